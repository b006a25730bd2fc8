"""Greedy accuracy-target search (AIMET AMP style): a measured Pareto list, then a pick from it.

Phase 1: the single-layer probes of eval-delta (shared engine, shared cache) give ΔL(ℓ, b).
Phase 2: from every searched layer at its largest candidate, repeatedly take the one-step-down move
(ℓ: b → next lower b') with the least loss increase per byte saved, ΔL(ℓ,b') − ΔL(ℓ,b) over
size(ℓ,b) − size(ℓ,b'); after each move the *combined* configuration is measured through the
engine (loss and top-1 on the calibration set). The whole list, down to every layer at its
smallest bits, is the Pareto list (``Decision.pareto``); ``solve/greedy.py`` picks from it.
With a budget and ``RunSettings.prune`` (default), only the points that meet the budget are measured
(the solver picks the most accurate of those); the others stay in the list unmeasured (``measured``
False, no loss or top-1): the same pick, fewer probes.
"""
from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

from ..budget import Ledger
from ..solve import Solution, solve_greedy
from .base import Decision, SearchContext, SensitivityTable, SolveRequest
from .evalbased import eval_delta
from .gradients import require_weight_search
from .options import MethodOptions, RunnerOptions, option, positive
from .registry import METHODS
from .solvers import need_decision


@dataclass(frozen=True)
class GreedyOptions(MethodOptions):
    max_drop: float = option(1.0, help="greedy: accuracy drop target, points on the calibration set (default 1.0)")

    def __post_init__(self) -> None:
        positive("max_drop", self.max_drop, "greedy", allow_zero=True)


def greedy_solver(req: SolveRequest) -> Solution:
    """The configuration of the measured Pareto list that meets the budget (or ``--max-drop``)."""
    dec = need_decision(req)
    opts = req.options
    assert isinstance(opts, GreedyOptions)
    if dec.pareto is None:
        raise RuntimeError("the greedy method must give its Pareto list (Decision.pareto)")
    return solve_greedy(req.problem, dec.pareto, opts.max_drop)


@METHODS.register("greedy", "lower the least sensitive layers while the measured accuracy drop ≤ --max-drop "
                  "(whole Pareto list)", solver=greedy_solver, options=GreedyOptions, decides=True)
def greedy(ctx: SearchContext) -> SensitivityTable:
    require_weight_search(ctx, "greedy")
    engine, ledger = ctx.engine, Ledger(ctx.graph, ctx.searched)  # built first: phase 1 shares it
    table = eval_delta(dataclasses.replace(ctx, options=RunnerOptions()), complete=True)
    bits = sorted(ctx.w_bits, reverse=True)
    config = {f: bits[0] for f in ctx.searched}

    def move(f: str):
        i = bits.index(config[f])
        if i + 1 == len(bits):
            return None
        lo = bits[i + 1]
        saved = ledger.layer_cost("size", f, config[f], None) - ledger.layer_cost("size", f, lo, None)
        return ((table.w[f][lo] - table.w[f][config[f]]) / max(saved, 1e-12), f, lo)

    heap = [m for f in ctx.searched if (m := move(f)) is not None]
    heapq.heapify(heap)
    order = []
    while heap:
        _, f, lo = heapq.heappop(heap)
        config[f] = lo
        order.append((f, lo, dict(config)))
        if (m := move(f)) is not None:
            heapq.heappush(heap, m)
    start = {f: bits[0] for f in ctx.searched}
    configs = [start] + [c for _, _, c in order]
    wanted = _wanted(ctx, configs)
    measured = engine.run([{f: (b, None) for f, b in configs[i].items()} for i in wanted], desc="greedy Pareto list")
    results = dict(zip(wanted, measured))
    fp = engine.fp
    pareto = []
    for i, c in enumerate(configs):
        full = {f: (b, None) for f, b in c.items()}
        r = results.get(i)
        pareto.append({"step": i, "moved": None if i == 0 else f"{order[i - 1][0]}@{order[i - 1][1]}",
                       "bits": dict(c), "measured": r is not None, "loss": r.loss if r else None,
                       "top1": r.top1 if r else None, "drop_pct": 100 * (fp.top1 - r.top1) if r else None,
                       "avg_w_bits": ledger.value("avg-bits", full), "searched_bytes": ledger.value("size", full)})
    table.decision = Decision(pareto=pareto)
    table.for_budget = len(wanted) < len(configs)
    table.meta.update({"score": "delta loss (phase 1); measured Pareto list (phase 2)", "fp_top1": fp.top1,
                       "pareto_measured": len(wanted)})
    return table


def _wanted(ctx: SearchContext, configs: list[dict[str, int]]) -> list[int]:
    """Indices of the Pareto points to measure: all of them, or with a budget and pruning on, those
    that meet the budget (the solver never picks another)."""
    problem = ctx.problem
    if not (ctx.settings is not None and ctx.settings.prune and problem is not None and problem.constraints):
        return list(range(len(configs)))
    a_bits = problem.a_bits[0]
    return [i for i, c in enumerate(configs) if not problem.violations({f: (b, a_bits) for f, b in c.items()})]
