"""Exact ILP allocation on SciPy's HiGHS (``scipy.optimize.milp``).

One binary per (layer, w_bits, a_bits) combination, one-hot per layer, so BitOps (a product of
weight and activation bits) stays linear. Objective: Σ w_score(ℓ, w_bits) + α·a_score(ℓ, a_bits).
Every budget metric is a linear row built from the shared ledger; ``act-mem`` (a maximum) becomes
one row per layer. Time-limited; the MIP gap and dual bound are reported.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from ..budget import format_budget_value
from ..errors import InfeasibleBudgetError
from .problem import Allocation, Choice, Solution

Scores = Mapping[str, Mapping[int, float]]


def solve_ilp(problem: Allocation, w_scores: Scores, a_scores: Scores | None = None, alpha: float = 1.0,
              time_limit: float = 60.0) -> Solution:
    """Minimise total sensitivity under the problem's constraints; raises InfeasibleBudgetError."""
    problem.check_feasible()
    t0 = time.perf_counter()
    choices = problem.choices()
    layers = problem.layers
    nc = len(choices)
    nvar = len(layers) * nc
    col = {(f, ch): i * nc + k for i, f in enumerate(layers) for k, ch in enumerate(choices)}
    c = np.zeros(nvar)
    for (f, (wb, ab)), j in col.items():
        c[j] = float(w_scores[f][wb])
        if a_scores is not None and len(problem.a_bits) > 1:
            c[j] += alpha * float(a_scores[f][ab])

    rows, lo, hi = [], [], []
    fixed = problem.fixed
    ledger = problem.ledger
    for f in layers:  # one-hot per layer
        rows.append({col[(f, ch)]: 1.0 for ch in choices})
        lo.append(1.0)
        hi.append(1.0)
    for con in problem.constraints:
        per_layer = con.metric == "act-mem"
        groups = [[f] for f in layers] if per_layer else [layers]
        rest = 0.0 if per_layer else ledger.constant(con.metric) + sum(
            ledger.layer_cost(con.metric, f, *b) for f, b in fixed.items())
        for group in groups:
            row = {col[(f, ch)]: ledger.layer_cost(con.metric, f, *ch) / con.limit for f in group for ch in choices}
            rows.append(row)
            lo.append(-np.inf)
            hi.append((con.limit - rest) / con.limit)
    if len(problem.a_bits) > 1:  # tied layers share activation bits
        searched = set(layers)
        for group in problem.tie_groups:
            members = [f for f in group if f in searched]
            for other in members[1:]:
                for ab in problem.a_bits:
                    row = {col[(members[0], ch)]: 1.0 for ch in choices if ch[1] == ab}
                    for ch in choices:
                        if ch[1] == ab:
                            row[col[(other, ch)]] = -1.0
                    rows.append(row)
                    lo.append(0.0)
                    hi.append(0.0)

    A = lil_matrix((len(rows), nvar))
    for r, row in enumerate(rows):
        for j, v in row.items():
            A[r, j] = v
    slack = 0.0
    for _ in range(3):  # retighten if HiGHS' feasibility tolerance lets a row exceed its budget
        budget_rows = np.isinf(np.array(lo))  # rows of the form "cost <= limit"
        hi_arr = np.array(hi) - slack * budget_rows
        res = milp(c, constraints=LinearConstraint(A.tocsr(), np.array(lo), hi_arr), integrality=np.ones(nvar),
                   bounds=Bounds(0, 1), options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
        if res.x is None:
            break
        assignment: dict[str, Choice] = {}
        for f in layers:
            k = int(np.argmax([res.x[col[(f, ch)]] for ch in choices]))
            assignment[f] = choices[k]
        if not problem.violations(assignment):
            break
        slack = 1e-6 if slack == 0 else slack * 10
    if res.x is None:
        raise InfeasibleBudgetError(_joint_infeasible_message(problem, res.message))
    if problem.violations(assignment):
        raise InfeasibleBudgetError("the solver's plan violates the budget: " + "; ".join(problem.violations(assignment)))
    objective = float(sum(c[col[(f, ch)]] for f, ch in assignment.items()))
    status = {0: "optimal", 1: "time limit (best feasible)"}.get(res.status, res.message)
    gap = getattr(res, "mip_gap", None)
    bound = getattr(res, "mip_dual_bound", None)
    return Solution(assignment, objective, "ilp-highs", status, time.perf_counter() - t0,
                    gap=float(gap) if gap is not None else None, bound=float(bound) if bound is not None else None,
                    info={"variables": nvar, "rows": len(rows)})


def _joint_infeasible_message(problem: Allocation, reason: str) -> str:
    parts = []
    for con in problem.constraints:
        lo = problem.ledger.extreme(con.metric, problem.choice_map(), problem.fixed)
        from ..budget import format_budget_value

        parts.append(f"'{con.text}' alone is feasible down to {format_budget_value(con, lo, problem.ledger)}")
    extra = " (tie groups force shared activation bits)" if problem.tie_groups and len(problem.a_bits) > 1 else ""
    return ("infeasible budget: the constraints cannot all hold together" + extra + "; " + "; ".join(parts)
            + f" [HiGHS: {reason}]")
