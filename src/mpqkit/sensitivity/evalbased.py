"""eval-delta: measured single-layer loss increase ΔL(ℓ, b) for every (layer, bits), + ILP.

The MQBench "naive" / AIMET-AMP phase-1 baseline and CLADO's diagonal: quantize one layer's
weights (or, separately, its input activations) to b bits, all else fp32, and measure the loss
change on the sensitivity set through the shared probe engine.

Pruning (``RunSettings.prune``, on by default; weight search under a budget with the KL objective):
a KL divergence is never below 0, so 0 bounds every unmeasured ΔL(ℓ, b) from below. The candidates
are measured lazily: the two lowest bits of every layer first, then, round by round, only the
candidates the ILP on (measured scores, 0 for the rest) chooses, until its plan uses measured
candidates alone. That plan's true total equals its bounded total, which no plan's true total
undercuts, so it is the plan of the full table (up to exact ties); the skipped candidates are
recorded in ``SensitivityTable.pruned`` with their bound.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from ..engine.runners import ProbeJob, dispatch_options
from ..solve import solve_ilp
from ..solve.problem import TIME_LIMIT
from .base import SearchContext, SensitivityTable
from .options import RunnerOptions
from .registry import METHODS


@METHODS.register("eval-delta", "single-layer Δloss probes for every (layer, bits) + ILP", options=RunnerOptions)
def eval_delta(ctx: SearchContext, complete: bool = False) -> SensitivityTable:
    """The ΔL table (``complete``: every candidate, never pruned, e.g. for greedy's move order)."""
    if not complete and prunable(ctx):
        return _lazy(ctx)
    engine = ctx.engine
    probes, index = [], []
    if ctx.search_w:
        for f in ctx.searched:
            for b in ctx.w_bits:
                probes.append({f: (b, None)})
                index.append(("w", f, b))
    if ctx.search_a:
        for f in ctx.searched:
            for b in ctx.a_bits:
                if b is not None:
                    probes.append({f: (None, b)})
                    index.append(("a", f, b))
    dispatch_options(engine, ctx.options, lambda: _layer_jobs(probes))
    results = engine.run(probes, desc="eval-delta probes")
    w: dict[str, dict[int, float]] = {}
    a: dict[str, dict[int, float]] = {}
    dtop1: dict[str, dict[str, float]] = {}
    for (side, f, b), r in zip(index, results):
        (w if side == "w" else a).setdefault(f, {})[b] = r.loss - engine.fp.loss
        dtop1.setdefault(side, {})[f"{f}@{b}"] = r.top1 - engine.fp.top1
    return SensitivityTable(w=w, a=a, meta={"score": f"delta loss ({engine.objective})", "fp_loss": engine.fp.loss,
                                           "fp_top1": engine.fp.top1, "delta_top1": dtop1,
                                           "probes": len(probes)})


def _layer_jobs(probes: list[dict]) -> list[ProbeJob]:
    """One runner job per layer (its probes share their start)."""
    by_layer: dict[str, list] = {}
    for p in probes:
        by_layer.setdefault(next(iter(p)), []).append(p)
    return [ProbeJob(ps) for ps in by_layer.values()]


def prunable(ctx: SearchContext) -> bool:
    """Whether eval-delta may skip candidates: pruning on, weights only, a budget, scores bounded by 0."""
    return (ctx.settings is not None and ctx.settings.prune and ctx.search_w and not ctx.search_a and ctx.problem is not None
            and bool(ctx.problem.constraints) and len(ctx.w_bits) > 2 and ctx.engine.objective == "kl")


def _lazy(ctx: SearchContext) -> SensitivityTable:
    """eval-delta measuring only what the budget's ILP plan can choose (module docstring)."""

    engine, problem = ctx.engine, ctx.problem
    w: dict[str, dict[int, float]] = {f: {} for f in ctx.searched}
    dtop1: dict[str, float] = {}
    todo = [(f, b) for f in ctx.searched for b in sorted(ctx.w_bits)[:2]]
    rounds = 0
    while todo:
        rounds += 1
        _measure_w(ctx, todo, w, dtop1)
        bound = _bound(w)
        scores = {f: {b: w[f].get(b, bound) for b in ctx.w_bits} for f in ctx.searched}
        sol = solve_ilp(problem, scores, time_limit=ctx.settings.time_limit if ctx.settings is not None else TIME_LIMIT)
        if sol.status != "optimal":  # the argument needs the optimum: measure the rest
            todo = [(f, b) for f in ctx.searched for b in ctx.w_bits if b not in w[f]]
            continue
        todo = list(dict.fromkeys((f, sol.assignment[f][0]) for f in ctx.searched
                                  if sol.assignment[f][0] not in w[f]))
    bound = _bound(w)
    pruned = {f: {b: bound for b in ctx.w_bits if b not in w[f]} for f in ctx.searched}
    pruned = {f: v for f, v in pruned.items() if v}
    measured = sum(len(v) for v in w.values())
    return SensitivityTable(w=w, pruned=pruned, for_budget=True,
                            meta={"score": f"delta loss ({engine.objective})", "fp_loss": engine.fp.loss,
                                  "fp_top1": engine.fp.top1, "delta_top1": {"w": dtop1}, "probes": measured,
                                  "pruned": sum(len(v) for v in pruned.values()), "prune_rounds": rounds})


def _measure_w(ctx: SearchContext, todo: list[tuple[str, int]], w: dict[str, dict[int, float]],
               dtop1: dict[str, float], dispatch: bool = True) -> None:
    """Measure the single-layer weight probes ``todo`` ((layer, bits) pairs) into ``w`` (ΔL) and
    ``dtop1`` (Δtop-1, keyed ``layer@bits``); ``dispatch``: through the method's runner options."""
    engine = ctx.engine
    probes = [{f: (b, None)} for f, b in todo]
    if dispatch:
        dispatch_options(engine, ctx.options, lambda: _layer_jobs(probes))
    for (f, b), r in zip(todo, engine.run(probes, desc="eval-delta probes", show=None if dispatch else False)):
        w.setdefault(f, {})[b] = r.loss - engine.fp.loss
        dtop1[f"{f}@{b}"] = r.top1 - engine.fp.top1


def _bound(w: Mapping[str, Mapping[int, float]]) -> float:
    """The lower bound of an unmeasured ΔL under KL: 0, or the lowest measured value when float
    rounding left one a hair below 0."""
    return min([0.0, *(v for scores in w.values() for v in scores.values())])


class MeasuredScores(Mapping):
    """A table's weight scores that measure a pruned (layer, bits) single probe when it is read:
    what a consumer that walks away from the table's plan (refinement) reads is then the full
    table's value. Measured values are added to ``table.w`` (and leave ``table.pruned``)."""

    def __init__(self, ctx: SearchContext, table: SensitivityTable) -> None:
        self.ctx, self.table = ctx, table

    def __getitem__(self, f: str) -> Mapping[int, float]:
        if f not in self.table.w and f not in self.table.pruned:
            raise KeyError(f)
        return _LayerScores(self, f)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self.table.w, *self.table.pruned]))

    def __len__(self) -> int:
        return len(list(iter(self)))

    def measure(self, f: str, b: int) -> float:
        """Measure one pruned candidate into the table (no runner dispatch: the context may be auto's)."""
        dtop1 = self.table.meta.setdefault("delta_top1", {}).setdefault("w", {})
        _measure_w(self.ctx, [(f, b)], self.table.w, dtop1, dispatch=False)
        self.table.pruned.get(f, {}).pop(b, None)
        if f in self.table.pruned and not self.table.pruned[f]:
            del self.table.pruned[f]
        self.table.meta["pruned"] = sum(len(v) for v in self.table.pruned.values())
        self.table.meta["probes"] = self.table.meta.get("probes", 0) + 1
        return self.table.w[f][b]


class _LayerScores(Mapping):
    def __init__(self, parent: MeasuredScores, f: str) -> None:
        self.parent, self.f = parent, f

    def _known(self) -> dict[int, Any]:
        t = self.parent.table
        return {**t.pruned.get(self.f, {}), **t.w.get(self.f, {})}

    def __getitem__(self, b: int) -> float:
        t = self.parent.table
        if b in t.w.get(self.f, {}):
            return t.w[self.f][b]
        if b in t.pruned.get(self.f, {}):
            return self.parent.measure(self.f, b)
        raise KeyError(b)

    def __iter__(self) -> Iterator[int]:
        return iter(self._known())

    def __len__(self) -> int:
        return len(self._known())


def refine_scores(ctx: SearchContext, table: SensitivityTable | None) -> Mapping[str, Mapping[int, float]] | None:
    """The weight scores refinement orders its moves by: the table's, measuring pruned ones on read."""
    if table is None:
        return None
    return MeasuredScores(ctx, table) if table.pruned else table.w
