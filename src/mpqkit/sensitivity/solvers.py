"""The solvers a method can name in its registry entry: table + request → ``Solution``.

Each adapter reads only typed fields of the table (``w``, ``a``, ``argmax_bits``, ``pareto``)
and of the method's options; the solving itself lives in ``mpqkit.solve``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BudgetError
from ..solve import Solution, solve_greedy, solve_ilp, solve_supernet, solve_threshold, solve_uniform

if TYPE_CHECKING:  # types only: base never imports this module (the registry does)
    from .base import SensitivityTable, SolveRequest


def _need_table(req: "SolveRequest") -> "SensitivityTable":
    if req.table is None:
        raise RuntimeError("this solver needs the method's sensitivity table")
    return req.table


def need_budget(req: "SolveRequest") -> None:
    if not req.has_budget:
        raise BudgetError(f"method '{req.method}' needs a --budget (e.g. avg-bits=4)")


def ilp(req: "SolveRequest") -> Solution:
    """The shared ILP on the table's weight (and, when searched, activation) scores."""
    table = _need_table(req)
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


def threshold(req: "SolveRequest") -> Solution:
    """MixQuant's rule: ``options.qem`` as given, else bisected to the budget."""
    table = _need_table(req)
    qem = getattr(req.options, "qem", None)
    if qem is None and not req.has_budget:
        raise BudgetError("method 'mixquant' needs --qem or a --budget")
    return solve_threshold(req.problem, table.w, qem)


def supernet(req: "SolveRequest") -> Solution:
    """Argmax of the method's α when it fits, else the ILP on its costs (``options.select``)."""
    table = _need_table(req)
    if table.argmax_bits is None:
        raise RuntimeError("a supernet method must fill SensitivityTable.argmax_bits")
    return solve_supernet(req.problem, table.argmax_bits, table.w, req.time_limit,
                          select=getattr(req.options, "select", "argmax"))


def chosen(req: "SolveRequest") -> Solution:
    """The plan the method decided itself (``table.assignment``), checked against the budget."""
    table = _need_table(req)
    if table.assignment is None:
        raise RuntimeError("this method must fill SensitivityTable.assignment")
    bad = req.problem.violations(table.assignment)
    if bad:
        raise RuntimeError(f"the method's own plan breaks the budget: {bad}")
    # timings stay in the table (results directory), not in the plan: same inputs, same plan bytes
    trials = [{k: v for k, v in t.items() if k != "seconds"} for t in table.trials or []]
    return Solution(dict(table.assignment), None, "chosen", "chosen by the method", 0.0,
                    info={"trials": trials})


def greedy(req: "SolveRequest") -> Solution:
    table = _need_table(req)
    if table.pareto is None:
        raise RuntimeError("the greedy method must fill SensitivityTable.pareto")
    return solve_greedy(req.problem, table.pareto, getattr(req.options, "max_drop", 1.0))

