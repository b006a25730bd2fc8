"""Probe-engine speed-up from prefix caching, measured in one run.

    .venv/bin/python benchmarks/engine_speedup.py [--model resnet20] [--bits 2,4] [--calib 1024]

The same single-layer probes (every layer × bits, weights only) run twice on the same calibration
set, no disk cache: (a) prefix caching on (each probe starts at its layer from cached fp tensors),
(b) prefix caching off (every probe a full forward from the input). Reports the time of one batched
run() of all probes per mode, the median time of single-probe run() calls with the two modes
interleaved (machine noise hits both alike) and the median of their per-probe ratios, and checks
that both modes give the same losses.
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
from mpqkit.quant.config import QuantConfig

# measured with nearest rounding, before GPTQ became the default quantizer: pinned, so a rerun reproduces it
NEAREST = QuantConfig(rounding="nearest")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the engine's automatic size")
    ap.add_argument("--out", default="benchmarks/results/engine_speedup.json")
    args = ap.parse_args(argv)
    bundle = load_model(args.model)
    calib = calibration_set(args.data, args.calib, 0)
    graph = discover(bundle.model, bundle.input_shape)
    layers = [l.fqn for l in graph.layers]
    probes = [{f: (int(b), None)} for f in layers for b in args.bits.split(",")]
    engines = {}
    for mode, prefix in (("prefix", True), ("full", False)):
        eng = ProbeEngine(bundle.model, graph, calib.images, calib.labels, batch_size=args.batch_size,
                          use_cache=False, prefix=prefix, progress=False, qconfig=NEAREST)
        eng.observers()
        for p in probes:  # build quantized layers first, so both modes time only the forward passes
            (f, (wb, ab)), = p.items()
            eng.quant_layer(f, wb, ab)
        engines[mode] = eng
    # (1) one batched run() of all probes per mode: the prefix engine walks the network once
    batched, losses = {}, {}
    for mode, eng in engines.items():
        t0 = time.perf_counter()
        losses[mode] = [r.loss for r in eng.run(probes, show=False)]
        batched[mode] = time.perf_counter() - t0
        print(mode, f"batched run of {len(probes)} probes: {batched[mode]:.2f}s", flush=True)
    # (2) single probes, the two modes interleaved so machine noise hits both alike
    per = {"prefix": [], "full": []}
    for p in probes:
        for mode, eng in engines.items():
            t0 = time.perf_counter()
            eng.run([p], show=False)
            per[mode].append(time.perf_counter() - t0)
    ratios = [f / q for f, q in zip(per["full"], per["prefix"])]
    summary = {
        "model": args.model, "probes": len(probes), "calib": args.calib, "batch_size": engines["prefix"].batch_size,
        "threads": torch.get_num_threads(),
        "batched_s": batched, "speedup_batched": batched["full"] / batched["prefix"],
        "per_probe_median_s": {m: statistics.median(v) for m, v in per.items()},
        "speedup_median_of_per_probe_ratios": statistics.median(ratios),
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["prefix"], losses["full"])),
    }
    atomic_write_text(Path(args.out), json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
