"""MPQCO: S(ℓ, b) = Σ_n ((ΔW_ℓ,b · ∇_W z_y,n) / z_y,n)² / 2N on the true-class logit z_y, + ILP.

The first-order change of each sample's true-class logit under the weight perturbation
ΔW = Ŵ_ℓ,b − W_ℓ, relative to the logit, squared and averaged. Per-sample gradients come from
``torch.func`` (vmap of grad, one batched pass per chunk); ΔW·∇z is then a dot product per
(layer, bits), so the cost does not grow with the number of candidates.
Options: ``mpqco_samples`` (default: the whole calibration set).
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from dataclasses import dataclass

from .base import METHODS, SearchContext, SensitivityTable
from .options import MethodOptions, option, positive
from .gradients import calib_chunks, grad_model, require_weight_search, weight_deltas

EPS = 1e-6  # |z_y| floor: the score divides by the logit


@dataclass(frozen=True)
class MpqcoOptions(MethodOptions):
    mpqco_samples: int | None = option(None, type=int, help="mpqco: calibration images in the per-sample "
                                       "gradients (default: the whole calibration set)")

    def __post_init__(self) -> None:
        positive("mpqco_samples", self.mpqco_samples, "mpqco")


@METHODS.register("mpqco", "per-sample first-order change of the true-class logit, (ΔW·∇z_y / z_y)², + ILP",
                  options=MpqcoOptions)
def mpqco(ctx: SearchContext) -> SensitivityTable:
    require_weight_search(ctx, "mpqco")
    model, params = grad_model(ctx)
    state = {k: v.detach() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    keys = {f: f"{f}.weight" for f in params}
    deltas = weight_deltas(ctx)

    def true_logit(sel, x, y):
        out = functional_call(model, {**state, **{keys[f]: w for f, w in sel.items()}}, (x.unsqueeze(0),))
        z = torch.gather(out[0], 0, y.reshape(1))[0]  # out[0, y] without data-dependent indexing
        return z, z.detach()

    per_sample = vmap(grad(true_logit, has_aux=True), in_dims=(None, 0, 0))
    sel = {f: p.detach() for f, p in params.items()}
    acc = {f: {b: 0.0 for b in ctx.w_bits} for f in ctx.searched}
    n = 0
    small = 0
    for x, y in calib_chunks(ctx, ctx.options.mpqco_samples, chunk=32):
        g, z = per_sample(sel, x, y)
        small += int((z.abs() < EPS).sum())
        zinv = 1.0 / z.abs().clamp(min=EPS) * z.sign().where(z != 0, torch.ones_like(z))
        for f in ctx.searched:
            gf = g[f].reshape(len(x), -1)
            for b, d in deltas[f].items():
                acc[f][b] += float(((gf @ d.reshape(-1)) * zinv).pow(2).sum())
        n += len(x)
    w = {f: {b: v / (2 * n) for b, v in row.items()} for f, row in acc.items()}
    return SensitivityTable(w=w, meta={"score": "sum_n ((dW . grad z_y) / z_y)^2 / 2N", "samples": n,
                                       "tiny_logits": small})
