"""Uniform allocation: every searched layer at the same bits (the baseline every method must beat)."""
from __future__ import annotations

import time

from ..errors import InfeasibleBudgetError
from .problem import Allocation, Solution


def solve_uniform(problem: Allocation, w_bits: int | None = None, a_bits: int | None = None) -> Solution:
    """Given bits are used as they are; otherwise the largest candidate bits meeting the budget."""
    t0 = time.perf_counter()
    w_opts = [w_bits] if w_bits is not None else sorted(problem.w_bits, reverse=True)
    a_opts = [a_bits] if a_bits is not None else sorted(problem.a_bits, key=lambda b: -(b or 99))
    tried = []
    for wb in w_opts:
        for ab in a_opts:
            assignment = {f: (wb, ab) for f in problem.layers}
            bad = problem.violations(assignment)
            if not bad:
                return Solution(assignment, 0.0, "uniform", "ok", time.perf_counter() - t0,
                                info={"w_bits": wb, "a_bits": ab})
            tried.append(f"W{wb}A{ab}: " + "; ".join(bad))
    if w_bits is not None and a_bits is not None:
        raise InfeasibleBudgetError(f"uniform W{w_bits}A{a_bits} does not meet the budget: " + "; ".join(bad))
    problem.check_feasible()
    raise InfeasibleBudgetError("no uniform bit-width meets the budget (" + " | ".join(tried[-3:]) + ")")
