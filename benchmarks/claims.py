"""The seed methods' claims (issue 16, part 5), each settled with paired calibration draws.

    .venv/bin/python benchmarks/claims.py --out DIR/paired_claims.md \
        --claim "CLADO > CLADO-diag;DIR;clado;DIR;clado-diag" \
        --claim "MixQuant+BRECQ > uniform+BRECQ;DIR;mixquant@brecq;DIR2;uniform@brecq" ...

A claim is ``text;dir_a;method_a[@ptq];dir_b;method_b[@ptq][;budgets]`` (ptq default: ``default``;
budgets: only these, comma-separated): "A beats B". A difference whose side ahead is the larger model
(by more than ``EQUAL_SIZE_BITS`` average weight bits, e.g. a mixed plan at avg-bits 2.5 against
uniform W2) gets no verdict: "not at equal size".
Per budget measured on both sides, rows are paired by calibration seed; the table gives each side's
mean ± std, the mean of A − B with its 95 % t interval, and the verdict: the claim holds where the
interval lies above 0, is reversed where it lies below 0, and is not settled otherwise. Written to
``--out`` (a ``paired_*.md`` in a bench directory is picked up by ``mpqkit report``) and printed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mpqkit.fileutil import atomic_write_text
from mpqkit.report.bench import load_rows
from mpqkit.report.stats import larger_winner, paired_difference, summarize


def _side(spec_dir: str, spec_method: str) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """({budget: {seed: top-1 test}}, {budget: {seed: avg w-bits}}) of one method (and PTQ) in one bench
    directory (rows without ``avg_w_bits`` are left out of the second)."""
    method, _, ptq = spec_method.partition("@")
    ptq = ptq or "default"
    top1: dict[str, dict[int, float]] = {}
    bits: dict[str, dict[int, float]] = {}
    for r in load_rows(Path(spec_dir) / "rows.jsonl"):
        if r["method"] != method or r.get("error") or (r.get("ptq") or "default") != ptq:
            continue
        seed = int(r.get("seed", r.get("draw", 0)))
        top1.setdefault(r["budget"], {})[seed] = float(r["top1_test"])
        if r.get("avg_w_bits") is not None:
            bits.setdefault(r["budget"], {})[seed] = float(r["avg_w_bits"])
    return top1, bits


def _mean_bits(bits: dict[int, float], seeds: list[int]) -> float | None:
    vals = [bits[s] for s in seeds if s in bits]
    return sum(vals) / len(vals) if vals else None


def _budget_key(budget: str) -> tuple:
    name, _, value = budget.partition("=")
    try:
        return name, float(value)
    except ValueError:
        return name, 0.0


def claim_rows(text: str, dir_a: str, method_a: str, dir_b: str, method_b: str, budgets: str = "") -> list[str]:
    """One table row per budget both sides measured (only ``budgets``, comma-separated, when given)."""
    (a, bits_a), (b, bits_b) = _side(dir_a, method_a), _side(dir_b, method_b)
    common = set(a) & set(b)
    only = {t.strip() for t in budgets.split(",") if t.strip()}
    if only:
        common &= only
    lines = []
    for budget in sorted(common, key=_budget_key):
        d = paired_difference(a[budget], b[budget])
        if d is None:
            continue
        seeds = sorted(set(a[budget]) & set(b[budget]))
        sa, sb = summarize([a[budget][s] for s in seeds]), summarize([b[budget][s] for s in seeds])
        interval, verdict = d.interval_text, d.verdict("**holds**", "**reversed**", "not settled")
        size_a, size_b = _mean_bits(bits_a.get(budget, {}), seeds), _mean_bits(bits_b.get(budget, {}), seeds)
        unequal = larger_winner(d.mean, size_a, size_b) if size_a is not None and size_b is not None else ""
        if unequal and d.significant:  # a larger model ahead of a smaller one is no verdict on the method
            verdict = f"not at equal size ({unequal})"
        std_a = f" ± {sa.std:.2f}" if d.n > 1 else ""
        std_b = f" ± {sb.std:.2f}" if d.n > 1 else ""
        lines.append(f"| {text} | {budget} | {d.n} | {sa.mean:.2f}{std_a} | {sb.mean:.2f}{std_b} | {d.mean:+.2f} | "
                     f"{interval} | {verdict} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--claim", action="append", required=True,
                    help="text;dir_a;method_a[@ptq];dir_b;method_b[@ptq][;budget,budget] (A beats B; only at the "
                         "budgets listed, e.g. the integer ones where a mixed plan and uniform have equal size)")
    ap.add_argument("--out", required=True, help="markdown file to write (e.g. DIR/paired_claims.md)")
    ap.add_argument("--title", default="The seed methods' claims, paired over calibration draws")
    args = ap.parse_args(argv)
    lines = [f"### {args.title} (top-1 test)", "",
             "A claim \"A > B\" holds where the 95 % t interval of A − B over paired draws (same calibration seed) "
             "lies above 0, is reversed where it lies below 0, and is not settled otherwise.", "",
             "| claim | budget | draws | A mean ± std | B mean ± std | A − B | 95 % interval | verdict |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for spec in args.claim:
        parts = spec.split(";")
        if len(parts) not in (5, 6):
            ap.error(f"--claim needs text;dir_a;method_a;dir_b;method_b[;budgets], got {spec!r}")
        rows = claim_rows(*parts)
        lines += rows or [f"| {parts[0]} | - | 0 | | | | | no paired rows yet |"]
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
