"""Supernet methods' pick (SMPQ / DMPQ): per layer the method's argmax bits when that plan meets the
budget; otherwise the shared ILP on the method's costs (−log softmax of its α: the most probable plan
within the budget)."""
from __future__ import annotations

import time
from typing import Mapping

from .ilp import solve_ilp
from .problem import TIME_LIMIT, Allocation, Solution

FILL = 0.98  # select="ilp": the least share of each budget the plan spends


def solve_supernet(problem: Allocation, argmax_bits: Mapping[str, int], costs: Mapping[str, Mapping[int, float]],
                   time_limit: float = TIME_LIMIT, select: str = "argmax") -> Solution:
    """``select="argmax"`` (the papers' rule, docs/METHODS.md) or ``"ilp"``: always the ILP on the costs,
    spending at least ``FILL`` of the budget (the most probable plan of (nearly) the budget's size, for
    comparisons at equal size; without such a plan, the most probable one within the budget)."""
    t0 = time.perf_counter()
    a_bits = problem.a_bits[0]
    asg = {f: (int(argmax_bits[f]), a_bits) for f in problem.layers}
    if select == "argmax" and not problem.violations(asg):
        return Solution(asg, sum(costs[f][b] for f, (b, _) in asg.items()), "argmax", "argmax meets the budget",
                        time.perf_counter() - t0)
    sol = solve_ilp(problem, costs, None, time_limit=time_limit, min_fill=FILL if select == "ilp" else None)
    sol.info["argmax_over_budget"] = bool(problem.violations(asg))
    sol.info["select"] = select
    return sol
