"""Would another held-out rule have made ``--method auto`` pick a better plan? (issue 15)

    .venv/bin/python benchmarks/auto_selection.py --budgets avg-bits=3.5 --heldout 4096

auto measures each candidate method's plan on held-out *training* images beside the calibration
draw and keeps the one with the lowest KL to the fp outputs. At avg-bits 3.5 on ResNet-20 it chose
mixquant-ilp's plan on 4 of 5 draws, which scores ~0.3 points of test top-1 below eval-delta's.
This script takes the candidate plans a multi-draw bench directory already holds (the same plans
auto compared: same calibration draw, same methods), quantizes each as ``mpqkit eval`` does
(``apply_plan`` on the draw's calibration images), and scores it on the draw's held-out images
(auto's first 1,024, and the first ``--heldout``) by KL to the fp outputs, cross-entropy to the
labels, top-1 and agreement with the fp top-1. For each rule: the method it picks per draw and the
mean test top-1 of the picked plans (from the bench rows), beside the best possible pick (by test).
Written to ``--out`` and printed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mpqkit.api import calibration_set, heldout_set
from mpqkit.fileutil import atomic_write_text
from mpqkit.plan import Plan
from mpqkit.quant.apply import apply_plan
from mpqkit.report.bench import load_rows
from mpqkit.zoo.models import get_model

RULES = {"kl": min, "ce": min, "top1": max, "agree": max}


def _logits(model: torch.nn.Module, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def _scores(q_logits: torch.Tensor, fp_logits: torch.Tensor, labels: torch.Tensor, n: int) -> dict[str, float]:
    lq, lp = F.log_softmax(q_logits[:n], 1), F.log_softmax(fp_logits[:n], 1)
    return {"kl": (lp.exp() * (lp - lq)).sum(1).mean().item(),
            "ce": F.cross_entropy(q_logits[:n], labels[:n]).item(),
            "top1": (q_logits[:n].argmax(1) == labels[:n]).float().mean().item(),
            "agree": (q_logits[:n].argmax(1) == fp_logits[:n].argmax(1)).float().mean().item()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="benchmarks/results/draws_resnet20")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--budgets", default="avg-bits=3.5")
    ap.add_argument("--methods", default="eval-delta,mpqco,mixquant-ilp,greedy")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--heldout", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/draws_resnet20/paired_auto_selection.md")
    args = ap.parse_args(argv)
    rows = [r for r in load_rows(Path(args.dir) / "rows.jsonl") if not r.get("ptq") and not r.get("error")]
    test = {(r["method"], r["budget"], int(r.get("draw", 0))): r["top1_test"] for r in rows}
    plan_of = {(r["method"], r["budget"], int(r.get("draw", 0))): r["plan"] for r in rows if r.get("plan")}
    model = get_model(args.model).model
    methods = args.methods.split(",")
    sizes = sorted({min(1024, args.heldout), args.heldout})
    lines = [f"### auto's held-out choice: which rule picks the plan with the best test top-1 ({args.model})", "",
             f"Candidate plans of `{args.dir}` ({', '.join(methods)}), scored on each draw's held-out training "
             f"images (the first 1,024 are auto's); mean test top-1 of the plan each rule picks, and its pick per "
             f"draw. Command: `.venv/bin/python benchmarks/auto_selection.py --budgets "
             f"{args.budgets} --heldout {args.heldout}`.", "",
             "| budget | rule | held-out images | mean test top-1 of the pick | picks (draw 0..) |", "|---|---|---:|---:|---|"]
    for budget in args.budgets.split(","):
        picks: dict[tuple[str, int], list[str]] = {}
        for d in range(args.draws):
            calib = calibration_set(args.data, args.calib_size, d)
            held = heldout_set(args.data, args.calib_size, args.heldout, d, None)
            fp = _logits(model, held.images)
            scored = {}
            for m in methods:
                q = apply_plan(model, Plan.load(plan_of[(m, budget, d)]), calib.images)
                ql = _logits(q, held.images)
                scored[m] = {n: _scores(ql, fp, held.labels, n) for n in sizes}
                print(json.dumps({"budget": budget, "draw": d, "method": m, "test": test[(m, budget, d)],
                                  **{f"{k}{n}": v for n in sizes for k, v in scored[m][n].items()}}), flush=True)
            for rule, pick in RULES.items():
                for n in sizes:
                    picks.setdefault((rule, n), []).append(pick(methods, key=lambda m: scored[m][n][rule]))
            picks.setdefault(("test (best possible)", 0), []).append(max(methods, key=lambda m: test[(m, budget, d)]))
        if all(("auto", budget, d) in test for d in range(args.draws)):
            mean = sum(test[("auto", budget, d)] for d in range(args.draws)) / args.draws
            lines.append(f"| {budget} | auto's own row (KL on 1,024, then refined) | 1024 | {mean:.2f} | |")
        for (rule, n), chosen in picks.items():
            mean = sum(test[(m, budget, d)] for d, m in enumerate(chosen)) / len(chosen)
            lines.append(f"| {budget} | {rule} | {n or '-'} | {mean:.2f} | {', '.join(chosen)} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
