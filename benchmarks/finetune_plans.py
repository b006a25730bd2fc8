"""Fine-tune the plans of a multi-draw bench directory (LSQ, ``mpqkit finetune``) and test them: bench rows.

    PYTHONPATH=src .venv/bin/python benchmarks/finetune_plans.py --src benchmarks/results/draws_resnet20_gptq \
        --out benchmarks/results/finetune_resnet20 --methods auto,uniform --budgets avg-bits=2.5,avg-bits=3 \
        --draws 0,1,2 --epochs 5

For every (method, budget, draw) row of ``--src`` (its default-PTQ rows), the row's plan is fine-tuned
with ``api.finetune`` (the run's seed is the draw's seed) into ``<out>/plans/<method>/<budget>/draw<k>/``
and evaluated on the test split; the row is written to ``<out>/rows.jsonl`` with the source row's size
fields and search seconds, ``ptq`` = ``lsq-<epochs>ep``, ``ptq_s`` = the seconds of PTQ plus fine-tuning and ``plan`` = the fine-tuned
plan, so ``mpqkit report`` and ``benchmarks/claims.py`` pair it like any bench row. ``--epochs-list``
adds rows at fewer epochs (accuracy vs epochs: each a separate run with its own cosine schedule).
Resumable: rows already written are skipped and a killed fine-tune resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mpqkit import api
from mpqkit.report.bench import load_rows


#: copied from the source row: what the plan is, and the search time a user waited for it
SOURCE_FIELDS = ("method", "budget", "draw", "seed", "size_mb", "compression", "gbitops", "avg_w_bits", "search_s")


def ptq_tag(epochs: int, train_size: int | None) -> str:
    """The rows' PTQ column: ``lsq-<epochs>ep``, plus ``-<N>img`` when an epoch is ``N`` images."""
    return f"lsq-{epochs}ep" + (f"-{train_size}img" if train_size else "")


def _key(r: dict) -> tuple:
    return r["method"], r["budget"], r.get("draw"), r.get("ptq")


def finetune_row(src_row: dict, model: str, data: str, out: Path, epochs: int, lr: float,
                 train_size: int | None = None) -> dict:
    """Fine-tune one source row's plan; return the bench row of the fine-tuned model on the test split."""
    tag = ptq_tag(epochs, train_size)
    folder = out / "plans" / src_row["method"] / src_row["budget"] / f"draw{src_row['draw']}" / tag
    res = api.finetune(model, src_row["plan"], data, folder, epochs=epochs, lr=lr, train_size=train_size,
                       seed=int(src_row["seed"]), progress=False)
    ev = api.evaluate(model, data, "test", quantized=folder / "model.pt", progress=False)
    row = {k: src_row[k] for k in SOURCE_FIELDS if k in src_row}
    row.update(ptq=tag, top1_test=100 * ev["top1"], top1_before=src_row["top1_test"], ptq_s=res["seconds"],
               seconds_per_epoch=res["seconds"] / max(res["finetune"]["epochs_done"], 1),
               heldout_top1=res["finetune"]["heldout_top1"], plan=str(folder / "plan.json"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="bench directory whose default-PTQ plans are fine-tuned")
    ap.add_argument("--out", required=True, help="bench directory for the fine-tuned rows")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--methods", default="auto,uniform")
    ap.add_argument("--budgets", default="avg-bits=2.5,avg-bits=3")
    ap.add_argument("--draws", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--epochs-list", default="", help="also these epoch counts (comma-separated), e.g. 1,2")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-size", type=int, help="images per epoch (default: the whole train split)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {_key(r) for r in load_rows(rows_path)} if rows_path.exists() else set()
    methods, budgets = args.methods.split(","), args.budgets.split(",")
    draws = [int(d) for d in args.draws.split(",")]
    epochs = [args.epochs] + [int(e) for e in args.epochs_list.split(",") if e]
    src = [r for r in load_rows(Path(args.src) / "rows.jsonl")
           if r["method"] in methods and r["budget"] in budgets and r.get("draw") in draws and r.get("ptq") is None]
    for ep in epochs:
        for r in sorted(src, key=lambda r: (r["draw"], r["budget"], r["method"])):
            if (r["method"], r["budget"], r["draw"], ptq_tag(ep, args.train_size)) in done:
                continue
            row = finetune_row(r, args.model, args.data, out, ep, args.lr, args.train_size)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['method']} {row['budget']} draw {row['draw']} {row['ptq']}: top-1 {row['top1_before']:.2f} "
                  f"→ {row['top1_test']:.2f} ({row['ptq_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
