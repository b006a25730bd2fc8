"""Method × budget × PTQ comparison (``mpqkit bench``) and single-method frontiers (``mpqkit sweep``).

Each method measures its sensitivity once and solves every budget from that table; each plan is
quantized with each PTQ backend and evaluated on the test split (and CIFAR's pixel-exact subset).
Rows are appended to ``rows.jsonl`` as they are measured, so a killed run resumes where it
stopped; ``results.csv``, ``pareto.png`` and ``report.html`` are rewritten from all rows at the end.
A method that fails at a budget (e.g. no greedy point meets it) gets a row with the error, never a
made-up figure.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..device import resolve_device
from ..errors import MpqkitError
from ..evaluation import evaluate_model
from ..plan import Plan, atomic_write_text

log = logging.getLogger("mpqkit")

COLUMNS = ["method", "budget", "ptq", "size_mb", "compression", "gbitops", "avg_w_bits", "top1_test", "top1_exact",
           "search_s", "ptq_s", "plan", "error"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "none"


def _load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: measured again
            continue
    return rows


def run_bench(model: Any, data: str, methods: Sequence[str], budgets: Sequence[str], ptqs: Sequence[str | None],
              out: Path, *, splits: Sequence[str] = ("test", "exact"), search_kwargs: dict | None = None,
              recon_options: dict | None = None, progress: bool = False) -> list[dict]:
    """Measure every (method, budget, PTQ) row not yet in ``out/rows.jsonl``; returns all rows."""
    from .. import api

    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = _load_rows(rows_path)
    clean = "".join(json.dumps(r) + "\n" for r in rows)
    if rows_path.exists() and rows_path.read_text() != clean:  # drop a cut line, or the next row is glued to it
        atomic_write_text(rows_path, clean)
    done = {(r["method"], r["budget"], r["ptq"]) for r in rows}
    bundle = api.load_model(model)
    eval_sets = {}
    for split in splits:
        try:
            eval_sets[split] = api.load_split(data, split)
        except MpqkitError as e:  # e.g. no 'exact' subset for this dataset
            log.warning("bench: split %s not available (%s); its column stays empty", split, e)
    search_kwargs = dict(search_kwargs or {})

    def append(row: dict) -> None:
        rows.append(row)
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("bench: %s", json.dumps({k: row.get(k) for k in ("method", "budget", "ptq", "top1_test", "error")}))

    if ("fp32", "-", None) not in done:
        fp_model = api._on_device(bundle.model, resolve_device(search_kwargs.get("device")))
        ev = {s: evaluate_model(fp_model, d) for s, d in eval_sets.items()}
        append({"method": "fp32", "budget": "-", "ptq": None, "size_mb": None, "compression": 1.0, "gbitops": None,
                "avg_w_bits": 32.0, **{f"top1_{s}": 100 * e["top1"] for s, e in ev.items()}})
    for method in methods:
        table = None
        for budget in budgets:
            todo = [p for p in ptqs if (method, budget, p) not in done]
            if not todo:
                continue
            plan_dir = out / "plans" / _slug(method) / _slug(budget)
            try:
                res = api.search(bundle, data, budget, method, out=plan_dir, progress=progress, table=table,
                                 **search_kwargs)
            except MpqkitError as e:
                for p in todo:
                    append({"method": method, "budget": budget, "ptq": p, "error": str(e)})
                continue
            search_s = res.seconds["total"]
            table = res.table
            c = res.plan.costs
            for p in todo:
                t0 = time.perf_counter()
                q = api.apply_plan(bundle, res.plan, data, ptq=p, device=search_kwargs.get("device"),
                                   recon_options=recon_options if p in ("adaround", "brecq", "qdrop") else None)
                ptq_s = time.perf_counter() - t0
                with torch.inference_mode():
                    ev = {s: evaluate_model(q, d) for s, d in eval_sets.items()}
                append({"method": method, "budget": budget, "ptq": p, "size_mb": c["weight_mb"],
                        "compression": c["compression"], "gbitops": c["bitops"] / 1e9,
                        "avg_w_bits": c["avg_w_bits_searched"],
                        **{f"top1_{s}": 100 * e["top1"] for s, e in ev.items()},
                        "search_s": search_s, "ptq_s": ptq_s, "plan": str(plan_dir / "plan.json")})
    return rows


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return path


def plot_pareto(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Top-1 (test) vs weight size, one line per (method, PTQ)."""
    from .plots import plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("error") or r.get("size_mb") is None or r.get("top1_test") is None:
            continue
        lines.setdefault((r["method"], r["ptq"]), []).append((r["size_mb"], r["top1_test"]))
    for (m, p), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, label=m if p is None else f"{m} + {p}")
    fp = [r for r in rows if r["method"] == "fp32" and r.get("top1_test") is not None]
    if fp:
        ax.axhline(fp[0]["top1_test"], color="k", ls="--", lw=0.8, label="fp32")
    ax.set_xlabel("weight size (MB)")
    ax.set_ylabel("top-1 test (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bits_grid(plans: dict[str, Plan], path: Path, title: str) -> Path:
    """Weight bits per layer (columns) of several plans (rows): one picture per method."""
    import numpy as np

    from .plots import plt

    names = list(next(iter(plans.values())).layers)
    grid = np.array([[p.layers[n].w_bits or 32 for n in names] for p in plans.values()], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 0.45 * len(plans) + 1.6))
    ax.imshow(np.minimum(grid, 8), cmap="viridis", vmin=1, vmax=8, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=6,
                    color="white" if grid[i, j] < 5 else "black")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(plans)))
    ax.set_yticklabels(list(plans), fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_title(prefix: str, rows: Sequence[dict]) -> str:
    """'<model> / <data>: <methods> at <n> budget(s)' over every row of the directory (a resumed or
    extended run appends to earlier rows, so the title is not the last command's arguments)."""
    measured = [r for r in rows if r["method"] != "fp32"]
    methods = list(dict.fromkeys(r["method"] for r in measured))
    return f"{prefix}: {', '.join(methods)} at {len({r['budget'] for r in measured})} budget(s)"


def write_outputs(rows: Sequence[dict], out: Path, title: str) -> dict[str, Path]:
    """results.csv, pareto.png, per-method bit grids, results.md and the self-contained report.html."""
    from .html import write_html

    atomic_write_text(out / "title.txt", title + "\n")
    paths = {"csv": write_csv(rows, out / "results.csv"), "pareto": plot_pareto(rows, out / "pareto.png", title)}
    grids = {}
    for method in dict.fromkeys(r["method"] for r in rows if r.get("plan") and not r.get("error")):
        plans = {}
        for r in rows:
            if r["method"] == method and r.get("plan") and r["budget"] not in plans and Path(r["plan"]).exists():
                plans[r["budget"]] = Plan.load(r["plan"])
        if plans:
            grids[method] = plot_bits_grid(plans, out / f"bits_{_slug(method)}.png", f"{method}: weight bits per layer")
    paths["md"] = out / "results.md"
    atomic_write_text(paths["md"], markdown_table(rows, title))
    paths["html"] = write_html(rows, out, title, paths["pareto"], grids)
    return paths


def markdown_table(rows: Sequence[dict], title: str) -> str:
    lines = [f"### {title}", "", "| method | budget | PTQ | size MB | compression | GBitOps | avg w-bits | top-1 test | "
             "top-1 exact | search s | PTQ s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['budget']} | {r['ptq'] or '-'} | — | | | | failed: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['budget']} | {r['ptq'] or 'default'} | {f(r.get('size_mb'), '.4f')} | "
                     f"{f(r.get('compression'), '.2f')} | {f(r.get('gbitops'), '.4f')} | {f(r.get('avg_w_bits'), '.3f')} | "
                     f"{f(r.get('top1_test'), '.2f')} | {f(r.get('top1_exact'), '.2f')} | {f(r.get('search_s'), '.1f')} | "
                     f"{f(r.get('ptq_s'), '.1f')} |")
    return "\n".join(lines) + "\n"
