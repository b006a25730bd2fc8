"""AdaRound / BRECQ / QDrop: post-training reconstruction of an already-quantized model.

For each reconstruction unit in execution order — a residual block (BRECQ) or a single layer
(AdaRound) — learn

* the rounding of every weight in the unit: AdaRound's rectified-sigmoid variables ``α`` decide
  floor or ceil per weight, with the regulariser ``λ·Σ(1 − |2h(α) − 1|^β)`` (β annealed 20 → 2
  after a warm-up) pushing them to a hard 0/1 decision;
* (BRECQ, QDrop) the step size of every input-activation quantizer in the unit, with LSQ
  (straight-through rounding, gradient to the scale);

so that the quantized unit's output, fed with the *quantized* model's input to the unit (units
before it already reconstructed), matches the fp model's output of that unit on the calibration
set (MSE, summed over channels). QDrop: during reconstruction each activation element keeps its
fp value with probability ``drop`` instead of being quantized.

At the end the rounding is made hard and the quantized weights are written into the model's
weight tensors: they lie exactly on each layer's grid (same scale and zero point), so the model is
an ordinary fake-quant model that saves, loads and exports like any other.

Follows BRECQ's ``quant/block_recon.py`` / ``adaptive_rounding.py`` and QDrop's ``recon.py``
(hyper-parameters: λ = 0.01, β 20 → 2, warm-up 20 %, batch 32, Adam 1e-3 for α, 4e-5 for the
step sizes); the iteration count is the knob for CPUs (see :data:`DEFAULT_ITERS`).
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DataError, MpqkitError
from .modules import QuantMixin, install_quantizers
from .lsq import lsq_fake_quant

log = logging.getLogger("mpqkit")

#: CPU default iterations per unit, chosen by measurement (benchmarks/results/brecq_resnet20/table.md).
DEFAULT_ITERS = 500
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)


@dataclass(frozen=True)
class ReconConfig:
    """Reconstruction settings. ``granularity``: "block" (BRECQ) or "layer" (AdaRound)."""

    granularity: str = "block"
    iters: int = DEFAULT_ITERS
    batch_size: int = 32
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr: float = 1e-3
    learn_act: bool = True
    act_lr: float = 4e-5
    drop: float = 0.0  # QDrop: probability of keeping an activation element fp
    max_block_layers: int = 4
    cache_mb: int = 1024  # fp outputs / quantized inputs above this go to a memory-mapped temp file
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in ("block", "layer"):
            raise MpqkitError(f"reconstruction granularity must be 'block' or 'layer', got {self.granularity!r}")
        if self.iters < 0 or self.batch_size < 1:
            raise MpqkitError("reconstruction iters must be >= 0 and batch size >= 1")
        if not 0.0 <= self.drop < 1.0:
            raise MpqkitError(f"QDrop probability must be in [0, 1), got {self.drop}")

    def to_dict(self) -> dict:
        return asdict(self)


#: PTQ backend name -> reconstruction config (None: range estimation only, no reconstruction)
PTQ_BACKENDS: dict[str, ReconConfig | None] = {
    "minmax": None,
    "mse": None,
    "adaround": ReconConfig(granularity="layer", learn_act=False),
    "brecq": ReconConfig(granularity="block"),
    "qdrop": ReconConfig(granularity="block", drop=0.5),
}


def recon_config(ptq: str, **overrides) -> ReconConfig | None:
    """The reconstruction config of a PTQ backend name, with non-None overrides applied."""
    if ptq not in PTQ_BACKENDS:
        raise MpqkitError(f"unknown PTQ backend '{ptq}', expected one of {sorted(PTQ_BACKENDS)}")
    base = PTQ_BACKENDS[ptq]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if base is None:
        if overrides:
            raise MpqkitError(f"PTQ backend '{ptq}' has no reconstruction options ({', '.join(overrides)})")
        return None
    return ReconConfig(**{**asdict(base), **overrides})


# ------------------------------------------------------------------------------ units
@dataclass
class Unit:
    """A reconstruction unit: a module called once per forward, and the quantized layers in it."""

    fqn: str
    module: nn.Module
    layers: list[str]


def find_units(model: nn.Module, granularity: str = "block", max_block_layers: int = 4) -> list[Unit]:
    """Reconstruction units in module order. Containers (Sequential/ModuleList/ModuleDict) are
    entered; any other module holding 1..``max_block_layers`` quantized layers is a block (BRECQ's
    residual blocks, torchvision's BasicBlock/Bottleneck); larger modules are entered too."""
    units: list[Unit] = []

    def quant_layers(mod: nn.Module, prefix: str) -> list[str]:
        return [f"{prefix}{n}" if n else prefix.rstrip(".") for n, m in mod.named_modules() if isinstance(m, QuantMixin)]

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            fqn = f"{prefix}{name}"
            if isinstance(child, QuantMixin):
                units.append(Unit(fqn, child, [fqn]))
                continue
            layers = quant_layers(child, fqn + ".")
            if not layers:
                continue
            container = isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
            if granularity == "block" and not container and len(layers) <= max_block_layers:
                units.append(Unit(fqn, child, layers))
            else:
                walk(child, fqn + ".")

    walk(model, "")
    return units


# ------------------------------------------------------------------------------ storage
class _Store:
    """Rows of one tensor shape, kept in CPU memory, or in a memory-mapped temp file when larger
    than ``bound_mb``: the calibration activations of a unit never need to fit on the device."""

    def __init__(self, n: int, shape: Sequence[int], bound_mb: int) -> None:
        nbytes = n * math.prod(shape) * 4
        self._file = None
        if nbytes > bound_mb * 2**20:
            self._file = tempfile.NamedTemporaryFile(prefix="mpqkit-recon-", suffix=".f32")
            self.data = torch.from_numpy(np.memmap(self._file.name, np.float32, "w+", shape=(n, *shape)))
        else:
            self.data = torch.empty((n, *shape), dtype=torch.float32)
        self.filled = 0

    def add(self, x: Tensor) -> None:
        self.data[self.filled:self.filled + len(x)] = x.detach().to("cpu", torch.float32)
        self.filled += len(x)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Captured(Exception):
    pass


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, batches: Sequence[Tensor], n: int, bound_mb: int,
             want: str) -> _Store:
    """The input (``want="in"``) or output (``"out"``) of ``module`` over all batches; the forward
    stops as soon as it is captured (inputs)."""
    store: _Store | None = None
    calls = 0

    def hook(_m, args, out=None):
        nonlocal store, calls
        x = args[0] if want == "in" else out
        if not isinstance(x, Tensor) or (want == "in" and len(args) != 1):
            raise MpqkitError(f"reconstruction needs units with one tensor input and output; {type(_m).__name__} has not")
        calls += 1
        if calls > 1:
            raise MpqkitError(f"{type(_m).__name__} is called more than once per forward: it cannot be reconstructed as a unit")
        if store is None:
            store = _Store(n, x.shape[1:], bound_mb)
        store.add(x)
        raise _Captured  # nothing after this module is needed

    h = module.register_forward_pre_hook(hook) if want == "in" else module.register_forward_hook(hook)
    device = next(module.parameters()).device
    try:
        for x in batches:
            calls = 0
            try:
                model(x.to(device))
            except _Captured:
                pass
    finally:
        h.remove()
    assert store is not None and store.filled == n
    return store


# ------------------------------------------------------------------------------ learned quantizers
class _AdaRoundWeight(nn.Module):
    """Soft (training) / hard (final) rounding of one layer's weight on its fixed grid."""

    def __init__(self, layer: QuantMixin) -> None:
        super().__init__()
        w = layer.weight.detach()
        self.scale, self.zp = layer.w_scale.detach(), layer.w_zero_point.detach()
        self.qmin, self.qmax = layer._w_range
        scaled = w * torch.reciprocal(self.scale)
        self.w_floor = torch.floor(scaled)
        rest = (scaled - self.w_floor).clamp(1e-4, 1 - 1e-4)  # keep the logit finite
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def h(self) -> Tensor:
        return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, _w: Tensor) -> Tensor:
        h = (self.alpha >= 0).to(self.w_floor.dtype) if self.hard else self.h()
        q = (self.w_floor + h + self.zp).clamp(self.qmin, self.qmax)
        return (q - self.zp) * self.scale

    def reg(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class _LsqInput(nn.Module):
    """Input quantizer with a learnable step size (LSQ) and optional QDrop."""

    def __init__(self, layer: QuantMixin, learn: bool, drop: float, gen: torch.Generator) -> None:
        super().__init__()
        self.scale = nn.Parameter(layer.a_scale.detach().clone(), requires_grad=learn)
        self.zp = layer.a_zero_point.detach()
        self.qmin, self.qmax = layer._a_range
        self.drop, self.gen, self.active = drop, gen, True

    def forward(self, x: Tensor) -> Tensor:
        xq = lsq_fake_quant(x, self.scale, self.zp, self.qmin, self.qmax, clamp_first=False)  # as BRECQ's code
        if self.drop > 0 and self.active:
            keep_fp = torch.rand(x.shape, generator=self.gen).to(x.device) < self.drop  # CPU stream: same on any device
            xq = torch.where(keep_fp, x, xq)
        return xq


# ------------------------------------------------------------------------------ the loop
def _beta(step: int, cfg: ReconConfig) -> float:
    start = cfg.warmup * cfg.iters
    rel = (step - start) / max(cfg.iters - start, 1)
    return cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * max(0.0, 1.0 - rel)


def _rec_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over the channel dim (dim 1), averaged over the rest (BRECQ's lp_loss)."""
    return (pred - target).pow(2).sum(1).mean() if pred.dim() > 1 else (pred - target).pow(2).mean()


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, batches: Iterable[Tensor],
                cfg: ReconConfig | None = None, progress: bool = False) -> dict:
    """Reconstruct ``qmodel`` (a quantized copy of ``fp_model``, changed in place) unit by unit on
    the calibration ``batches``; returns per-unit statistics (losses before/after, seconds)."""
    cfg = cfg or ReconConfig()
    batches = [b for b in batches]
    n = sum(len(b) for b in batches)
    if n == 0:
        raise DataError("reconstruction needs calibration data: the calibration set is empty")
    units = find_units(qmodel, cfg.granularity, cfg.max_block_layers)
    fp_modules = dict(fp_model.named_modules())
    gen = torch.Generator().manual_seed(cfg.seed)
    qmodel.eval()
    fp_model.eval()
    stats: dict = {"config": cfg.to_dict(), "units": []}
    t_all = time.perf_counter()
    for ui, unit in enumerate(units):
        layers: list[QuantMixin] = [qmodel.get_submodule(f) for f in unit.layers]  # type: ignore[misc]
        if not any(l.w_spec is not None or (cfg.learn_act and l.a_spec is not None) for l in layers):
            continue
        t0 = time.perf_counter()
        x_store = _capture(qmodel, unit.module, batches, n, cfg.cache_mb, "in")
        y_store = _capture(fp_model, fp_modules[unit.fqn], batches, n, cfg.cache_mb, "out")
        try:
            before, after = _reconstruct_unit(unit.module, layers, x_store.data, y_store.data, cfg, gen)
        finally:
            x_store.close()
            y_store.close()
        row = {"unit": unit.fqn, "layers": unit.layers, "mse_before": before, "mse_after": min(after, before),
               "kept": after <= before, "seconds": time.perf_counter() - t0}
        stats["units"].append(row)
        msg = (f"[recon {ui + 1}/{len(units)}] {unit.fqn}: output MSE {before:.4g} → {after:.4g} "
               f"({row['seconds']:.1f}s)")
        (log.info if progress else log.debug)(msg)
    stats["seconds"] = time.perf_counter() - t_all
    return stats


def _reconstruct_unit(module: nn.Module, layers: list[QuantMixin], xs: Tensor, ys: Tensor, cfg: ReconConfig,
                      gen: torch.Generator) -> tuple[float, float]:
    """Learn the unit's rounding (and, with ``cfg.learn_act``, its input steps) so that ``module(xs)``
    matches the fp outputs ``ys``; harden it onto the grid, or restore nearest rounding where the
    unit's output error rose. Returns the output MSE before and after."""
    before = _unit_error(module, xs, ys)
    rounders = [_AdaRoundWeight(l) if l.w_spec is not None else None for l in layers]
    inputs = [_LsqInput(l, cfg.learn_act, cfg.drop, gen) if l.a_spec is not None else None for l in layers]
    for l, r, q in zip(layers, rounders, inputs):
        install_quantizers(l, r, q)
    saved = [(l.weight.detach().clone(), l.a_scale.detach().clone() if hasattr(l, "a_scale") else None)
             for l in layers]
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            _optimize(module, rounders, inputs, xs, ys, cfg, gen)
        _harden(layers, rounders, inputs, cfg)
        after = _unit_error(module, xs, ys)
        if after > before:  # rare (few iterations): keep nearest rounding and the calibrated steps
            _restore(layers, saved)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for l in layers:
            install_quantizers(l, None, None)
    return before, after


def _optimize(module: nn.Module, rounders: list, inputs: list, xs: Tensor, ys: Tensor, cfg: ReconConfig,
              gen: torch.Generator) -> None:
    """``cfg.iters`` Adam steps on random calibration batches: reconstruction loss, plus the rounding
    regulariser (annealed β) after the warm-up."""
    w_params = [r.alpha for r in rounders if r is not None]
    a_params = [q.scale for q in inputs if q is not None and cfg.learn_act]
    opts = [torch.optim.Adam(w_params, lr=cfg.lr) if w_params else None,
            torch.optim.Adam(a_params, lr=cfg.act_lr) if a_params else None]
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opts[1], T_max=max(cfg.iters, 1), eta_min=0.0) \
        if opts[1] else None
    device = next(module.parameters()).device
    n = len(xs)
    for step in range(cfg.iters):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        x, y = xs[idx].to(device), ys[idx].to(device)
        loss = _rec_loss(module(x), y)
        if step >= cfg.warmup * cfg.iters and w_params:
            b = _beta(step, cfg)
            loss = loss + cfg.reg_weight * sum(r.reg(b) for r in rounders if r is not None)
        for o in opts:
            if o is not None:
                o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            if o is not None:
                o.step()
        if sched_a is not None:
            sched_a.step()


@torch.no_grad()
def _harden(layers: list[QuantMixin], rounders: list, inputs: list, cfg: ReconConfig) -> None:
    """Write the learned rounding (hard, on the layer's grid) and input steps into the layers and
    remove the learned quantizers."""
    for r in rounders:
        if r is not None:
            r.hard = True
    for q in inputs:
        if q is not None:
            q.active = False
    for l, r, q in zip(layers, rounders, inputs):
        if r is not None:
            l.weight.copy_(r(l.weight))  # hard-rounded values, on the layer's grid
        if q is not None and cfg.learn_act:
            l.a_scale.copy_(q.scale.detach().abs() + 1e-12)
        install_quantizers(l, None, None)


@torch.no_grad()
def _restore(layers: Sequence[QuantMixin], saved: Sequence[tuple[Tensor, Tensor | None]]) -> None:
    for l, (w, a) in zip(layers, saved):
        l.weight.copy_(w)
        l._w_cache = None
        if a is not None:
            l.a_scale.copy_(a)


@torch.no_grad()
def _unit_error(module: nn.Module, xs: Tensor, ys: Tensor, chunk: int = 256) -> float:
    """Mean reconstruction loss of the unit over the whole calibration set."""
    device = next(module.parameters()).device
    total, n = 0.0, len(xs)
    for i in range(0, n, chunk):
        x, y = xs[i:i + chunk].to(device), ys[i:i + chunk].to(device)
        total += float(_rec_loss(module(x), y)) * len(x)
    return total / n
