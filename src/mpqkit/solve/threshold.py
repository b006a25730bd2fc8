"""Threshold rule (MixQuant): per layer the smallest bits whose score ≤ QEM; QEM bisected to a budget."""
from __future__ import annotations

import math
import time
from typing import Mapping

from ..errors import InfeasibleBudgetError
from .problem import Allocation, Solution


def assign(problem: Allocation, scores: Mapping[str, Mapping[int, float]], qem: float) -> dict:
    """Smallest candidate bits with score ≤ qem per layer (the largest candidate if none is)."""
    a_bits = problem.a_bits[0] if len(problem.a_bits) == 1 else max(b for b in problem.a_bits if b is not None)
    out = {}
    for f in problem.layers:
        ok = [b for b in sorted(problem.w_bits) if scores[f][b] <= qem]
        out[f] = (ok[0] if ok else max(problem.w_bits), a_bits)
    return out


def solve_threshold(problem: Allocation, scores: Mapping[str, Mapping[int, float]], qem: float | None = None,
                    iterations: int = 60) -> Solution:
    """With ``qem``: the rule as is (must meet the budget). Without: bisect log(QEM) for the smallest
    QEM (most bits) whose plan meets the budget."""
    t0 = time.perf_counter()
    if qem is not None:
        asg = assign(problem, scores, qem)
        bad = problem.violations(asg)
        if bad:
            raise InfeasibleBudgetError(f"QEM={qem:g} gives a plan over budget ({'; '.join(bad)}); "
                                        f"raise --qem or drop it to let the budget choose QEM")
        return Solution(asg, 0.0, "threshold", "rule", time.perf_counter() - t0, info={"qem": qem})
    if not problem.constraints:
        raise InfeasibleBudgetError("mixquant needs --qem or a --budget")
    problem.check_feasible()
    values = sorted({v for s in scores.values() for v in s.values() if v > 0})
    lo, hi = math.log(max(values[0], 1e-300)) - 1, math.log(values[-1]) + 1  # hi: every layer at min bits
    if problem.violations(assign(problem, scores, math.exp(hi))):
        raise InfeasibleBudgetError("the budget is below the plan with every layer at its smallest bits")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if problem.violations(assign(problem, scores, math.exp(mid))):
            lo = mid
        else:
            hi = mid
    qem_found = math.exp(hi)
    return Solution(assign(problem, scores, qem_found), 0.0, "threshold", "bisected QEM", time.perf_counter() - t0,
                    info={"qem": qem_found})
