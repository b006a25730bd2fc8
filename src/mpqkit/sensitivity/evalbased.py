"""eval-delta: measured single-layer loss increase ΔL(ℓ, b) for every (layer, bits), + ILP.

The MQBench "naive" / AIMET-AMP phase-1 baseline and CLADO's diagonal: quantize one layer's
weights (or, separately, its input activations) to b bits, all else fp32, and measure the loss
change on the sensitivity set through the shared probe engine.
"""
from __future__ import annotations

from .base import SearchContext, SensitivityTable
from .registry import METHODS
from ..engine.runners import ProbeJob, dispatch_options
from .options import RunnerOptions


@METHODS.register("eval-delta", "single-layer Δloss probes for every (layer, bits) + ILP", options=RunnerOptions)
def eval_delta(ctx: SearchContext) -> SensitivityTable:
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
    by_layer: dict[str, list] = {}
    for p in probes:
        by_layer.setdefault(next(iter(p)), []).append(p)
    dispatch_options(engine, ctx.options, lambda: [ProbeJob(ps) for ps in by_layer.values()])
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
