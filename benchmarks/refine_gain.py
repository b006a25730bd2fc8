"""--refine vs the method's own plan, paired over calibration draws (issue 15's refinement figures).

    .venv/bin/python benchmarks/refine_gain.py [--plain benchmarks/results/draws_resnet20]
        [--refined benchmarks/results/draws_resnet20_refine]

Reads the rows of two multi-draw bench directories run with the same seeds (one with --refine N)
and writes, per method and budget, the mean top-1 of both, the paired difference with its 95 %
interval, and the probes and moves refinement used (from the refined plans), to
``<refined>/refine_gain.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mpqkit.fileutil import atomic_write_text
from mpqkit.report.bench import draw_groups, load_rows
from mpqkit.report.stats import paired_difference, summarize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", default="benchmarks/results/draws_resnet20")
    ap.add_argument("--refined", default="benchmarks/results/draws_resnet20_refine")
    args = ap.parse_args()
    plain, refined = (draw_groups(load_rows(Path(d) / "rows.jsonl")) for d in (args.plain, args.refined))
    lines = [f"### --refine vs the method's own plan (top-1 test, paired over calibration draws)", "",
             f"Rows from `{args.plain}` and `{args.refined}` (same seeds; the second with `--refine`).", "",
             "| method | budget | draws | plain mean ± std | refined mean ± std | refined − plain | 95 % interval | "
             "verdict | probes (mean) | moves (mean) |", "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for key, rows in refined.items():
        if key not in plain:
            continue
        a = {k: r["top1_test"] for k, r in rows.items()}
        b = {k: r["top1_test"] for k, r in plain[key].items()}
        d = paired_difference(a, b)
        if d is None:
            continue
        sa, sb = summarize([a[k] for k in a if k in b]), summarize([b[k] for k in a if k in b])
        recs = [json.loads(Path(r["plan"]).read_text())["provenance"].get("refine", {}) for r in rows.values()]
        probes = summarize([x.get("probes", 0) for x in recs]).mean
        moves = summarize([len(x.get("moves", [])) for x in recs]).mean
        verdict = ("**refined better**" if d.lo > 0 else "**refined worse**") if d.significant else "not separated"
        lines.append(f"| {key[0]} | {key[1]} | {d.n} | {sb.mean:.2f} ± {sb.std:.2f} | {sa.mean:.2f} ± {sa.std:.2f} | "
                     f"{d.mean:+.2f} | [{d.lo:+.2f}, {d.hi:+.2f}] | {verdict} | {probes:.0f} | {moves:.1f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(args.refined) / "refine_gain.md", text)
    print(text)


if __name__ == "__main__":
    main()
