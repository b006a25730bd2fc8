"""HAWQ-V2/V3: S(ℓ, b) = Tr(H_ℓ)/n_ℓ · ‖Ŵ_ℓ,b − W_ℓ‖², Hessian traces by Hutchinson's estimator, + ILP.

Tr(H_ℓ) = E_v[v_ℓᵀ H_ℓℓ v_ℓ] with Rademacher v_ℓ, one product per layer block (a joint v over all
layers is cheaper but its cross-layer terms swamp small traces). Each layer stops once its running mean changed by less than ``tol``
(relative) for ``patience`` iterations in a row, all at ``max_iter``. Layers whose double backward fails (an op without a second derivative on the
path) get a warning and fall back to the empirical Fisher trace E_n‖∇_W ℓ_n‖² (Gauss–Newton-like).
``curvature="fisher"`` measures the empirical Fisher trace E_n‖∇_W ℓ_n‖² for every layer instead (one
backward per image, no double backward); ``"auto"`` (default) does so on models with grouped or depthwise
convolutions, whose double backward is far slower on a CPU (docs/METHODS.md), and the table's
``meta["curvature"]`` says which was measured.
Options: ``hawq_samples`` (default 256 calibration images), ``max_iter`` (200), ``tol`` (1e-2), ``curvature``.
The traces are kept in the probe cache (``ProbeEngine.memo``), so a second search on the same draw
reads them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..profile import stage
from .base import SearchContext, SensitivityTable
from .gradients import (calib_chunks, chunk_size, grad_model, grad_pass_mb, loss_sum, require_weight_search,
                        weight_deltas)
from .options import MethodOptions, option, positive
from .registry import METHODS

log = logging.getLogger("mpqkit")


@dataclass(frozen=True)
class HawqOptions(MethodOptions):
    hawq_samples: int = option(256, help="hawq: calibration images in the Hessian products (default 256)")
    max_iter: int = option(200, flag="--hawq-iters", help="hawq: maximum Hutchinson iterations (default 200)")
    tol: float = option(1e-2, flag="--hawq-tol", help="hawq: stop a layer once its running mean changes by "
                        "less than this, relative (default 1e-2)")
    curvature: str = option("auto", flag="--hawq-curvature", choices=("auto", "hessian", "fisher"),
                            help="hawq: Hutchinson Hessian traces (hessian), the empirical Fisher trace "
                                 "E_n||grad l_n||^2 from per-sample gradients (fisher: one backward per image, no "
                                 "double backward), or auto (default): fisher for models with grouped or depthwise "
                                 "convolutions, whose double backward is far slower on a CPU, else hessian")

    def __post_init__(self) -> None:
        for name in ("hawq_samples", "max_iter", "tol"):
            positive(name, getattr(self, name), "hawq")


def _hv(model, params, names, chunks, n, vs):
    """Block-diagonal products H_ℓℓ v_ℓ for the named layers (mean loss over n samples): each layer's
    own Hessian block, so no cross-layer term adds variance. One forward / first backward per
    chunk is shared; raises if a layer's double backward fails."""
    out = {f: torch.zeros_like(params[f]) for f in names}
    for x, y in chunks:
        grads = torch.autograd.grad(loss_sum(model, x, y) / n, [params[f] for f in names], create_graph=True)
        for i, (f, g) in enumerate(zip(names, grads)):
            (h,) = torch.autograd.grad((g * vs[f]).sum(), params[f], allow_unused=True,
                                       retain_graph=i + 1 < len(names))
            if h is None:
                raise RuntimeError(f"no second derivative reaches {f}")
            out[f] += h
    return out


def _fisher_traces(model, params, names, ctx, n_samples: int) -> dict[str, float]:
    """Empirical Fisher trace E_n ‖∇_W ℓ_n‖² over the first ``n_samples`` calibration images (per-sample
    gradients, one backward per image): the Gauss–Newton-like stand-in for Tr(H) (at a well-fit model
    E[H] ≈ F, on the same scale as the Hessian of the mean loss)."""
    acc = {f: 0.0 for f in names}
    n = 0
    for x, y in calib_chunks(ctx, n_samples, chunk=1):
        grads = torch.autograd.grad(loss_sum(model, x, y), [params[f] for f in names])
        for f, g in zip(names, grads):
            acc[f] += float(g.pow(2).sum())
        n += 1
    return {f: v / max(n, 1) for f, v in acc.items()}


def has_grouped_conv(model: nn.Module) -> bool:
    """Whether the model has a grouped (e.g. depthwise) convolution."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def fisher_traces(ctx: SearchContext, n_samples: int) -> dict[str, float]:
    """Per searched layer, the empirical Fisher trace on the first ``n_samples`` calibration images."""
    model, params = grad_model(ctx)
    return _fisher_traces(model, params, list(params), ctx, min(n_samples, len(ctx.calib_images)))


HVP_CHUNK_ELEMENTS = 8 * 3 * 224 * 224  # input elements per Hessian-vector chunk (8 ImageNet images)


def hvp_chunk(images: Tensor) -> int:
    """Images per chunk of a Hessian-vector product: the double backward keeps the whole graph of a
    chunk alive, so the chunk shrinks with the input size (128 CIFAR images, 8 at 224 × 224, where
    the graph holds about :func:`grad_pass_mb` per image)."""
    return chunk_size(images, HVP_CHUNK_ELEMENTS, 128)


def hutchinson_traces(ctx: SearchContext, n_samples: int = 256, max_iter: int = 200, tol: float = 1e-2,
                      patience: int = 3, min_iter: int = 10, seed: int = 0) -> tuple[dict[str, float], dict]:
    """Per-layer Hessian traces of the calibration loss; returns (traces, info)."""
    model, params = grad_model(ctx)
    n = min(n_samples, len(ctx.calib_images))
    chunks = list(calib_chunks(ctx, n, chunk=hvp_chunk(ctx.calib_images)))
    gen = torch.Generator().manual_seed(seed)
    names = list(params)
    failed: list[str] = []
    try:  # one joint product for all layers; on failure find the layers it fails for
        _hv(model, params, names, chunks[:1], n, {f: torch.ones_like(p) for f, p in params.items()})
    except RuntimeError:
        for f in list(names):
            try:
                _hv(model, params, [f], chunks[:1], n, {f: torch.ones_like(params[f])})
            except RuntimeError as e:
                failed.append(f)
                names.remove(f)
                log.warning("hawq: double backward fails for layer %s (%s); using the empirical Fisher trace "
                            "for it instead", f, str(e).splitlines()[0][:120])
    sums = {f: 0.0 for f in names}
    means = {f: 0.0 for f in names}
    calm = {f: 0 for f in names}
    iters = {f: 0 for f in names}
    active = list(names)  # layers whose running mean has not settled yet
    it, history = 0, []
    t0 = time.perf_counter()
    while active and it < max_iter:
        vs = {f: (torch.randint(0, 2, params[f].shape, generator=gen) * 2 - 1).to(params[f]) for f in active}
        hv = _hv(model, params, active, chunks, n, vs)
        it += 1
        change = 0.0
        for f in list(active):
            sums[f] += float((hv[f] * vs[f]).sum())
            iters[f] = it
            new = sums[f] / it
            rel = abs(new - means[f]) / max(abs(means[f]), 1e-12) if it > 1 else float("inf")
            change = max(change, rel)
            means[f] = new
            calm[f] = calm[f] + 1 if rel < tol else 0
            if it >= min_iter and calm[f] >= patience:
                active.remove(f)
        history.append(change)
    traces = dict(means)
    if failed:
        traces.update(_fisher_traces(model, params, failed, ctx, min(n, 64)))
    info = {"iterations": it, "iterations_per_layer": iters, "converged": not active, "last_rel_change": history[-1] if history else None,
            "samples": n, "tol": tol, "max_iter": max_iter, "seconds": time.perf_counter() - t0,
            "fisher_fallback": failed}
    return traces, info


def _curvature(ctx: SearchContext) -> str:
    """The curvature hawq measures: the option, or for "auto" fisher on models with grouped convolutions."""
    opts = ctx.options
    assert isinstance(opts, HawqOptions)
    chosen = opts.curvature
    return chosen if chosen != "auto" else ("fisher" if has_grouped_conv(ctx.model) else "hessian")


def hawq_memory(ctx: SearchContext) -> float:
    """MB hawq holds beside the probe engine (``Method.memory``): the graph of one Hessian-vector chunk,
    or of one image for Fisher traces."""
    return grad_pass_mb(ctx.graph, 1 if _curvature(ctx) == "fisher" else hvp_chunk(ctx.calib_images))


@METHODS.register("hawq", "Hutchinson Hessian trace (or empirical Fisher) × ‖Ŵ−W‖² per (layer, bits) + ILP "
                  "(HAWQ-V2/V3)", options=HawqOptions, memory=hawq_memory)
def hawq(ctx: SearchContext) -> SensitivityTable:
    require_weight_search(ctx, "hawq")
    o: HawqOptions = ctx.options  # type: ignore[assignment]

    curvature = _curvature(ctx)

    def measure() -> dict:
        if curvature == "fisher":
            with stage("gradients (Fisher traces)"):
                return {"traces": fisher_traces(ctx, o.hawq_samples), "info": {"curvature": "fisher"}}
        with stage("gradients (Hessian traces)"):
            t, i = hutchinson_traces(ctx, o.hawq_samples, o.max_iter, o.tol, seed=ctx.seed)
        return {"traces": t, "info": {"curvature": "hessian", **i}}

    # cached with the probes (same model, draw and quantizer): auto and a rerun read it instead of
    # computing the Hessian products again
    spec = {"method": "hawq", "samples": o.hawq_samples, "max_iter": o.max_iter, "tol": o.tol, "patience": 3,
            "min_iter": 10} if curvature == "hessian" else {"method": "hawq-fisher", "samples": o.hawq_samples}
    memo = ctx.engine.memo(spec, measure)
    traces, info = memo["traces"], memo["info"]
    deltas = weight_deltas(ctx)
    w = {}
    for f in ctx.searched:
        numel = ctx.model.get_submodule(f).weight.numel()
        # a negative trace (non-convex spot) would reward quantization noise: count it as flat
        w[f] = {b: max(traces[f], 0.0) / numel * float(d.pow(2).sum()) for b, d in deltas[f].items()}
    score = "Tr(H)/n · ||dW||^2" if curvature == "hessian" else "Tr(F)/n · ||dW||^2 (empirical Fisher)"
    return SensitivityTable(w=w, meta={"score": score, "curvature": curvature, "traces": traces,
                                       ("hutchinson" if curvature == "hessian" else "fisher"): info})
