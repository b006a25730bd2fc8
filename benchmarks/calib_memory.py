"""Peak resident memory of the activation calibration pass (``quant.calibration.calibrate``): as mpqkit
does it, with whole-batch observer updates, and with no observer.

    PYTHONPATH=src .venv/bin/python benchmarks/calib_memory.py --model mobilenetv2 --data imagenet-subset \
        --calib-size 128 [--chunks 0,128] [--out benchmarks/results/memory_mobilenetv2/calib_memory.jsonl]

Each mode runs in its own process (a peak is per process): ``asis`` calibrates as mpqkit does (an
observer update takes at most ``observers.UPDATE_PIECE`` values at a time); ``whole`` feeds each batch to
its observers in one update, as mpqkit did before the pieces (the 128-image chunk's values all at once);
``noobs`` skips the observers (the forward pass alone). Each mode runs once per ``--chunks`` entry
(images per calibration forward; 0: mpqkit's own, sized by the input). One JSON line per run: the
chunk, resident MB before, peak MB, seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("asis", "whole", "noobs")


def measure(model: str, data: str, calib_size: int, mode: str, chunk: int = 0) -> dict:
    """Calibrate in this process under ``mode`` with ``chunk`` images per forward (0: mpqkit's own
    ``calib_chunk``); its record."""
    from mpqkit.graph import discover
    from mpqkit.loading import calibration_set, load_model
    from mpqkit.quant import calibration, observers
    from mpqkit.settings import RunSettings

    bundle = load_model(model, RunSettings())
    graph = discover(bundle.model, bundle.input_shape)
    calib = calibration_set(data, calib_size, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "whole":
        observers.UPDATE_PIECE = 1 << 62  # no batch is split
    elif mode == "noobs":
        observers.ActivationObserver.update = lambda self, x: None
    own = calibration.calib_chunk(calib.images)
    if chunk:
        calibration.calib_chunk = lambda images: chunk
    t0 = time.perf_counter()
    calibration.calibrate(bundle.model.eval(), graph.names, calib.images)
    return {"model": model, "data": data, "calib_size": calib_size, "mode": mode, "chunk": chunk or own,
            "before_mb": round(before),
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--data", default="imagenet-subset")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--chunks", default="0", help="images per calibration forward, comma-separated (0: mpqkit's own)")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.data, args.calib_size, args.one, int(args.chunks))), flush=True)
        return []
    recs = []
    for chunk, mode in ((c, m) for c in args.chunks.split(",") for m in args.modes.split(",")):
        cmd = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--calib-size",
               str(args.calib_size), "--chunks", chunk, "--one", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ).stdout
        recs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(recs[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


if __name__ == "__main__":
    main()
