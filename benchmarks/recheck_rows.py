"""Re-measure chosen rows of a bench directory with today's code: does each still give its top-1?

    PYTHONPATH=src .venv/bin/python benchmarks/recheck_rows.py --dir benchmarks/results/bench_mobilenetv2_gptq \
        --model mobilenetv2 --pick "uniform,avg-bits=4,0" --pick "eval-delta,avg-bits=4,0" \
        [--out benchmarks/results/bench_mobilenetv2_gptq/recheck.jsonl]

Each ``--pick "method,budget,draw"`` selects the row(s) of that plan (every PTQ it was measured with, or
only ``--ptq``); the row's plan file is applied again with the row's PTQ (calibration set from the plan's
provenance, as ``mpqkit eval --plan`` does) and evaluated on the test split. One JSON line per row: the
row's top-1, today's, their difference, and the seconds the PTQ took. Use it after a change that should
leave results alone (or move them only in the last digits) to see which published rows still hold.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mpqkit.api import apply_plan, load_model, load_split
from mpqkit.evaluation import evaluate_model
from mpqkit.plan import Plan
from mpqkit.settings import RunSettings
from mpqkit.zoo.models import FIXED_RESOLUTION


def picked(rows: list[dict], pick: str, ptq: str | None) -> list[dict]:
    """The measured rows of ``pick`` ("method,budget,draw"), optionally of one PTQ ("default": None)."""
    method, budget, draw = (p.strip() for p in pick.rsplit(",", 2))
    want = None if ptq in (None, "default") else ptq
    out = [r for r in rows if r["method"] == method and r["budget"] == budget and int(r.get("draw", 0)) == int(draw)
           and not r.get("error") and r.get("top1_test") is not None and (ptq is None or r["ptq"] == want)]
    if not out:
        raise SystemExit(f"no measured row for {pick!r}" + (f" with --ptq {ptq}" if ptq else ""))
    return out


def recheck(row: dict, bundle, data: str, test, root: Path, s: RunSettings) -> dict:
    """Apply the row's plan with its PTQ again and evaluate it on ``test``; the comparison record."""
    plan_path = Path(row["plan"])
    plan = Plan.load(plan_path if plan_path.is_absolute() else root / plan_path)
    recon = {"iters": int(row["recon_iters"])} if row.get("recon_iters") else None
    t0 = time.perf_counter()
    q = apply_plan(bundle, plan, data, settings=s, ptq=row["ptq"], recon_options=recon)
    ptq_s = time.perf_counter() - t0
    with torch.inference_mode():
        now = 100 * evaluate_model(q, test, s.eval_batch_size)["top1"]
    return {"method": row["method"], "budget": row["budget"], "ptq": row["ptq"], "draw": int(row.get("draw", 0)),
            "row_top1": row["top1_test"], "now_top1": round(now, 4), "diff": round(now - row["top1_test"], 4),
            "ptq_s": round(ptq_s, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="bench directory (its rows.jsonl and plans)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None, help="default: the model's own data")
    ap.add_argument("--pick", action="append", required=True, help='"method,budget,draw" (repeatable)')
    ap.add_argument("--ptq", default=None, help="only rows of this PTQ (default: every PTQ of the plan)")
    ap.add_argument("--root", type=Path, default=Path("."), help="where the rows' relative plan paths start")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines file (default: print only)")
    args = ap.parse_args(argv)
    s = RunSettings(progress=False)
    rows = [json.loads(line) for line in (args.dir / "rows.jsonl").read_text().splitlines() if line.strip()]
    bundle = load_model(args.model, s)
    data = args.data or FIXED_RESOLUTION.get(args.model, "cifar10")
    test = load_split(data, "test", s)
    recs = []
    for pick in args.pick:
        for row in picked(rows, pick, args.ptq):
            recs.append(recheck(row, bundle, data, test, args.root, s))
            print(json.dumps(recs[-1]), flush=True)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


if __name__ == "__main__":
    main()
