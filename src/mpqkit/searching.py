"""``search``: calibrate → measure (the method) → decide (the solver) → refine → the plan."""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from . import sensitivity as _sensitivity  # noqa: F401  (registers the built-in methods)
from .budget import Ledger, parse_budget
from .device import resolve_device
from .engine.probe import default_prefix_cache_mb
from .errors import MpqkitError
from .evaluation import check_outputs
from .fileutil import writer_lock
from .graph import discover
from .loading import calibration_set, check_compatible, check_out_dir, heldout_set, load_model, train_subset
from .memory import plan_prefix_cache, search_parts, trim_heap
from .plan import LayerQuant, Plan, provenance
from .profile import profiling, stage
from .quant.calibration import calib_chunk
from .quant.ptq import prepare_fp
from .result import SearchResult
from .sensitivity.base import Method, SearchContext, SensitivityTable, SolveRequest
from .sensitivity.evalbased import refine_scores
from .sensitivity.options import MethodOptions
from .sensitivity.registry import METHODS
from .settings import RunSettings, resolve_settings
from .solve import Allocation
from .solve.refine import engine_halves_measure, refine
from .zoo.data import LabeledData
from .zoo.models import ModelBundle

log = logging.getLogger("mpqkit")

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

    existed = out is not None and Path(out).is_dir()
    try:
        with profiling() as prof:
            result = _search(model, data, budget, method, resolve_settings(settings, overrides), options, table, out)
    except BaseException:
        if out is not None and not existed:
            with contextlib.suppress(OSError):
                Path(out).rmdir()  # made by the output check; only removed while still empty
        raise
    finally:
        # the probe engines (their kept layer cuts, quantized layers, GPTQ statistics) sit in reference
        # cycles: free them now, not at some later collection while the next search holds its own; then
        # hand the freed heap back, so that what comes next (a PTQ, the next draw's search) starts lean
        gc.collect()
        trim_heap()
    result.profile = prof.to_dict()
    if out is not None:
        # lazy: matplotlib takes a second to import
        from .report.results import write_results

        with writer_lock(Path(out), "search results directory", remove_if_empty=not existed):
            result.results_dir = write_results(Path(out), result)
    return result


def _search(model: str | nn.Module | ModelBundle, data: str | LabeledData, budget: str | None, method: str,
            s: RunSettings, options: MethodOptions | Mapping[str, Any] | None, table: SensitivityTable | None,
            out: str | Path | None = None) -> SearchResult:
    """``search`` inside its profile: calibrate, pose the problem, measure (unless ``table``), decide,
    refine, write the plan; writes no file (``out`` is only checked, before the long work)."""

    t_start = time.perf_counter()
    if table is not None and table.pruned:  # its bounds stand in for scores only at the budget it was pruned for
        raise MpqkitError("the given sensitivity table skipped candidates that its own budget's plan cannot choose "
                          "(pruned): it cannot be solved for another budget; search without table=, or measure "
                          "it with prune=False to reuse it")
    m = METHODS.get(method)
    opts = m.make_options(options)
    terms = parse_budget(budget)
    dev = resolve_device(s.device)
    bundle = load_model(model, s)
    with stage("calibration set"):
        calib = calibration_set(data, s.calib_size, s.seed, s.data_root)
    check_compatible(bundle, calib)
    graph = discover(bundle.model, bundle.input_shape)
    problem, fixed_names = _problem(graph, s, terms, uniform=m.sensitivity is None)
    check_out_dir(out, "search results directory", s)  # after the cheap checks, before the long work
    ctx = SearchContext(model=prepare_fp(bundle.model, s.qconfig), graph=graph, calib_images=calib.images,
                        calib_labels=calib.labels, searched=problem.layers, w_bits=problem.w_bits,
                        a_bits=problem.a_bits, search_w="w" in s.search, search_a="a" in s.search, qconfig=s.qconfig,
                        seed=s.seed, options=opts, engine_kwargs={**s.engine_kwargs(), "device": dev}, device=dev,
                        load_train=functools.lru_cache(maxsize=1)(  # read once: the memory estimate counts it
                            lambda n, seed: train_subset(data, n, seed, s.data_root)),
                        load_heldout=functools.lru_cache(maxsize=1)(  # read once: the memory estimate counts it
                            lambda n: heldout_set(data, s.calib_size, n, s.seed, s.data_root)),
                        problem=problem, settings=s)
    _fit_memory(ctx, m, s)
    t_sens = time.perf_counter()
    table, warnings = _measure(m, ctx, table, bundle.model) if table is None else (table, [])
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
    plan = _plan(bundle, problem, solution, s, opts, method, budget, calib, fixed_names, refined, warnings)
    return SearchResult(plan, solution, table, graph, problem.ledger,
                        {"sensitivity": t_solve - t_sens, "solve": t_end - t_solve, "total": t_end - t_start},
                        ctx.engine_stats())


def _fit_memory(ctx: SearchContext, m: Method, s: RunSettings) -> None:
    """Under ``--max-memory``: refuse a search whose estimated need exceeds it (``MemoryLimitError``,
    before any probe) and size the probe engine's prefix cache within what is left; without it (and
    without ``--prefix-cache-mb``), size the prefix cache within ``memory.DEFAULT_TARGET_MB``."""
    if m.sensitivity is None or (s.max_memory_mb is None and s.prefix_cache_mb is not None):
        return
    n_candidates = len(ctx.w_bits) + (len(ctx.a_bits) if ctx.search_a else 0)
    own = (lambda: m.memory(ctx)) if m.memory is not None else None
    parts = search_parts(ctx.graph, ctx.calib_images, n_candidates, own)
    cache = plan_prefix_cache(s.max_memory_mb, parts, s.prefix_cache_mb, default_prefix_cache_mb())
    ctx.engine_kwargs["prefix_cache_mb"] = cache
    log.info("memory estimate (%s): %s; prefix cache %.0f MB",
             f"--max-memory {s.max_memory_mb:.0f} MB" if s.max_memory_mb is not None else "default target",
             ", ".join(f"{k} {v:.0f}" for k, v in parts.items()), cache)


def _problem(graph: Any, s: RunSettings, terms: Any, uniform: bool) -> tuple[Allocation, list[str]]:
    """The allocation problem: searched layers (all but the fixed ones), candidate bits (``uniform``: the
    given bits or every candidate), the budget's constraints; checked feasible. Also the fixed layers."""
    fixed_names = list(graph.default_fixed() if s.fixed is None else s.fixed)
    graph.check_names(fixed_names)
    searched = [n for n in graph.names if n not in fixed_names]
    if not searched:
        raise MpqkitError("no layer left to search: every quantizable layer is fixed")
    if uniform:
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
    return problem, fixed_names


def _measure(m: Any, ctx: SearchContext, table: SensitivityTable | None,
             fp_model: nn.Module) -> tuple[SensitivityTable | None, list[str]]:
    """The method's measurement (None for uniform) and the warnings it raised or the table deserves."""
    if m.sensitivity is None:
        return None, []
    check_outputs(fp_model, ctx.calib_images)
    table = m.measure(ctx)
    warnings = []
    if table.flat:
        warnings.append(f"{m.name}: every sensitivity of the table is the same value, so the plan carries no "
                        f"information from the measurement (any allocation within the budget is 'optimal')")
        log.warning(warnings[-1])
    return table, warnings + list(table.meta.get("warnings", []))  # what the method itself flagged (logged)


def _plan(bundle: ModelBundle, problem: Allocation, solution: Any, s: RunSettings, opts: MethodOptions, method: str,
          budget: str | None, calib: LabeledData, fixed_names: list[str], refined: Any, warnings: list[str]) -> Plan:
    """The plan a search writes: every layer's bits, the method's parameters, costs and provenance."""
    full = problem.full(solution.assignment)
    layers = {f: LayerQuant(wb, ab, s.qconfig.w_granularity, s.qconfig.w_symmetric) for f, (wb, ab) in
              ((n, full[n]) for n in problem.ledger.graph.names)}
    params = {"search": s.search, "w_candidates": problem.w_bits, "a_candidates": problem.a_bits,
              "fixed": fixed_names, "objective": s.objective, "alpha": s.alpha, "time_limit": s.time_limit,
              "qconfig": s.qconfig.to_dict(), **opts.to_params()}
    prov = provenance(s.seed, len(calib), calib.sha256())
    prov["calib"] = {**prov["calib"], "seed": s.seed, "data": calib.name, "split": calib.split,
                     "chunk": calib_chunk(calib.images)}
    if refined is not None:
        prov["refine"] = {"max_probes": s.refine, **refined.record()}
    if warnings:
        prov["warnings"] = warnings
    return Plan(layers=layers, model_name=bundle.name, model_sha256=bundle.sha256, method=method,
                method_params=params, budget=budget, costs=problem.ledger.summary(full),
                provenance={**prov, "solver": solution.record(), "data": calib.name})


def _refine(ctx: SearchContext, problem: Allocation, assignment: dict, table: SensitivityTable | None,
            s: RunSettings):
    """``--refine``: the method's plan improved by measured moves (``solve/refine.py``), measured
    through the search's probe engine on the two halves of the calibration set."""

    if "a" in s.search:
        raise MpqkitError("--refine moves weight bits: use it with --search w")
    measure, on_accept = engine_halves_measure(ctx.engine, problem.full(assignment))
    res = refine(problem, assignment, measure, s.refine, refine_scores(ctx, table) if "w" in s.search else None,
                 on_accept=on_accept)
    log.info("refine: %d probes, loss (half A, half B) %.4f, %.4f → %.4f, %.4f; %d moves (%s)", res.probes,
             *res.before, *res.after, len(res.moves), res.stopped)
    return res
