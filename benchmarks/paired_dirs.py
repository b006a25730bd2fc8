"""Two multi-draw bench directories run on the same seeds, paired draw by draw: one change's gain.

    .venv/bin/python benchmarks/paired_dirs.py --base DIR --other DIR --name NAME \
        [--base-label plain --other-label refined]

Used for the figures of issue 15: ``--refine`` against the method's own plan, and the probe
objective (``--objective kl`` against ``ce``). Per method and budget present in both: each side's
mean ± std of top-1 and its plan stability (bits agreement between draws), the paired difference
other − base with its 95 % interval, and, where the other side's plans were refined, the probes and
moves refinement used. Written to ``<other>/paired_<NAME>.md`` (``mpqkit report`` puts it in
``docs/RESULTS.md``) and printed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mpqkit.fileutil import atomic_write_text
from mpqkit.plan import Plan
from mpqkit.report.bench import load_rows
from mpqkit.report.stats import draw_groups
from mpqkit.report.stats import bits_agreement, paired_difference, summarize


def _agreement(rows) -> str:
    bits = [Plan.load(r["plan"]).assignment() for r in rows if r.get("plan")]
    a = bits_agreement(bits) if len(bits) > 1 else None
    return "" if a is None else f"{a:.2f}"


def _same_draw(base_rows, other_rows) -> str:
    """Per common draw, the fraction of layers whose bits agree between the two sides' plans (their
    mean), and how many draws have identical plans: did the change change the plan?"""
    fracs = [bits_agreement([Plan.load(b["plan"]).assignment(), Plan.load(o["plan"]).assignment()])
             for b, o in zip(base_rows, other_rows) if b.get("plan") and o.get("plan")]
    if not fracs:
        return ""
    return f"{sum(fracs) / len(fracs):.2f} ({sum(f == 1.0 for f in fracs)}/{len(fracs)})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="bench directory of the reference runs")
    ap.add_argument("--other", required=True, help="bench directory of the changed runs (same seeds)")
    ap.add_argument("--name", required=True, help="file stem: <other>/paired_<name>.md")
    ap.add_argument("--base-label", default="base")
    ap.add_argument("--other-label", default="other")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    base, other = (draw_groups(load_rows(Path(d) / "rows.jsonl")) for d in (args.base, args.other))
    bl, ol = args.base_label, args.other_label
    title = args.title or f"{ol} vs {bl}"
    lines = [f"### {title} (top-1 test, paired over calibration draws)", "",
             f"Rows from `{args.base}` ({bl}) and `{args.other}` ({ol}), same seeds. Agreement: mean over pairs of "
             "draws of the fraction of layers whose bits agree (plan stability); same draw: that fraction between "
             "the two sides' plans of one draw, mean over draws.", "",
             f"| method | budget | draws | {bl} mean ± std | agreement | {ol} mean ± std | agreement | {ol} − {bl} | "
             "95 % interval | verdict | same draw: bits agree (identical plans) | refine probes (mean) | moves (mean) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for key, rows in other.items():
        if key not in base:
            continue
        a = {k: r["top1_test"] for k, r in rows.items()}
        b = {k: r["top1_test"] for k, r in base[key].items()}
        d = paired_difference(a, b)
        if d is None:
            continue
        common = [k for k in a if k in b]
        sa, sb = summarize([a[k] for k in common]), summarize([b[k] for k in common])
        recs = [json.loads(Path(rows[k]["plan"]).read_text())["provenance"].get("refine") for k in common]
        refined = [x for x in recs if x]
        probes = f"{summarize([x.get('probes', 0) for x in refined]).mean:.0f}" if refined else ""
        moves = f"{summarize([len(x.get('moves', [])) for x in refined]).mean:.1f}" if refined else ""
        verdict, interval = d.verdict(f"**{ol} better**", f"**{ol} worse**", "not separated"), d.interval_text
        lines.append(f"| {key[0]} | {key[1]} | {d.n} | {sb.mean:.2f} ± {sb.std:.2f} | "
                     f"{_agreement([base[key][k] for k in common])} | {sa.mean:.2f} ± {sa.std:.2f} | "
                     f"{_agreement([rows[k] for k in common])} | {d.mean:+.2f} | {interval} | "
                     f"{verdict} | {_same_draw([base[key][k] for k in common], [rows[k] for k in common])} | "
                     f"{probes} | {moves} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(args.other) / f"paired_{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
