"""The public entry points: ``search``, ``apply_plan``, ``evaluate``.

The CLI is a thin layer over these; ``mpqkit search --method X`` and ``mpqkit.search(method="X")``
are the same code path.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import sensitivity as _sensitivity  # noqa: F401  (registers the built-in methods)
from .budget import Ledger, parse_budget
from .errors import BudgetError, DataError, MpqkitError
from .evaluation import evaluate_model
from .graph import ModelGraph, discover
from .plan import LayerQuant, Plan, provenance
from .quant.apply import apply_plan as _apply_plan
from .quant.config import QuantConfig
from .sensitivity.base import METHODS, Method, SearchContext, SensitivityTable
from .solve import Allocation, Solution, solve_greedy, solve_ilp, solve_supernet, solve_iqp, solve_threshold, solve_uniform
from .zoo.data import LabeledData, load_data
from .zoo.models import CIFAR_MODELS, ModelBundle, get_model

log = logging.getLogger("mpqkit")

DEFAULT_W_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_A_BITS = (4, 6, 8)
FIXED_BITS = (8, 8)
CALIB_SIZE = 1024
#: method options that change where probes run, never their results: kept out of the plan so the
#: same inputs give the same plan bytes on any runner
EXECUTION_OPTIONS = ("workers", "runner", "address")


@dataclass
class SearchResult:
    plan: Plan
    solution: Solution
    table: SensitivityTable | None
    graph: ModelGraph
    ledger: Ledger
    seconds: dict[str, float]
    engine_stats: dict[str, Any] = field(default_factory=dict)
    results_dir: Path | None = None


# ---------------------------------------------------------------- resolving names to objects
def load_model(model: str | nn.Module | ModelBundle, checkpoint: str | None = None, models_dir: str | None = None,
               random_init: bool = False, input_shape: Sequence[int] | None = None) -> ModelBundle:
    """A ModelBundle from a name (zoo), a bundle, or a bare module (needs ``input_shape``)."""
    if isinstance(model, ModelBundle):
        return model
    if isinstance(model, nn.Module):
        if input_shape is None:
            raise MpqkitError("pass input_shape=(C, H, W) with a bare nn.Module")
        from .errors import CheckpointError
        from .zoo.models import state_dict_sha256

        for name, t in model.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"model tensor '{name}' contains NaN or Inf")
        return ModelBundle(model.eval(), type(model).__name__, tuple(input_shape), -1, None, state_dict_sha256(model))
    return get_model(model, checkpoint=checkpoint, models_dir=models_dir, random_init=random_init)


def load_split(data: str | LabeledData, split: str = "test", data_root: str | None = None,
               limit: int | None = None) -> LabeledData:
    if isinstance(data, LabeledData):
        return data if limit is None else data.head(limit)
    return load_data(data, split, root=data_root, limit=limit)


def calibration_set(data: str | LabeledData, n: int = CALIB_SIZE, seed: int = 0,
                    data_root: str | None = None) -> LabeledData:
    """The fixed-seed calibration/sensitivity subset of the train split (or of the given data)."""
    if isinstance(data, LabeledData):
        return data.sample(n, seed)
    return _named_calibration_set(data, n, seed, str(data_root) if data_root else None, os.environ.get("MPQKIT_DATA"))


@functools.lru_cache(maxsize=8)
def _named_calibration_set(data: str, n: int, seed: int, data_root: str | None, _env: str | None) -> LabeledData:
    """Kept per process: the subset is small, the train split it is drawn from is not."""
    return load_data(data, "train", root=data_root).sample(n, seed)


def _train_subset(data: str | LabeledData, n: int, seed: int, data_root: str | None) -> LabeledData:
    """Up to ``n`` training images (all of them when the split is smaller), fixed seed."""
    full = data if isinstance(data, LabeledData) else load_data(data, "train", root=data_root)
    return full.sample(min(n, len(full)), seed)


def check_compatible(bundle: ModelBundle, data: LabeledData) -> None:
    shape = tuple(data.images.shape[1:])
    if len(shape) != len(bundle.input_shape) or shape[0] != bundle.input_shape[0]:
        raise DataError(f"data {data.name}/{data.split} has images of shape {shape}, but model {bundle.name} "
                        f"expects {bundle.input_shape}")
    fixed_resolution = bundle.name in CIFAR_MODELS or bundle.name == "digits-cnn"  # trained at one input size
    if fixed_resolution and shape != tuple(bundle.input_shape):
        raise DataError(f"data {data.name}/{data.split} has images of shape {shape}, but model {bundle.name} "
                        f"expects {bundle.input_shape}")


# ---------------------------------------------------------------- search
def search(model: str | nn.Module | ModelBundle = "resnet20", data: str | LabeledData = "cifar10",
           budget: str | None = None, method: str = "eval-delta", *,
           w_bits: int | None = None, a_bits: int | None = None, search: str = "w",
           w_candidates: Sequence[int] = DEFAULT_W_BITS, a_candidates: Sequence[int] = DEFAULT_A_BITS,
           fixed: Sequence[str] | None = None, fixed_bits: tuple[int, int] = FIXED_BITS,
           calib_size: int = CALIB_SIZE, seed: int = 0, qconfig: QuantConfig | None = None,
           time_limit: float = 60.0, alpha: float = 1.0, out: str | Path | None = None,
           checkpoint: str | None = None, data_root: str | None = None, models_dir: str | None = None,
           input_shape: Sequence[int] | None = None, engine_options: dict[str, Any] | None = None,
           method_options: dict[str, Any] | None = None, progress: bool = True,
           table: SensitivityTable | None = None, device: str | None = None) -> SearchResult:
    """Search a mixed-precision plan; writes a results directory when ``out`` is given.

    search: "w" (weights searched, activations at ``a_bits``, default 8), "a" (activations
    searched, weights at ``w_bits``, default 8) or "wa" (both, jointly).
    ``table``: a sensitivity table from an earlier search with the same settings (sweeps solve
    many budgets from one measurement); the method's measurement is then skipped.
    ``device``: "auto" (default: CUDA when available), "cpu", "cuda[:N]".
    """
    from .device import resolve_device

    dev = resolve_device(device)
    t_start = time.perf_counter()
    qconfig = qconfig or QuantConfig()
    m = METHODS.get(method)
    if search not in ("w", "a", "wa"):
        raise MpqkitError(f"search must be 'w', 'a' or 'wa', got {search!r}")
    for b in (*w_candidates, *a_candidates, *(x for x in (w_bits, a_bits) if x is not None), *fixed_bits):
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise MpqkitError(f"bits must be integers in 1..16, got {b!r}")
    terms = parse_budget(budget)
    bundle = load_model(model, checkpoint, models_dir, input_shape=input_shape)
    calib = calibration_set(data, calib_size, seed, data_root)
    check_compatible(bundle, calib)
    graph = discover(bundle.model, bundle.input_shape)
    fixed_names = list(graph.default_fixed() if fixed is None else fixed)
    graph.check_names(fixed_names)
    searched = [n for n in graph.names if n not in fixed_names]
    if not searched:
        raise MpqkitError("no layer left to search: every quantizable layer is fixed")

    if m.solver == "uniform":
        w_cands = [w_bits] if w_bits is not None else list(w_candidates)
        a_cands: list[int | None] = [a_bits] if a_bits is not None else (list(a_candidates) if "a" in search else [8])
    else:
        w_cands = list(w_candidates) if "w" in search else [w_bits or 8]
        a_cands = list(a_candidates) if "a" in search else [a_bits or 8]
    ledger = Ledger(graph, searched)
    problem = Allocation(ledger=ledger, layers=searched, w_bits=w_cands, a_bits=a_cands,
                         fixed={f: tuple(fixed_bits) for f in fixed_names}, constraints=ledger.resolve(terms),
                         tie_groups=graph.tie_groups)
    problem.check_feasible()

    ctx = SearchContext(model=bundle.model, graph=graph, calib_images=calib.images, calib_labels=calib.labels,
                        searched=searched, w_bits=w_cands, a_bits=a_cands, search_w="w" in search,
                        search_a="a" in search, qconfig=qconfig, seed=seed, options=dict(method_options or {}),
                        engine_kwargs={"progress": progress, "device": dev, **(engine_options or {})},
                        device=dev, load_train=lambda n, s: _train_subset(data, n, s, data_root))
    t_sens = time.perf_counter()
    if table is None and m.sensitivity is not None:
        table = m.sensitivity(ctx)
    t_solve = time.perf_counter()
    solution = _solve(m, problem, table, bool(terms), w_bits=w_bits, a_bits=a_bits, search=search, alpha=alpha,
                      time_limit=time_limit, seed=seed, options=method_options or {})
    t_end = time.perf_counter()

    full = problem.full(solution.assignment)
    layers = {f: LayerQuant(wb, ab, qconfig.w_granularity, qconfig.w_symmetric) for f, (wb, ab) in
              ((n, full[n]) for n in graph.names)}
    params = {"search": search, "w_candidates": w_cands, "a_candidates": a_cands, "fixed": fixed_names,
              "alpha": alpha, "time_limit": time_limit, "qconfig": qconfig.to_dict(),
              **{k: v if isinstance(v, (str, int, float, bool, list, type(None))) else f"<{type(v).__name__}>"
                 for k, v in (method_options or {}).items() if k not in EXECUTION_OPTIONS}}
    plan = Plan(layers=layers, model_name=bundle.name, model_sha256=bundle.sha256, method=method,
                method_params=params, budget=budget, costs=ledger.summary(full),
                provenance={**provenance(seed, len(calib), calib.sha256()), "solver": solution.record(),
                            "data": calib.name})
    result = SearchResult(plan, solution, table, graph, ledger,
                          {"sensitivity": t_solve - t_sens, "solve": t_end - t_solve,
                           "total": t_end - t_start}, ctx.engine_stats())
    if out is not None:
        from .report.results import write_results

        result.results_dir = write_results(Path(out), result)
    return result


def _solve(m: Method, problem: Allocation, table: SensitivityTable | None, has_budget: bool, *,
           w_bits: int | None, a_bits: int | None, search: str, alpha: float, time_limit: float, seed: int,
           options: dict[str, Any]) -> Solution:
    """The method's solver on the problem: uniform, the threshold rule, the IQP or the ILP."""
    if m.solver == "uniform":
        if w_bits is None and not has_budget:
            raise BudgetError("uniform needs --w-bits (and optionally --a-bits) or a --budget")
        return solve_uniform(problem, w_bits, a_bits if a_bits is not None else (8 if "a" not in search else None))
    assert table is not None
    if m.solver == "threshold":
        qem = options.get("qem")
        if qem is None and not has_budget:
            raise BudgetError(f"method '{m.name}' needs --qem or a --budget")
        return solve_threshold(problem, table.w, None if qem is None else float(qem))
    if m.solver == "supernet":  # argmax of the method's α when it fits, else the ILP on its costs
        return solve_supernet(problem, table.meta["argmax_bits"], table.w, time_limit,
                              select=str(options.get("select", "argmax")))
    if m.solver == "greedy":
        return solve_greedy(problem, table.meta["pareto"], float(options.get("max_drop", 1.0)))
    if not has_budget:
        raise BudgetError(f"method '{m.name}' needs a --budget (e.g. avg-bits=4)")
    if m.solver == "iqp":
        from .sensitivity.crosslayer import quadratic_objective

        g, lin, info = quadratic_objective(table, problem)
        solution = solve_iqp(problem, g, lin, time_limit=time_limit, seed=seed)
        solution.info.update(info)
        return solution
    zeros = {f: {b: 0.0 for b in problem.w_bits} for f in problem.layers}
    return solve_ilp(problem, table.w if "w" in search else zeros, table.a if "a" in search else None,
                     alpha=alpha, time_limit=time_limit)


# ---------------------------------------------------------------- apply / evaluate
def apply_plan(model: str | nn.Module | ModelBundle, plan: Plan | str | Path, data: str | LabeledData | None = "cifar10",
               *, ptq: str | None = None, recon_options: dict[str, Any] | None = None,
               calib_size: int | None = None, seed: int | None = None, qconfig: QuantConfig | None = None,
               checkpoint: str | None = None, data_root: str | None = None, models_dir: str | None = None,
               input_shape: Sequence[int] | None = None, allow_other_model: bool = False,
               progress: bool = False, device: str | None = None) -> nn.Module:
    """A quantized copy of the model following ``plan``. Activation ranges are calibrated on the
    same fixed-seed train subset the search used (size and seed from the plan's provenance).

    ``ptq`` picks the post-training quantizer: None keeps the plan's quantizer config (default:
    MSE ranges); "minmax" / "mse" set the range estimator of weights and activations; "adaround"
    (layer-wise), "brecq" (block-wise, LSQ activation steps) and "qdrop" (BRECQ + QDrop) then
    reconstruct on the calibration set; ``recon_options`` override :class:`ReconConfig` fields
    (e.g. ``{"iters": 2000}``). ``device``: "auto" (CUDA when available), "cpu", "cuda[:N]"; the
    quantized copy lives there.
    """
    from dataclasses import replace

    from .device import resolve_device

    from .quant.brecq import reconstruct, recon_config

    recon = recon_config(ptq, **(recon_options or {})) if ptq is not None else None
    bundle = load_model(model, checkpoint, models_dir, input_shape=input_shape)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    graph = discover(bundle.model, bundle.input_shape)
    plan.validate(graph, None if allow_other_model else bundle.sha256)
    if qconfig is None and isinstance(plan.method_params.get("qconfig"), dict):
        qconfig = QuantConfig(**plan.method_params["qconfig"])
    if ptq in ("minmax", "mse"):
        qconfig = replace(qconfig or QuantConfig(), w_range=ptq, a_range=ptq)
    prov = plan.provenance or {}
    calib_batches = None
    if recon is not None or any(lq.a_bits is not None for lq in plan.layers.values()):
        if data is None:
            raise DataError("the plan quantizes activations (or PTQ reconstruction was asked for): pass calibration data")
        calib = calibration_set(data, calib_size or prov.get("calib", {}).get("n", CALIB_SIZE),
                                seed if seed is not None else prov.get("seed", 0), data_root)
        check_compatible(bundle, calib)
        calib_batches = [x for x, _ in calib.batches(256)]
    fp = _on_device(bundle.model, resolve_device(device))
    qmodel = _apply_plan(fp, plan, calib_batches, qconfig)
    if recon is not None:
        assert calib_batches is not None
        reconstruct(qmodel, fp, calib_batches, recon, progress=progress)
    return qmodel


def _on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """The model itself when already there, else a moved copy (the caller's model never moves)."""
    from .quant.apply import model_device

    if model_device(model) == dev:
        return model
    import copy

    return copy.deepcopy(model).to(dev)


def save_quantized(qmodel: nn.Module, plan: Plan, path: str | Path) -> Path:
    """Write a quantized model (plan + state dict with every quantizer's parameters), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"mpqkit_quantized": 1, "plan": plan.to_dict(), "state_dict": qmodel.state_dict()}, tmp)
    tmp.replace(path)
    return path


def load_quantized(model: str | nn.Module | ModelBundle, path: str | Path, *, checkpoint: str | None = None,
                   models_dir: str | None = None, input_shape: Sequence[int] | None = None) -> nn.Module:
    """Rebuild a model saved by ``mpqkit apply --out`` (no calibration data needed)."""
    from .errors import CheckpointError

    bundle = load_model(model, checkpoint, models_dir, input_shape=input_shape)
    if not Path(path).is_file():
        raise MpqkitError(f"quantized model file not found: {path}")
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
        plan = Plan.from_dict(obj["plan"], source=str(path))
        state = obj["state_dict"]
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(f"{path} is not an mpqkit quantized model file: {str(e).splitlines()[0]}") from None
    plan.validate(discover(bundle.model, bundle.input_shape))
    qconfig = QuantConfig(**plan.method_params["qconfig"]) if isinstance(plan.method_params.get("qconfig"), dict) else None
    return _apply_plan(bundle.model, plan, qconfig=qconfig, state_dict=state)


def evaluate(model: str | nn.Module | ModelBundle = "resnet20", data: str | LabeledData = "cifar10",
             split: str = "test", plan: Plan | str | Path | None = None, *, limit: int | None = None,
             checkpoint: str | None = None, data_root: str | None = None, models_dir: str | None = None,
             input_shape: Sequence[int] | None = None, batch_size: int = 500, progress: bool = False,
             device: str | None = None, **apply_kwargs: Any) -> dict[str, Any]:
    """Top-1 / loss of the fp model, or of the model quantized by ``plan``, on a split."""
    from .device import resolve_device

    bundle = load_model(model, checkpoint, models_dir, input_shape=input_shape)
    ds = load_split(data, split, data_root, limit)
    check_compatible(bundle, ds)
    net = _on_device(bundle.model, resolve_device(device))
    if plan is not None:
        net = apply_plan(bundle, plan, data if not isinstance(data, LabeledData) else ds, data_root=data_root,
                         progress=progress, device=device, **apply_kwargs)
    with torch.inference_mode():
        res = evaluate_model(net, ds, batch_size=batch_size, progress=progress)
    return {"model": bundle.name, "data": ds.name, "split": ds.split, "plan": None if plan is None else str(
        plan if not isinstance(plan, Plan) else plan.method), "ptq": apply_kwargs.get("ptq"), **res}
