"""Exact ILP allocation on SciPy's HiGHS (``scipy.optimize.milp``).

One binary per (layer, w_bits, a_bits) combination, one-hot per layer, so BitOps (a product of
weight and activation bits) stays linear. Objective: Σ w_score(ℓ, w_bits) + α·a_score(ℓ, a_bits).
Every budget metric is a linear row built from the shared ledger; ``act-mem`` (a maximum) becomes
one row per layer. Time-limited; the MIP gap and dual bound are reported. ``MilpModel`` holds
those rows so other solvers (the IQP's linearisation) add their own columns and rows to it.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp
from scipy.sparse import coo_matrix

from ..budget import format_budget_value
from ..errors import InfeasibleBudgetError
from .problem import TIME_LIMIT, Allocation, Choice, Solution

Scores = Mapping[str, Mapping[int, float]]


class MilpModel:
    """The assignment rows every allocation MILP shares: one-hot per layer, budgets, tie groups."""

    def __init__(self, problem: Allocation):
        self.problem = problem
        self.choices = problem.choices()
        self.layers = problem.layers
        nc = len(self.choices)
        self.col = {(f, ch): i * nc + k for i, f in enumerate(self.layers) for k, ch in enumerate(self.choices)}
        self.n_binary = self.n_cols = len(self.layers) * nc
        self.rows: list[dict[int, float]] = []
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.budget_row: list[bool] = []
        for f in self.layers:
            self.add_row({self.col[(f, ch)]: 1.0 for ch in self.choices}, 1.0, 1.0)
        ledger, fixed = problem.ledger, problem.fixed
        for con in problem.constraints:
            per_layer = con.metric == "act-mem"
            groups = [[f] for f in self.layers] if per_layer else [self.layers]
            rest = 0.0 if per_layer else ledger.constant(con.metric) + sum(
                ledger.layer_cost(con.metric, f, *b) for f, b in fixed.items())
            for group in groups:  # rows scaled by the limit, so HiGHS' tolerances are relative
                row = {self.col[(f, ch)]: ledger.layer_cost(con.metric, f, *ch) / con.limit
                       for f in group for ch in self.choices}
                self.add_row(row, -np.inf, (con.limit - rest) / con.limit, budget=True)
        if len(problem.a_bits) > 1:  # tied layers share activation bits
            searched = set(self.layers)
            for group in problem.tie_groups:
                members = [f for f in group if f in searched]
                for other in members[1:]:
                    for ab in problem.a_bits:
                        row = {self.col[(members[0], ch)]: 1.0 for ch in self.choices if ch[1] == ab}
                        row.update({self.col[(other, ch)]: -1.0 for ch in self.choices if ch[1] == ab})
                        self.add_row(row, 0.0, 0.0)

    def add_columns(self, n: int) -> int:
        """Append ``n`` continuous columns in [0, 1]; returns the index of the first."""
        start = self.n_cols
        self.n_cols += n
        return start

    def add_row(self, row: dict[int, float], lo: float, hi: float, budget: bool = False) -> None:
        self.rows.append(row)
        self.lo.append(lo)
        self.hi.append(hi)
        self.budget_row.append(budget)

    def budget_rows(self) -> list[tuple[dict[int, float], float, bool]]:
        """(row, upper limit, network-wide) of every budget row; not network-wide = a per-layer
        limit (act-mem), whose row touches one layer only."""
        K = len(self.choices)
        return [(row, hi, len({j // K for j in row}) > 1)
                for row, hi, is_budget in zip(self.rows, self.hi, self.budget_row) if is_budget]

    def budget_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The budget rows as dense arrays over (layer, choice): costs[r, ℓ, k] (scaled by the limit,
        as in the rows) and limits[r] of the network-wide rows, and allowed[ℓ, k], False where a
        per-layer row (act-mem) excludes that choice. Plan a meets the budget iff
        Σ_ℓ costs[r, ℓ, a_ℓ] ≤ limits[r] for every r and allowed[ℓ, a_ℓ]."""
        L, K = len(self.layers), len(self.choices)
        costs, limits = [], []
        allowed = np.ones((L, K), dtype=bool)
        for row, hi, network in self.budget_rows():
            arr = np.zeros((L, K))
            for j, v in row.items():
                arr[j // K, j % K] = v
            if network:
                costs.append(arr)
                limits.append(hi)
            else:  # a per-layer limit: exclude the choices that break it
                layer = next(iter(row)) // K
                allowed[layer] &= arr[layer] <= hi * (1 + 1e-12)
        return (np.array(costs) if costs else np.zeros((0, L, K)), np.array(limits) if limits else np.zeros(0),
                allowed)

    def decode(self, x: np.ndarray) -> dict[str, Choice]:
        return {f: self.choices[int(np.argmax([x[self.col[(f, ch)]] for ch in self.choices]))] for f in self.layers}

    def solve(self, c: np.ndarray, time_limit: float) -> tuple[dict[str, Choice] | None, OptimizeResult]:
        """Solve; retighten the budget rows if HiGHS' feasibility tolerance lets the rounded plan
        exceed a budget, so the plan always meets it exactly as the ledger counts it."""
        r_idx = [r for r, row in enumerate(self.rows) for _ in row]
        c_idx = [j for row in self.rows for j in row]
        vals = [v for row in self.rows for v in row.values()]
        A = coo_matrix((vals, (r_idx, c_idx)), shape=(len(self.rows), self.n_cols)).tocsr()
        integrality = np.r_[np.ones(self.n_binary), np.zeros(self.n_cols - self.n_binary)]
        slack, assignment = 0.0, None
        for _ in range(3):
            hi = np.array(self.hi) - slack * np.array(self.budget_row)
            res = milp(c, constraints=LinearConstraint(A, np.array(self.lo), hi), integrality=integrality,
                       bounds=Bounds(0, 1), options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
            if res.x is None:
                return None, res
            assignment = self.decode(res.x)
            if not self.problem.violations(assignment):
                return assignment, res
            slack = 1e-6 if slack == 0 else slack * 10
        raise InfeasibleBudgetError("the solver's plan violates the budget: "
                                    + "; ".join(self.problem.violations(assignment or {})))


def milp_status(res: OptimizeResult) -> tuple[str, float | None, float | None]:
    status = {0: "optimal", 1: "time limit (best feasible)"}.get(res.status, res.message)
    gap = getattr(res, "mip_gap", None)
    bound = getattr(res, "mip_dual_bound", None)
    return status, (float(gap) if gap is not None else None), (float(bound) if bound is not None else None)


def solve_ilp(problem: Allocation, w_scores: Scores, a_scores: Scores | None = None, alpha: float = 1.0,
              time_limit: float = TIME_LIMIT, min_fill: float | None = None) -> Solution:
    """Minimise total sensitivity under the problem's constraints; raises InfeasibleBudgetError.
    ``min_fill`` f: the plan must also spend at least f × each network-wide budget (plans of equal
    size when the scores alone do not reward more bits); without a plan that does, no floor."""
    problem.check_feasible()
    t0 = time.perf_counter()

    def build(floor: float | None) -> tuple[MilpModel, np.ndarray]:
        model = MilpModel(problem)
        if floor is not None:
            for row, hi, network in model.budget_rows():
                if network:
                    model.add_row(row, floor * hi, np.inf)
        c = np.zeros(model.n_cols)
        for (f, (wb, ab)), j in model.col.items():
            c[j] = float(w_scores[f][wb])
            if a_scores is not None and len(problem.a_bits) > 1:
                c[j] += alpha * float(a_scores[f][ab])
        return model, c

    model, c = build(min_fill)
    assignment, res = model.solve(c, time_limit)
    floored = min_fill is not None and assignment is not None
    if assignment is None and min_fill is not None:
        model, c = build(None)
        assignment, res = model.solve(c, time_limit)
    if assignment is None:
        raise InfeasibleBudgetError(joint_infeasible_message(problem, res.message))
    objective = float(sum(c[model.col[(f, ch)]] for f, ch in assignment.items()))
    status, gap, bound = milp_status(res)
    info = {"variables": model.n_cols, "rows": len(model.rows)}
    if min_fill is not None:
        info["min_fill"] = min_fill if floored else None
    return Solution(assignment, objective, "ilp-highs", status, time.perf_counter() - t0, gap=gap, bound=bound,
                    info=info)


def joint_infeasible_message(problem: Allocation, reason: str) -> str:
    parts = []
    for con in problem.constraints:
        lo = problem.ledger.extreme(con.metric, problem.choice_map(), problem.fixed)
        parts.append(f"'{con.text}' alone is feasible down to {format_budget_value(con, lo, problem.ledger)}")
    extra = " (tie groups force shared activation bits)" if problem.tie_groups and len(problem.a_bits) > 1 else ""
    return ("infeasible budget: the constraints cannot all hold together" + extra + "; " + "; ".join(parts)
            + f" [HiGHS: {reason}]")
