"""Many searches: ``bench`` (methods × budgets × PTQ × draws, resumable rows), ``sweep``, ``proxies``."""
from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import sensitivity as _sensitivity  # noqa: F401  (registers the built-in methods)
from .applying import apply_plan
from .budget import parse_budget
from .errors import DataError, MissingResourceError, MpqkitError
from .evaluation import evaluate_model
from .fileutil import writer_lock
from .graph import discover
from .loading import calibration_set, check_out_dir, load_model, load_split, on_device
from .memory import trim_heap
from .plan import Plan
from .profile import RssSampler
from .quant.brecq import DEFAULT_ITERS
from .quant.ptq import parse_ptq
from .report.bench import append_row, load_rows, plan_dir
from .report.proxies import DEFAULT_METHODS, correlations, true_drops, write_proxies
from .searching import search
from .sensitivity.options import MethodOptions, field_flag
from .sensitivity.registry import METHODS
from .settings import RunSettings, resolve_settings
from .zoo.data import LabeledData
from .zoo.models import ModelBundle

log = logging.getLogger("mpqkit")
MAX_DRAWS = 100  #: calibration draws one bench may ask for (each is a full search per method)

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
    check_out_dir(out, "bench results directory", s)
    with writer_lock(out, "bench results directory", remove_if_empty=not existed):
        return _bench_rows(model, data, methods, budgets, out, ptqs, s, opts, splits, recon_options, draws)


def _bench_rows(model: str | nn.Module | ModelBundle, data: str, methods: list[str], budgets: list[str], out: Path,
                ptqs: list[str | None], s: RunSettings, opts: dict[str, MethodOptions], splits: list[str],
                recon_options: dict[str, Any] | None, draws: int) -> list[dict]:
    """``bench``'s measurements, with the validated inputs, while this process holds ``out``."""

    rows_path = out / "rows.jsonl"
    rows = load_rows(rows_path, repair=True)
    recon_iters = _bench_recon_iters(ptqs, recon_options)
    _check_same_run(rows, out, s, recon_iters)
    done = {(r["method"], r["budget"], r["ptq"], r.get("draw", 0)) for r in rows}
    bundle = load_model(model, s)
    eval_sets = _eval_sets(data, splits, s)
    quiet = s.replace(progress=False)

    def append(row: dict) -> None:
        rows.append(row)
        append_row(rows_path, row)

    if ("fp32", "-", None, 0) not in done:
        fp_model = on_device(bundle.model, s.device)
        ev = {sp: evaluate_model(fp_model, d, s.eval_batch_size) for sp, d in eval_sets.items()}
        append({"method": "fp32", "budget": "-", "ptq": None, "size_mb": None, "compression": 1.0, "gbitops": None,
                "avg_w_bits": 32.0, **{f"top1_{sp}": 100 * e["top1"] for sp, e in ev.items()}})

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
                kept = _measured_plan(rows, method, budget, draw, pdir)
                if kept is not None:  # rows of this plan exist: new PTQ rows measure the same plan
                    plan, search_s = kept
                    _check_plan_protocol(plan, sd, opts[method], pdir, calibration_set(data, sd.calib_size, sd.seed,
                                                                                        sd.data_root))
                else:
                    try:
                        res = search(bundle, data, budget, method, settings=sd, options=opts[method], out=pdir,
                                     table=table)
                    except MpqkitError as e:
                        for p in todo:
                            append({"method": method, "budget": budget, "ptq": p, **tag, "error": str(e)})
                        continue
                    # a table is reused for the next budget, unless it was made for this budget (auto, supernet)
                    table = res.table if res.table is not None and res.table.reusable else None
                    plan, search_s = res.plan, res.seconds["total"]
                _bench_plan(plan, search_s, bundle, data, todo, eval_sets, quiet, recon_options, pdir,
                            {**tag, "objective": sd.objective}, append, recon_iters)
    return rows


def _eval_sets(data: str, splits: Sequence[str], s: RunSettings) -> dict[str, LabeledData]:
    """The evaluation splits that ``data`` has (a missing one is logged, its column stays empty);
    an error when none is available or the data root is wrong."""
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
    return eval_sets


def _bench_recon_iters(ptqs: Sequence[str | None], recon_options: Mapping[str, Any] | None) -> int | None:
    """Reconstruction iterations per unit of this bench's reconstruction rows (None: no such row)."""

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


def _check_plan_protocol(plan: Plan, s: RunSettings, opts: MethodOptions, pdir: Path, calib: LabeledData) -> None:
    """Resuming onto a plan an earlier run searched is refused when that run's settings differ from this
    run's where the plan records them: the quantizer (qconfig), the probe objective, the candidate
    bit-widths, the method's options and the calibration images (``calib``: this run's draw)."""
    params, recorded = plan.method_params, plan.provenance.get("calib", {})
    mine = {"qconfig": s.qconfig.to_dict(), "objective": s.objective, **opts.to_params()}
    if s.w_bits is None and "w_candidates" in params:  # the same candidates in any order
        mine["w_candidates"] = sorted(s.w_candidates)
        params = {**params, "w_candidates": sorted(params["w_candidates"])}

    def differs(old: Any, new: Any) -> bool:  # a dict recorded before a field existed is compared where both have it
        old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
        if isinstance(old, dict) and isinstance(new, dict):
            return any(old[k] != new[k] for k in old.keys() & new.keys())
        return old != new

    clashes = [f"{k} {params[k]!r} (this run: {v!r})" for k, v in mine.items() if k in params and differs(params[k], v)]
    if recorded.get("sha256") not in (None, calib.sha256()):
        clashes.append(f"other calibration images ({recorded.get('n')} drawn with seed {recorded.get('seed')}; "
                       f"this run: {len(calib)} with seed {s.seed})")
    if clashes:
        raise MpqkitError(f"{pdir / 'plan.json'} was searched with {'; '.join(clashes)}: a results directory describes "
                          "one run: use another --out, or the same settings to resume it")


def _measured_plan(rows: Sequence[dict], method: str, budget: str, draw: int,
                   pdir: Path) -> tuple[Plan, float] | None:
    """The plan (and its search seconds) that earlier rows of ``(method, budget, draw)`` measured,
    when its file is in ``pdir``; None when no such row exists (the plan is searched).

    Resuming with another PTQ must quantize the plan those rows measured: a new search may give
    other bits (the code or the caches changed), and rows of one key would then describe two plans.
    """
    prior = [r for r in rows if r["method"] == method and r["budget"] == budget
             and int(r.get("draw", 0)) == draw and not r.get("error") and r.get("search_s") is not None]
    path = pdir / "plan.json"
    if not prior or not path.is_file():
        return None
    return Plan.load(path), float(prior[0]["search_s"])


def _bench_plan(plan: Plan, search_s: float, bundle: ModelBundle, data: str, ptqs: Sequence[str | None],
                eval_sets: Mapping[str, LabeledData], settings: RunSettings, recon_options: dict[str, Any] | None,
                pdir: Path, tag: dict[str, Any], append: Any, recon_iters: int | None = None) -> None:
    """Quantize one plan with each PTQ backend, evaluate it, append one row each."""

    c = plan.costs
    for p in ptqs:
        with RssSampler() as rss:  # the resident peak of this PTQ and evaluation, not the process's so far
            t0 = time.perf_counter()
            q = apply_plan(bundle, plan, data, settings=settings, ptq=p,
                           recon_options=recon_options if p is not None and parse_ptq(p).recon else None)
            ptq_s = time.perf_counter() - t0
            with torch.inference_mode():
                ev = {sp: evaluate_model(q, d, settings.eval_batch_size) for sp, d in eval_sets.items()}
            del q
            gc.collect()
            trim_heap()  # the next plan's PTQ or the next draw's search starts from what is held, not kept free
        recon = {"recon_iters": recon_iters} if p is not None and parse_ptq(p).recon else {}
        append({"method": plan.method, "budget": plan.budget, "ptq": p, **tag, **recon, "size_mb": c["weight_mb"],
                "compression": c["compression"], "gbitops": c["bitops"] / 1e9,
                "avg_w_bits": c["avg_w_bits_searched"], **{f"top1_{sp}": 100 * e["top1"] for sp, e in ev.items()},
                "search_s": search_s, "ptq_s": ptq_s, "ptq_eval_peak_mb": round(rss.peak, 1),
                "plan": str(pdir / "plan.json")})


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

    s = resolve_settings(settings, overrides)
    methods = [METHODS.get(m).name for m in (methods or DEFAULT_METHODS)]
    check_out_dir(out, "proxies results directory", s)
    bundle = load_model(model, s)
    graph = discover(bundle.model, bundle.input_shape)
    searched = [n for n in graph.names if n not in (graph.default_fixed() if s.fixed is None else s.fixed)]
    bits = list(s.w_candidates)
    truth = true_drops(bundle, graph, load_split(data, "test", s), searched, bits, s,
                       calib=calibration_set(data, s.calib_size, s.seed, s.data_root))
    tables, corr = {}, {}
    for m in methods:  # every (layer, bits) is compared with the truth: nothing pruned
        res = search(bundle, data, "avg-bits=8", m, settings=s.replace(prune=False), options=(options or {}).get(m))
        tables[m] = res.table.w if res.table is not None else {}
        corr[m] = {**correlations(tables[m], truth), "sensitivity_s": res.seconds["sensitivity"]}
        log.info("proxies: %s %s", m, corr[m])
    result = {"model": bundle.name, "data": data, "split": "test", "w_candidates": bits,
              "correlations": corr, "truth": truth, "scores": tables}
    write_proxies(result, Path(out), searched)
    return result
