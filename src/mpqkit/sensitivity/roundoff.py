"""MixQuant: per-layer weight bits from the quantize–dequantize round-off error (no data needed).

QE(ℓ, b) = ‖W_ℓ − deq(q(W_ℓ, b))‖² / numel with the weight quantizer the plan will use.
``mixquant``: the smallest b whose score ≤ QEM per layer (``solve/threshold.py``; with a budget and
no ``--qem``, QEM is bisected until the budget holds). ``--mixquant-rule`` picks the score:
``absolute`` (default) QE(ℓ, b) against one network-wide threshold; ``relative`` QE(ℓ, b) / QE(ℓ,
b_ref) (the paper's form; nearly the same for every layer, since QE falls ~4× per bit everywhere, so
at integer budgets its plans are the uniform ones); ``weighted`` QE(ℓ, b) × numel_ℓ / Σ numel.
The rules compared on ResNet-20: ``docs/METHODS.md`` (mixquant).
``mixquant-ilp``: the same round-off errors as a sensitivity for the shared ILP, as noise-to-signal
ratios QE(ℓ, b) / mean(W_ℓ²) so layers of different weight scales are comparable [ours].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BudgetError, MpqkitError
from ..quant.observers import quantize_weight
from ..solve import Solution, solve_threshold
from .base import SearchContext, SensitivityTable, SolveRequest
from .options import MethodOptions, option, positive
from .registry import METHODS
from .solvers import need_table

RULES = ("relative", "absolute", "weighted")


@dataclass(frozen=True)
class MixQuantOptions(MethodOptions):
    qem: float | None = option(None, type=float, help="quantization error multiplier (default: bisected to the budget)")
    bref: int = option(8, help="reference bits of the relative QE rule (default 8)")
    rule: str = option("absolute", flag="--mixquant-rule", choices=RULES,
                       help="mixquant: what the threshold compares: absolute = QE(b) against one network-wide "
                       "threshold (default, by measurement), relative = QE(b)/QE(b_ref) per layer (the paper's "
                       "form), weighted = QE(b) × the layer's share of the weights")

    def __post_init__(self) -> None:
        positive("qem", self.qem, "mixquant")
        if not 1 <= self.bref <= 16:

            raise MpqkitError(f"option 'bref' of method 'mixquant' must be 1..16, got {self.bref}")


def roundoff_errors(ctx: SearchContext, bits: list[int]) -> dict[str, dict[int, float]]:
    """QE(ℓ, b) for every searched layer and bits, with the configured weight quantizer."""
    out: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for f in ctx.searched:
            w = ctx.model.get_submodule(f).weight.detach()
            out[f] = {b: float((w - quantize_weight(w, ctx.qconfig.w_spec(b))).pow(2).mean()) for b in bits}
    return out


def threshold(req: SolveRequest) -> Solution:
    """MixQuant's rule: ``--qem`` as given, else bisected to the budget."""
    table = need_table(req)
    opts = req.options
    assert isinstance(opts, MixQuantOptions)
    if opts.qem is None and not req.has_budget:
        raise BudgetError("method 'mixquant' needs --qem or a --budget")
    return solve_threshold(req.problem, table.w, opts.qem)


@METHODS.register("mixquant", "round-off error rule: smallest bits with QE ≤ QEM·QE(b_ref); QEM bisected to a budget",
                  solver=threshold, options=MixQuantOptions)
def mixquant(ctx: SearchContext) -> SensitivityTable:
    opts: MixQuantOptions = ctx.options  # type: ignore[assignment]
    bref = opts.bref
    qe = roundoff_errors(ctx, sorted({*ctx.w_bits, bref}))
    if opts.rule == "relative":
        score = {f: {b: e[b] / max(e[bref], 1e-30) for b in ctx.w_bits} for f, e in qe.items()}
        what = "QE(b)/QE(b_ref)"
    elif opts.rule == "absolute":
        score = {f: {b: e[b] for b in ctx.w_bits} for f, e in qe.items()}
        what = "QE(b)"
    else:
        numel = {f: ctx.model.get_submodule(f).weight.numel() for f in ctx.searched}
        total = sum(numel.values())
        score = {f: {b: e[b] * numel[f] / total for b in ctx.w_bits} for f, e in qe.items()}
        what = "QE(b) x numel/total"
    return SensitivityTable(w=score, meta={"score": what, "rule": opts.rule, "bref": bref, "qe": qe,
                                           "data_free": True})


@METHODS.register("mixquant-ilp", "round-off noise-to-signal ratio per (layer, bits) + ILP")
def mixquant_ilp(ctx: SearchContext) -> SensitivityTable:
    qe = roundoff_errors(ctx, list(ctx.w_bits))
    power = {f: float(ctx.model.get_submodule(f).weight.detach().pow(2).mean()) for f in ctx.searched}
    nsr = {f: {b: e / max(power[f], 1e-30) for b, e in qe[f].items()} for f in ctx.searched}
    return SensitivityTable(w=nsr, meta={"score": "QE(b)/mean(W²)", "qe": qe, "data_free": True})
