"""LSQ: fake quantization whose step size is a trained parameter (Esser et al., "Learned Step Size
Quantization", ICLR 2020).

The forward is the grid of :func:`.primitives.fake_quant` — ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``
with an integer-valued zero point ``zp`` held fixed — so a trained step size drops into a
``QuantConv2d`` / ``QuantLinear`` buffer unchanged. Gradients (straight-through rounding):

* w.r.t. ``x``: 1 inside the grid's range, 0 where clamped (``x / s + zp`` outside ``[qmin, qmax]``);
* w.r.t. ``s``: ``round(x / s) - x / s`` inside the range, ``qmin - zp`` / ``qmax - zp`` where clamped,
  times the gradient scale ``g`` (the paper's ``1 / sqrt(N * Q_p)``, :func:`lsq_grad_scale`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: the smallest step size a trained scale may reach (keeps ``x / s`` finite)
MIN_STEP = 1e-12


def scale_grad(x: Tensor, g: float) -> Tensor:
    """``x`` in the forward, ``g`` times its gradient in the backward."""
    return (x - x * g).detach() + x * g


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward, the identity in the backward."""
    return x + (torch.round(x) - x).detach()


def lsq_fake_quant(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int, g: float = 1.0,
                   clamp_first: bool = True) -> Tensor:
    """Fake-quantize ``x`` with a learnable step ``scale`` (broadcast against ``x``; its absolute value
    is used, floored at :data:`MIN_STEP`); ``zp`` is a constant; ``g`` scales the step's gradient.

    ``clamp_first`` (the LSQ paper): an element is clamped — gradient 0 for ``x``, ``qmin − zp`` or
    ``qmax − zp`` for the step — when ``x / s + zp`` lies outside ``[qmin, qmax]`` before rounding;
    False clamps after rounding (BRECQ's code), which counts the half step beyond either end as inside.
    The forward is the same either way."""
    if clamp_first:
        return _LsqClampFirst.apply(x, scale, zp.detach(), int(qmin), int(qmax), float(g))
    s = scale_grad(scale.abs().clamp_min(MIN_STEP), g)
    zp = zp.detach()
    q = torch.clamp(round_ste(x / s) + zp, qmin, qmax)
    return (q - zp) * s


class _LsqClampFirst(torch.autograd.Function):
    """:func:`lsq_fake_quant` with ``clamp_first`` as one autograd node: a handful of passes over the
    tensor instead of the many temporaries a composition of ops records. Saves the in-range mask and
    the per-element ``∂x̂/∂s``; gradients equal the composed straight-through ops' (tested)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int, g: float) -> Tensor:  # type: ignore[override]
        s = scale.detach().abs().clamp_min(MIN_STEP)
        v = x.detach() / s
        v.add_(zp)
        inside = (v >= qmin) & (v <= qmax)
        q = v.clamp(qmin, qmax).round_()
        d_step = torch.where(inside, q - v, q - zp)  # round(x/s) − x/s inside, qmin − zp / qmax − zp outside
        ctx.save_for_backward(inside, d_step, scale)
        ctx.g = g
        return q.sub_(zp).mul_(s)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        inside, d_step, scale = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            sign = torch.where(scale.abs() > MIN_STEP, torch.sign(scale), torch.zeros_like(scale))
            grad_s = (grad * d_step).sum_to_size(scale.shape) * (ctx.g * sign)
        return grad_x, grad_s, None, None, None, None


def lsq_grad_scale(elems_per_step: int, qmax: int) -> float:
    """The LSQ paper's step-size gradient scale ``1 / sqrt(N * Q_p)``: ``N`` elements share one step,
    ``Q_p`` is the grid's positive end (at least 1)."""
    return 1.0 / math.sqrt(max(elems_per_step, 1) * max(qmax, 1))


class LsqQuantizer(nn.Module):
    """A fake-quantizer with a learnable step size, initialised from a calibrated ``(scale, zp)``.

    ``scale`` may be per tensor (0-d) or per channel (broadcastable against the input); ``g`` is the
    gradient scale (1 keeps the plain straight-through gradient). ``log_domain``: the parameter is
    ``log s`` (step ``exp`` of it), so an optimizer's step is a relative change of the step size
    whatever its magnitude — what Adam needs, which ignores a constant gradient scale such as ``g``
    and would otherwise move a 0.01 step and a 1.0 step by the same absolute amount.
    """

    def __init__(self, scale: Tensor, zp: Tensor, qmin: int, qmax: int, g: float = 1.0,
                 log_domain: bool = False) -> None:
        super().__init__()
        init = scale.detach().clone().float()
        self.log_domain = log_domain
        self.scale = nn.Parameter(init.abs().clamp_min(MIN_STEP).log() if log_domain else init)
        self.register_buffer("zp", zp.detach().clone().float())
        self.qmin, self.qmax, self.g = int(qmin), int(qmax), float(g)

    def _step(self) -> Tensor:
        return self.scale.exp() if self.log_domain else self.scale

    def step(self) -> Tensor:
        """The step size the forward uses (positive), detached."""
        return self._step().detach().abs().clamp_min(MIN_STEP)

    def forward(self, x: Tensor) -> Tensor:
        return lsq_fake_quant(x, self._step(), self.zp, self.qmin, self.qmax, self.g)
