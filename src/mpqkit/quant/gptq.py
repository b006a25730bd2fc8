"""GPTQ / OPTQ second-order rounding of one layer's weights on a fixed grid (Frantar et al., 2023).

Per layer, with ``X`` the layer's inputs on the calibration set (im2col columns for a Conv2d, feature
vectors for a Linear) and ``H = XᵀX / n``: choose grid values ``Ŵ`` that keep ``‖(W − Ŵ)Xᵀ‖²`` small.
The objective is a sum over output rows ``Σ_r (w_r − ŵ_r)ᵀ H (w_r − ŵ_r)``, so every row is rounded
independently, all rows at once:

* columns are quantized one at a time (in order, or by decreasing ``H_ii`` with ``act_order``); the
  rounding error of a column is spread over the columns not yet quantized through the inverse
  Hessian (the OBS update), computed from the upper Cholesky factor of ``H⁻¹`` and applied lazily in
  blocks of ``block_size`` columns;
* ``H`` is dampened by ``damp · mean(diag H)``; an input that is always zero (``H_ii = 0``) gets
  ``H_ii = 1`` and a zero weight;
* grouped and depthwise convolutions have one Hessian per group (``G`` groups of ``R`` rows and
  ``D`` columns), processed as a batch.

The grid (scale, zero point, integer range per output row) is fixed before the rounding, so the
result lies exactly on it. :func:`gptq_weight` runs GPTQ on a few candidate grids per row (the
layer's own, MSE-searched one and shrunk min–max ranges; the own grid also in natural column order when
act-order is on), keeps per row the one with the lowest
error on the calibration inputs (undamped ``H``), and keeps round-to-nearest on the layer's own grid
where that is lower still: the layer's output error is therefore never above RTN's. Written from the
paper's Algorithm 1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MpqkitError
from .primitives import qparams

# im2col rows per chunk when accumulating statistics (bounds the unfolded tensor to ~64 MB in float32)
_STAT_CHUNK_ELEMS = 1 << 24


#: shrink factors of each output channel's min–max range tried as GPTQ grids, beside the layer's own
#: (MSE-searched) grid: the wider grids lose to MSE clipping under nearest rounding but can win once GPTQ
#: spreads the rounding error (benchmarks/results/gptq_grid_resnet20/table.md)
GRID_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6)


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ settings: dampening (fraction of the mean diagonal of H), columns per lazy block, act-order
    (columns by decreasing ``H_ii``), and the candidate grids (``own_grid``: the layer's own, MSE-searched
    grid; ``shrink``: each channel's min–max range times these factors). Which inputs ``H`` is taken on
    is the caller's choice (``quant/layerwise.py``: the fp model's, or the already-quantized network's)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    own_grid: bool = True
    shrink: tuple[float, ...] = GRID_SHRINK
    #: with ``act_order``, also round the layer's own grid in natural column order (one more candidate):
    #: on a nearly singular ``H`` (e.g. a depthwise 3×3 on a smooth input) act-order can push the last
    #: columns off the grid's range, where the other order does not
    natural_order: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, (int, float)) and 0.0 < self.damp < 10.0):
            raise MpqkitError(f"GPTQ dampening must be in (0, 10), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise MpqkitError(f"GPTQ block size must be a positive integer, got {self.block_size!r}")
        object.__setattr__(self, "shrink", tuple(float(a) for a in self.shrink))
        if not all(0.0 < a <= 1.0 for a in self.shrink) or not (self.own_grid or self.shrink):
            raise MpqkitError(f"GPTQ grids: shrink factors in (0, 1] and at least one grid, got {self.shrink!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ input statistics
def layer_groups(layer: nn.Module) -> int:
    """Weight groups of a Conv2d (``groups``; depthwise: one per channel) or 1 for a Linear."""
    return int(layer.groups) if isinstance(layer, nn.Conv2d) else 1


def input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows ``(M, G, D)`` that its weight ``(G·R, D)`` multiplies: im2col
    patches of a Conv2d (padding included, in ``weight.reshape(C_out, -1)``'s column order), the
    feature vectors of a Linear."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    if not isinstance(layer, nn.Conv2d):
        raise MpqkitError(f"GPTQ handles Conv2d and Linear layers, not {type(layer).__name__}")
    g = layer.groups
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and all(p == 0 for p in layer._reversed_padding_repeated_twice):
        cols = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return cols.reshape(cols.shape[0], g, -1)
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=0, stride=layer.stride)  # (N, C·k, L)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return cols.reshape(cols.shape[0], g, -1)


def _row_sum(layer: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``(Σ rows, number of rows)`` of :func:`input_rows` without unfolding: for a Conv2d, each
    kernel offset's strided slice of the padded input summed per channel."""
    if not isinstance(layer, nn.Conv2d):
        rows = input_rows(layer, x)
        return rows.sum(0, dtype=torch.float64), rows.shape[0]
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    sums = torch.empty(x.shape[1], kh, kw, dtype=torch.float64, device=x.device)
    for i in range(kh):
        for j in range(kw):
            sl = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            sums[:, i, j] = sl.sum(dim=(0, 2, 3), dtype=torch.float64)
    return sums.reshape(layer.groups, -1), x.shape[0] * ho * wo


class InputStats:
    """Running ``H = Σ x xᵀ / n`` (per group, ``(G, D, D)``) and ``μ = Σ x / n`` (``(G, D)``) of a
    layer's input rows, accumulated in float64. ``hessian=False`` keeps the mean only."""

    def __init__(self, layer: nn.Module, hessian: bool = True) -> None:
        self.layer = layer
        self.want_h = hessian
        self.n = 0
        self.sum: Tensor | None = None
        self.xx: Tensor | None = None

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        if not self.want_h:
            s, m = _row_sum(self.layer, x.float())
            self.sum = s if self.sum is None else self.sum + s
            self.n += m
            return
        per_image = max(1, math.prod(x.shape[1:]) * (math.prod(getattr(self.layer, "kernel_size", (1,)))))
        step = max(1, _STAT_CHUNK_ELEMS // per_image)
        for i in range(0, len(x), step):
            rows = input_rows(self.layer, x[i:i + step].float())
            s = rows.sum(0, dtype=torch.float64)
            self.sum = s if self.sum is None else self.sum + s
            if self.want_h:
                r = rows.permute(1, 0, 2)  # (G, M, D)
                xx = torch.bmm(r.transpose(1, 2), r).double()
                self.xx = xx if self.xx is None else self.xx + xx
            self.n += rows.shape[0]

    def _check(self) -> None:
        if self.n == 0:
            raise MpqkitError("no calibration inputs reached this layer: its statistics are empty")

    @property
    def mean(self) -> Tensor:
        """``(G, D)`` mean input row."""
        self._check()
        assert self.sum is not None
        return self.sum / self.n

    @property
    def hessian(self) -> Tensor:
        """``(G, D, D)`` second moment of the input rows."""
        self._check()
        if self.xx is None:
            raise MpqkitError("these statistics were collected without the Hessian")
        return self.xx / self.n


# ------------------------------------------------------------------------------ the algorithm
def _fq(w: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize–dequantize on the grid (half-to-even rounding, as ``fake_quant``)."""
    return (torch.round(w / scale) + zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` per group, λ = ``damp``·mean(diag H); the dampening
    grows ×10 until the factorisation succeeds (a nearly singular H)."""
    d = h.shape[-1]
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    base = h.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)[:, None, None]
    for k in range(6):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10**k) * base * eye)
        if int(info.max()) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise MpqkitError("GPTQ: the layer's input Hessian is not positive definite even with strong dampening")


@torch.no_grad()
def gptq_round(w: Tensor, h: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int,
               cfg: GptqConfig = GptqConfig()) -> Tensor:
    """GPTQ rounding of ``w`` ``(G, R, D)`` with Hessians ``h`` ``(G, D, D)`` on the grid
    ``scale``/``zp`` ``(G, R, 1)``; returns the dequantized values ``(G, R, D)`` (float64), each on its
    row's grid. Deterministic; no fallback to nearest rounding (see :func:`gptq_weight`)."""
    W = w.double().clone()
    H = h.double().clone()
    G, R, D = W.shape
    scale, zp = scale.double().reshape(G, R), zp.double().reshape(G, R)
    diag = H.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    perm = None
    if cfg.act_order:
        perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
        W = W.gather(2, perm[:, None, :].expand(G, R, D))
        H = H.gather(1, perm[:, :, None].expand(G, D, D)).gather(2, perm[:, None, :].expand(G, D, D))
    U = _inverse_cholesky(H, cfg.damp)
    Q = torch.empty_like(W)
    for i1 in range(0, D, cfg.block_size):
        i2 = min(i1 + cfg.block_size, D)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, :, i]
            q = _fq(col, scale, zp, qmin, qmax)
            Q[:, :, i1 + i] = q
            err = (col - q) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            E1[:, :, i] = err
        if i2 < D:
            W[:, :, i2:] -= torch.bmm(E1, U[:, i1:i2, i2:])
    if perm is not None:
        Q = Q.gather(2, torch.argsort(perm, dim=1)[:, None, :].expand(G, R, D))
    return Q


def row_errors(w: Tensor, q: Tensor, h: Tensor) -> Tensor:
    """``(G, R)`` output error of each row on the calibration inputs: ``(w − q) H (w − q)ᵀ``."""
    d = (w.double() - q.double())
    return torch.einsum("grd,gde,gre->gr", d, h.double(), d)


def layer_grid(layer: nn.Module) -> tuple[Tensor, Tensor, int, int]:
    """The quantized layer's weight grid as ``(G, R, 1)`` scale and zero point plus its integer range."""
    w = layer.weight
    g = layer_groups(layer)
    c_out = w.shape[0]
    scale = layer.w_scale.detach().reshape(-1).expand(c_out) if layer.w_scale.numel() in (1, c_out) else None
    if scale is None:
        raise MpqkitError("GPTQ needs a per-tensor or per-output-channel weight grid")
    zp = layer.w_zero_point.detach().reshape(-1).expand(c_out)
    qmin, qmax = layer._w_range
    return scale.reshape(g, c_out // g, 1), zp.reshape(g, c_out // g, 1), qmin, qmax


def candidate_grids(layer: nn.Module, w3: Tensor, shrink: tuple[float, ...] = GRID_SHRINK,
                    own_grid: bool = True) -> tuple[Tensor, Tensor]:
    """``(K, G, R, 1)`` scales and zero points: the layer's own grid first (``own_grid``), then the
    min–max range of each row (of the whole tensor for a per-tensor grid) shrunk by each factor, on the
    layer's integer grid."""

    scale, zp, _, _ = layer_grid(layer)
    per_tensor = layer.w_scale.numel() == 1 and layer.weight.shape[0] > 1
    if per_tensor:
        lo, hi = (t.reshape(1, 1, 1).expand_as(scale) for t in torch.aminmax(w3))
    else:
        lo, hi = (t.unsqueeze(-1) for t in torch.aminmax(w3, dim=2))
    spec = layer.w_spec
    scales, zps = ([scale.double()], [zp.double()]) if own_grid else ([], [])
    for a in shrink:
        s_, z_ = qparams(lo * a, hi * a, spec.bits, spec.symmetric)
        scales.append(s_.double())
        zps.append(z_.double())
    return torch.stack(scales), torch.stack(zps)


@torch.no_grad()
def gptq_weight(layer: nn.Module, h: Tensor, cfg: GptqConfig = GptqConfig()) -> tuple[Tensor, Tensor, Tensor, dict]:
    """GPTQ-rounded weight of a quantized Conv2d/Linear (``QuantConv2d``/``QuantLinear``, grid already
    set) and the grid it lies on. GPTQ runs on each candidate grid (:func:`candidate_grids`: the layer's
    own and shrunk min–max ranges, all in one batched pass: rows are independent); per output channel
    (per layer for a per-tensor grid) the candidate with the lowest error on the calibration inputs,
    ``(w − ŵ)ᵀH(w − ŵ)``, wins, and nearest rounding on the layer's own grid is kept where it is lower
    still: the output error never exceeds round-to-nearest's. Returns (weight, w_scale, w_zero_point)
    shaped like the layer's and ``{"rows", "rows_nearest", "grid_counts", "err_gptq", "err_nearest"}``."""
    w = layer.weight.detach()
    g = layer_groups(layer)
    w3 = w.reshape(g, w.shape[0] // g, -1)
    G, R, D = w3.shape
    if h.shape != (G, D, D):
        raise MpqkitError(f"GPTQ: Hessian of shape {tuple(h.shape)} does not fit a weight of shape {tuple(w.shape)}")
    scales, zps = candidate_grids(layer, w3, cfg.shrink, cfg.own_grid)
    K = scales.shape[0]
    own_scale, own_zp, qmin, qmax = layer_grid(layer)
    stack = lambda t: t.permute(1, 0, 2, 3).reshape(G, K * R, -1)  # noqa: E731  (K, G, R, x) -> (G, K·R, x)
    q = gptq_round(w3.repeat(1, K, 1), h, stack(scales), stack(zps), qmin, qmax, cfg)  # (G, K·R, D)
    own_scale, own_zp = own_scale.double()[None], own_zp.double()[None]
    if cfg.act_order and cfg.natural_order and cfg.own_grid:  # candidate: the own grid, columns in natural order
        nat = gptq_round(w3, h, own_scale[0], own_zp[0], qmin, qmax, replace(cfg, act_order=False))
        q = torch.cat([q, nat], 1)
        scales, zps = torch.cat([scales, own_scale]), torch.cat([zps, own_zp])
        K += 1
    err = row_errors(w3.repeat(1, K, 1), q, h).reshape(G, K, R)
    rtn = _fq(w3.double(), own_scale[0], own_zp[0], qmin, qmax)
    err = torch.cat([err, row_errors(w3, rtn, h)[:, None]], 1)  # candidate K: nearest on the layer's grid
    q = torch.cat([q.reshape(G, K, R, D), rtn[:, None]], 1)
    scales, zps = torch.cat([scales, own_scale]), torch.cat([zps, own_zp])
    if layer.w_scale.numel() == 1 and w.shape[0] > 1:  # one grid for the whole layer
        best = err.sum(dim=(0, 2)).argmin().expand(G, R)
    else:
        best = err.argmin(dim=1)  # (G, R)
    pick = lambda t: t.gather(1, best[:, None, :, None].expand(G, 1, R, t.shape[-1]))[:, 0]  # noqa: E731
    out = pick(q)
    s_out = pick(scales.permute(1, 0, 2, 3))
    z_out = pick(zps.permute(1, 0, 2, 3))
    info = {"rows": G * R, "rows_nearest": int((best == K).sum()),
            "grid_counts": [int((best == k).sum()) for k in range(K)],
            "err_gptq": float(err.gather(1, best[:, None]).sum()), "err_nearest": float(err[:, K].sum())}
    shape = layer.w_scale.shape
    s_out = s_out.reshape(-1)[: 1 if layer.w_scale.numel() == 1 else None].reshape(shape)
    z_out = z_out.reshape(-1)[: 1 if layer.w_scale.numel() == 1 else None].reshape(shape)
    return (out.reshape(w.shape).to(w.dtype), s_out.to(layer.w_scale.dtype), z_out.to(layer.w_zero_point.dtype),
            info)
