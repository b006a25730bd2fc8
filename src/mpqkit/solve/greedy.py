"""Pick a plan from a greedy Pareto list (``sensitivity/greedy.py``).

Without a budget: the last (smallest) point whose measured accuracy drop ≤ ``max_drop`` points.
With a budget: the most accurate point that meets it (its drop is reported; a drop above
``max_drop`` is flagged in the status rather than refused, since the budget is the harder limit).
Points left unmeasured (``measured`` False: pruned, they do not meet the budget) are never picked.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from ..errors import InfeasibleBudgetError
from .problem import Allocation, Solution


def solve_greedy(problem: Allocation, pareto: Sequence[dict[str, Any]], max_drop: float = 1.0) -> Solution:
    t0 = time.perf_counter()
    a_bits = problem.a_bits[0]
    points = [(p, {f: (b, a_bits) for f, b in p["bits"].items()}) for p in pareto if p.get("measured", True)]
    if problem.constraints:
        ok = [(p, a) for p, a in points if not problem.violations(a)]
        if not ok:
            problem.check_feasible()
            raise InfeasibleBudgetError("no point of the greedy Pareto list meets the budget")
        p, a = max(ok, key=lambda pa: (pa[0]["top1"], -pa[0]["step"]))
        status = "within max-drop" if p["drop_pct"] <= max_drop else f"budget met, drop {p['drop_pct']:.2f} > max-drop"
    else:
        within = [(p, a) for p, a in points if p["drop_pct"] <= max_drop]
        if not within:
            raise InfeasibleBudgetError(f"even the largest bits drop {points[0][0]['drop_pct']:.2f} points on the "
                                        f"calibration set: raise --max-drop above that")
        p, a = within[-1]
        status = "within max-drop"
    return Solution(a, -p["top1"], "greedy", status, time.perf_counter() - t0,
                    info={"step": p["step"], "drop_pct": p["drop_pct"], "max_drop": max_drop,
                          "pareto_points": len(pareto)})
