"""The solvers a method can name in its registry entry: table + request → ``Solution``.

The generic adapters (the shared ILP, uniform bits, a plan the method decided) read only typed fields of
the table (``w``, ``a``, ``decision``); a solver that needs a method's own options (MixQuant's
threshold, the supernet's selection, greedy's Pareto choice) lives beside that method's options class
and reads them typed. The solving itself lives in ``mpqkit.solve``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BudgetError
from ..solve import Solution, solve_ilp, solve_uniform

if TYPE_CHECKING:  # types only: base never imports this module (the registry does)
    from .base import Decision, SensitivityTable, SolveRequest


def need_table(req: "SolveRequest") -> "SensitivityTable":
    if req.table is None:
        raise RuntimeError("this solver needs the method's sensitivity table")
    return req.table


def need_decision(req: "SolveRequest") -> "Decision":
    """The deciding method's ``Decision`` (a method registered with ``decides=True`` returns one)."""
    table = need_table(req)
    if table.decision is None:
        raise RuntimeError(f"method '{req.method}' gave no Decision for its solver")
    return table.decision


def need_budget(req: "SolveRequest") -> None:
    if not req.has_budget:
        raise BudgetError(f"method '{req.method}' needs a --budget (e.g. avg-bits=4)")


def ilp(req: "SolveRequest") -> Solution:
    """The shared ILP on the table's weight (and, when searched, activation) scores."""
    table = need_table(req)
    need_budget(req)
    p = req.problem
    zeros = {f: {b: 0.0 for b in p.w_bits} for f in p.layers}
    return solve_ilp(p, table.w_bounded if "w" in req.search else zeros, table.a if "a" in req.search else None,
                     alpha=req.alpha, time_limit=req.time_limit)


def uniform(req: "SolveRequest") -> Solution:
    if req.w_bits is None and not req.has_budget:
        raise BudgetError("uniform needs --w-bits (and optionally --a-bits) or a --budget")
    a_bits = req.a_bits if req.a_bits is not None else (8 if "a" not in req.search else None)
    return solve_uniform(req.problem, req.w_bits, a_bits)


def chosen(req: "SolveRequest") -> Solution:
    """The plan the method decided itself (its ``Decision.assignment``), checked against the budget."""
    dec = need_decision(req)
    if dec.assignment is None:
        raise RuntimeError("this method must decide a plan (Decision.assignment)")
    bad = req.problem.violations(dec.assignment)
    if bad:
        raise RuntimeError(f"the method's own plan breaks the budget: {bad}")
    # timings stay in the table (results directory), not in the plan: same inputs, same plan bytes
    trials = [{k: v for k, v in t.items() if k != "seconds"} for t in dec.trials or []]
    return Solution(dict(dec.assignment), None, "chosen", "chosen by the method", 0.0,
                    info={"trials": trials})
