"""Plans to quantized models: ``apply_plan``, saving and loading quantized models, ``evaluate``."""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .engine.cache import ProbeCache, default_cache_dir, module_sha256, tensor_sha256
from .errors import CheckpointError, DataError, MpqkitError, PlanError
from .evaluation import evaluate_model
from .fileutil import atomic_write_bytes
from .graph import discover
from .loading import calibration_set, check_compatible, load_model, load_split, on_device
from .plan import Plan
from .quant.apply import apply_plan as _apply_plan
from .quant.brecq import recon_config
from .quant.config import QuantConfig
from .quant.layerwise import layer_ptq_context
from .quant.ptq import parse_ptq, prepare_fp
from .settings import RunSettings, resolve_settings
from .zoo.data import LabeledData
from .zoo.models import ModelBundle

log = logging.getLogger("mpqkit")

def plan_qconfig(plan: Plan) -> QuantConfig | None:
    """The quantizer settings a plan was searched with (None for a plan that does not say)."""
    q = plan.method_params.get("qconfig")
    if not isinstance(q, dict):
        return None
    try:
        return QuantConfig.from_dict(q)
    except (TypeError, ValueError) as e:

        raise PlanError(f"the plan's qconfig is malformed: {e}") from None


def apply_plan(model: str | nn.Module | ModelBundle, plan: Plan | str | Path, data: str | LabeledData | None = "cifar10",
               *, settings: RunSettings | None = None, ptq: str | None = None,
               recon_options: dict[str, Any] | None = None, allow_other_model: bool = False,
               **overrides: Any) -> nn.Module:
    """A quantized copy of the model following ``plan``. Activation ranges are calibrated on the
    calibration set the search used (size, seed and data from the plan's provenance) through the
    same path as the probe engine, so the plan evaluates the way it was searched.

    ``ptq`` picks the post-training quantizer (``quant/ptq.py``): None or "default" is the quantizer
    the plan was searched under (its ``qconfig``: rounding, bias correction, equalization, ranges);
    a recipe such as "gptq+bc", "cle+gptq+bc", "brecq", "brecq+bc", "mse" replaces those steps (a
    step not named is off). "adaround" (layer-wise), "brecq" (block-wise, LSQ activation steps) and
    "qdrop" (BRECQ + QDrop) reconstruct on the calibration set; ``recon_options`` override
    :class:`ReconConfig` fields (e.g. ``{"iters": 2000}``). The quantized copy lives on
    ``settings.device``; its ``mpqkit_qconfig`` attribute is the quantizer config that built it.
    """

    s = resolve_settings(settings, overrides)
    recipe = parse_ptq(ptq) if ptq not in (None, "default") else None
    recon = None
    if recipe is not None and recipe.recon:
        recon = recon_config(recipe.recon, **(recon_options or {}))
    elif any(v is not None for v in (recon_options or {}).values()):
        raise MpqkitError(f"reconstruction options ({', '.join(k for k, v in recon_options.items() if v is not None)}) "
                          f"need a reconstruction step in --ptq (adaround, brecq or qdrop), not {ptq or 'default'}")
    bundle = load_model(model, s)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    graph = discover(bundle.model, bundle.input_shape)
    plan.validate(graph, None if allow_other_model else bundle.sha256)
    if plan.model_name and plan.model_name != bundle.name:
        log.warning("the plan names model '%s' but is applied to '%s' (the same weights)", plan.model_name, bundle.name)
    if not plan.provenance:
        log.warning("the plan has no provenance (calibration seed and size): applied with this run's "
                    "--seed %d and --calib-size %d", s.seed, s.calib_size)
    qconfig = plan_qconfig(plan) or QuantConfig.from_dict({})
    if recipe is not None:
        qconfig = recipe.qconfig(qconfig)
    prov = plan.provenance or {}
    calib_prov = prov.get("calib") if isinstance(prov.get("calib"), dict) else {}
    calib_images = None
    if recon is not None or qconfig.layer_ptq or any(lq.a_bits is not None for lq in plan.layers.values()) or \
            qconfig.matmul_a_bits is not None:
        if data is None:
            raise DataError("the plan quantizes activations (or its PTQ needs calibration data): pass calibration data")
        n, seed = int(calib_prov.get("n", s.calib_size)), int(prov.get("seed", s.seed))
        calib = calibration_set(data, n, seed, s.data_root)
        check_compatible(bundle, calib)
        if calib_prov.get("sha256") and calib_prov["sha256"] != calib.sha256():
            log.warning("the calibration set drawn now (%d images, seed %d) differs from the one the plan was "
                        "searched with (sha256 %s…): the data changed, so activation ranges may differ", n, seed,
                        str(calib_prov["sha256"])[:12])
        calib_images = calib.images
    fp = on_device(bundle.model, s.device)
    store = _layer_store(fp, calib_images, qconfig, int(prov.get("seed", s.seed)), s)
    return _apply_plan(fp, plan, calib_images, qconfig, recon=recon, store=store, progress=s.progress)


def _layer_store(fp: nn.Module, images: torch.Tensor | None, qconfig: QuantConfig, seed: int, s: RunSettings):
    """The probe-cache folder of the layers a search built on its own (GPTQ on the fp inputs): a plan is
    applied with the very layers its search measured, computed only when not cached."""

    if qconfig.rounding != "gptq" or images is None or not s.use_cache:
        return None
    return ProbeCache(Path(s.cache_dir) if s.cache_dir else default_cache_dir(), layer_ptq_context(
        module_sha256(prepare_fp(fp, qconfig)), tensor_sha256(images), qconfig, seed))


def save_quantized(qmodel: nn.Module, plan: Plan, path: str | Path) -> Path:
    """Write a quantized model (plan + state dict with every quantizer's parameters), atomically."""

    buf = io.BytesIO()
    qconfig = getattr(qmodel, "mpqkit_qconfig", None)  # the quantizer that built it (--ptq may differ from the plan's)
    torch.save({"mpqkit_quantized": 1, "plan": plan.to_dict(), "state_dict": qmodel.state_dict(),
                "qconfig": qconfig.to_dict() if qconfig is not None else None}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def load_quantized(model: str | nn.Module | ModelBundle, path: str | Path, *, settings: RunSettings | None = None,
                   **overrides: Any) -> nn.Module:
    """Rebuild a model saved by ``mpqkit apply --out`` (no calibration data needed)."""
    bundle = load_model(model, resolve_settings(settings, overrides))
    if not Path(path).is_file():
        raise MpqkitError(f"quantized model file not found: {path}")
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
        plan = Plan.from_dict(obj["plan"], source=str(path))
        state = obj["state_dict"]
        qconfig = QuantConfig.from_dict(obj["qconfig"]) if obj.get("qconfig") is not None else plan_qconfig(plan)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(f"{path} is not an mpqkit quantized model file: {str(e).splitlines()[0]}") from None
    plan.validate(discover(bundle.model, bundle.input_shape))
    qmodel = _apply_plan(bundle.model, plan, qconfig=qconfig or QuantConfig.from_dict({}), state_dict=state)
    qmodel.mpqkit_plan = plan  # the plan saved with it (fine-tuned models record how in method.params)
    return qmodel


def evaluate(model: str | nn.Module | ModelBundle = "resnet20", data: str | LabeledData = "cifar10",
             split: str = "test", plan: Plan | str | Path | None = None, *, settings: RunSettings | None = None,
             limit: int | None = None, batch_size: int | None = None, ptq: str | None = None,
             recon_options: dict[str, Any] | None = None, quantized: str | Path | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Top-1 / loss of the fp model, of the model quantized by ``plan``, or of a saved quantized model
    (``quantized``: a ``mpqkit apply --out`` or ``mpqkit finetune`` model.pt), on a split."""
    s = resolve_settings(settings, overrides)
    if plan is None and ptq is not None:
        raise MpqkitError("--ptq needs --plan (there is nothing to quantize in the fp model)")
    if quantized is not None and plan is not None:
        raise MpqkitError("give --plan (quantize now) or --quantized (a saved quantized model), not both")
    bundle = load_model(model, s)
    ds = load_split(data, split, s, limit)
    check_compatible(bundle, ds)
    if quantized is not None:
        net = on_device(load_quantized(bundle, quantized, settings=s), s.device)
        plan = str(quantized)
    elif plan is not None:
        net = apply_plan(bundle, plan, data if not isinstance(data, LabeledData) else ds, settings=s, ptq=ptq,
                         recon_options=recon_options)
    else:
        net = on_device(bundle.model, s.device)
    with torch.inference_mode():
        res = evaluate_model(net, ds, batch_size=batch_size or s.eval_batch_size, progress=s.progress)
    return {"model": bundle.name, "data": ds.name, "split": ds.split, "plan": None if plan is None else str(
        plan if not isinstance(plan, Plan) else plan.method), "ptq": ptq, **res}
