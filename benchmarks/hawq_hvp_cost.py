"""What HAWQ's Hessian traces cost against the empirical Fisher's, per chunk of images.

    PYTHONPATH=src .venv/bin/python benchmarks/hawq_hvp_cost.py --model mobilenetv2 --images 8 [--repeats 2] \
        [--out benchmarks/results/hawq_hvp_cost_mobilenetv2.json]

On random inputs of the model's shape (timings do not depend on the pixels), times per repeat: one
forward + backward of the mean loss over ``--images`` images (what one Fisher image costs, batched),
and one Hutchinson step of ``mpqkit.sensitivity.hessian`` (a Hessian-vector product per searched layer
block, by double backward) on the same images; prints and writes their ratio. One Hutchinson iteration
over the calibration set costs about (calibration images / --images) such steps, and a trace needs at
least 10 iterations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mpqkit.graph import discover
from mpqkit.loading import load_model
from mpqkit.quant.ptq import prepare_fp
from mpqkit.sensitivity import hessian
from mpqkit.sensitivity.base import SearchContext
from mpqkit.sensitivity.gradients import calib_chunks, grad_model, loss_sum
from mpqkit.settings import RunSettings


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bundle = load_model(args.model, RunSettings())
    graph = discover(bundle.model, bundle.input_shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, *bundle.input_shape, generator=gen)
    logits = bundle.model.eval()(x[:1])
    y = torch.randint(0, logits.shape[1], (args.images,), generator=gen)
    ctx = SearchContext(model=prepare_fp(bundle.model, RunSettings().qconfig), graph=graph, calib_images=x,
                        calib_labels=y, searched=graph.names, w_bits=[8], a_bits=[8])
    model, params = grad_model(ctx)
    names = list(params)
    chunks = list(calib_chunks(ctx, args.images, chunk=args.images))
    vs = {f: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for f, p in params.items()}
    grad_s, hv_s = [], []
    torch.autograd.grad(loss_sum(model, x, y), [params[f] for f in names])  # warm-up (allocator, kernels): untimed
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        torch.autograd.grad(loss_sum(model, x, y), [params[f] for f in names])
        grad_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hessian._hv(model, params, names, chunks, args.images, vs)
        hv_s.append(time.perf_counter() - t0)
    rec = {"model": args.model, "images": args.images, "layers": len(names),
           "grouped_conv": hessian.has_grouped_conv(bundle.model), "threads": torch.get_num_threads(),
           "forward_backward_s": grad_s, "hutchinson_step_s": hv_s,
           "median_ratio": statistics.median(h / g for h, g in zip(hv_s, grad_s))}
    print(json.dumps(rec), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


if __name__ == "__main__":
    main()
