"""Range estimation for weights and activations, and the :class:`QuantSpec` that selects it.

Three range methods (``RANGE_METHODS``):

* ``minmax``: the observed min/max (no clipping);
* ``percentile``: the ``pct`` / ``100 - pct`` percentiles (clips rare outliers);
* ``mse``: the shrunk min-max range ``(alpha * lo, alpha * hi)``, ``alpha`` on a grid in
  ``(0, 1]``, that minimizes the Lp quantization error of the data itself. ``alpha = 1`` is on
  the grid, so it is never worse than min-max on the data it was fitted to.

Weights are quantized per output channel (axis 0 of Conv2d/Linear weights) or per tensor;
activations per tensor, from an :class:`ActivationObserver` fed with calibration batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .primitives import channel_rows, channel_shape, fake_quant, qparams, qrange, quantize

RANGE_METHODS = ("minmax", "percentile", "mse")

# Elements processed per vectorized step of the MSE search (alphas x elements): keeps the
# working set cache-sized and memory bounded for large tensors.
_MSE_CHUNK_ELEMS = 1 << 18


def _shape_like(lo: Tensor, hi: Tensor, x: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    shape = channel_shape(x, axis)
    return lo.reshape(shape), hi.reshape(shape)


def _check_nonempty(x: Tensor) -> None:
    if x.numel() == 0:
        raise ValueError("cannot estimate the range of an empty tensor")


def minmax_range(x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` per tensor (0-d) or per channel along ``axis`` (channel-shaped)."""
    _check_nonempty(x)
    lo, hi = torch.aminmax(channel_rows(x.detach(), axis), dim=1)
    return _shape_like(lo, hi, x, axis)


def _row_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row quantile with linear interpolation (as ``torch.quantile``), via ``kthvalue``,
    which has no input-size limit (``torch.quantile`` refuses more than 2**24 elements)."""
    n = rows.shape[1]
    pos = q * (n - 1)
    k0 = int(pos)  # floor: pos >= 0
    frac = pos - k0
    v0 = rows.kthvalue(k0 + 1, dim=1).values
    if frac == 0.0 or k0 + 1 >= n:
        return v0
    v1 = rows.kthvalue(k0 + 2, dim=1).values
    return v0 + (v1 - v0) * frac


def percentile_range(x: Tensor, pct: float = 99.99, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``(100 - pct)``-th and ``pct``-th percentiles of ``x``, per tensor or per channel.

    Exact (linear interpolation between order statistics, like ``torch.quantile``) at any size.
    ``pct`` must be in ``[50, 100]``; 100 is the min-max range.
    """
    if not 50.0 <= pct <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {pct}")
    _check_nonempty(x)
    rows = channel_rows(x.detach(), axis)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    p = pct / 100.0
    lo, hi = _row_quantile(rows, 1.0 - p), _row_quantile(rows, p)
    return _shape_like(lo, hi, x, axis)


def mse_range(x: Tensor, bits: int, symmetric: bool, axis: int | None = None, grid: int = 80,
              p: float = 2.0, init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The range ``(alpha * lo, alpha * hi)`` minimizing ``sum |fake_quant(x) - x|**p``.

    ``(lo, hi)`` is the min-max range of ``x`` (widened to contain 0), or ``init`` when given
    (e.g. the exact running min/max of activations whose values ``x`` only samples; per-tensor
    0-d or channel-shaped). ``alpha`` runs over ``linspace(1/grid, 1, grid)``, chosen per channel
    independently; on ties the largest ``alpha`` (least clipping) wins. The search is vectorized
    over cache-sized blocks of (alphas x channels x elements); cost is ``O(grid * numel)``.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    _check_nonempty(x)
    qmin, qmax = qrange(bits, symmetric)
    rows = channel_rows(x.detach(), axis)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    n_ch, n = rows.shape
    if init is None:
        lo, hi = torch.aminmax(rows, dim=1)
    else:
        lo, hi = (torch.as_tensor(t).to(rows.device, rows.dtype).reshape(-1).expand(n_ch) for t in init)
    lo = lo.clamp(max=0.0).reshape(1, n_ch, 1)
    hi = hi.clamp(min=0.0).reshape(1, n_ch, 1)
    alphas = torch.linspace(1.0 / grid, 1.0, grid, dtype=rows.dtype, device=rows.device)
    alphas[-1] = 1.0  # exactly: alpha = 1 must reproduce min-max bit for bit
    a = alphas.reshape(-1, 1, 1)
    scales, zps = qparams(lo * a, hi * a, bits, symmetric)  # (grid, C, 1) each
    # Blocks of (alphas x channels x columns) of about _MSE_CHUNK_ELEMS elements: many alphas
    # at once for small tensors, channel/column blocks for large ones (cache-sized either way).
    cb = min(n_ch, max(1, _MSE_CHUNK_ELEMS // n))  # channels per block
    nb = min(n, max(1, _MSE_CHUNK_ELEMS // cb))  # columns per block (< n only when cb == 1)
    step = min(grid, max(1, _MSE_CHUNK_ELEMS // (cb * nb)))  # alphas per block
    # one reused buffer: no large allocation per block
    buf = torch.empty(step * cb * nb, dtype=rows.dtype, device=rows.device)
    err = torch.zeros(grid, n_ch, dtype=rows.dtype, device=rows.device)
    for c0 in range(0, n_ch, cb):
        for n0 in range(0, n, nb):
            blk = rows[c0:c0 + cb, n0:n0 + nb]
            for a0 in range(0, grid, step):
                scale, zp = scales[a0:a0 + step, c0:c0 + cb], zps[a0:a0 + step, c0:c0 + cb]
                out = buf[: scale.shape[0] * blk.numel()].view(scale.shape[0], *blk.shape)
                # quantize + dequantize in place: bit-identical to fake_quant(blk, scale, zp, ...)
                d = quantize(blk, scale, zp, qmin, qmax, out=out).sub_(zp).mul_(scale).sub_(blk)
                d = d.square_() if p == 2.0 else d.abs_().pow_(p)
                err[a0:a0 + step, c0:c0 + cb] += d.sum(dim=2)
    best = grid - 1 - err.flip(0).argmin(dim=0)  # last (largest alpha) minimizer
    a = alphas[best]
    return _shape_like(lo.reshape(-1) * a, hi.reshape(-1) * a, x, axis)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit-width, grid type, granularity and range method."""

    bits: int
    symmetric: bool = False
    per_channel: bool = True
    range_method: str = "mse"

    def __post_init__(self) -> None:
        qrange(self.bits, self.symmetric)  # validates bits
        if self.range_method not in RANGE_METHODS:
            raise ValueError(f"unknown range method '{self.range_method}', expected one of {RANGE_METHODS}")

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, self.symmetric)

    @property
    def name(self) -> str:
        """E.g. ``int4_per_channel_asym_mse``."""
        gran = "per_channel" if self.per_channel else "per_tensor"
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}_{gran}_{kind}_{self.range_method}"


def estimate_range(x: Tensor, spec: QuantSpec, axis: int | None,
                   init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` of ``x`` by ``spec.range_method`` (``init`` only seeds the MSE search)."""
    if spec.range_method == "minmax":
        return minmax_range(x, axis)
    if spec.range_method == "percentile":
        return percentile_range(x, axis=axis)
    return mse_range(x, spec.bits, spec.symmetric, axis=axis, init=init)


def weight_qparams(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, int, int]:
    """``(scale, zero_point, qmin, qmax)`` for weight ``w`` (per channel: axis 0, i.e. output
    channels of Conv2d/Linear weights; params shaped ``(C, 1, ...)``; per tensor: 0-d)."""
    w = w.detach()
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty weight tensor")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"weight of shape {tuple(w.shape)} contains {bad} NaN/Inf value(s); cannot quantize")
    axis = 0 if spec.per_channel and w.dim() > 0 else None
    lo, hi = estimate_range(w, spec, axis)
    scale, zp = qparams(lo, hi, spec.bits, spec.symmetric)
    qmin, qmax = spec.qrange
    return scale, zp, qmin, qmax


def quantize_weight(w: Tensor, spec: QuantSpec) -> Tensor:
    """The fake-quantized (quantized then dequantized) weight, same shape and dtype as ``w``."""
    return fake_quant(w, *weight_qparams(w, spec))


def _uniform_subset(n: int, m: int, gen: torch.Generator) -> Tensor:
    """``m`` distinct indices drawn uniformly from ``range(n)`` (a uniform random m-subset)."""
    if 4 * m >= n:
        return torch.randperm(n, generator=gen)[:m]
    while True:  # sparse: draw with replacement, dedupe, keep a random m of the distinct ones
        cand = torch.unique(torch.randint(n, (m + m // 4 + 16,), generator=gen))
        if cand.numel() >= m:
            return cand[torch.randperm(cand.numel(), generator=gen)[:m]]


#: values per observer update: a larger batch is fed in pieces of this size, in order, so its
#: transient copies (the values, one random key each, their concatenation with the sample) stay
#: ~64 MB each instead of growing with the batch. Batches up to this size are sampled exactly as
#: before pieces existed; above it the sample is drawn from another (equally uniform) key stream.
UPDATE_PIECE = 1 << 24
#: part of every cache key built from calibrated activations or calibration-set statistics (bump
#: when the sample's values or the calibration chunks change)
OBSERVER_VERSION = 3


class ActivationObserver:
    """Statistics of a layer's input activations over calibration batches (per tensor).

    Keeps the exact running min/max and a uniform random sample without replacement of all
    values seen, of at most ``max_samples`` values: every value gets a random key and the sample
    is the ``max_samples`` values with the smallest keys (reservoir sampling by random keys).
    The keys come from a generator seeded with ``seed``, so the same batches give the same
    sample. The sample feeds the percentile and MSE range methods; min-max uses the exact
    running extremes, which also seed the MSE search. Once the sample is full, an update costs
    O(values entering the sample), not O(batch size); a batch of more than ``UPDATE_PIECE`` values
    is taken as consecutive updates of that size (the same min/max, a bounded transient).
    """

    def __init__(self, max_samples: int = 262_144, seed: int = 0) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self._sample = torch.empty(0)
        self._keys = torch.empty(0)
        self.num_seen = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add one batch of activations (any shape, any device). Min/max are reduced on the
        tensor's device; only the values that enter the sample are copied to CPU (float32)."""
        v = x.detach().reshape(-1)
        if v.numel() > UPDATE_PIECE:
            for i in range(0, v.numel(), UPDATE_PIECE):
                self.update(v[i:i + UPDATE_PIECE])
            return
        if v.numel() == 0:
            return
        lo, hi = (t.to("cpu", torch.float32) for t in torch.aminmax(v))
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("activations contain NaN/Inf values; cannot calibrate")
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        n = v.numel()
        self.num_seen += n
        if self._sample.numel() >= self.max_samples:
            # Full: only keys below the current worst key tau can enter. Instead of drawing n
            # keys, draw (identically distributed) how many fall below tau, which positions
            # (a uniform subset), and their keys (uniform below tau): O(entrants), not O(n).
            tau = float(self._keys.max())
            m = int(torch.binomial(torch.tensor(float(n), dtype=torch.float64),
                                   torch.tensor(tau, dtype=torch.float64), generator=self._gen))
            if m == 0:
                return
            pos = _uniform_subset(n, m, self._gen)
            v = v[pos.to(v.device)].to("cpu", torch.float32)
            keys = torch.rand(m, generator=self._gen) * tau
        else:
            v = v.to("cpu", torch.float32)
            keys = torch.rand(n, generator=self._gen)
        vals = torch.cat([self._sample, v])
        keys = torch.cat([self._keys, keys])
        if keys.numel() > self.max_samples:
            idx = torch.topk(keys, self.max_samples, largest=False, sorted=False).indices
            vals, keys = vals[idx], keys[idx]
        self._sample, self._keys = vals, keys

    @property
    def sample(self) -> Tensor:
        """The current uniform sample of the values seen (1-d, at most ``max_samples``)."""
        return self._sample

    def _require_data(self) -> None:
        if self._min is None:
            raise ValueError("no calibration data seen")

    def range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """Per-tensor ``(lo, hi)`` (0-d) by ``spec.range_method``; ``spec.per_channel`` is ignored."""
        self._require_data()
        assert self._min is not None and self._max is not None
        if spec.range_method == "minmax":
            return self._min.clone(), self._max.clone()
        return estimate_range(self._sample, spec, None, init=(self._min, self._max))

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)`` for the activations seen so far."""
        lo, hi = self.range(spec)
        scale, zp = qparams(lo, hi, spec.bits, spec.symmetric)
        qmin, qmax = spec.qrange
        return scale, zp, qmin, qmax
