"""Stacked probes against one forward per probe, measured in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/stack_speed.py [--model resnet20] [--stack 6] [--calib 1024] \
        [--out benchmarks/results/stack_speed_resnet20.json]

Two probe engines on the same calibration set (no disk cache, the default quantizer, activations at
8 bits): ``stack=1`` (one forward per probe) and ``stack=N`` (``--stack-probes N``: the probes that
start at the same layer and differ only in it run as one forward of the batch stacked N times). For
every searched layer, its probes at every candidate bit-width run as one ``run()`` call on each
engine, the two engines alternating layer by layer so machine noise hits both alike (the quantized
layers are built first, so only the forwards are timed). Reports the total seconds per engine, the
median of the per-layer time ratios (stacked / single), and the largest loss difference between the
two (they must agree to float tolerance).
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
from mpqkit.fileutil import atomic_write_text
from mpqkit.graph import discover
from mpqkit.settings import DEFAULT_W_BITS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--stack", type=int, default=len(DEFAULT_W_BITS))
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/stack_speed_resnet20.json")
    args = ap.parse_args(argv)
    bundle = load_model(args.model)
    calib = calibration_set(args.data, args.calib, 0)
    graph = discover(bundle.model, bundle.input_shape)
    layers = [f for f in graph.names if f not in graph.default_fixed()]
    base = {f: (None, 8) for f in graph.names}
    engines = {}
    for k in (1, args.stack):
        eng = ProbeEngine(bundle.model, graph, calib.images, calib.labels, use_cache=False, progress=False,
                          objective="kl", stack=k)
        for f in layers:  # build the quantized layers first: only the forwards are timed
            for b in DEFAULT_W_BITS:
                eng.quant_layer(f, b, 8)
        engines[k] = eng
    seconds: dict[int, list[float]] = {k: [] for k in engines}
    losses: dict[int, list[float]] = {k: [] for k in engines}
    for f in layers:
        probes = [{f: (b, 8)} for b in DEFAULT_W_BITS]
        for k, eng in engines.items():
            t0 = time.perf_counter()
            losses[k] += [r.loss for r in eng.run(probes, base=base, show=False)]
            seconds[k].append(time.perf_counter() - t0)
    single, stacked = seconds[1], seconds[args.stack]
    summary = {
        "model": args.model, "calib": args.calib, "layers": len(layers), "probes_per_layer": len(DEFAULT_W_BITS),
        "stack": args.stack, "batch_size": engines[1].batch_size, "threads": torch.get_num_threads(),
        "total_s": {"single": sum(single), "stacked": sum(stacked)},
        "median_ratio_stacked_over_single": statistics.median(s / t for s, t in zip(stacked, single)),
        "probes_stacked": engines[args.stack].stats.get("probes_stacked", 0),
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses[1], losses[args.stack])),
    }
    atomic_write_text(Path(args.out), json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
