"""Apply a plan to a *copy* of a model: swap layers for fake-quant modules and calibrate activations.

Activation ranges are calibrated on the fp model's layer inputs through ``quant.calibration``,
the same path (images, chunks, seed) the probe engine uses, so a plan evaluates the way it was
searched.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import DataError, PlanError
from ..plan import Plan
from .calibration import calib_batches, calibrate, model_device
from .config import QuantConfig
from .layerwise import LocalLayerBuilder
from .modules import QuantAct, quantize_module
from .observers import ActivationObserver
from .ptq import layer_steps, prepare_fp


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_plan(model: nn.Module, plan: Plan, calib_images: torch.Tensor | None = None,
               qconfig: QuantConfig | None = None,
               observers: dict[str, ActivationObserver] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None, recon: object | None = None,
               store: object | None = None, progress: bool = False) -> nn.Module:
    """Return a quantized copy of ``model`` following ``plan``; ``model`` itself is never changed.

    Stages (``quant/ptq.py``): the fp model equalized when ``qconfig.equalize``; every layer's grid
    and activation ranges; GPTQ rounding when ``qconfig.rounding`` says so (layer-local layers from
    ``store``, the probe cache the search wrote, when given); reconstruction when ``recon`` (a
    ``brecq.ReconConfig``); bias correction when ``qconfig.bias_correction``.

    ``calib_images`` (the calibration set's inputs, calibrated with the plan's seed through
    ``quant.calibration.calibrate``) are needed when the plan quantizes any activation or its PTQ
    learns from data, unless ready ``observers`` are given, or a saved quantized ``state_dict``
    supplies every quantizer's parameters (``mpqkit apply --out`` files; no PTQ then runs).
    """

    qconfig = qconfig or QuantConfig()
    names = {n for n, m in model.named_modules()}
    for fqn in plan.layers:
        if fqn not in names:
            raise PlanError(f"plan names layer '{fqn}', which the model does not have")
    model = prepare_fp(model, qconfig)
    seed = int((plan.provenance or {}).get("seed", 0))
    act_layers = [f for f, lq in plan.layers.items() if lq.a_bits is not None]
    if act_layers and observers is None and state_dict is None:
        if calib_images is None:
            raise DataError("the plan quantizes activations: calibration data is required")
        observers = calibrate(model, act_layers, calib_images, seed=seed)
    qmodel = _swap_layers(copy.deepcopy(model).eval(), plan, qconfig, observers)
    _quantize_matmul_inputs(model, qmodel, plan, calib_images, qconfig, state_dict is not None)
    if state_dict is not None:
        _load_saved(qmodel, plan, state_dict)
    elif qconfig.layer_ptq or recon is not None:
        if calib_images is None:
            raise DataError("the quantizer (GPTQ, bias correction or reconstruction) learns from the calibration "
                            "set: calibration data is required")

        dev = model_device(model)
        batches = [chunk.to(dev) for chunk in calib_batches(calib_images)]
        builder = LocalLayerBuilder(model, calib_images, qconfig, seed, store, dev) \
            if qconfig.rounding == "gptq" else None
        qmodel.mpqkit_ptq = layer_steps(qmodel, model, batches, qconfig, recon, builder, progress)
    qmodel.mpqkit_qconfig = qconfig  # the quantizer that built it (saved beside the weights)
    return qmodel


def _swap_layers(qmodel: nn.Module, plan: Plan, qconfig: QuantConfig,
                 observers: dict[str, ActivationObserver] | None) -> nn.Module:
    """Every layer the plan quantizes replaced in ``qmodel`` (in place) by its fake-quant module: weight
    grid from ``qconfig`` at the plan's bits, input range from its observer (without observers, a
    placeholder that a saved state dict overwrites)."""
    for fqn, lq in plan.layers.items():
        if lq.w_bits is None and lq.a_bits is None:
            continue
        module = qmodel.get_submodule(fqn)
        w_spec = (qconfig.w_spec(lq.w_bits, per_channel=lq.w_granularity == "per_channel",
                                 symmetric=lq.w_symmetric) if lq.w_bits is not None else None)
        a_spec = qconfig.a_spec(lq.a_bits) if lq.a_bits is not None else None
        a_qparams = None
        if a_spec is not None:
            a_qparams = observers[fqn].qparams(a_spec) if observers is not None else \
                (torch.ones(()), torch.zeros(()), *a_spec.qrange)  # placeholder: overwritten by state_dict
        set_submodule(qmodel, fqn, quantize_module(module, w_spec, a_spec, a_qparams=a_qparams))
    return qmodel


def _load_saved(qmodel: nn.Module, plan: Plan, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a saved quantized state dict into ``qmodel`` (strict), after giving a bias to every layer
    the saved one has a bias for (bias correction adds one where there was none)."""
    for fqn in plan.layers:
        m = qmodel.get_submodule(fqn)
        if f"{fqn}.bias" in state_dict and isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(state_dict[f"{fqn}.bias"]))
    try:
        qmodel.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise PlanError(f"the saved quantized weights do not match this model and plan: {e}") from None


def _quantize_matmul_inputs(model: nn.Module, qmodel: nn.Module, plan: Plan, calib_images: torch.Tensor | None,
                            qconfig: QuantConfig, from_state_dict: bool) -> None:
    """With ``qconfig.matmul_a_bits``: swap every ``MatMulInput`` tap of ``qmodel`` for a fake-quantizer
    whose range is calibrated on the fp ``model`` through the same path as the layer inputs."""
    # lazy: torchvision takes seconds to import
    from ..attention import MatMulInput

    if qconfig.matmul_a_bits is None:
        return
    taps = [n for n, m in model.named_modules() if isinstance(m, MatMulInput)]
    if not taps:
        return
    spec = qconfig.a_spec(qconfig.matmul_a_bits)
    if from_state_dict:
        qparams = {t: (torch.ones(()), torch.zeros(()), *spec.qrange) for t in taps}  # overwritten by state_dict
    else:
        if calib_images is None:
            raise DataError("matmul_a_bits quantizes attention activations: calibration data is required")
        obs = calibrate(model, taps, calib_images, seed=int((plan.provenance or {}).get("seed", 0)))
        qparams = {t: obs[t].qparams(spec) for t in taps}
    for t in taps:
        set_submodule(qmodel, t, QuantAct(spec, qparams[t]))
