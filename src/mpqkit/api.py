"""The public entry points: ``search``, ``apply_plan``, ``evaluate``, ``sweep``, ``bench``, ``proxies``,
``layers``, ``demo``.

Every entry point takes one :class:`~mpqkit.settings.RunSettings` (keyword overrides of its fields
are accepted and checked) and, where a method runs, that method's typed options. The CLI is a thin
layer over these; ``mpqkit search --method X`` and ``mpqkit.search(method="X")`` are the same code
path. Rendering (tables, plots, HTML) lives in ``mpqkit.report``, which never imports this module.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import sensitivity as _sensitivity  # noqa: F401  (registers the built-in methods)
from .budget import Ledger, parse_budget
from .fileutil import writer_lock
from .errors import CheckpointError, DataError, MissingResourceError, MpqkitError
from .evaluation import check_outputs, evaluate_model
from .graph import discover
from .plan import LayerQuant, Plan, provenance
from .quant.apply import apply_plan as _apply_plan
from .quant.apply import model_device
from .quant.calibration import CALIB_CHUNK
from .quant.config import QuantConfig
from .result import SearchResult
from .sensitivity.base import SearchContext, SensitivityTable, SolveRequest
from .sensitivity.registry import METHODS
from .sensitivity.options import MethodOptions
from .settings import CALIB_SIZE, DEFAULT_A_BITS, DEFAULT_W_BITS, FIXED_BITS, RunSettings, resolve_settings
from .solve import Allocation
from .zoo.data import LabeledData, load_data, sample_data
from .zoo.models import FIXED_RESOLUTION, ModelBundle, get_model, state_dict_sha256

log = logging.getLogger("mpqkit")
MAX_DRAWS = 100  #: calibration draws one bench may ask for (each is a full search per method)

__all__ = ["RunSettings", "SearchResult", "search", "apply_plan", "evaluate", "sweep", "bench", "proxies", "layers",
           "demo", "finetune", "load_model", "load_split", "calibration_set", "save_quantized", "load_quantized",
           "DEFAULT_W_BITS", "DEFAULT_A_BITS", "FIXED_BITS", "CALIB_SIZE"]


# ---------------------------------------------------------------- resolving names to objects
def load_model(model: str | nn.Module | ModelBundle, settings: RunSettings | None = None,
               **overrides: Any) -> ModelBundle:
    """A ModelBundle from a name (zoo, with the settings' checkpoint / models dir / random init),
    a bundle, or a bare module (needs ``input_shape``)."""
    s = resolve_settings(settings, overrides)
    if isinstance(model, ModelBundle):
        return model
    if isinstance(model, nn.Module):
        if s.input_shape is None:
            raise MpqkitError("pass input_shape=(C, H, W) with a bare nn.Module")
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"model tensor '{name}' contains NaN or Inf")
        from .attention import expose_attention

        expose_attention(model)  # in place: the same function, with searchable attention projections
        return ModelBundle(model.eval(), type(model).__name__, tuple(s.input_shape), -1, None, state_dict_sha256(model))
    return get_model(model, checkpoint=s.checkpoint, models_dir=s.models_dir, random_init=s.random_init)


def load_split(data: str | LabeledData, split: str = "test", settings: RunSettings | None = None,
               limit: int | None = None) -> LabeledData:
    if isinstance(data, LabeledData):
        return data if limit is None else data.head(limit)
    return load_data(data, split, root=(settings or RunSettings()).data_root, limit=limit)


def calibration_set(data: str | LabeledData, n: int = CALIB_SIZE, seed: int = 0,
                    data_root: str | None = None) -> LabeledData:
    """The fixed-seed calibration/sensitivity subset of the train split (or of the given data)."""
    if isinstance(data, LabeledData):
        return data.sample(n, seed)
    return _named_calibration_set(data, n, seed, str(data_root) if data_root else None, os.environ.get("MPQKIT_DATA"))


@functools.lru_cache(maxsize=8)
def _named_calibration_set(data: str, n: int, seed: int, data_root: str | None, _env: str | None) -> LabeledData:
    """Kept per process: the subset is small, the train split it is drawn from is not."""
    return sample_data(data, "train", n, seed, root=data_root)


def _train_subset(data: str | LabeledData, n: int, seed: int, data_root: str | None) -> LabeledData:
    """Up to ``n`` training images (all of them when the split is smaller), fixed seed."""
    if isinstance(data, LabeledData):
        return data.sample(min(n, len(data)), seed)
    return sample_data(data, "train", n, seed, root=data_root)


def heldout_set(data: str | LabeledData, calib_n: int, n: int, seed: int, data_root: str | None) -> LabeledData:
    """Up to ``n`` training images disjoint from ``calibration_set(data, calib_n, seed)``."""
    held = data.sample(n, seed, offset=calib_n) if isinstance(data, LabeledData) else \
        sample_data(data, "train", n, seed, offset=calib_n, root=data_root)
    if len(held) == 0:
        raise DataError(f"no training images are left beside the {calib_n}-image calibration draw for a held-out "
                        f"set: lower --calib-size")
    return held


def check_compatible(bundle: ModelBundle, data: LabeledData) -> None:
    shape = tuple(data.images.shape[1:])
    if len(shape) != len(bundle.input_shape) or shape[0] != bundle.input_shape[0]:
        raise DataError(f"data {data.name}/{data.split} has images of shape {shape}, but model {bundle.name} "
                        f"expects {bundle.input_shape}")
    fixed_resolution = bundle.name in FIXED_RESOLUTION  # trained at one input size
    if fixed_resolution and shape != tuple(bundle.input_shape):
        raise DataError(f"data {data.name}/{data.split} has images of shape {shape}, but model {bundle.name} "
                        f"expects {bundle.input_shape}")


def on_device(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """The model itself when already there, else a moved copy (the caller's model never moves)."""
    from .device import resolve_device

    dev = resolve_device(device)
    if model_device(model) == dev:
        return model
    import copy

    return copy.deepcopy(model).to(dev)


def _check_out_dir(out: str | Path | None, what: str, settings: RunSettings | None = None) -> None:
    """Fail before any long work when ``out`` cannot hold a results directory (or the settings'
    probe cache cannot be written)."""
    from .fileutil import check_output_dir

    if settings is not None and settings.use_cache:
        from .engine.cache import default_cache_dir

        check_output_dir(Path(settings.cache_dir) if settings.cache_dir else default_cache_dir(),
                         "probe cache directory (--cache-dir / $MPQKIT_CACHE)")
    if out is not None:
        if str(out).strip() in ("", "-"):
            raise MpqkitError(f"{what} {str(out)!r} is not a path (results go into a folder; stdout is not one)")
        check_output_dir(Path(out), what)


# ---------------------------------------------------------------- search
def search(model: str | nn.Module | ModelBundle = "resnet20", data: str | LabeledData = "cifar10",
           budget: str | None = None, method: str = "eval-delta", *, settings: RunSettings | None = None,
           options: MethodOptions | Mapping[str, Any] | None = None, out: str | Path | None = None,
           table: SensitivityTable | None = None, **overrides: Any) -> SearchResult:
    """Search a mixed-precision plan; writes a results directory when ``out`` is given.

    ``settings``: how to load, calibrate, quantize and solve (keyword ``overrides`` replace its
    fields, e.g. ``calib_size=256``); ``options``: the method's typed options (or a dict of them;
    an unknown name is an error). ``settings.search``: "w" (weights searched, activations at
    ``a_bits``, default 8), "a" (activations searched, weights at ``w_bits``) or "wa" (jointly).
    ``table``: a sensitivity table from an earlier search with the same settings (sweeps solve
    many budgets from one measurement); the method's measurement is then skipped.
    """
    import contextlib

    from .profile import profiling

    existed = out is not None and Path(out).is_dir()
    try:
        with profiling() as prof:
            result = _search(model, data, budget, method, resolve_settings(settings, overrides), options, table, out)
    except BaseException:
        if out is not None and not existed:
            with contextlib.suppress(OSError):
                Path(out).rmdir()  # made by the output check; only removed while still empty
        raise
    result.profile = prof.to_dict()
    if out is not None:
        from .report.results import write_results

        with writer_lock(Path(out), "search results directory", remove_if_empty=not existed):
            result.results_dir = write_results(Path(out), result)
    return result


def _search(model: str | nn.Module | ModelBundle, data: str | LabeledData, budget: str | None, method: str,
            s: RunSettings, options: MethodOptions | Mapping[str, Any] | None, table: SensitivityTable | None,
            out: str | Path | None = None) -> SearchResult:
    """``search`` inside its profile: measure (unless ``table``), solve, refine; writes no file (``out`` is
    only checked, before the long work)."""
    from .device import resolve_device
    from .profile import stage

    t_start = time.perf_counter()
    m = METHODS.get(method)
    opts = m.make_options(options)
    terms = parse_budget(budget)
    dev = resolve_device(s.device)
    bundle = load_model(model, s)
    with stage("calibration set"):
        calib = calibration_set(data, s.calib_size, s.seed, s.data_root)
    check_compatible(bundle, calib)
    graph = discover(bundle.model, bundle.input_shape)
    fixed_names = list(graph.default_fixed() if s.fixed is None else s.fixed)
    graph.check_names(fixed_names)
    searched = [n for n in graph.names if n not in fixed_names]
    if not searched:
        raise MpqkitError("no layer left to search: every quantizable layer is fixed")

    if m.sensitivity is None:  # uniform: the given bits, or every candidate
        w_cands = [s.w_bits] if s.w_bits is not None else list(s.w_candidates)
        a_cands: list[int | None] = ([s.a_bits] if s.a_bits is not None else
                                     (list(s.a_candidates) if "a" in s.search else [8]))
    else:
        w_cands = list(s.w_candidates) if "w" in s.search else [s.w_bits or 8]
        a_cands = list(s.a_candidates) if "a" in s.search else [s.a_bits or 8]
    ledger = Ledger(graph, searched)
    problem = Allocation(ledger=ledger, layers=searched, w_bits=w_cands, a_bits=a_cands,
                         fixed={f: tuple(s.fixed_bits) for f in fixed_names}, constraints=ledger.resolve(terms),
                         tie_groups=graph.tie_groups)
    problem.check_feasible()
    _check_out_dir(out, "search results directory", s)  # after the cheap checks, before the long work

    from .quant.ptq import prepare_fp

    ctx = SearchContext(model=prepare_fp(bundle.model, s.qconfig), graph=graph, calib_images=calib.images,
                        calib_labels=calib.labels, searched=searched, w_bits=w_cands, a_bits=a_cands,
                        search_w="w" in s.search, search_a="a" in s.search, qconfig=s.qconfig, seed=s.seed, options=opts,
                        engine_kwargs={**s.engine_kwargs(), "device": dev}, device=dev,
                        load_train=lambda n, seed: _train_subset(data, n, seed, s.data_root),
                        load_heldout=lambda n: heldout_set(data, s.calib_size, n, s.seed, s.data_root),
                        problem=problem, settings=s)
    t_sens = time.perf_counter()
    warnings: list[str] = []
    if table is None and m.sensitivity is not None:
        check_outputs(bundle.model, calib.images)
        table = m.sensitivity(ctx)
        if table.flat:
            warnings.append(f"{method}: every sensitivity of the table is the same value, so the plan carries no "
                            f"information from the measurement (any allocation within the budget is 'optimal')")
            log.warning(warnings[-1])
        warnings += list(table.meta.get("warnings", []))  # what the method itself flagged (already logged)
    t_solve = time.perf_counter()
    with stage("solver"):
        solution = m.solver(SolveRequest(problem=problem, table=table, options=opts, has_budget=bool(terms),
                                         method=m.name, search=s.search, w_bits=s.w_bits, a_bits=s.a_bits,
                                         alpha=s.alpha, time_limit=s.time_limit, seed=s.seed))
    with stage("refine"):
        refined = _refine(ctx, problem, solution.assignment, table, s) if s.refine else None
    if refined is not None:
        solution.assignment = refined.assignment
    t_end = time.perf_counter()

    full = problem.full(solution.assignment)
    layers = {f: LayerQuant(wb, ab, s.qconfig.w_granularity, s.qconfig.w_symmetric) for f, (wb, ab) in
              ((n, full[n]) for n in graph.names)}
    params = {"search": s.search, "w_candidates": w_cands, "a_candidates": a_cands, "fixed": fixed_names,
              "objective": s.objective, "alpha": s.alpha, "time_limit": s.time_limit, "qconfig": s.qconfig.to_dict(),
              **opts.to_params()}
    prov = provenance(s.seed, len(calib), calib.sha256())
    prov["calib"] = {**prov["calib"], "seed": s.seed, "data": calib.name, "split": calib.split, "chunk": CALIB_CHUNK}
    if refined is not None:
        prov["refine"] = {"max_probes": s.refine, **refined.record()}
    if warnings:
        prov["warnings"] = warnings
    plan = Plan(layers=layers, model_name=bundle.name, model_sha256=bundle.sha256, method=method,
                method_params=params, budget=budget, costs=ledger.summary(full),
                provenance={**prov, "solver": solution.record(), "data": calib.name})
    return SearchResult(plan, solution, table, graph, ledger,
                        {"sensitivity": t_solve - t_sens, "solve": t_end - t_solve, "total": t_end - t_start},
                        ctx.engine_stats())


def _refine(ctx: SearchContext, problem: Allocation, assignment: dict, table: SensitivityTable | None,
            s: RunSettings):
    """``--refine``: the method's plan improved by measured moves (``solve/refine.py``), measured
    through the search's probe engine on the two halves of the calibration set."""
    from .solve.refine import engine_halves_measure, refine

    if "a" in s.search:
        raise MpqkitError("--refine moves weight bits: use it with --search w")
    measure, on_accept = engine_halves_measure(ctx.engine, problem.full(assignment))
    res = refine(problem, assignment, measure, s.refine, table.w if table is not None and "w" in s.search else None,
                 on_accept=on_accept)
    log.info("refine: %d probes, loss (half A, half B) %.4f, %.4f → %.4f, %.4f; %d moves (%s)", res.probes,
             *res.before, *res.after, len(res.moves), res.stopped)
    return res


# ---------------------------------------------------------------- apply / evaluate
def plan_qconfig(plan: Plan) -> QuantConfig | None:
    """The quantizer settings a plan was searched with (None for a plan that does not say)."""
    q = plan.method_params.get("qconfig")
    if not isinstance(q, dict):
        return None
    try:
        return QuantConfig.from_dict(q)
    except (TypeError, ValueError) as e:
        from .errors import PlanError

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
    from .quant.brecq import recon_config
    from .quant.ptq import parse_ptq

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
    from .engine.cache import ProbeCache, default_cache_dir, module_sha256, tensor_sha256
    from .quant.layerwise import layer_ptq_context
    from .quant.ptq import prepare_fp

    if qconfig.rounding != "gptq" or images is None or not s.use_cache:
        return None
    return ProbeCache(Path(s.cache_dir) if s.cache_dir else default_cache_dir(), layer_ptq_context(
        module_sha256(prepare_fp(fp, qconfig)), tensor_sha256(images), qconfig, seed))


def save_quantized(qmodel: nn.Module, plan: Plan, path: str | Path) -> Path:
    """Write a quantized model (plan + state dict with every quantizer's parameters), atomically."""
    import io

    from .fileutil import atomic_write_bytes

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


#: fewest training images ``finetune`` accepts without ``allow_small_data`` (CIFAR-10 has 50,000)
MIN_FINETUNE_IMAGES = 5_000


def finetune(model: str | nn.Module | ModelBundle, plan: Plan | str | Path, data: str | LabeledData = "cifar10",
             out: str | Path = "results/finetune", *, epochs: int = 5, lr: float = 1e-4, batch_size: int = 128,
             distill: bool = True, augment: str | None = None, heldout: int = 1000, train_size: int | None = None,
             allow_small_data: bool = False,
             ptq: str | None = None, recon_options: dict[str, Any] | None = None,
             settings: RunSettings | None = None, stop_after: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Quantization-aware fine-tuning (LSQ, ``quant/finetune.py``) of ``model`` quantized by ``plan``
    (with ``ptq``, the plan's own quantizer by default) on ``data``'s train split, never its test split.

    ``heldout`` training images (seeded by the run's seed) are kept out of training and give the
    held-out top-1 after every epoch; ``train_size`` images of the rest make one epoch (a new draw each
    epoch; default all). ``augment`` defaults to "crop-flip" for CIFAR-10, "none" otherwise.
    Writes into ``out``: ``checkpoint.pt`` after every epoch (a rerun with the same settings resumes
    from it), then ``model.pt`` (loadable by :func:`load_quantized`, ``mpqkit eval/export --quantized``),
    ``plan.json`` (the plan, bits and budget unchanged, with ``method.params.finetune`` saying how it
    was fine-tuned) and ``summary.json``. Returns the summary (``seconds``: this run's PTQ plus every
    epoch's, resumed ones included); ``stop_after`` stops after that many epochs in total without
    writing the final files (what a killed run leaves).
    """
    from .quant.finetune import FinetuneConfig

    s = resolve_settings(settings, overrides)
    name = data.name if isinstance(data, LabeledData) else data
    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, distill=distill, seed=s.seed,
                         augment=augment or ("crop-flip" if name == "cifar10" else "none"), train_size=train_size)
    if not (isinstance(heldout, int) and heldout >= 0):
        raise MpqkitError(f"heldout must be an integer >= 0, got {heldout!r}")
    existed = Path(out).is_dir()
    _check_out_dir(out, "fine-tuning folder (--out)")
    with writer_lock(Path(out), "fine-tuning folder", remove_if_empty=not existed):
        return _finetune(model, plan, data, name, Path(out), cfg, heldout, allow_small_data,
                         {"ptq": ptq, "recon_options": recon_options}, s, stop_after)


def _finetune(model: str | nn.Module | ModelBundle, plan: Plan | str | Path, data: str | LabeledData, name: str,
              out: Path, cfg: Any, heldout: int, allow_small_data: bool, ptq: dict[str, Any], s: RunSettings,
              stop_after: int | None) -> dict[str, Any]:
    from .fileutil import atomic_write_text, json_text
    from .quant.finetune import CHECKPOINT
    from .quant.finetune import finetune as run_finetune
    from .zoo.data import sample_indices

    bundle = load_model(model, s)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    train = load_split(data, "train", s)
    check_compatible(bundle, train)
    if len(train) - heldout < MIN_FINETUNE_IMAGES and not allow_small_data:
        raise DataError(f"{name}'s train split has {len(train)} images ({max(len(train) - heldout, 0)} after the "
                        f"{heldout} held out): fine-tuning on fewer than {MIN_FINETUNE_IMAGES} over-fits; pass "
                        f"--allow-small-data to fine-tune anyway")
    order = sample_indices(len(train), len(train), s.seed)
    held, rest = train.subset(order[:heldout]), train.subset(order[heldout:])
    if len(rest) == 0:
        raise DataError(f"no training images are left beside the {heldout} held out: lower --heldout")
    t0 = time.perf_counter()
    qmodel = apply_plan(bundle, plan, data, settings=s, **ptq)
    top1 = (lambda m: evaluate_model(m, held, s.eval_batch_size)["top1"]) if len(held) else None
    before = top1(qmodel) if top1 else None
    ptq_s = time.perf_counter() - t0
    state = run_finetune(qmodel, on_device(bundle.model, s.device), rest.images, rest.labels, cfg,
                         out / CHECKPOINT, heldout=top1, progress=s.progress, stop_after=stop_after)
    record = {**cfg.to_dict(), "epochs_done": state.epochs_done, "train_images": len(rest),
              "heldout_images": len(held), "heldout_top1_before": before,
              "heldout_top1": state.history[-1].get("heldout_top1") if state.history else before,
              "ptq": ptq["ptq"] or "default", "data": name}
    summary = {"model": bundle.name, "finetune": record, "history": state.history,
               "ptq_s": ptq_s, "seconds": ptq_s + sum(h["seconds"] for h in state.history),
               "finished": state.epochs_done == cfg.epochs}
    if summary["finished"]:
        tuned = Plan(**{**plan.__dict__, "method_params": {**plan.method_params, "finetune": record}})
        save_quantized(qmodel, tuned, out / "model.pt")
        tuned.save(out / "plan.json")
    atomic_write_text(out / "summary.json", json_text(summary, "the fine-tuning summary", indent=2))
    return summary


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


# ---------------------------------------------------------------- many searches
def method_options_for(methods: Sequence[str], given: Mapping[str, Any]) -> dict[str, MethodOptions]:
    """Typed options per method from one flat mapping of option values (the CLI's flags): each
    method takes the values it declares; a value no listed method declares is an error."""
    out, used = {}, set()
    for name in methods:
        m = METHODS.get(name)
        fields = {f.name for f in m.options.option_fields()}
        mine = {k: v for k, v in given.items() if k in fields}
        used |= set(mine)
        out[name] = m.make_options(mine)
    if "auto" in out:  # the flags of auto's candidate methods go to those candidates
        out["auto"], passed = _auto_candidate_options(out["auto"], given)
        used |= passed
    unused = sorted(set(given) - used)
    if unused:
        from .sensitivity.options import field_flag

        owners = {f.name: (field_flag(f) or f.name, []) for m in METHODS for f in m.options.option_fields()}
        for m in METHODS:
            for f in m.options.option_fields():
                owners[f.name][1].append(m.name)
        parts = [f"{owners[k][0] if k in owners else k} is an option of {', '.join(owners[k][1]) if k in owners else 'no method'}"
                 for k in unused]
        raise MpqkitError(f"{'; '.join(parts)}, not of {', '.join(methods)}")
    return out


def _auto_candidate_options(auto: MethodOptions, given: Mapping[str, Any]) -> tuple[MethodOptions, set[str]]:
    """auto's options with each candidate method's given flags merged into ``candidate_options``
    (explicit ``--auto-options`` entries win); also the names of the flags so passed on."""
    cands = auto.candidate_map()  # type: ignore[attr-defined]
    passed = set()
    for m in [METHODS.get(n.strip()) for n in auto.methods.split(",") if n.strip()]:  # type: ignore[attr-defined]
        mine = {f.name: given[f.name] for f in m.options.option_fields() if f.name in given}
        if mine:
            cands[m.name] = {**mine, **cands.get(m.name, {})}
            passed |= set(mine)
    return (auto.replace(candidate_options=cands) if passed else auto), passed


def unique(items: Sequence[Any], what: str, key: Callable[[Any], Any] = lambda x: x) -> list[Any]:
    """``items`` without repeats (by ``key``; the first spelling kept, order kept); a note names the
    repeats dropped, so nothing is measured twice."""
    seen: dict[Any, Any] = {}
    repeats = []
    for item in items:
        k = key(item)
        if k in seen:
            repeats.append(f"{item} (= {seen[k]})" if item != seen[k] else str(item))
        else:
            seen[k] = item
    if repeats:
        log.warning("%s: %s given more than once; measured once", what, ", ".join(dict.fromkeys(repeats)))
    return list(seen.values())


def unique_budgets(budgets: Sequence[str]) -> list[str]:
    """Budgets without repeats by meaning (``avg-bits=3`` = ``avg-bits=3.0`` = `` avg-bits=3 ``)."""
    stripped = [" ".join(b.split()) for b in budgets]
    return unique(stripped, "--budgets",
                  key=lambda b: tuple(sorted((t.key, t.value) for t in parse_budget(b))))


def bench(model: str | nn.Module | ModelBundle, data: str, methods: Sequence[str], budgets: Sequence[str],
          out: str | Path, *, ptqs: Sequence[str | None] = (None,), settings: RunSettings | None = None,
          options: Mapping[str, MethodOptions | Mapping[str, Any]] | None = None,
          splits: Sequence[str] = ("test", "exact"), recon_options: dict[str, Any] | None = None,
          draws: int = 1, **overrides: Any) -> list[dict]:
    """Measure every (method, budget, PTQ, draw) row not yet in ``out/rows.jsonl``; returns all rows.

    ``draws`` K: the calibration / sensitivity set is drawn K times, with seeds ``seed``,
    ``seed + 1``, …; every method sees the same K draws, so methods are compared draw by draw
    (``report.stats``). Per draw, each method measures its sensitivity once and solves every
    budget from that table; each plan is quantized with each PTQ backend and evaluated on
    ``splits``. Rows are appended as they are measured, so a killed run resumes; a method that
    fails at a budget gets a row with the error. ``options``: per method name, its options
    (methods not named use their defaults).
    """
    from .quant.ptq import parse_ptq

    s = resolve_settings(settings, overrides)
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= MAX_DRAWS:
        raise MpqkitError(f"--draws must be an integer in 1..{MAX_DRAWS}, got {draws!r}")
    # canonical recipe names (an unknown one fails before any work): "bc+gptq" and "gptq+bc" are one row key
    ptqs = [None if p == "default" else p for p in
            unique(["default" if p in (None, "default") else parse_ptq(p).name for p in ptqs], "--ptq")]
    methods = unique([METHODS.get(m).name for m in methods], "--methods")
    budgets = unique_budgets(budgets)
    splits = unique(list(splits), "--splits")
    opts = {m: METHODS.get(m).make_options((options or {}).get(m)) for m in methods}
    out = Path(out)
    existed = out.is_dir()
    _check_out_dir(out, "bench results directory", s)
    with writer_lock(out, "bench results directory", remove_if_empty=not existed):
        return _bench_rows(model, data, methods, budgets, out, ptqs, s, opts, splits, recon_options, draws)


def _bench_rows(model: str | nn.Module | ModelBundle, data: str, methods: list[str], budgets: list[str], out: Path,
                ptqs: list[str | None], s: RunSettings, opts: dict[str, MethodOptions], splits: list[str],
                recon_options: dict[str, Any] | None, draws: int) -> list[dict]:
    """``bench``'s measurements, with the validated inputs, while this process holds ``out``."""
    from .report.bench import append_row, load_rows

    rows_path = out / "rows.jsonl"
    rows = load_rows(rows_path, repair=True)
    recon_iters = _bench_recon_iters(ptqs, recon_options)
    _check_same_run(rows, out, s, recon_iters)
    done = {(r["method"], r["budget"], r["ptq"], r.get("draw", 0)) for r in rows}
    bundle = load_model(model, s)
    eval_sets = {}
    for split in splits:
        try:
            eval_sets[split] = load_split(data, split, s)
        except MissingResourceError:
            raise  # the data root is wrong: nothing can be measured
        except MpqkitError as e:  # e.g. no 'exact' subset for this dataset
            log.warning("bench: split %s not available (%s); its column stays empty", split, e)
    if not eval_sets:
        raise DataError(f"none of the evaluation splits {', '.join(splits)} is available for {data}")
    quiet = s.replace(progress=False)

    def append(row: dict) -> None:
        rows.append(row)
        append_row(rows_path, row)

    if ("fp32", "-", None, 0) not in done:
        fp_model = on_device(bundle.model, s.device)
        ev = {sp: evaluate_model(fp_model, d, s.eval_batch_size) for sp, d in eval_sets.items()}
        append({"method": "fp32", "budget": "-", "ptq": None, "size_mb": None, "compression": 1.0, "gbitops": None,
                "avg_w_bits": 32.0, **{f"top1_{sp}": 100 * e["top1"] for sp, e in ev.items()}})
    from .report.bench import plan_dir

    for draw in range(draws):
        sd = s.replace(seed=s.seed + draw)
        tag = {"draw": draw, "seed": sd.seed}
        for method in methods:
            table = None
            for budget in budgets:
                todo = [p for p in ptqs if (method, budget, p, draw) not in done]
                if not todo:
                    continue
                pdir = plan_dir(out, method, budget, draw)
                try:
                    res = search(bundle, data, budget, method, settings=sd, options=opts[method], out=pdir,
                                 table=table)
                except MpqkitError as e:
                    for p in todo:
                        append({"method": method, "budget": budget, "ptq": p, **tag, "error": str(e)})
                    continue
                # a table is reused for the next budget, unless it was made for this budget (auto, supernet)
                table = res.table if res.table is not None and res.table.reusable else None
                _bench_plan(res, bundle, data, todo, eval_sets, quiet, recon_options, pdir,
                            {**tag, "objective": sd.objective}, append, recon_iters)
    return rows


def _bench_recon_iters(ptqs: Sequence[str | None], recon_options: Mapping[str, Any] | None) -> int | None:
    """Reconstruction iterations per unit of this bench's reconstruction rows (None: no such row)."""
    from .quant.brecq import DEFAULT_ITERS
    from .quant.ptq import parse_ptq

    if not any(p is not None and parse_ptq(p).recon for p in ptqs):
        return None
    return int((recon_options or {}).get("iters") or DEFAULT_ITERS)


def _check_same_run(rows: Sequence[dict], out: Path, s: RunSettings, recon_iters: int | None) -> None:
    """A results directory describes one protocol: resuming into rows measured with another seed,
    objective or reconstruction length would mix them in every mean, so it is refused before any
    work. Rows written before a field was recorded are taken as matching."""
    for r in rows:
        if r["method"] == "fp32" or r.get("error"):
            continue
        draw = int(r.get("draw", 0))
        clash = None
        if r.get("seed") is not None and int(r["seed"]) != s.seed + draw:
            clash = f"--seed {int(r['seed']) - draw} (this run: --seed {s.seed})"
        elif r.get("objective") not in (None, s.objective):
            clash = f"--objective {r['objective']} (this run: --objective {s.objective})"
        elif recon_iters is not None and r.get("recon_iters") not in (None, recon_iters):
            clash = f"--recon-iters {r['recon_iters']} (this run: --recon-iters {recon_iters})"
        if clash:
            raise MpqkitError(f"{out} holds rows measured with {clash}; a results directory describes one run: "
                              f"use another --out, or the same settings to resume it")


def _bench_plan(res: SearchResult, bundle: ModelBundle, data: str, ptqs: Sequence[str | None],
                eval_sets: Mapping[str, LabeledData], settings: RunSettings, recon_options: dict[str, Any] | None,
                pdir: Path, tag: dict[str, Any], append: Any, recon_iters: int | None = None) -> None:
    """Quantize one searched plan with each PTQ backend, evaluate it, append one row each."""
    from .quant.ptq import parse_ptq

    c = res.plan.costs
    for p in ptqs:
        t0 = time.perf_counter()
        q = apply_plan(bundle, res.plan, data, settings=settings, ptq=p,
                       recon_options=recon_options if p is not None and parse_ptq(p).recon else None)
        ptq_s = time.perf_counter() - t0
        with torch.inference_mode():
            ev = {sp: evaluate_model(q, d, settings.eval_batch_size) for sp, d in eval_sets.items()}
        recon = {"recon_iters": recon_iters} if p is not None and parse_ptq(p).recon else {}
        append({"method": res.plan.method, "budget": res.plan.budget, "ptq": p, **tag, **recon, "size_mb": c["weight_mb"],
                "compression": c["compression"], "gbitops": c["bitops"] / 1e9,
                "avg_w_bits": c["avg_w_bits_searched"], **{f"top1_{sp}": 100 * e["top1"] for sp, e in ev.items()},
                "search_s": res.seconds["total"], "ptq_s": ptq_s, "plan": str(pdir / "plan.json")})


def sweep(model: str | nn.Module | ModelBundle, data: str, method: str, budgets: Sequence[str], out: str | Path,
          **kwargs: Any) -> list[dict]:
    """One method over many budgets from one sensitivity measurement (``bench`` with one method)."""
    return bench(model, data, [method], budgets, out, **kwargs)


def proxies(model: str | nn.Module | ModelBundle, data: str, out: str | Path,
            methods: Sequence[str] | None = None, *, settings: RunSettings | None = None,
            options: Mapping[str, MethodOptions | Mapping[str, Any]] | None = None,
            **overrides: Any) -> dict[str, Any]:
    """Rank correlation of each method's sensitivity with the true single-layer top-1 drop on the
    test split; writes proxies.json/.csv/.md/.png into ``out``."""
    from .report.proxies import DEFAULT_METHODS, correlations, true_drops, write_proxies

    s = resolve_settings(settings, overrides)
    methods = [METHODS.get(m).name for m in (methods or DEFAULT_METHODS)]
    _check_out_dir(out, "proxies results directory", s)
    bundle = load_model(model, s)
    graph = discover(bundle.model, bundle.input_shape)
    searched = [n for n in graph.names if n not in (graph.default_fixed() if s.fixed is None else s.fixed)]
    bits = list(s.w_candidates)
    truth = true_drops(bundle, graph, load_split(data, "test", s), searched, bits, s,
                       calib=calibration_set(data, s.calib_size, s.seed, s.data_root))
    tables, corr = {}, {}
    for m in methods:
        res = search(bundle, data, "avg-bits=8", m, settings=s, options=(options or {}).get(m))
        tables[m] = res.table.w if res.table is not None else {}
        corr[m] = {**correlations(tables[m], truth), "sensitivity_s": res.seconds["sensitivity"]}
        log.info("proxies: %s %s", m, corr[m])
    result = {"model": bundle.name, "data": data, "split": "test", "w_candidates": bits,
              "correlations": corr, "truth": truth, "scores": tables}
    write_proxies(result, Path(out), searched)
    return result


def layers(model: str | nn.Module | ModelBundle, settings: RunSettings | None = None, **overrides: Any) -> dict[str, Any]:
    """Quantizable layers with their costs and tie groups."""
    bundle = load_model(model, resolve_settings(settings, overrides))
    graph = discover(bundle.model, bundle.input_shape)
    rows = [{"layer": lay.fqn, "kind": lay.kind, "weight_numel": lay.weight_numel, "macs": lay.macs,
             "in_shape": list(lay.in_shape)} for lay in graph.layers]
    return {"model": bundle.name, "layers": rows, "tie_groups": graph.tie_groups, "fp32_bytes": Ledger(graph).fp32_bytes}


def demo(out: str | Path = "results/demo", budget: str = "avg-bits=3", progress: bool = True,
         echo: Any = print) -> list[tuple]:
    """The embedded default: the digits CNN, every kind of method, search → plan → quantize → eval,
    offline (no ../shared needed). Returns the summary rows; ``echo`` receives progress lines."""
    from .fileutil import atomic_write_text

    t0 = time.perf_counter()
    out = Path(out)
    _check_out_dir(out, "demo results directory")
    model, data = "digits-cnn", "digits"
    s = RunSettings(calib_size=512, progress=progress)
    fp = evaluate(model, data, "test", settings=s.replace(progress=False))
    echo(f"[demo] {model} fp32 top-1 on digits/test ({fp['n']} images): {100 * fp['top1']:.2f} %")
    rows: list[tuple] = [("fp32", "-", 32.0, fp["top1"], None)]
    runs: list[tuple[str, dict, dict]] = [
        ("eval-delta", {}, {}), ("infoq", {"projections": 32}, {}),
        ("clado", {}, {"w_candidates": (2, 4, 8), "time_limit": 10}), ("mixquant", {}, {}), ("uniform", {}, {})]
    for method, opts, changes in runs:
        res = search(model, data, budget, method, settings=s.replace(**changes), options=opts, out=out / method)
        ev = evaluate(model, data, "test", res.plan, settings=s.replace(progress=False))
        c = res.plan.costs
        rows.append((method, budget, c["avg_w_bits_searched"], ev["top1"], c["weight_mb"] * 2**20 / 1024))
        bits = " ".join(str(lq.w_bits) for lq in res.plan.layers.values())
        echo(f"[demo] {method:<10} {budget}: w-bits per layer [{bits}] · {c['weight_bytes'] / 1024:.2f} KB · "
             f"top-1 {100 * ev['top1']:.2f} % · search {res.seconds['total']:.1f}s → {out / method}")
    lines = ["| plan | budget | avg w-bits (searched) | weight KB | top-1 digits/test |", "|---|---|---:|---:|---:|"]
    for label, b, avg, top1, kb in rows:
        lines.append(f"| {label} | {b} | {avg:.3f} | {'' if kb is None else f'{kb:.2f}'} | {100 * top1:.2f} % |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    echo("\n".join(lines))
    echo(f"[demo] done in {time.perf_counter() - t0:.1f}s; results in {out}/")
    return rows


def results_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
