"""MPQCO: S(ℓ, b) = Σ_n ((ΔW_ℓ,b · ∇_W z_y,n) / z_y,n)² / 2N, + ILP.

The first-order change of each sample's true-class output z_y under the weight perturbation
ΔW = Ŵ_ℓ,b − W_ℓ, relative to z_y, squared and averaged: the Gauss-Newton (Fisher) term of the
cross-entropy −log z_y. ``mpqco_output`` says what z is:
- ``prob`` (default): the softmax probability, as in the paper's cross-entropy derivation; then
  ∇z_y / z_y = ∇ log z_y is computed directly and never divides by a small number.
- ``logit``: the true-class logit (the METHODS.md wording). A logit near 0 makes one image's term
  dominate the sum (what that did on MobileNetV2: docs/METHODS.md, MPQCO).
Per-sample gradients come from ``torch.func`` (vmap of grad, one batched pass per chunk); ΔW·∇z is
then a dot product per (layer, bits), so the cost does not grow with the number of candidates.
Options: ``mpqco_samples`` (default: the whole calibration set), ``mpqco_output``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from ..profile import stage
from .base import SearchContext, SensitivityTable
from .gradients import calib_chunks, chunk_size, grad_model, grad_pass_mb, require_weight_search, weight_deltas
from .options import MethodOptions, option, positive
from .registry import METHODS

EPS = 1e-6  # |z_y| floor: the score divides by the logit
#: input elements per vmapped chunk (8 images at 224 × 224, 32 on CIFAR): the per-sample gradients and
#: the vmapped backward of a chunk live at once (measured peaks: benchmarks/results/memory_mobilenetv2/note.md)
CHUNK_ELEMENTS = 8 * 3 * 224 * 224


#: bytes the per-sample gradients of one chunk may take (chunk × the searched layers' weights, fp32): a
#: transformer's weights, not its inputs, bound its chunk
GRAD_BYTES = 256 * 2**20


def searched_weight_bytes(ctx: SearchContext) -> int:
    """fp32 bytes of one sample's gradient with respect to every searched layer's weight."""
    searched = set(ctx.searched)
    return 4 * sum(layer.weight_numel for layer in ctx.graph.layers if layer.fqn in searched)


def mpqco_chunk(ctx: SearchContext) -> int:
    """Samples per vmapped per-sample-gradient chunk: at most ``CHUNK_ELEMENTS`` input elements and
    ``GRAD_BYTES`` of per-sample gradients (and 32 samples)."""
    by_input = chunk_size(ctx.calib_images, CHUNK_ELEMENTS, 32)
    return max(1, min(by_input, GRAD_BYTES // max(1, searched_weight_bytes(ctx))))


def mpqco_memory(ctx: SearchContext) -> float:
    """MB mpqco holds beside the probe engine (``Method.memory``): the vmapped backward of one chunk and
    its per-sample gradients."""
    chunk = mpqco_chunk(ctx)
    return grad_pass_mb(ctx.graph, chunk) + chunk * searched_weight_bytes(ctx) / 2 ** 20


@dataclass(frozen=True)
class MpqcoOptions(MethodOptions):
    mpqco_samples: int | None = option(None, type=int, help="mpqco: calibration images in the per-sample "
                                       "gradients (default: the whole calibration set)")

    mpqco_output: str = option("prob", choices=("prob", "logit"),
                               help="mpqco: z_y is the true-class softmax probability (prob, default) or logit")

    def __post_init__(self) -> None:
        positive("mpqco_samples", self.mpqco_samples, "mpqco")


@METHODS.register("mpqco", "per-sample first-order change of the true-class output, (ΔW·∇z_y / z_y)², + ILP",
                  options=MpqcoOptions, memory=mpqco_memory)
def mpqco(ctx: SearchContext) -> SensitivityTable:
    require_weight_search(ctx, "mpqco")
    model, params = grad_model(ctx)
    state = {k: v.detach() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    keys = {f: f"{f}.weight" for f in params}
    deltas = weight_deltas(ctx)

    prob = ctx.options.mpqco_output == "prob"

    def true_output(sel, x, y):
        out = functional_call(model, {**state, **{keys[f]: w for f, w in sel.items()}}, (x.unsqueeze(0),))[0]
        if prob:  # log p_y: its gradient is ∇p_y / p_y
            out = torch.log_softmax(out, dim=0)
        z = torch.gather(out, 0, y.reshape(1))[0]  # out[y] without data-dependent indexing
        return z, z.detach()

    per_sample = vmap(grad(true_output, has_aux=True), in_dims=(None, 0, 0))
    sel = {f: p.detach() for f, p in params.items()}
    acc = {f: {b: 0.0 for b in ctx.w_bits} for f in ctx.searched}
    n = 0
    small = 0
    for x, y in calib_chunks(ctx, ctx.options.mpqco_samples, chunk=mpqco_chunk(ctx)):
        with stage("gradients"):
            g, z = per_sample(sel, x, y)
        if prob:  # g is already ∇ log p_y
            zinv = torch.ones_like(z)
        else:
            small += int((z.abs() < EPS).sum())
            zinv = 1.0 / z.abs().clamp(min=EPS) * z.sign().where(z != 0, torch.ones_like(z))
        for f in ctx.searched:
            gf = g[f].reshape(len(x), -1)
            for b, d in deltas[f].items():
                acc[f][b] += float(((gf @ d.reshape(-1)) * zinv).pow(2).sum())
        n += len(x)
    w = {f: {b: v / (2 * n) for b, v in row.items()} for f, row in acc.items()}
    meta = {"score": "sum_n ((dW . grad z_y) / z_y)^2 / 2N", "output": ctx.options.mpqco_output, "samples": n}
    if not prob:
        meta["tiny_logits"] = small
    return SensitivityTable(w=w, meta=meta)
