"""Layer-wise PTQ steps on a quantized model whose grids are set: GPTQ rounding and empirical bias
correction, in execution order.

A *walk* runs the calibration set through the quantized network one quantized layer at a time
(the traced program of :mod:`mpqkit.tracing`, keeping the live tensors of every batch at the
current layer): each layer is processed on the inputs the network before it — already processed —
gives it, then the walk runs on through it. So GPTQ rounds every layer against the quantized
network's own inputs (the paper's sequential order), and bias correction removes each layer's
output shift including the drift of the layers before it:

* GPTQ (``quant/gptq.py``): ``H`` of the layer's (input-quantized) inputs, weights rounded on the
  layer's grid and written into its weight tensor;
* bias correction: ``δ = W·μ_fp − Ŵ·μ̂`` per output channel, with ``μ_fp`` the mean input row of the fp
  model's layer and ``μ̂`` that of the quantized layer's actual (quantized) input, so that the
  quantized layer's mean output equals the fp layer's on the calibration set. ``δ`` goes into the
  bias of the BatchNorm right after a conv (exact: ``BN(z + δ) = BN(z) + δ·γ/σ``), else the layer's
  own bias (created when it has none): the parameters of a conv+BN model, and so its size, stay as
  they were.

The same arithmetic on the fp model's inputs (:class:`LocalLayerBuilder`) builds one quantized layer
on its own — its quantization then depends only on its own bits — for the probe engine and for
``apply_plan`` under the default ``rounding="gptq"``, both reading one cache. Models torch.fx cannot
trace are walked by one forward per layer (same result, slower).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import MpqkitError
from ..tracing import Program, trace_model
from .calibration import calib_batches, calibrate
from .config import QuantConfig
from .fold import bn_affine, conv_bn_nodes
from .gptq import GptqConfig, InputStats, gptq_weight, layer_groups
from .modules import QuantMixin
from .observers import OBSERVER_VERSION
from .primitives import fake_quant

#: GPTQ's settings (dampening, blocks, act-order) for every layer mpqkit rounds
LOCAL_GPTQ = GptqConfig()
LAYER_PTQ_VERSION = 3

log = logging.getLogger("mpqkit")


class _Stop(Exception):
    pass


# ------------------------------------------------------------------------------ walking
def _walk_traced(program: Program, batches: Sequence[Tensor], layers: list[str]) -> Iterator[tuple[str, list[Tensor]]]:
    envs = [program.initial_env(x) for x in batches]
    cur = 0
    for fqn in sorted(layers, key=program.cut.__getitem__):
        cut = program.cut[fqn]
        envs = [program.run(env, cur, cut, {}) for env in envs]
        cur = cut
        node = program.nodes[cut]
        if len(node.args) != 1 or node.kwargs:
            raise MpqkitError(f"layer {fqn} is called with more than one argument: it cannot be walked")
        yield fqn, [env[node.args[0]] for env in envs]


def _walk_hooked(model: nn.Module, batches: Sequence[Tensor], layers: list[str]) -> Iterator[tuple[str, list[Tensor]]]:
    """One forward per layer, stopped at the layer (models that do not trace)."""
    for fqn in layers:
        got: list[Tensor] = []

        def hook(_m, args):
            got.append(args[0].detach())
            raise _Stop

        h = model.get_submodule(fqn).register_forward_pre_hook(hook)
        try:
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
        finally:
            h.remove()
        yield fqn, got


@torch.no_grad()
def fp_input_means(model: nn.Module, batches: Sequence[Tensor], layers: Sequence[nn.Module | str]) -> dict[str, Tensor]:
    """``(G, D)`` mean input row of each named layer of the (fp) model over the batches, one forward."""
    stats = {f: InputStats(model.get_submodule(f), hessian=False) for f in layers}
    hs = [model.get_submodule(f).register_forward_pre_hook(lambda m, a, f=f: stats[f].add(a[0])) for f in stats]
    try:
        for x in batches:
            model(x)
    finally:
        for h in hs:
            h.remove()
    return {f: s.mean for f, s in stats.items()}


# ------------------------------------------------------------------------------ bias correction
def output_mean(weight: Tensor, mu: Tensor) -> Tensor:
    """Mean output per channel (without bias) of a layer with ``weight`` on mean input rows ``mu`` (G, D)."""
    g = mu.shape[0]
    w3 = weight.detach().double().reshape(g, weight.shape[0] // g, -1)
    return torch.einsum("grd,gd->gr", w3, mu.double()).reshape(-1)


def bias_shift(fp_weight: Tensor, mu_fp: Tensor, q_weight: Tensor, mu_q: Tensor) -> Tensor:
    """``δ = W·μ_fp − Ŵ·μ̂`` per output channel (float32): add it to the quantized layer's output."""
    return (output_mean(fp_weight, mu_fp) - output_mean(q_weight, mu_q)).float()


def _add_layer_bias(layer: nn.Module, delta: Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(delta))
    layer.bias.data.add_(delta.to(layer.bias))


def _add_output_bias(layer: nn.Module, bn: nn.BatchNorm2d | None, delta: Tensor) -> None:
    """Shift the layer's output by ``delta``: through the BN right after it when there is one (and it
    has a bias), else the layer's own bias."""
    if bn is not None and bn.bias is not None:
        scale, _ = bn_affine(bn, None)
        bn.bias.data.add_((delta * scale).to(bn.bias))
    else:
        _add_layer_bias(layer, delta)


# ------------------------------------------------------------------------------ the sequential pass
@torch.no_grad()
def sequential_ptq(qmodel: nn.Module, fp_model: nn.Module, batches: Sequence[Tensor], gptq: GptqConfig | None,
                   bias_correction: bool) -> dict:
    """GPTQ (when ``gptq``) and/or bias correction of every quantized layer of ``qmodel`` (a quantized
    copy of ``fp_model``, changed in place), in execution order on the calibration ``batches``, each
    on the inputs of the network before it as already processed. Returns per-layer statistics and
    the seconds taken."""
    if gptq is None and not bias_correction:
        return {}
    t0 = time.perf_counter()
    qmodel.eval()
    fp_model.eval()
    names = [n for n, m in qmodel.named_modules() if isinstance(m, QuantMixin)]
    fp_mods = dict(fp_model.named_modules())
    mu_fp = fp_input_means(fp_model, batches, names) if bias_correction else {}
    gm = trace_model(qmodel)
    program = Program(gm, names, fold_bn=False) if gm is not None else None
    if program is not None and any(n not in program.cut for n in names):
        program = None
    bn_after = ({program.modules[c.target]: program.modules[b.target] for c, b in conv_bn_nodes(program.nodes, program.modules)}
                if program is not None else {})
    walk = _walk_traced(program, batches, names) if program is not None else _walk_hooked(qmodel, batches, names)
    rows = []
    for fqn, inputs in walk:
        layer = qmodel.get_submodule(fqn)
        rounds = gptq is not None and layer.w_spec is not None
        stats = InputStats(layer, hessian=rounds)
        for x in inputs:
            stats.add(layer.quantize_input(x))
        row: dict = {"layer": fqn}
        if rounds:
            w, scale, zp, info = gptq_weight(layer, stats.hessian, gptq)
            set_weight(layer, {"weight": w, "w_scale": scale, "w_zero_point": zp})
            row.update(info)
        if bias_correction:
            delta = bias_shift(fp_mods[fqn].weight, mu_fp[fqn], layer.quantized_weight(), stats.mean)
            _add_output_bias(layer, bn_after.get(layer), delta)
            row["bias_shift_abs_mean"] = float(delta.abs().mean())
        rows.append(row)
    return {"layers": rows, "seconds": time.perf_counter() - t0, "walk": "traced" if program is not None else "hooked"}


# ------------------------------------------------------------------------------ one layer on its own
def layer_ptq_context(model_sha256: str, images_sha256: str, qconfig: QuantConfig, seed: int) -> dict:
    """What a layer built on its own depends on (the key space of its cache entries): the fp weights,
    the calibration images, the quantizer (grid, rounding, bias correction, GPTQ settings) and the
    activation observers' seed. The probe engine and ``apply_plan`` use the same context, so a plan
    is applied with the very layers its search measured."""
    return {"layer_ptq": LAYER_PTQ_VERSION, "observer": OBSERVER_VERSION, "model": model_sha256,
            "data": images_sha256, "qconfig": qconfig.to_dict(), "gptq": LOCAL_GPTQ.to_dict(), "seed": seed}


class LocalLayerBuilder:
    """Builds quantized layers on the fp model's inputs alone (layer-local PTQ): GPTQ rounding on the
    layer's grid (``qconfig.rounding`` "gptq" or "gptq-seq") and the bias correction
    ``δ = W·μ_fp − Ŵ·μ̂_fp`` (``qconfig.bias_correction``), for a given (layer, w_bits, a_bits).

    Statistics of every layer's fp input (Hessian, mean; through the layer's ``a_bits`` input
    quantizer) are gathered in one forward of a private copy of ``model`` over ``images`` in
    ``calib_batches`` chunks, the first time a layer needs them. ``store`` (optional; ``get_tensors`` /
    ``put_tensors`` / ``key``, e.g. an ``engine.cache.ProbeCache`` with :func:`layer_ptq_context`)
    keeps every built layer on disk: a layer is computed once per context, then read."""

    def __init__(self, model: nn.Module, images: Tensor, qconfig: QuantConfig, seed: int = 0,
                 store: Any = None, device: torch.device | None = None, gptq: GptqConfig = LOCAL_GPTQ) -> None:
        self.gptq = gptq  # (its settings are part of the store's context: pass the store made for them)
        self.model = copy.deepcopy(model).eval()
        if device is not None:
            self.model.to(device)
        self.images, self.qconfig, self.seed, self.store = images, qconfig, seed, store
        self._stats: dict[int | None, dict[str, InputStats]] = {}
        self._observers: dict | None = None
        self.built = self.cached = 0  # tensors (GPTQ weights, corrected biases) computed / read from the store
        self.seconds = 0.0

    def build(self, fqn: str, qlayer: nn.Module, w_bits: int | None, a_bits: int | None) -> dict[str, Tensor]:
        """``{"weight": …, "bias": …}`` (the entries that change) for ``qlayer``, the quantized
        ``fqn`` at (``w_bits``, ``a_bits``) with its grid set; empty when nothing changes. The GPTQ
        weight depends on (layer, w_bits) only — ``H`` is taken on the fp input itself, so a
        weight-only probe and a plan's layer with quantized input share it; the corrected bias on
        (layer, w_bits, a_bits)."""
        gptq = self.qconfig.rounding != "nearest" and w_bits is not None
        bc = self.qconfig.bias_correction and (w_bits is not None or a_bits is not None)
        out: dict[str, Tensor] = {}
        if gptq:
            def rounded() -> dict[str, Tensor]:
                w, scale, zp, _ = gptq_weight(qlayer, self._input_stats(None, want_h=True)[fqn].hessian, self.gptq)
                return {"weight": w, "w_scale": scale, "w_zero_point": zp}

            out.update(self._entry(["weight", fqn, w_bits], rounded))
        if bc:
            def bias() -> Tensor:
                fp_layer = self.model.get_submodule(fqn)
                w_hat = out["weight"] if "weight" in out else qlayer.quantized_weight()
                mu_q = self._input_stats(a_bits, want_h=False)[fqn].mean
                delta = bias_shift(fp_layer.weight, self._input_stats(None, want_h=False)[fqn].mean, w_hat, mu_q)
                return delta if fp_layer.bias is None else fp_layer.bias.detach() + delta

            out.update(self._entry(["bias", fqn, w_bits, a_bits], lambda: {"bias": bias()}))
        return out

    def _entry(self, spec: list, compute: Any) -> dict[str, Tensor]:
        """One built entry (named tensors): read from the store, or computed (and stored)."""
        t0 = time.perf_counter()
        key = self.store.key({"layer": spec}) if self.store is not None else None
        got = self.store.get_tensors(key) if key is not None else None
        if got is None:
            got = {k: v.detach().cpu() for k, v in compute().items()}
            if key is not None:
                self.store.put_tensors(key, got)
            self.built += 1
        else:
            self.cached += 1
        self.seconds += time.perf_counter() - t0
        return got

    @torch.no_grad()
    def _input_stats(self, a_bits: int | None, want_h: bool) -> dict[str, InputStats]:
        """Per layer, statistics of the fp input (through its ``a_bits`` input quantizer when given),
        Hessians included when ``want_h`` (gathered again if an earlier pass skipped them)."""
        if a_bits not in self._stats or (want_h and any(st.xx is None for st in self._stats[a_bits].values())):

            names = [n for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            stats = {f: InputStats(self.model.get_submodule(f), hessian=want_h) for f in names}
            aq = {}
            if a_bits is not None:
                if self._observers is None:
                    self._observers = calibrate(self.model, names, self.images, seed=self.seed)
                aq = {f: self._observers[f].qparams(self.qconfig.a_spec(a_bits)) for f in names}

            def hook(f: str):
                def fn(_m, args):
                    stats[f].add(fake_quant(args[0], *aq[f]) if f in aq else args[0])
                return fn

            hs = [self.model.get_submodule(f).register_forward_pre_hook(hook(f)) for f in names]
            device = next(self.model.parameters()).device
            try:
                for chunk in calib_batches(self.images):
                    self.model(chunk.to(device))
            finally:
                for h in hs:
                    h.remove()
            self._stats[a_bits] = stats
        return self._stats[a_bits]


def install(qlayer: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Give a quantized layer its own weight/bias tensors and grid (the fp model's tensors, which the
    layer shares until then, stay as they are)."""
    params = dict(qlayer._parameters)
    for name, t in tensors.items():
        if name in ("w_scale", "w_zero_point"):
            qlayer._buffers[name] = t.to(qlayer._buffers[name])
            continue
        ref = params.get(name)
        t = t.to(ref.device if ref is not None else qlayer.weight.device)
        if ref is not None and t.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) \
                and not ref.is_contiguous():
            t = t.contiguous(memory_format=torch.channels_last)
        params[name] = nn.Parameter(t, requires_grad=False)
    qlayer._parameters = params
    qlayer._w_cache = None


@torch.no_grad()
def set_weight(qlayer: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Write a rounded weight and its grid into a quantized layer's own tensors, in place."""
    for name, t in tensors.items():
        getattr(qlayer, name).copy_(t.to(getattr(qlayer, name)))
    qlayer._w_cache = None


__all__ = ["sequential_ptq", "LocalLayerBuilder", "layer_ptq_context", "install", "set_weight", "fp_input_means",
           "bias_shift", "layer_groups"]
