"""Probe-engine speed-up from prefix caching, measured in one run.

    .venv/bin/python benchmarks/engine_speedup.py [--model resnet20] [--bits 2,4] [--calib 1024]

The same single-layer probes (every layer × bits, weights only) run twice on the same calibration
set, no disk cache: (a) prefix caching on (each probe starts at its layer from cached fp tensors),
(b) prefix caching off (every probe a full forward from the input). Reports the total time of one
batched run() of all probes (the first walk fills the prefix cache), the median time of a single
probe per run() call afterwards, and checks that both modes give the same losses.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mpqkit.api import calibration_set, load_model
from mpqkit.engine.probe import ProbeEngine
from mpqkit.graph import discover
from mpqkit.plan import atomic_write_text


def timed(engine: ProbeEngine, probes: list[dict]) -> tuple[list[float], list]:
    times, results = [], []
    # one probe per run() call, so per-probe times are observable (after the batched run the fp
    # tensors at every cut are in the engine's in-memory prefix cache, as in a long search)
    for p in probes:
        t0 = time.perf_counter()
        results.append(engine.run([p], show=False)[0])
        times.append(time.perf_counter() - t0)
    return times, results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/engine_speedup.json")
    args = ap.parse_args()
    bundle = load_model(args.model)
    calib = calibration_set("cifar10", args.calib, 0)
    graph = discover(bundle.model, bundle.input_shape)
    layers = [l.fqn for l in graph.layers]
    probes = [{f: (int(b), None)} for f in layers for b in args.bits.split(",")]
    res = {}
    for mode, prefix in (("prefix", True), ("full", False)):
        eng = ProbeEngine(bundle.model, graph, calib.images, calib.labels, batch_size=args.batch_size,
                          use_cache=False, prefix=prefix, progress=False)
        eng.observers()
        for p in probes:  # build quantized layers first, so both modes time only the forward passes
            (f, (wb, ab)), = p.items()
            eng.quant_layer(f, wb, ab)
        t0 = time.perf_counter()
        batched = eng.run(probes, show=False)
        batched_s = time.perf_counter() - t0
        times, results = timed(eng, probes)
        res[mode] = {"batched_total_s": batched_s, "per_probe_median_s": statistics.median(times),
                     "per_probe_total_s": sum(times), "losses": [r.loss for r in batched]}
        print(mode, json.dumps({k: v for k, v in res[mode].items() if k != "losses"}), flush=True)
    maxdiff = max(abs(a - b) for a, b in zip(res["prefix"]["losses"], res["full"]["losses"]))
    summary = {
        "model": args.model, "probes": len(probes), "calib": args.calib, "threads": torch.get_num_threads(),
        "speedup_batched": res["full"]["batched_total_s"] / res["prefix"]["batched_total_s"],
        "speedup_median_per_probe": res["full"]["per_probe_median_s"] / res["prefix"]["per_probe_median_s"],
        "max_abs_loss_diff": maxdiff,
        **{f"{m}_{k}": v for m in res for k, v in res[m].items() if k != "losses"},
    }
    atomic_write_text(Path(args.out), json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
