"""Core benchmark on ResNet-20 / CIFAR-10 (the issue-2 figures), printed and written as a table.

    .venv/bin/python benchmarks/core_resnet20.py [--out benchmarks/results/core_resnet20]

Measures: fp32 top-1 (test, exact); uniform W8/6/4/3/2 A8; eval-delta at avg-bits 3 and 4 (W search,
A8, first/last 8/8) vs uniform at the same size, with search wall time (fresh probe cache). All
top-1 figures are on the full 10k test split unless a column says otherwise.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mpqkit
from mpqkit.api import load_model, load_split
from mpqkit.budget import Ledger
from mpqkit.graph import discover
from mpqkit.evaluation import evaluate_model
from mpqkit.plan import atomic_write_text
from mpqkit.quant.config import QuantConfig
from mpqkit.zoo.data import DATASETS

# measured with nearest rounding, before GPTQ became the default quantizer: pinned, so a rerun reproduces it
NEAREST = QuantConfig(rounding="nearest")


def _secs(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _images(n: int) -> str:
    return "10k" if n == 10_000 else f"{n:,}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--out", default="benchmarks/results/core_resnet20")
    ap.add_argument("--budgets", default="3,4")
    ap.add_argument("--data", default="cifar10", help="its exact split, where it has one, is measured too")
    args = ap.parse_args(argv)
    out = Path(args.out)
    bundle = load_model(args.model)
    test = load_split(args.data, "test")
    exact = load_split(args.data, "exact") if "exact" in DATASETS.get(args.data, ()) else None
    rows = []
    graph = discover(bundle.model, bundle.input_shape)
    fp_costs = Ledger(graph, [l.fqn for l in graph.layers[1:-1]]).summary({})  # everything fp32

    def record(label, budget, plan, search_s=None):
        net = bundle.model if plan is None else mpqkit.apply_plan(bundle, plan, args.data)
        t = evaluate_model(net, test)
        e = evaluate_model(net, exact) if exact is not None else {"top1": None}
        c = plan.costs if plan is not None else fp_costs
        row = {"plan": label, "budget": budget, "avg_w_bits": c["avg_w_bits_searched"],
               "weight_mb": c["weight_mb"], "compression": c["compression"], "gbitops": c["bitops"] / 1e9,
               "top1_test": 100 * t["top1"], "top1_exact": None if e["top1"] is None else 100 * e["top1"],
               "search_s": search_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    record("fp32", "-", None)
    for wb in (8, 6, 4, 3, 2):
        r = mpqkit.search(bundle, args.data, None, "uniform", w_bits=wb, a_bits=8, progress=False, qconfig=NEAREST)
        record(f"uniform W{wb}A8", "-", r.plan)
    for b in args.budgets.split(","):
        with tempfile.TemporaryDirectory() as cache:  # fresh probe cache: the search time is a cold search
            budget = f"avg-bits={b}"
            t0 = time.perf_counter()
            r = mpqkit.search(bundle, args.data, budget, "eval-delta", out=out / f"eval-delta-{b}", progress=False,
                              cache_dir=cache, qconfig=NEAREST)
            secs = time.perf_counter() - t0
        record("eval-delta", budget, r.plan, secs)
        u = mpqkit.search(bundle, args.data, budget, "uniform", progress=False, qconfig=NEAREST)
        record(f"uniform (largest meeting {budget})", budget, u.plan)

    data_name = "CIFAR-10" if args.data == "cifar10" else args.data
    exact_col = f"top-1 exact ({_images(len(exact))})" if exact is not None else "top-1 exact (none)"
    lines = [f"# {args.model} / {data_name}: uniform vs eval-delta (W search, A8; first/last layer 8/8)", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; produced by "
             "`.venv/bin/python benchmarks/core_resnet20.py`.", "",
             "| plan | budget | avg w-bits (searched) | weight MB | compression | GBitOps | "
             f"top-1 test ({_images(len(test))}) | {exact_col} | search s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['budget']} | {r['avg_w_bits']:.3f} | {r['weight_mb']:.4f} | "
                     f"{r['compression']:.2f} | {r['gbitops']:.4f} | {r['top1_test']:.2f} | "
                     f"{'-' if r['top1_exact'] is None else format(r['top1_exact'], '.2f')} | "
                     f"{_secs(r['search_s'])} |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "rows.json", json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
