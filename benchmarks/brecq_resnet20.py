"""MixQuant × PTQ backends on ResNet-20 / CIFAR-10 (issue 4 figures), printed and written as tables.

    .venv/bin/python benchmarks/brecq_resnet20.py [--out benchmarks/results/brecq_resnet20]
        [--iters 500] [--sweep-iters 100,500,2000] [--sweep-plan "uniform W3A8"]

Plans (weights searched, A8, first/last layer 8/8, per-channel asymmetric weights): uniform W4/W3/W2,
MixQuant (round-off rule, QEM bisected to the budget) and MixQuant-ILP (round-off NSR + ILP) at
avg-bits 2.5 / 3 / 4. Each plan is quantized with every PTQ backend: ``minmax`` (plain asymmetric
min-max ranges), ``mse`` (MSE ranges, the toolkit default) and ``brecq`` (block reconstruction at
``--iters``); ``adaround`` and ``qdrop`` on the sweep plan. Top-1 on the full 10k test split.
A second table gives BRECQ's wall time, peak RSS and top-1 at several iteration counts.

Rows already measured are kept in ``rows.jsonl`` and skipped on a rerun (a killed run resumes).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mpqkit
from mpqkit.api import load_model, load_split
from mpqkit.evaluation import evaluate_model
from mpqkit.plan import atomic_write_text
from mpqkit.quant.config import QuantConfig

# measured with nearest rounding, before GPTQ became the default quantizer: pinned, so a rerun reproduces it
NEAREST = QuantConfig(rounding="nearest")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/brecq_resnet20")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--sweep-iters", default="100,500,2000")
    ap.add_argument("--sweep-plan", default="uniform W3A8")
    ap.add_argument("--budgets", default="2.5,3,4")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="cifar10")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bundle = load_model(args.model)
    test = load_split(args.data, "test")
    done_path = out / "rows.jsonl"
    done = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["plan"], r["ptq"], r["iters"])] = r

    plans: dict[str, mpqkit.Plan] = {}
    for wb in (4, 3, 2):
        plans[f"uniform W{wb}A8"] = mpqkit.search(bundle, args.data, None, "uniform", w_bits=wb, progress=False, qconfig=NEAREST).plan
    for b in args.budgets.split(","):
        for method in ("mixquant", "mixquant-ilp"):
            plans[f"{method} avg-bits={b}"] = mpqkit.search(bundle, args.data, f"avg-bits={b}", method,
                                                            progress=False, qconfig=NEAREST).plan
    same_as = {}  # identical assignments are measured once
    for name, plan in plans.items():
        for other in list(plans)[:list(plans).index(name)]:
            if plans[other].assignment() == plan.assignment():
                same_as[name] = other
                break

    def measure(name: str, ptq: str, iters: int | None) -> dict:
        key = (name, ptq, iters)
        if key in done:
            return done[key]
        src = same_as.get(name, name)
        if (src, ptq, iters) in done:
            row = {**done[(src, ptq, iters)], "plan": name, "same_plan_as": src}
        else:
            plan = plans[src]
            _reset_peak()
            rss0 = _rss_mb("VmRSS")
            t0 = time.perf_counter()
            q = mpqkit.apply_plan(bundle, plan, args.data, ptq=ptq,
                                  recon_options={"iters": iters} if iters is not None else None)
            ptq_s = time.perf_counter() - t0
            peak = _rss_mb("VmHWM")
            ev = evaluate_model(q, test)
            c = plan.costs
            row = {"plan": name, "ptq": ptq, "iters": iters, "bits": [lq.w_bits for lq in plan.layers.values()],
                   "avg_w_bits": c["avg_w_bits_searched"], "weight_mb": c["weight_mb"],
                   "top1_test": 100 * ev["top1"], "ptq_s": ptq_s, "rss_before_mb": rss0, "peak_rss_mb": peak}
        done[key] = row
        with done_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    main_rows = [measure(n, p, args.iters if p == "brecq" else None) for n in plans for p in ("minmax", "mse", "brecq")]
    sweep = [measure(args.sweep_plan, "brecq", int(i)) for i in args.sweep_iters.split(",")]
    extra = [measure(args.sweep_plan, p, args.iters) for p in ("adaround", "qdrop")]

    by = {(r["plan"], r["ptq"]): r for r in main_rows}
    setting = ("ResNet-20 / CIFAR-10" if (args.model, args.data) == ("resnet20", "cifar10")
               else f"{args.model} / {args.data}")
    n_test = "10k" if len(test) == 10_000 else f"{len(test):,}-image"
    lines = [f"# MixQuant × PTQ on {setting} (A8, first/last 8/8; top-1 % on the {n_test} test split; "
             f"BRECQ {args.iters} iterations per block)", "",
             "| plan | avg w-bits | weight MB | w-bits per layer | minmax | mse | brecq |", "|---|---:|---:|---|---:|---:|---:|"]
    for n, plan in plans.items():
        r = by[(n, "minmax")]
        note = f" (= {same_as[n]})" if n in same_as else ""
        lines.append(f"| {n}{note} | {r['avg_w_bits']:.3f} | {r['weight_mb']:.4f} | {' '.join(map(str, r['bits']))} | "
                     + " | ".join(f"{by[(n, p)]['top1_test']:.2f}" for p in ("minmax", "mse", "brecq")) + " |")
    lines += ["", f"## Reconstruction cost vs iterations ({args.sweep_plan}; wall time of apply incl. calibration, "
              "peak RSS of the process during it)", "",
              "| backend | iters/unit | top-1 | PTQ seconds | peak RSS MB (before) |", "|---|---:|---:|---:|---:|"]
    for r in sweep + extra:
        lines.append(f"| {r['ptq']} | {r['iters']} | {r['top1_test']:.2f} | {r['ptq_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", table)
    print(table)


if __name__ == "__main__":
    main()
