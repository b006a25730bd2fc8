""""What should I run?": per results directory and budget, the best measured (method, PTQ) and the
cheapest one within ``TIE_POINTS`` of it on the mean that the draws do not separate from it.

Only multi-draw directories (at least ``MIN_DRAWS`` calibration draws) answer: a single draw cannot
tell two methods apart. "Not separated" is the paired test of ``report.stats`` (same draws, 95 %
t interval containing 0) at equal size. Time is the median over draws of the search plus PTQ seconds
recorded in the rows (a search whose probes were already in the disk cache shows less).
"""
from __future__ import annotations

import statistics
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .stats import EQUAL_SIZE_BITS, MIN_DRAWS, draw_groups, metric_column, paired_difference, summarize


LINE_WIDTH = 110  #: prose lines of the generated page are wrapped at this width
TIE_POINTS = 0.2  #: top-1 points the cheaper choice may trail the best by on the mean (and not be separated)


@dataclass(frozen=True)
class Choice:
    method: str
    ptq: str
    n: int
    mean: float
    std: float
    avg_w_bits: float
    seconds: float  # median over draws of search_s + ptq_s
    recon_iters: int | None = None  # reconstruction iterations per block (BRECQ rows that record them)

    @property
    def label(self) -> str:
        iters = f" ({self.recon_iters:,} iterations)" if self.recon_iters else ""
        return f"{self.method} + {self.ptq}{iters}"


def _choice(key: tuple, by_draw: dict[int, dict], metric: str) -> Choice | None:
    rows = [r for r in by_draw.values() if r.get(metric) is not None]
    if len(rows) < MIN_DRAWS:
        return None
    st = summarize([r[metric] for r in rows])
    secs = statistics.median((r.get("search_s") or 0.0) + (r.get("ptq_s") or 0.0) for r in rows)
    iters = {r.get("recon_iters") for r in rows}
    return Choice(key[0], key[2] or "default", st.n, st.mean, st.std,
                  summarize([r["avg_w_bits"] for r in rows]).mean, secs, iters.pop() if len(iters) == 1 else None)


def recommend(rows: Sequence[dict]) -> list[tuple[str, Choice, Choice | None, str]]:
    """Per budget (in the rows' order): (budget, best, cheapest not separated from it or None when
    the best is also the cheapest such, the paired difference best − cheapest as text)."""
    metric = metric_column(rows)
    groups = draw_groups(rows)
    vals = {k: {d: r[metric] for d, r in g.items() if r.get(metric) is not None} for k, g in groups.items()}
    out = []
    for budget in dict.fromkeys(k[1] for k in groups):
        cands = {k: c for k, g in groups.items() if k[1] == budget and (c := _choice(k, g, metric)) is not None}
        if not cands:
            continue
        best_key = max(cands, key=lambda k: cands[k].mean)
        best = cands[best_key]
        ties = []
        for k, c in cands.items():
            d = paired_difference(vals[best_key], vals[k])
            tied = d is not None and not d.significant and d.mean <= TIE_POINTS
            if k == best_key or (tied and c.avg_w_bits <= best.avg_w_bits + EQUAL_SIZE_BITS):
                ties.append((c.seconds, k, d))
        secs, cheap_key, d = min(ties, key=lambda t: t[0])
        if cheap_key == best_key:
            out.append((budget, best, None, ""))
        else:
            out.append((budget, best, cands[cheap_key], f"{d.mean:+.2f} {d.interval_text}"))
    return out


def what_to_run_markdown(named: Sequence[tuple[str, str, Sequence[dict]]]) -> str:
    """The opening table of ``docs/RESULTS.md``: ``named`` is (title, directory, rows) per results
    directory. One row per model (the title before any parenthesis) and budget: the directory whose
    best (method + PTQ) has the highest mean over its draws, with that directory's cheapest choice
    not separated from it. Directories with fewer than ``MIN_DRAWS`` draws are left out."""
    best_of: dict[tuple[str, str], tuple[str, Choice, Choice | None, str]] = {}
    n_dirs: Counter[tuple[str, str]] = Counter()
    for title, directory, rows in named:
        model = title.split(" (")[0]
        for budget, best, cheap, diff in recommend(rows):
            key = (model, budget)
            n_dirs[key] += 1
            if key not in best_of or best.mean > best_of[key][1].mean:
                best_of[key] = (directory, best, cheap, diff)
    if not best_of:
        return ""
    intro = (f"Per model and budget, over every results directory below with at least {MIN_DRAWS} calibration draws: "
             f"the (method + PTQ) with the best mean top-1 (the directory it comes from, and how many directories "
             f"measured that budget), and the cheapest choice of the same directory within {TIE_POINTS} points of it on "
             "the mean whose paired difference from it over the same draws is not separated from 0 (95 % t interval), "
             "at equal size. Seconds: median over the draws of search + PTQ (or fine-tuning), as the rows recorded "
             "them (with the probe cache of that run; a cached search shows less). Directories measured under "
             "other protocols answer other questions: their sections below say how.")
    lines = ["## What to run", "", textwrap.fill(intro, LINE_WIDTH, break_on_hyphens=False), "",
             "| model | budget | best: method + PTQ | top-1 mean ± std (draws) | s | from (of N) | cheapest not "
             "separated | top-1 | s | best − it, 95 % interval |", "|---|---|---|---:|---:|---|---|---:|---:|---|"]
    for (model, budget), (directory, best, cheap, diff) in sorted(best_of.items(), key=_guide_order):
        head = (f"| {model} | {budget} | {best.label} | {best.mean:.2f} ± {best.std:.2f} ({best.n}) | "
                f"{best.seconds:.0f} | `{directory}` ({n_dirs[model, budget]}) | ")
        lines.append(head + ("the same | | | |" if cheap is None else
                             f"{cheap.label} | {cheap.mean:.2f} | {cheap.seconds:.0f} | {diff} |"))
    return "\n".join(lines) + "\n"


def _guide_order(item: tuple) -> tuple:
    (model, budget), _ = item
    key, _, value = budget.partition("=")
    try:
        return model, key, float(value.rstrip("MBGK")), budget
    except ValueError:
        return model, key, 0.0, budget


def toc_markdown(titles: Sequence[str]) -> str:
    """A table of contents linking each ``### title`` section (GitHub's heading anchors: lower case,
    punctuation dropped, spaces to hyphens, repeated headings numbered)."""
    seen: dict[str, int] = {}
    lines = ["## Contents", ""]
    for t in titles:
        base = "".join(ch for ch in t.lower() if ch.isalnum() or ch in " -_").replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        lines.append(f"- [{t}](#{base if n == 0 else f'{base}-{n}'})")
    return "\n".join(lines) + "\n"
