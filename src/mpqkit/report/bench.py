"""Rendering of bench/sweep results directories (the measuring loop is ``mpqkit.api.bench``).

``rows.jsonl`` holds one measured row per (method, budget, PTQ); ``results.csv``, ``pareto.png``,
bit grids, ``results.md`` and ``report.html`` are rewritten from all rows. A failed row carries
its error, never a made-up figure.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MpqkitError
from ..fileutil import atomic_write_text, json_text
from ..plan import Plan
from .html import write_html
from .recommend import LINE_WIDTH, toc_markdown, what_to_run_markdown
from .stats import (EQUAL_SIZE_BITS, MIN_DRAWS, bits_agreement, draw_groups, larger_winner, metric_column,
                    paired_difference, summarize)

log = logging.getLogger("mpqkit")

COLUMNS = ["method", "budget", "ptq", "draw", "seed", "size_mb", "compression", "gbitops", "avg_w_bits", "top1_test", "top1_exact",
           "search_s", "ptq_s", "plan", "error"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "none"


def load_rows(path: Path, repair: bool = False) -> list[dict]:
    """The rows of a ``rows.jsonl``; a line cut by a kill is skipped (measured again). ``repair``
    rewrites the file without it, or the next appended row would be glued to it and lost."""
    if not path.exists():
        return []
    rows, seen, repeated = [], set(), 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "method" not in row:
            continue
        key = (row["method"], row.get("budget"), row.get("ptq"), row.get("draw", 0))
        if key in seen:  # two writers before the lock existed: the first measurement counts, once
            repeated += 1
            continue
        seen.add(key)
        rows.append(row)
    if repeated:
        log.warning("%s: %d repeated row(s) ignored (same method, budget, PTQ and draw)", path, repeated)
    if repair:
        clean = "".join(json_text(r, "a bench row") + "\n" for r in rows)
        if path.read_text() != clean:
            atomic_write_text(path, clean)
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one measured row (a kill loses at most this line, which ``load_rows`` then skips)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json_text(row, "a bench row") + "\n")
    log.info("bench: %s", json.dumps({k: row.get(k) for k in ("method", "budget", "ptq", "top1_test", "error")}))


def plan_dir(out: Path, method: str, budget: str, draw: int = 0) -> Path:
    """Where a bench row's plan and search results go (draw 0 where single-draw runs put it)."""
    base = out / "plans" / _slug(method) / _slug(budget)
    return base if draw == 0 else base / f"draw{draw}"


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return path


def pareto_lines(rows: Sequence[dict]) -> tuple[str, dict[tuple, list[tuple[float, float]]]]:
    """(the top-1 column plotted, {(method, PTQ): [(size MB, top-1)]})."""
    col = metric_column(rows)
    points: dict[tuple, list[tuple[float, float]]] = {}  # (method, ptq, budget) -> one point per draw
    for r in rows:
        if r.get("error") or r.get("size_mb") is None or r.get(col) is None:
            continue
        points.setdefault((r["method"], r["ptq"], r["budget"]), []).append((r["size_mb"], r[col]))
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for (m, p, _), pts in points.items():  # the mean over draws
        lines.setdefault((m, p), []).append((sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)))
    return col, lines


def plot_pareto(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Top-1 vs weight size, one line per (method, PTQ), on the test split (or, when a run
    evaluated only another split, e.g. ``--splits exact``, on that one)."""
    # lazy: matplotlib takes a second to import
    from .plots import plt

    col, lines = pareto_lines(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (m, p), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, label=m if p is None else f"{m} + {p}")
    fp = [r for r in rows if r["method"] == "fp32" and r.get(col) is not None]
    if fp:
        ax.axhline(fp[0][col], color="k", ls="--", lw=0.8, label="fp32")
    ax.set_xlabel("weight size (MB)")
    ax.set_ylabel(f"top-1 {col[len('top1_'):]} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bits_grid(plans: dict[str, Plan], path: Path, title: str) -> Path:
    """Weight bits per layer (columns) of several plans (rows): one picture per method."""

    # lazy: matplotlib takes a second to import
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
    if not measured:
        return f"{prefix}: no plan measured"
    methods = list(dict.fromkeys(r["method"] for r in measured))
    return f"{prefix}: {', '.join(methods)} at {len({r['budget'] for r in measured})} budget(s)"


def write_outputs(rows: Sequence[dict], out: Path, title: str) -> dict[str, Path]:
    """results.csv, pareto.png, per-method bit grids, results.md and the self-contained report.html."""

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


def _plan_bits(row: dict) -> dict[str, tuple] | None:
    try:
        return Plan.load(row["plan"]).assignment()
    except Exception:  # noqa: BLE001 - a missing or unreadable plan only leaves the agreement empty
        return None


def draws_markdown(rows: Sequence[dict], title: str) -> str:
    """Tables of a multi-draw run: mean ± std over draws with plan stability, and paired
    differences (each method vs uniform and vs the best mean) with 95 % intervals."""
    metric = metric_column(rows)
    groups = draw_groups(rows)
    seeds = sorted({int(r["seed"]) for r in rows if r.get("seed") is not None})
    n_draws = len({int(r.get("draw", 0)) for r in rows if r["method"] != "fp32"})
    split = metric[len("top1_"):]
    lines = [f"### {title}", "", f"{n_draws} calibration draws (seeds {', '.join(map(str, seeds))}); top-1 on the "
             f"{split} split, mean ± std over draws (sample std). Bits agreement: mean over pairs of draws of the "
             "fraction of layers whose bits agree.", "",
             f"| method | budget | PTQ | draws | avg w-bits | top-1 {split} | std | min | max | bits agreement |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    fp = [r for r in rows if r["method"] == "fp32" and r.get(metric) is not None]
    if fp:
        lines.append(f"| fp32 | - | - | 1 | 32 | {fp[0][metric]:.2f} | | | | |")
    lines += _mean_rows(groups, metric)
    for r in (r for r in rows if r.get("error")):
        lines.append(f"| {r['method']} | {r['budget']} | {r['ptq'] or 'default'} | draw {r.get('draw', 0)} | | "
                     f"failed: {r['error'][:80]} | | | | |")
    paired = _paired_rows(groups, metric)
    if not paired:  # one method per budget and PTQ: nothing to pair
        return "\n".join(lines) + "\n"
    lines += ["", f"Paired differences of top-1 {split} (A − B on the same draw; mean and 95 % t interval over "
              f"draws). **A > B** / **A < B** only from at least {MIN_DRAWS} draws, where the interval excludes 0 and the "
              f"side ahead is not the larger model (by more than {EQUAL_SIZE_BITS} avg w-bits); otherwise the draws do "
              "not separate them.", "", "| budget | PTQ | A | B | draws | mean A − B | 95 % interval | verdict |",
              "|---|---|---|---|---:|---:|---|---|"]
    return "\n".join(lines + paired) + "\n"


def _mean_rows(groups: dict, metric: str) -> list[str]:
    """One row per (method, budget, PTQ): mean ± std over draws, by budget and PTQ, best mean first."""
    def order(item):
        (m, b, p), by_draw = item
        vals = [r[metric] for r in by_draw.values() if r.get(metric) is not None]
        return (b, p or "", -(sum(vals) / len(vals)) if vals else 0.0)

    lines = []
    for (m, b, p), by_draw in sorted(groups.items(), key=order):
        vals = [r[metric] for r in by_draw.values() if r.get(metric) is not None]
        if not vals:
            continue
        st = summarize(vals)
        bits = [x for x in (_plan_bits(r) for r in by_draw.values()) if x is not None]
        agree = bits_agreement(bits) if len(bits) > 1 else None
        avg = summarize([r["avg_w_bits"] for r in by_draw.values()]).mean
        spread = f"{st.std:.2f} | {min(vals):.2f} | {max(vals):.2f}" if st.n > 1 else " | | "  # one draw: no spread
        lines.append(f"| {m} | {b} | {p or 'default'} | {st.n} | {avg:.3f} | {st.mean:.2f} | {spread} | "
                     f"{'' if agree is None else f'{agree:.2f}'} |")
    return lines


def _paired_rows(groups: dict, metric: str) -> list[str]:
    """Per (budget, PTQ): each method against uniform and against the best mean, paired over draws,
    with a verdict only where the draws, the interval and equal size allow one."""
    by_setting: dict[tuple, dict[str, dict[int, float]]] = {}
    bits_of: dict[tuple, float] = {}  # (method, budget, PTQ) -> mean average weight bits over the draws
    for (m, b, p), by_draw in groups.items():
        by_setting.setdefault((b, p), {})[m] = {k: r[metric] for k, r in by_draw.items() if r.get(metric) is not None}
        bits_of[(m, b, p)] = summarize([r["avg_w_bits"] for r in by_draw.values()]).mean
    lines = []
    for (b, p), methods in by_setting.items():
        means = {m: sum(v.values()) / len(v) for m, v in methods.items() if v}
        if len(means) < 2:
            continue
        best = max(means, key=means.__getitem__)
        listed: set[frozenset] = set()
        for m in sorted(means, key=means.__getitem__, reverse=True):
            for ref in dict.fromkeys(x for x in ("uniform", best) if x in means and x != m):
                if frozenset((m, ref)) in listed:
                    continue
                listed.add(frozenset((m, ref)))
                d = paired_difference(methods[m], methods[ref])
                if d is None:
                    continue
                verdict = d.verdict("**A > B**", "**A < B**", "not separated")
                larger = larger_winner(d.mean, bits_of[(m, b, p)], bits_of[(ref, b, p)])
                if larger and d.n >= MIN_DRAWS:
                    verdict = f"not at equal size ({larger})"
                lines.append(f"| {b} | {p or 'default'} | {m} | {ref} | {d.n} | {d.mean:+.2f} | {d.interval_text} | "
                             f"{verdict} |")
    return lines


def markdown_table(rows: Sequence[dict], title: str) -> str:
    """The per-row table of a single-draw run; a multi-draw run gets ``draws_markdown`` instead."""
    if any(int(r.get("draw", 0)) > 0 for r in rows):
        return draws_markdown(rows, title)
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


def bench_prefix(d: Path, rows: list[dict]) -> str:
    """'<model> / <data>' of a results directory: from title.txt, else (a run stopped before writing
    it) from the first readable plan of its rows, else the directory name."""
    if (d / "title.txt").exists():
        return (d / "title.txt").read_text().strip().split(":")[0]
    for r in rows:
        try:
            plan = json.loads(Path(r["plan"]).read_text())
            return f"{plan['model']['name']} / {plan['provenance']['data']}"
        except (KeyError, TypeError, OSError, ValueError):
            continue
    return d.name


def write_markdown_index(dirs: Sequence[Path], markdown: str | None, command: str) -> list[str]:
    """Rewrite every directory's outputs from its rows; with ``markdown``, one file holding all
    their tables (``docs/RESULTS.md``). Returns the progress lines."""

    md, lines, named = [], [], []
    for d in dirs:
        rows = load_rows(d / "rows.jsonl")
        if not rows:
            raise MpqkitError(f"{d / 'rows.jsonl'} holds no readable row" if (d / "rows.jsonl").exists() else
                              f"{d} has no rows.jsonl: not a bench or sweep results directory")
        named.append((bench_prefix(d, rows), d.name, rows))
        title = bench_title(bench_prefix(d, rows), rows)
        paths = write_outputs(rows, d, title)
        head, _, body = paths["md"].read_text().partition("\n")
        head = f"{head} (`{d.name}`)"  # the directory tells sections of the same methods apart
        if (d / "note.md").exists():  # what a reader must know about these rows (e.g. an older protocol)
            body = f"\n{(d / 'note.md').read_text().strip()}\n{body}"
        table = f"{head}\n{body}"
        md.append(table)
        # mpqkit proxies / benchmarks/paired_dirs.py / search_cost.py / clado_pair_replay.py wrote these here
        for extra in [d / "proxies.md", d / "cost.md", d / "pair_replay.md", *sorted(d.glob("paired_*.md"))]:
            if extra.exists():
                md.append(extra.read_text())
        lines.append(f"{d}: {len(rows)} rows → {paths['html']}")
    if markdown:
        intro = ("Generated by `mpqkit report` (the command is at the end of this page) "
                 "from the rows `mpqkit bench` measured (and `mpqkit proxies`, where run). Top-1 in %; "
                 "accuracy on this machine's CIFAR-10 copy is below published numbers (JPEG pixels; docs/USAGE.md's model "
                 "table gives each model's fp32 top-1 on it). "
                 "'search s' is the wall time of the search call in that run: a method's first budget includes "
                 "measuring its sensitivity, later budgets reuse it and only solve; probes already in the disk "
                 "cache from an earlier run are read, not measured, so a cached method shows a fraction of a "
                 "second.")
        head = f"# Results\n\n{textwrap.fill(intro, LINE_WIDTH, break_on_hyphens=False)}\n\n"
        tail = "\n---\nThis page:\n\n```\n" + " \\\n    ".join(textwrap.wrap(
            command, LINE_WIDTH - 6, break_on_hyphens=False, break_long_words=False)) + "\n```\n"
        body = "\n".join(md)
        titles = [line[4:].strip() for line in body.splitlines() if line.startswith("### ")]
        atomic_write_text(Path(markdown), head + what_to_run_markdown(named) + "\n" + toc_markdown(titles) + "\n"
                          + body + tail)
        lines.append(f"tables written to {markdown}")
    return lines
