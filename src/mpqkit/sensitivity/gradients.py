"""Shared pieces of the gradient-based sensitivities (HAWQ, MPQCO): the searched layers' weights as
autograd leaves, the calibration loss, and the weight perturbation of each candidate bit-width.

The probe engine measures forward losses; these methods need derivatives of the fp model instead,
so they use the model itself (eval mode, a private copy so no ``requires_grad`` flag leaks), but
quantize through the same ``quantize_weight`` as every other path.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MpqkitError
from ..graph import ModelGraph
from ..quant.observers import quantize_weight
from .base import SearchContext


def grad_model(ctx: SearchContext) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """An eval-mode copy of the model whose only trainable tensors are the searched layers' weights."""
    model = copy.deepcopy(ctx.model).eval().to(ctx.device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = {f: model.get_submodule(f).weight for f in ctx.searched}
    for p in params.values():
        p.requires_grad_(True)
    return model, params


def calib_chunks(ctx: SearchContext, n: int | None = None, chunk: int = 128) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``n`` calibration samples (all by default) in chunks."""
    n = len(ctx.calib_images) if n is None else min(n, len(ctx.calib_images))
    for i in range(0, n, chunk):
        yield (ctx.calib_images[i:min(i + chunk, n)].to(ctx.device),
               ctx.calib_labels[i:min(i + chunk, n)].to(ctx.device))


#: bytes a gradient pass holds per image, in units of the fp32 inputs of all quantizable layers (the
#: autograd graph: convolution inputs, normalisation and activation outputs, their gradients); fitted
#: to the peaks of single gradient passes on MobileNetV2 (``benchmarks/results/memory_mobilenetv2/note.md``)
GRAD_PASS_FACTOR = 7.0


def grad_pass_mb(graph: ModelGraph, chunk: int) -> float:
    """Estimated MB a backward (or double backward) pass over ``chunk`` images holds at its peak."""
    return GRAD_PASS_FACTOR * chunk * 4 * sum(layer.in_numel for layer in graph.layers) / 2 ** 20


def chunk_size(images: Tensor, elements: int, cap: int) -> int:
    """Images per chunk of a pass whose memory grows with the chunk's input (a double backward, a
    vmapped per-sample gradient): ``elements`` input elements, at most ``cap`` images."""
    per = max(1, images[0].numel()) if len(images) else 1
    return max(1, min(cap, elements // per))


def loss_sum(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="sum")


def weight_deltas(ctx: SearchContext) -> dict[str, dict[int, Tensor]]:
    """Ŵ_{ℓ,b} − W_ℓ for every searched layer and candidate bits, with the configured quantizer: the
    probe engine's quantized layer when the run rounds with GPTQ (the weights the plan ships with),
    else nearest rounding on the grid."""
    out: dict[str, dict[int, Tensor]] = {}
    with torch.no_grad():
        for f in ctx.searched:
            w = ctx.model.get_submodule(f).weight.detach()
            if ctx.qconfig.rounding == "gptq":
                q = {b: ctx.engine.quant_layer(f, b, None).weight.detach().to(w) for b in ctx.w_bits}
            else:
                q = {b: quantize_weight(w, ctx.qconfig.w_spec(b)) for b in ctx.w_bits}
            out[f] = {b: (q[b] - w).contiguous().to(ctx.device) for b in ctx.w_bits}
    return out


def require_weight_search(ctx: SearchContext, method: str) -> None:
    if ctx.search_a:
        raise MpqkitError(f"method '{method}' scores weight bits only: use --search w (activations at --a-bits)")
