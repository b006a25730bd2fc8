"""Which grid GPTQ rounds on: the layer's MSE grid, the min-max grid, or per channel the better of six.

    PYTHONPATH=src .venv/bin/python benchmarks/gptq_grid.py --model resnet20 --bits 2,3,4
    PYTHONPATH=src .venv/bin/python benchmarks/gptq_grid.py --model mobilenetv2 --bits 3,4 --calib-size 128

Uniform WbA8 plans (first and last layer 8/8), the same calibration draw (seed 0), evaluated on the
whole test split: nearest rounding on the MSE grid (the quantizer before GPTQ), GPTQ on the MSE grid
only, GPTQ on the min-max grid only, and the default (GPTQ on the MSE grid and the min-max range
shrunk by 1.0-0.6, the lowest output error per channel). Writes
``benchmarks/results/gptq_grid_<model>/table.md`` and prints it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mpqkit
from mpqkit.api import calibration_set, load_model, load_split
from mpqkit.evaluation import evaluate_model
from mpqkit.fileutil import atomic_write_text
from mpqkit.quant.apply import apply_plan
from mpqkit.quant.config import QuantConfig
from mpqkit.quant.gptq import GptqConfig
from mpqkit.quant.layerwise import LocalLayerBuilder, set_weight
from mpqkit.quant.modules import QuantMixin

VARIANTS = {
    "nearest (MSE grid)": None,
    "GPTQ, MSE grid": GptqConfig(shrink=()),
    "GPTQ, min-max grid": GptqConfig(own_grid=False, shrink=(1.0,)),
    "GPTQ, grid per channel (default)": GptqConfig(),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--data", default=None,
                    help="default: imagenet-subset for mobilenetv2 and efficientnet-lite0, else cifar10")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/gptq_grid_<model>")
    args = ap.parse_args(argv)
    bundle = load_model(args.model)
    data = args.data or {"mobilenetv2": "imagenet-subset", "efficientnet-lite0": "imagenet-subset"}.get(
        args.model, "cifar10")
    calib = calibration_set(data, args.calib_size, 0)
    test = load_split(data, "test")
    nearest = QuantConfig(rounding="nearest")
    rows = []
    for b in (int(t) for t in args.bits.split(",")):
        plan = mpqkit.search(bundle, data, None, "uniform", w_bits=b, a_bits=8, calib_size=args.calib_size,
                             progress=False, qconfig=nearest).plan
        for name, g in VARIANTS.items():
            t0 = time.perf_counter()
            q = apply_plan(bundle.model, plan, calib.images, nearest)
            if g is not None:
                builder = LocalLayerBuilder(bundle.model, calib.images, QuantConfig(), gptq=g)
                for f, m in q.named_modules():
                    if isinstance(m, QuantMixin) and m.w_spec is not None:
                        got = builder.build(f, m, m.w_spec.bits, m.a_spec.bits if m.a_spec else None)
                        set_weight(m, {k: got[k] for k in ("weight", "w_scale", "w_zero_point")})
            secs = time.perf_counter() - t0
            with torch.inference_mode():
                top1 = 100 * evaluate_model(q, test)["top1"]
            rows.append((f"W{b}A8", name, top1, secs))
            print(rows[-1], flush=True)
    lines = [f"# {args.model}: the grid GPTQ rounds on (uniform plans, calibration draw 0, "
             f"{args.calib_size} images; top-1 on the {len(test)}-image test split)", "",
             "| plan | weights | top-1 % | quantize s |", "|---|---|---:|---:|"]
    lines += [f"| {p} | {n} | {t:.2f} | {s:.1f} |" for p, n, t, s in rows]
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"gptq_grid_{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
