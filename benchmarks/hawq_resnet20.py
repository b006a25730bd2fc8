"""HAWQ trace stability on ResNet-20 / CIFAR-10 (issue 6): Hutchinson traces with two seeds.

    .venv/bin/python benchmarks/hawq_resnet20.py [--out benchmarks/results/hawq_resnet20]

Prints and writes, per searched layer, the trace of each seed, the relative spread |a − b| / mean,
and iterations; plus wall time, and whether the ILP plan at avg-bits 3 is the same for both seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mpqkit
from mpqkit.plan import atomic_write_text
from mpqkit.quant.config import QuantConfig

# measured with nearest rounding, before GPTQ became the default quantizer: pinned, so a rerun reproduces it
NEAREST = QuantConfig(rounding="nearest")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/hawq_resnet20")
    ap.add_argument("--budget", default="avg-bits=3")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="cifar10")
    args = ap.parse_args(argv)
    runs = []
    for seed in (0, 1):
        t0 = time.perf_counter()
        res = mpqkit.search(args.model, args.data, args.budget, "hawq", seed=seed, progress=False, qconfig=NEAREST)
        runs.append((res, time.perf_counter() - t0))
    (a, ta), (b, tb) = runs
    ma, mb = a.table.meta, b.table.meta
    rows = []
    for f in a.table.w:
        x, y = ma["traces"][f], mb["traces"][f]
        rows.append({"layer": f, "trace_seed0": x, "trace_seed1": y, "rel_spread": abs(x - y) / abs((x + y) / 2),
                     "iters_seed0": ma["hutchinson"]["iterations_per_layer"][f],
                     "iters_seed1": mb["hutchinson"]["iterations_per_layer"][f]})
    spreads = [r["rel_spread"] for r in rows]
    note = ("seed changes both the calibration subset and the Hutchinson vectors"
            if a.plan.provenance.get("calib") != b.plan.provenance.get("calib") else "same calibration subset")
    summary = {"median_rel_spread": statistics.median(spreads), "max_rel_spread": max(spreads),
               "seconds": [ta, tb], "same_plan": a.plan.assignment() == b.plan.assignment(),
               "bits_seed0": [lq.w_bits for lq in a.plan.layers.values()],
               "bits_seed1": [lq.w_bits for lq in b.plan.layers.values()], "note": note}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "traces.json", json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    name = "ResNet-20" if args.model == "resnet20" else args.model
    lines = [f"# HAWQ Hessian traces on {name}, two seeds (256 calibration images, per-layer Hutchinson, tol 1e-2)",
             "", f"{note}; median relative spread {summary['median_rel_spread']:.3f}, max {summary['max_rel_spread']:.3f}; "
             f"search wall time {ta:.0f} s / {tb:.0f} s; plans at {args.budget} identical: {summary['same_plan']}", "",
             "| layer | trace seed 0 | trace seed 1 | rel. spread | iters |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['trace_seed0']:.4g} | {r['trace_seed1']:.4g} | {r['rel_spread']:.3f} | "
                     f"{r['iters_seed0']}/{r['iters_seed1']} |")
    lines += ["", f"bits seed 0: {summary['bits_seed0']}", f"bits seed 1: {summary['bits_seed1']}"]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
