"""Fine-tune the plans of a multi-draw bench directory (LSQ, ``mpqkit finetune``) and test them: bench rows.

    PYTHONPATH=src .venv/bin/python benchmarks/finetune_plans.py --src benchmarks/results/draws_resnet20_gptq \
        --out benchmarks/results/finetune_resnet20 --methods auto,uniform --budgets avg-bits=2.5,avg-bits=3 \
        --draws 0,1,2 --epochs 5

For every (method, budget, draw) row of ``--src`` (its default-PTQ rows), the row's plan is fine-tuned
with ``api.finetune`` (the run's seed is the draw's seed) into
``<out>/plans/<method>/<budget>/draw<k>/<tag>/`` and evaluated on the test split; the row is written to
``<out>/rows.jsonl`` with the source row's size fields and search seconds, ``ptq`` = the tag
(``lsq-<epochs>ep``, ``-lr<lr>`` when not the default, ``-<N>img`` with ``--train-size``, ``-linsteps``
with ``--steps linear``, ``-norm`` with ``--train-norm``), ``ptq_s`` =
the seconds of PTQ plus fine-tuning, ``device`` = where it was fine-tuned and ``plan`` = the
fine-tuned plan, so ``mpqkit report`` and ``benchmarks/claims.py`` pair it like any bench row; the
source plan under today's PTQ is written beside it as a row without PTQ tag (fine-tuned vs not, paired).
``--epochs-list`` / ``--lr-list`` add runs at other epoch counts / learning rates (each its own run,
with its own cosine schedule).

``--jobs N`` fine-tunes N plans at once in separate processes (one thread each: for a GPU, where one
small model leaves the card idle). ``--no-test`` only fine-tunes (for a machine without the test
split): a later run without it finds the finished folders, does not train again, and evaluates them.
Resumable: rows already written are skipped and a killed fine-tune resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

#: copied from the source row: what the plan is, and the search time a user waited for it
SOURCE_FIELDS = ("method", "budget", "draw", "seed", "size_mb", "compression", "gbitops", "avg_w_bits", "search_s")
DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class Job:
    """One fine-tuning run: a source row's plan, the model and data, and how it is fine-tuned."""

    src_row: dict
    model: str
    data: str
    out: Path
    epochs: int
    lr: float
    train_size: int | None
    allow_small_data: bool = False
    steps: str = "log"
    train_norm: bool = False

    @property
    def tag(self) -> str:
        """The rows' PTQ column: ``lsq-<epochs>ep``, plus ``-lr<lr>`` and ``-<N>img`` where they differ."""
        return (f"lsq-{self.epochs}ep" + (f"-lr{self.lr:g}" if self.lr != DEFAULT_LR else "")
                + (f"-{self.train_size}img" if self.train_size else "") + ("-linsteps" if self.steps == "linear" else "")
                + ("-norm" if self.train_norm else ""))

    @property
    def folder(self) -> Path:
        r = self.src_row
        return self.out / "plans" / r["method"] / r["budget"] / f"draw{r['draw']}" / self.tag

    @property
    def key(self) -> tuple:
        r = self.src_row
        return r["method"], r["budget"], r.get("draw"), self.tag


def plan_path(path: str) -> str:
    """The source row's plan; an absolute path from another checkout is looked up in this one."""
    if not os.path.isabs(path) or os.path.exists(path) or "benchmarks/" not in path:
        return path
    return path[path.index("benchmarks/"):]


def finished(folder: Path) -> dict | None:
    """The summary of a finished fine-tune in ``folder`` (model.pt written), else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("finished") and (folder / "model.pt").is_file() else None


def run_job(job: Job, test: bool = True, before: float | None = None) -> tuple[dict, dict | None]:
    """Fine-tune the job's plan unless its folder already holds a finished run; return its summary and,
    with ``test``, its bench row (``before``: the plan's top-1 under today's PTQ when a row already has it)."""
    from mpqkit import api

    summary = finished(job.folder)
    if summary is None:
        summary = api.finetune(job.model, plan_path(job.src_row["plan"]), job.data, job.folder, epochs=job.epochs,
                               lr=job.lr, train_size=job.train_size, seed=int(job.src_row["seed"]),
                               steps=job.steps, train_norm=job.train_norm, allow_small_data=job.allow_small_data,
                               progress=False)
    return summary, test_row(job, summary, before) if test else None


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def test_row(job: Job, summary: dict, before: float | None = None) -> dict:
    """The bench row of a finished fine-tune: its test top-1 beside the plan's under today's PTQ
    (``top1_before``: ``before``, else measured now; the source row's may be older)."""
    from mpqkit import api

    ev = api.evaluate(job.model, job.data, "test", quantized=job.folder / "model.pt", progress=False)
    if before is None:
        before = 100 * api.evaluate(job.model, job.data, "test", plan=plan_path(job.src_row["plan"]),
                                    progress=False)["top1"]
    row = {k: job.src_row[k] for k in SOURCE_FIELDS if k in job.src_row}
    ft = summary["finetune"]
    row.update(ptq=job.tag, top1_test=100 * ev["top1"], top1_before=before,
               ptq_s=summary["seconds"], seconds_per_epoch=sum(h["seconds"] for h in summary["history"])
               / max(ft["epochs_done"], 1), device=summary.get("device", "cpu"),
               heldout_top1=ft["heldout_top1"], plan=str(job.folder / "plan.json"))
    return row


def ptq_row(job: Job, row: dict) -> dict:
    """The source plan under today's PTQ (its fine-tuned row's ``top1_before``) as a row of its own
    (``ptq`` None), so the directory pairs fine-tuned against not fine-tuned by itself."""
    out = {k: job.src_row[k] for k in SOURCE_FIELDS if k in job.src_row}
    out.update(ptq=None, top1_test=row["top1_before"], plan=plan_path(job.src_row["plan"]))
    return out


def jobs_from_args(args: argparse.Namespace) -> list[Job]:
    from mpqkit.report.bench import load_rows

    methods, budgets = args.methods.split(","), args.budgets.split(",")
    draws = [int(d) for d in args.draws.split(",")]
    src = [r for r in load_rows(Path(args.src) / "rows.jsonl")
           if r["method"] in methods and r["budget"] in budgets and r.get("draw", 0) in draws and r.get("ptq") is None]
    for r in src:
        r.setdefault("draw", 0)
        r.setdefault("seed", 0)
    epochs = [args.epochs] + [int(e) for e in args.epochs_list.split(",") if e]
    lrs = [args.lr] + [float(v) for v in args.lr_list.split(",") if v]
    return [Job(r, args.model, args.data, Path(args.out), ep, lr, args.train_size, args.allow_small_data, args.steps,
                args.train_norm)
            for ep in epochs for lr in lrs for r in sorted(src, key=lambda r: (r["draw"], r["budget"], r["method"]))]


def main(argv: list[str] | None = None) -> None:
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
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--lr-list", default="", help="also these learning rates (comma-separated)")
    ap.add_argument("--train-size", type=int, help="images per epoch (default: the whole train split)")
    ap.add_argument("--jobs", type=int, default=1, help="fine-tune this many plans at once (processes)")
    ap.add_argument("--no-test", action="store_true", help="only fine-tune; write no rows (no test split here)")
    ap.add_argument("--allow-small-data", action="store_true", help="fine-tune on a small train split (tests)")
    ap.add_argument("--steps", choices=["log", "linear"], default="log", help="step sizes trained as log s or s")
    ap.add_argument("--train-norm", action="store_true", help="also train the norm layers' affine parameters")
    args = ap.parse_args(argv)
    from mpqkit.report.bench import load_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {(r["method"], r["budget"], r.get("draw"), r.get("ptq")): r for r in load_rows(rows_path)} \
        if rows_path.exists() else {}
    jobs = jobs_from_args(args)
    for j in jobs:  # rows written before the plan's own row was: add it from the fine-tuned row's top1_before
        m, b, d, _ = j.key
        if j.key in done and (m, b, d, None) not in done:
            done[(m, b, d, None)] = ptq_row(j, done[j.key])
            with rows_path.open("a") as f:
                f.write(json.dumps(done[(m, b, d, None)]) + "\n")
    todo = [j for j in jobs if j.key not in done]
    test = not args.no_test
    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn"), _worker_init) as pool:
            futures = {pool.submit(run_job, j, test, _before(done, j)): j for j in todo}
            for fut in as_completed(futures):
                try:
                    _report(futures[fut], *fut.result(), rows_path)
                except Exception as e:  # noqa: BLE001 - one failed run must not lose the others' rows
                    print(f"{futures[fut].folder}: FAILED: {type(e).__name__}: {e}", flush=True)
    else:
        for j in todo:
            _report(j, *run_job(j, test, _before(done, j)), rows_path)


def _before(done: dict, job: Job) -> float | None:
    """The plan's top-1 under today's PTQ from its row, if one was written (not measured again)."""
    m, b, d, _ = job.key
    return done[(m, b, d, None)]["top1_test"] if (m, b, d, None) in done else None


def _report(job: Job, summary: dict, row: dict | None, rows_path: Path) -> None:
    print(f"{job.folder}: {summary['finetune']['epochs_done']} epochs in {summary['seconds']:.0f} s "
          f"on {summary.get('device', 'cpu')}", flush=True)
    if row is None:
        return
    from mpqkit.report.bench import load_rows

    have = {(r["method"], r["budget"], r.get("draw"), r.get("ptq")) for r in load_rows(rows_path)} \
        if rows_path.exists() else set()
    with rows_path.open("a") as f:
        if (row["method"], row["budget"], row["draw"], None) not in have:  # the plan before fine-tuning, as a row
            f.write(json.dumps(ptq_row(job, row)) + "\n")
        f.write(json.dumps(row) + "\n")
    print(f"{row['method']} {row['budget']} draw {row['draw']} {row['ptq']}: top-1 {row['top1_before']:.2f} "
          f"→ {row['top1_test']:.2f} ({row['ptq_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
