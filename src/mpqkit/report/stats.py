"""Statistics over calibration draws: mean ± std, paired differences with a 95 % interval, and
plan stability.

An accuracy depends on which calibration images were drawn, so a comparison of two methods is
made draw by draw (both methods saw the same images in draw k) and summarised as the mean of the
paired differences with a Student-t interval; "A beats B" is claimed only from at least
``MIN_DRAWS`` paired draws and when the interval excludes 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Mapping, Sequence

from scipy import stats

MIN_DRAWS = 3  # paired draws a verdict needs (two draws whose differences agree give a zero-width interval)

@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n − 1); 0 for a single value


@dataclass(frozen=True)
class PairedDifference:
    """mean(a_k − b_k) over the draws k both have, with its two-sided 95 % t interval."""

    n: int
    mean: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        """At least ``MIN_DRAWS`` draws and the interval excludes 0."""
        return self.n >= MIN_DRAWS and (self.lo > 0 or self.hi < 0)

    @property
    def interval_text(self) -> str:
        return "n/a (1 draw)" if self.n < 2 else f"[{self.lo:+.2f}, {self.hi:+.2f}]"

    def verdict(self, better: str, worse: str, neither: str) -> str:
        """``better`` / ``worse`` where significant, ``neither`` where the draws do not separate
        them, and a note when there are fewer than ``MIN_DRAWS`` draws to judge from."""
        if self.n < MIN_DRAWS:
            return f"too few draws ({self.n} < {MIN_DRAWS})"
        return (better if self.lo > 0 else worse) if self.significant else neither


def summarize(values: Sequence[float]) -> Summary:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarise")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return Summary(len(vals), mean, std)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedDifference | None:
    """Paired difference of two methods' results keyed by draw; None when no draw is shared."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    d = [float(a[k]) - float(b[k]) for k in keys]
    s = summarize(d)
    if s.n < 2:
        return PairedDifference(s.n, s.mean, -math.inf, math.inf)
    half = float(stats.t.ppf(0.5 + level / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return PairedDifference(s.n, s.mean, s.mean - half, s.mean + half)


def bits_agreement(plans: Sequence[Mapping[str, tuple]]) -> float | None:
    """Mean, over every pair of draws, of the fraction of layers whose (w, a) bits agree."""
    pairs = list(combinations(plans, 2))
    if not pairs:
        return None
    fracs = []
    for p, q in pairs:
        layers = sorted(set(p) | set(q))
        fracs.append(sum(1 for f in layers if p.get(f) == q.get(f)) / max(len(layers), 1))
    return sum(fracs) / len(fracs)


EQUAL_SIZE_BITS = 0.1  # average weight bits two plans may differ by and still be compared "at equal size"


def larger_winner(diff: float, bits_a: float, bits_b: float) -> str:
    """Why A − B = ``diff`` is no verdict: the side ahead is larger by more than ``EQUAL_SIZE_BITS``
    (e.g. a mixed plan at avg-bits 2.5 against uniform W2); "" when the comparison is fair (equal
    size, or the smaller side is the one ahead)."""
    ahead, behind = (bits_a, bits_b) if diff > 0 else (bits_b, bits_a)
    if ahead - behind > EQUAL_SIZE_BITS:
        return f"the side ahead has {ahead:.2f} vs {behind:.2f} avg w-bits"
    return ""


def metric_column(rows: Sequence[dict]) -> str:
    """The top-1 column the draw statistics use: the test split when measured."""
    cols = [k for k in dict.fromkeys(k for r in rows for k in r if k.startswith("top1_"))
            if any(r.get(k) is not None and r["method"] != "fp32" for r in rows)]
    return "top1_test" if "top1_test" in cols else (cols[0] if cols else "top1_test")


def draw_groups(rows: Sequence[dict]) -> dict[tuple, dict[int, dict]]:
    """{(method, budget, ptq): {draw: row}} over the measured (error-free, non-fp32) rows."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["method"] == "fp32" or r.get("error"):
            continue
        groups.setdefault((r["method"], r["budget"], r["ptq"]), {})[int(r.get("draw", 0))] = r
    return groups
