"""auto: run the cheap methods, keep the plan that measures best on held-out images, refine it.

1. Each method in ``methods`` measures its table on the calibration set (one shared probe engine
   and cache, so e.g. greedy reuses eval-delta's probes) and its own solver turns it into a plan
   under the budget.
2. Every plan is measured as a whole, once, on ``heldout`` training images disjoint from the
   calibration draw (a second probe engine): the plan with the lowest held-out loss is chosen, so
   the choice is not made on the images the tables were measured on.
3. The chosen plan is refined (``solve/refine.py``, at most ``refine`` probes on the calibration
   set's two halves) and the refined plan is kept only if its held-out loss is not higher.
The table of what was tried (method, held-out loss and top-1, seconds) travels in
``Decision.trials`` and the plan's solver record.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from ..engine.probe import STAT_CHUNK, ProbeEngine, auto_batch_size
from ..errors import MpqkitError
from ..profile import stage
from ..solve.problem import TIME_LIMIT
from ..solve.refine import engine_halves_measure, refine
from .base import Decision, SearchContext, SensitivityTable, SolveRequest
from .evalbased import refine_scores
from .options import MethodOptions, option, positive
from .registry import METHODS
from .solvers import chosen

log = logging.getLogger("mpqkit")

# The candidates that were ever chosen, by measurement (docs/METHODS.md, auto); infoq and hawq are one
# --auto-methods away.
DEFAULT_CANDIDATES = "uniform,eval-delta,mpqco,mixquant-ilp,greedy"


@dataclass(frozen=True)
class AutoOptions(MethodOptions):
    methods: str = option(DEFAULT_CANDIDATES, flag="--auto-methods",
                          help=f"auto: comma-separated methods to try (default {DEFAULT_CANDIDATES})")
    heldout: int = option(1024, flag="--auto-heldout", help="auto: training images beside the calibration draw "
                          "on which the plans are compared (default 1024)")
    refine: int = option(60, flag="--auto-refine", help="auto: probes for refining the chosen plan (default 60; "
                         "0: no refinement)")
    candidate_options: str = option("", flag="--auto-options", type=lambda v: v,
                                    help="auto: the candidate methods' options as JSON, e.g. "
                                         "'{\"mpqco\": {\"mpqco_output\": \"logit\"}}'; a candidate's own flags "
                                         "(e.g. --mpqco-output) given beside --method auto land here "
                                         "(default: each candidate's defaults)")

    def __post_init__(self) -> None:
        positive("heldout", self.heldout, "auto")
        positive("refine", self.refine, "auto", allow_zero=True)
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not names:
            raise MpqkitError("option 'methods' of method 'auto' names no method")
        if "auto" in names:
            raise MpqkitError("option 'methods' of method 'auto' cannot include auto itself")
        # canonical JSON (sorted, each candidate's options checked by its own class)
        try:
            canonical = json.dumps(self.candidate_map(), sort_keys=True) if self.candidate_options else ""
        except TypeError as e:
            raise MpqkitError(f"option 'candidate_options' of method 'auto' holds a value JSON cannot carry ({e}); "
                              "pass it to that method directly") from None
        object.__setattr__(self, "candidate_options", canonical)

    def to_params(self) -> dict:
        """As every method's, and of the candidates' options only those that change results (e.g. not
        ``--workers``), so the same inputs give the same plan bytes on any runner."""
        out = super().to_params()
        kept = {}
        for name, values in self.candidate_map().items():
            fields = {f.name: f for f in METHODS.get(name).options.option_fields()}
            mine = {k: v for k, v in values.items()
                    if not (fields[k].metadata.get("execution") or fields[k].metadata.get("python_only"))}
            if mine:
                kept[name] = mine
        out["candidate_options"] = json.dumps(kept, sort_keys=True) if kept else ""
        return out

    def candidate_map(self) -> dict[str, dict]:
        """Per candidate method (canonical name), its given options; unknown methods or options are errors."""
        raw = self.candidate_options
        if isinstance(raw, str):
            try:
                raw = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as e:
                raise MpqkitError(f"option 'candidate_options' of method 'auto' is not JSON ({e}): {raw!r}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise MpqkitError("option 'candidate_options' of method 'auto' must map method names to option "
                              f"mappings, e.g. {{\"mpqco\": {{\"mpqco_output\": \"logit\"}}}}; got {raw!r}")
        names = {METHODS.get(m.strip()).name for m in self.methods.split(",") if m.strip()}
        out = {}
        for m, values in raw.items():
            name = METHODS.get(m).name
            if name not in names:
                raise MpqkitError(f"option 'candidate_options' of method 'auto' names {name}, which is not one of "
                                  f"its candidates ({', '.join(sorted(names))}; see --auto-methods)")
            METHODS.get(name).make_options(values)  # refuses unknown names and bad values now
            out[name] = dict(sorted(values.items()))
        return out


def auto_memory(ctx: SearchContext) -> float:
    """MB auto holds beside the calibration engine (``Method.memory``): the held-out images (as many as
    the data has beside the calibration draw), loaded and batched, the held-out engine's model copy and
    the live tensors of one batch (it runs plans from the input, batch by batch: at most the widest
    layer's input and output per image), and the largest of its candidates' own memory."""
    opts: AutoOptions = ctx.options  # type: ignore[assignment]
    images, graph = ctx.calib_images, ctx.graph
    n = len(ctx.load_heldout(opts.heldout)) if ctx.load_heldout is not None else opts.heldout
    per_image = images[0].numel() * images.element_size() if len(images) else 0
    batch = min(n, ctx.engine_kwargs.get("batch_size") or auto_batch_size(graph))
    held = n * 2 * per_image + batch * 2 * 4 * graph.widest_in_numel + 4 * graph.total_params
    methods = (METHODS.get(name.strip()) for name in opts.methods.split(",") if name.strip())
    own = [m.memory(dataclasses.replace(ctx, options=m.make_options(None))) for m in methods if m.memory is not None]
    return held / 2 ** 20 + max(own, default=0.0)


@METHODS.register("auto", "runs the cheap methods, keeps the plan with the lowest loss on held-out images, "
                  "refines it by measured moves", solver=chosen, options=AutoOptions, memory=auto_memory, decides=True)
def auto(ctx: SearchContext) -> SensitivityTable:
    """Each candidate method's plan, measured on held-out images; the lowest held-out loss wins and
    is refined by measured moves (kept only if the held-out loss does not rise)."""
    opts: AutoOptions = ctx.options  # type: ignore[assignment]
    if ctx.problem is None or not ctx.problem.constraints:
        raise MpqkitError("method 'auto' needs a --budget (e.g. avg-bits=3)")
    if ctx.search_a:
        raise MpqkitError("method 'auto' searches weight bits (use --search w)")
    if ctx.load_heldout is None:
        raise MpqkitError("method 'auto' needs held-out training images (search by dataset name)")
    held = ctx.load_heldout(opts.heldout)
    # the plans are measured on held-out images with the layers the calibration set built (ranges, GPTQ);
    # each is a whole plan that differs from the fp model from its first searched layer on, so a kept
    # layer cut would save only the layers before it: the held-out engine runs every plan from the
    # input, batch by batch, and holds no live tensors of all its images at once
    held_engine = ProbeEngine(ctx.model, ctx.graph, held.images, held.labels, qconfig=ctx.qconfig, seed=ctx.seed,
                              layers_from=ctx.engine, **{**ctx.engine_kwargs, "prefix": False})
    trials, tables, plans = _candidates(ctx, opts, held_engine)
    ok = [t for t in trials if "heldout_loss" in t and math.isfinite(t["heldout_loss"])]
    if not ok:
        raise MpqkitError("method 'auto': no candidate method gave a plan under the budget: "
                          + "; ".join(f"{t['method']}: {t.get('error')}" for t in trials))
    best = min(ok, key=lambda t: (t["heldout_loss"], t["method"]))
    best["chosen"] = True
    table = tables[best["method"]]
    plan, record, warnings = _refine_best(ctx, opts, held_engine, best, plans[best["method"]], table, trials)
    return SensitivityTable(w=table.w if table is not None else {}, a=table.a if table is not None else {},
                            pruned=table.pruned if table is not None else {},
                            decision=Decision(assignment=plan, trials=trials),
                            meta={"score": f"the chosen method's ({best['method']})", "chosen": best["method"],
                                  "heldout_n": len(held), "refine": record,
                                  **({"warnings": warnings} if warnings else {})})


def _candidates(ctx: SearchContext, opts: AutoOptions, held_engine: Any) -> tuple[list[dict], dict, dict]:
    """Every candidate method's table and plan (all sharing ``ctx.engine``), its plan's held-out loss
    and top-1, or why it dropped out: (trials, tables by method, plans by method)."""
    names = list(dict.fromkeys(METHODS.get(m.strip()).name for m in opts.methods.split(",") if m.strip()))
    given = opts.candidate_map()
    s = ctx.settings
    trials, tables, plans = [], {}, {}
    for name in names:
        m = METHODS.get(name)
        t0 = time.perf_counter()
        sub = dataclasses.replace(ctx, options=m.make_options(given.get(name)))
        try:
            table = m.measure(sub) if m.sensitivity is not None else None
            sol = m.solver(SolveRequest(problem=ctx.problem, table=table, options=sub.options, has_budget=True,
                                        method=name, search="w", alpha=s.alpha if s is not None else 1.0,
                                        time_limit=s.time_limit if s is not None else TIME_LIMIT,
                                        seed=ctx.seed))
        except MpqkitError as e:  # e.g. greedy finds no point under the budget: that candidate drops out
            trials.append({"method": name, "error": str(e)})
            continue
        if ctx.problem.violations(sol.assignment):
            trials.append({"method": name, "error": "plan breaks the budget"})
            continue
        tables[name], plans[name] = table, dict(sol.assignment)
        r = held_engine.run([ctx.problem.full(sol.assignment)], desc=f"auto: {name} held-out", show=False,
                            stage_name="auto: held-out plans")[0]
        trials.append({"method": name, "heldout_loss": r.loss, "heldout_top1": r.top1,
                       "avg_w_bits": ctx.problem.ledger.value("avg-bits", ctx.problem.full(sol.assignment)),
                       "seconds": time.perf_counter() - t0})
    return trials, tables, plans


def _refine_best(ctx: SearchContext, opts: AutoOptions, held_engine: Any, best: dict, plan: dict, table: Any,
                 trials: list[dict]) -> tuple[dict, dict | None, list[str]]:
    """The winner refined by measured moves on the calibration halves, kept only if its held-out loss
    does not rise: (plan, refinement record, warnings); appends the refinement's trial to ``trials``."""

    engine = ctx.engine
    if opts.refine <= 0:
        return plan, None, []
    if engine.fp.n <= STAT_CHUNK:  # refine chooses on one half and confirms on the other
        warning = (f"auto: refinement skipped: it needs more than {STAT_CHUNK} calibration images (two halves "
                   f"of {STAT_CHUNK}-image chunks), the calibration set has {engine.fp.n}")
        log.warning(warning)
        return plan, {"skipped": warning}, [warning]
    measure, on_accept = engine_halves_measure(engine, ctx.problem.full(plan))
    with stage("refine"):
        res = refine(ctx.problem, plan, measure, opts.refine, refine_scores(ctx, table),
                     on_accept=on_accept)
    record = res.record()
    if res.moves:
        r = held_engine.run([ctx.problem.full(res.assignment)], desc="auto: refined held-out", show=False,
                            stage_name="auto: held-out plans")[0]
        record.update(heldout_loss=r.loss, heldout_top1=r.top1, kept=r.loss <= best["heldout_loss"])
        if record["kept"]:
            plan = res.assignment
    trials.append({"method": f"{best['method']} + refine", "probes": res.probes, "moves": len(res.moves),
                   **({"heldout_loss": record["heldout_loss"], "heldout_top1": record["heldout_top1"],
                       "kept": record["kept"]} if res.moves else {"kept": False})})
    return plan, record, []
