"""The public entry points: ``search``, ``apply_plan``, ``evaluate``, ``finetune``, ``sweep``, ``bench``,
``proxies``, ``layers``, ``demo`` — gathered here from the stage modules that implement them
(``loading``, ``searching``, ``applying``, ``finetuning``, ``benching``; none of them imports this one).

Every entry point takes one :class:`~mpqkit.settings.RunSettings` (keyword overrides of its fields
are accepted and checked) and, where a method runs, that method's typed options. The CLI is a thin
layer over these; ``mpqkit search --method X`` and ``mpqkit.search(method="X")`` are the same code
path. Rendering (tables, plots, HTML) lives in ``mpqkit.report``, which never imports this module.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from . import sensitivity as _sensitivity  # noqa: F401  (registers the built-in methods)
from .applying import apply_plan, evaluate, load_quantized, plan_qconfig, save_quantized
from .benching import MAX_DRAWS, bench, method_options_for, proxies, sweep, unique, unique_budgets
from .budget import Ledger
from .fileutil import atomic_write_text
from .finetuning import MIN_FINETUNE_IMAGES, finetune
from .graph import discover
from .loading import calibration_set, check_compatible, check_out_dir, heldout_set, load_model, load_split, on_device
from .quant.config import QuantConfig
from .result import SearchResult
from .searching import search
from .settings import CALIB_SIZE, DEFAULT_A_BITS, DEFAULT_W_BITS, FIXED_BITS, RunSettings, resolve_settings
from .zoo.models import ModelBundle

log = logging.getLogger("mpqkit")

__all__ = ["RunSettings", "SearchResult", "QuantConfig", "search", "apply_plan", "evaluate", "sweep", "bench",
           "proxies", "layers", "demo", "finetune", "load_model", "load_split", "calibration_set", "heldout_set",
           "check_compatible", "on_device", "save_quantized", "load_quantized", "plan_qconfig", "method_options_for",
           "unique", "unique_budgets", "resolve_settings", "results_json", "MAX_DRAWS", "MIN_FINETUNE_IMAGES",
           "DEFAULT_W_BITS", "DEFAULT_A_BITS", "FIXED_BITS", "CALIB_SIZE"]


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

    t0 = time.perf_counter()
    out = Path(out)
    check_out_dir(out, "demo results directory")
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
