"""Uniform affine quantization primitives (pure functions, no state).

Conventions (as in torchao's quant_primitives):

* integer grid ``[qmin, qmax]`` from :func:`qrange`;
* ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``;
* integer values are carried in floating-point tensors (``zero_point`` too), so everything
  broadcasts and differentiates like ordinary tensors;
* per-channel parameters are tensors shaped for broadcasting against the quantized tensor
  (size ``C`` on the channel axis, 1 elsewhere; see :func:`channel_shape`), per-tensor
  parameters are 0-d tensors.

``round`` is ``torch.round`` (half to even), the same as PyTorch's fake-quantize kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Smallest scale qparams returns: only binds for an all-zero range (a constant-zero tensor or
# channel), where any positive scale is exact, and keeps x / scale finite.
MIN_SCALE = 1e-12


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)`` of a ``bits``-bit quantizer.

    Asymmetric: unsigned ``(0, 2**bits - 1)``. Symmetric: signed full range
    ``(-2**(bits-1), 2**(bits-1) - 1)``, e.g. ``(-128, 127)`` at 8 bits.

    1-bit symmetric follows the same formula, ``(-1, 0)``: the levels are ``{-scale, 0}``.
    Sign-binary ``{-s, +s}`` is deliberately not offered because zero must be exactly
    representable (padding, ReLU zeros); use asymmetric 1-bit (``{0, s}`` or ``{-s, 0}``, picked
    by the zero point) when the sign of the data is not known to be negative.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _float_dtype(*ts: Tensor) -> torch.dtype:
    """Parameter dtype: at least float32 (qparams of fp16/bf16 data are computed in float32)."""
    dtype = torch.float32
    for t in ts:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` mapping the real range ``[lo, hi]`` onto the ``bits``-bit grid.

    ``lo``/``hi`` broadcast (0-d for per-tensor, channel-shaped for per-channel). The range is
    first widened to contain 0 (``lo <= 0 <= hi``) so that zero is exactly representable.

    * asymmetric: ``scale = (hi - lo) / (qmax - qmin)``,
      ``zero_point = clamp(round(qmin - lo / scale), qmin, qmax)``; the representable range is
      ``[lo, hi]`` shifted by at most ``scale / 2`` (the zero-point rounding).
    * symmetric: ``zero_point = 0``, ``scale = max(|lo|, |hi|) / qmax``, so ``+max`` is exact
      and the extra negative level ``qmin = -qmax - 1`` is simply spare headroom (1-bit, where
      ``qmax = 0``, uses ``scale = max(|lo|, |hi|)``, i.e. levels ``{-max, 0}``).

    ``scale`` is at least :data:`MIN_SCALE` so constant-zero tensors work. Both outputs have the
    broadcast shape of ``lo``/``hi`` and a float dtype of at least float32.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    dtype = _float_dtype(lo, hi)
    lo, hi = torch.broadcast_tensors(lo.to(dtype), hi.to(dtype))
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / max(qmax, 1)).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
    zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zp


def quantize(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int, out: Tensor | None = None) -> Tensor:
    """Integer codes ``clamp(round(x / scale) + zp, qmin, qmax)`` (in a float dtype).

    ``x / scale`` is computed as ``x * (1 / scale)`` (as PyTorch's fake-quantize kernels do:
    a multiply is cheaper than a divide). ``out`` optionally receives the result (a reused
    buffer of the broadcast shape, for hot loops).
    """
    q = torch.mul(x, torch.reciprocal(scale), out=out) if out is not None else x * torch.reciprocal(scale)
    return q.round_().add_(zp).clamp_(qmin, qmax)


def dequantize(q: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    """Real values ``(q - zp) * scale`` of integer codes ``q``."""
    return (q - zp) * scale


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize whose backward is the clipped straight-through estimator."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:  # type: ignore[override]
        q = (x * torch.reciprocal(scale)).round_().add_(zp)
        mask = (q >= qmin) & (q <= qmax)
        out = dequantize(q.clamp_(qmin, qmax), scale, zp).to(x.dtype)
        ctx.save_for_backward(mask)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        g = grad * mask.to(grad.dtype)
        if g.shape != ctx.x_shape:  # x was broadcast against per-channel params
            g = g.sum_to_size(ctx.x_shape)
        return g, None, None, None, None


def _fake_quant_inference(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """``round(x·(1/scale))`` clamped to ``[qmin − zp, qmax − zp]``, times ``scale``: one new tensor
    and three in-place passes. Equal bit for bit to ``dequantize(quantize(x))`` (adding ``zp``
    before the clamp and subtracting it after are exact on integer-valued floats; tested) and to
    ``torch.fake_quantize_per_tensor_affine``, with fewer passes over memory: activations are on
    every probe's path."""
    q = x * torch.reciprocal(scale)
    q.round_()
    if zp.numel() == 1:
        z = float(zp)
        q.clamp_(qmin - z, qmax - z)
    else:
        q.clamp_(qmin - zp, qmax - zp)
    return q.mul_(scale).to(x.dtype)


def fake_quant(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, with a straight-through estimator.

    The gradient w.r.t. ``x`` is 1 where ``round(x / scale) + zp`` falls inside ``[qmin, qmax]``
    and 0 where it is clamped (as ``torch.fake_quantize_per_channel_affine``). ``scale`` and
    ``zp`` are treated as constants (no gradient flows to them).
    """
    scale = torch.as_tensor(scale).detach()
    zp = torch.as_tensor(zp).detach()
    if not x.requires_grad:
        with torch.no_grad():
            if x.dtype in (torch.float32, torch.float64) and qmax - qmin < 2**16:
                return _fake_quant_inference(x, scale, zp, qmin, qmax)
            return dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp).to(x.dtype)
    return _FakeQuantSTE.apply(x, scale, zp, int(qmin), int(qmax))


def channel_shape(x: Tensor, axis: int | None) -> tuple[int, ...]:
    """Shape of per-channel parameters for ``x`` along ``axis`` (``()`` when ``axis`` is None).

    E.g. a ``(64, 32, 3, 3)`` weight with ``axis=0`` gives ``(64, 1, 1, 1)``.
    """
    if axis is None:
        return ()
    axis = _norm_axis(x, axis)
    return tuple(n if i == axis else 1 for i, n in enumerate(x.shape))


def _norm_axis(x: Tensor, axis: int) -> int:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")
    return axis % x.dim()


def channel_rows(x: Tensor, axis: int | None) -> Tensor:
    """``x`` as a 2-d ``(C, N)`` view/copy with one row per channel (``(1, numel)`` per tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    axis = _norm_axis(x, axis)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def reduce_range(x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """``(min, max)`` of ``x``: 0-d tensors per tensor, or channel-shaped (``axis`` kept, every
    other dim reduced to size 1) per channel, ready to broadcast in :func:`qparams`."""
    if x.numel() == 0:
        raise ValueError("cannot compute the range of an empty tensor")
    lo, hi = torch.aminmax(channel_rows(x, axis), dim=1)
    shape = channel_shape(x, axis)
    return lo.reshape(shape), hi.reshape(shape)
