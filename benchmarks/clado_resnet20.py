"""CLADO on a CIFAR ResNet (issue-9 figures), printed and written as tables.

    .venv/bin/python benchmarks/clado_resnet20.py [--model resnet20] [--calib-size 1024]
        [--budgets 2.5,3,3.5,4] [--naive-sample 40] [--out benchmarks/results/clado_resnet20]

1. top-1 on the 10k test split of CLADO, CLADO-diag, eval-delta ILP (all W{2,4,8}, A8, first/last 8/8)
   and uniform (any bits in {2..8}) at equal weight size (avg-bits budgets);
2. probe cost: wall time of the full CLADO sensitivity (cold cache), vs (a) the naive loop — every
   probe a plain full forward from the input, one probe at a time, no prefix reuse, no BN folding,
   NCHW, batches of 256, activations through PyTorch's stock ``torch.fake_quantize_per_tensor_affine``
   — timed on a random sample of the same probes in the same run and scaled to all probes; also the
   same naive loop with mpqkit's own activation kernel (``quant.primitives.fake_quant``), so the
   share of the speed-up that comes from the kernel is visible;
   (b) the FLOP floor — MACs of each (ℓ,b) walk from ℓ plus each pair's suffix from its later layer,
   turned into seconds with the engine's own measured full-forward time;
3. the IQP on the measured G: solve time, objective, bound, gap, vs the diagonal-only plan and
   uniform evaluated under the same G.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mpqkit
from mpqkit.api import calibration_set, load_model, load_split
from mpqkit.engine.probe import ProbeEngine
from mpqkit.evaluation import evaluate_model
from mpqkit.graph import discover
from mpqkit.plan import atomic_write_text
from mpqkit.sensitivity.crosslayer import quadratic_objective
from mpqkit.solve.iqp import QuadraticObjective
from mpqkit.quant.config import QuantConfig

# measured with nearest rounding, before GPTQ became the default quantizer: pinned, so a rerun reproduces it
NEAREST = QuantConfig(rounding="nearest")

BITS = (2, 4, 8)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--calib-size", "--sens-samples", dest="sens_samples", type=int, default=1024)
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--naive-sample", type=int, default=40)
    ap.add_argument("--naive-batch", type=int, default=256, help="batch size of the naive loop (a typical eval batch)")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-eval", action="store_true",
                    help="solve and report the IQP figures without measuring test accuracy (e.g. ResNet-56 on a "
                         "CPU, where `mpqkit bench` measures the plans' accuracy from the same cached probes)")
    ap.add_argument("--cache-dir", default=None,
                    help="probe cache for the CLADO sensitivity (default: a fresh temporary directory, so the "
                         "timing is cold; pass ~/.cache/mpqkit to let `mpqkit bench` reuse the probes)")
    args = ap.parse_args(argv)
    out = Path(args.out or f"benchmarks/results/clado_{args.model}")
    bundle = load_model(args.model)
    graph = discover(bundle.model, bundle.input_shape)
    test = load_split(args.data, "test")
    budgets = [f"avg-bits={b}" for b in args.budgets.split(",")]
    # the pairs on every sample, as these rows were measured (before CLADO's --pair-samples)
    common = dict(calib_size=args.sens_samples, progress=False, time_limit=args.time_limit)
    clado_opts = {"pair_samples": 0}
    rows, iqp_rows = [], []
    cache = args.cache_dir or tempfile.mkdtemp(prefix="clado-bench-")

    # ---- CLADO sensitivity, cold ----
    t0 = time.perf_counter()
    first = mpqkit.search(bundle, args.data, budgets[0], "clado", w_candidates=BITS,
                          cache_dir=cache, **common, qconfig=NEAREST, options=clado_opts)
    sens_s = first.seconds["sensitivity"]
    print(json.dumps({"clado_sensitivity_s": sens_s, "pairs": len(first.table.pairs),
                      "singles": first.table.meta["singles_measured"], "engine": first.engine_stats}), flush=True)

    def record(method, budget, res):
        top1 = None if args.skip_eval else 100 * evaluate_model(mpqkit.apply_plan(bundle, res.plan, args.data),
                                                                test)["top1"]
        row = {"budget": budget, "method": method, "top1_test": top1,
               "avg_w_bits": res.plan.costs["avg_w_bits_searched"], "solver": res.solution.solver,
               "status": res.solution.status, "solve_s": res.solution.seconds,
               "bits": " ".join(str(lq.w_bits) for lq in res.plan.layers.values())}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    ed_cache = tempfile.mkdtemp(prefix="ed-bench-")
    for budget in budgets:
        clado = first if budget == budgets[0] else mpqkit.search(
            bundle, args.data, budget, "clado", w_candidates=BITS, cache_dir=cache, **common, qconfig=NEAREST,
            options=clado_opts)
        record("clado", budget, clado)
        diag = mpqkit.search(bundle, args.data, budget, "clado-diag", w_candidates=BITS,
                             cache_dir=cache, **common, qconfig=NEAREST, options=clado_opts)
        record("clado-diag", budget, diag)
        ed = mpqkit.search(bundle, args.data, budget, "eval-delta", w_candidates=BITS,
                           cache_dir=ed_cache, **common, qconfig=NEAREST)
        record("eval-delta (ILP)", budget, ed)
        uni = mpqkit.search(bundle, args.data, budget, "uniform", **common, qconfig=NEAREST)
        record("uniform", budget, uni)
        # IQP quality on the measured G: CLADO's plan vs the diagonal-only plan and uniform W2/W4
        g, lin, _ = quadratic_objective(clado.table, _problem(clado))
        obj = QuadraticObjective(g, lin, len(clado.ledger.searched), len(BITS))

        def value(plan):
            return obj.value(np.array([BITS.index(plan.layers[f].w_bits) for f in clado.ledger.searched]))

        iqp_rows.append({"budget": budget, "iqp_objective": clado.solution.objective, "iqp_bound": clado.solution.bound,
                         "gap": clado.solution.gap, "solve_s": clado.solution.seconds, "status": clado.solution.status,
                         "solver": clado.solution.solver,
                         "heuristic_objective": clado.solution.info.get("heuristic_objective"),
                         "milp_objective": clado.solution.info.get("milp_objective"),
                         "diag_plan_under_G": value(diag.plan),
                         "uniform_under_G": value(uni.plan) if all(
                             uni.plan.layers[f].w_bits in BITS for f in clado.ledger.searched) else None})
        print(json.dumps(iqp_rows[-1]), flush=True)

    # ---- cost: naive loop on a sample, FLOP floor ----
    calib = calibration_set(args.data, args.sens_samples, 0)
    layers = first.ledger.searched
    act = {f: (None, 8) for f in graph.names}
    probes = [{f: (b, 8)} for f in layers for b in BITS] + [
        {f: (b, 8), g: (c, 8)} for i, f in enumerate(layers) for g in layers[i + 1:] for b in BITS for c in BITS]
    plain = dict(use_cache=False, progress=False, prefix=False, fold_bn=False, channels_last=False,
                 batch_size=args.naive_batch)
    naive = ProbeEngine(bundle.model, graph, calib.images, calib.labels, **plain, qconfig=NEAREST)
    naive_k = ProbeEngine(bundle.model, graph, calib.images, calib.labels, **plain, qconfig=NEAREST)
    for f in graph.names:  # every activation of the naive loop goes through the stock kernel
        for b in (None, *BITS):
            _stock_activation_kernel(naive.quant_layer(f, b, 8))
    fast = ProbeEngine(bundle.model, graph, calib.images, calib.labels, use_cache=False, progress=False, prefix=False, qconfig=NEAREST)
    cost_batch = fast.batch_size
    sample = random.Random(0).sample(probes, min(args.naive_sample, len(probes)))
    naive_t, naive_k_t, full_t = [], [], []
    for p in sample:  # interleaved, so machine noise hits all alike
        for eng, acc in ((naive, naive_t), (naive_k, naive_k_t), (fast, full_t)):
            for f, (b, a) in p.items():
                eng.quant_layer(f, b, a)
            t = time.perf_counter()
            eng.run([p], base=act, show=False)
            acc.append(time.perf_counter() - t)
    naive_total = statistics.median(naive_t) * len(probes)
    macs = {l.fqn: l.macs for l in graph.layers}
    order = graph.names
    suffix = {f: sum(macs[g] for g in order[order.index(f):]) for f in order}
    total_macs = sum(macs.values())
    floor_macs = sum(suffix[f] for f in layers for _ in BITS) + sum(
        suffix[g] * len(BITS) ** 2 for i, f in enumerate(layers) for g in layers[i + 1:])
    floor_s = floor_macs / total_macs * statistics.median(full_t)  # optimised full forward, same kernels
    cost = {"probes": len(probes), "clado_sensitivity_s": sens_s, "naive_per_probe_median_s": statistics.median(naive_t),
            "naive_total_estimate_s": naive_total, "speedup_vs_naive": naive_total / sens_s,
            "naive_mpqkit_kernel_per_probe_median_s": statistics.median(naive_k_t),
            "speedup_vs_naive_with_mpqkit_kernel": statistics.median(naive_k_t) * len(probes) / sens_s,
            "full_forward_optimised_median_s": statistics.median(full_t),
            "floor_fraction_of_naive_flops": floor_macs / (total_macs * len(probes)),
            "flop_floor_s": floor_s, "ratio_to_floor": sens_s / floor_s, "sens_samples": args.sens_samples,
            "median_chunk_std_of_single_delta": first.table.meta["median_chunk_std_of_single_delta"],
            "stat_chunks_of_128": first.table.meta["stat_chunks"], "engine_batch_size": cost_batch, "naive_batch_size": args.naive_batch}
    print(json.dumps(cost), flush=True)

    data_name = "CIFAR-10" if args.data == "cifar10" else args.data
    n_test = "10k" if len(test) == 10_000 else f"{len(test):,}-image"
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# CLADO on {args.model} / {data_name} (W{{2,4,8}}, A8; first/last 8/8)", "",
             f"Produced by `.venv/bin/python benchmarks/clado_resnet20.py {cmd}`".rstrip() +
             f"; top-1 on the {n_test} test split; torch threads: {torch.get_num_threads()}.", "",
             "| budget | method | top-1 % | avg w-bits | solver | status | solve s | w-bits per layer |",
             "|---|---|---:|---:|---|---|---:|---|"]
    lines += [f"| {r['budget']} | {r['method']} | {'-' if r['top1_test'] is None else format(r['top1_test'], '.2f')} | {r['avg_w_bits']:.3f} | {r['solver']} | "
              f"{r['status']} | {r['solve_s']:.2f} | {r['bits']} |" for r in rows]
    lines += ["", "## IQP on the measured G (PSD-projected; objective = ½xᵀGx, lower is better)", "",
              "| budget | IQP objective | bound | gap | solve s | status | heuristic obj | MILP obj | diag-only plan under G | uniform under G |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    f = lambda v: "" if v is None else f"{v:.5g}"  # noqa: E731
    lines += [f"| {r['budget']} | {f(r['iqp_objective'])} | {f(r['iqp_bound'])} | {f(r['gap'])} | {r['solve_s']:.2f} | "
              f"{r['status']} | {f(r['heuristic_objective'])} | {f(r['milp_objective'])} | {f(r['diag_plan_under_G'])} | "
              f"{f(r['uniform_under_G'])} |" for r in iqp_rows]
    lines += ["", "## Probe cost", "", "| quantity | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in cost.items()]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "iqp": iqp_rows, "cost": cost}, indent=1) + "\n")
    print("\n".join(lines))


def _stock_activation_kernel(q) -> None:
    """Route a quantized layer's input through ``torch.fake_quantize_per_tensor_affine`` (what a
    plain PyTorch implementation calls; bit-identical to mpqkit's kernel, tested)."""
    if q.a_spec is not None:
        scale, zp, (lo, hi) = float(q.a_scale), int(q.a_zero_point), q._a_range
        q.input_fn = lambda x: torch.fake_quantize_per_tensor_affine(x, scale, zp, lo, hi)


def _problem(res):
    from mpqkit.budget import parse_budget
    from mpqkit.solve import Allocation

    searched = res.ledger.searched
    return Allocation(res.ledger, searched, list(BITS), [8], {f: (8, 8) for f in res.plan.layers if f not in searched},
                      res.ledger.resolve(parse_budget(res.plan.budget)))


if __name__ == "__main__":
    main()
