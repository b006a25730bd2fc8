"""The ``mpqkit`` command: a thin layer over ``mpqkit.api``.

Every command that loads a model, data or runs a method builds one ``RunSettings`` from one shared
argument group (``cli_args.py``) and, where a method runs, its typed options from the flags the
method registry declares; the work itself is an ``api`` call.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .cli_args import (OneLineParser, add_method_options, add_ptq, add_settings, given_options, positive_int,
                       ptq_kwargs, settings_from_args)
from .errors import MpqkitError


def build_parser() -> argparse.ArgumentParser:
    """The ``mpqkit`` parser: one sub-command per pipeline entry point."""
    # lazy: the CLI imports only what the command it runs uses
    from .export.cli import add_parser as add_export_parser
    from .sensitivity import METHODS

    ap = OneLineParser(prog="mpqkit", description="Mixed-precision quantization: search, apply, evaluate.")
    sub = ap.add_subparsers(dest="command", required=True)
    method_help = "; ".join(f"{m.name}: {m.description}" for m in METHODS)
    _add_demo(sub)
    _add_search(sub, method_help)
    _add_apply_eval(sub)
    _add_sweep_bench(sub, method_help)
    _add_proxies_report(sub)
    _add_finetune(sub)
    g = sub.add_parser("layers", help="list quantizable layers, costs and tie groups")
    add_settings(g, data=False, device=False)  # nothing runs: no device, no progress
    add_export_parser(sub)
    return ap


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="digits CNN: search (each method) → plan → quantize → eval → report, offline")
    d.add_argument("--out", default="results/demo", help="results directory (default results/demo)")
    d.add_argument("--budget", default="avg-bits=3", help="budget of every demo search (default avg-bits=3)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_search(sub: Any, method_help: str) -> None:
    s = sub.add_parser("search", help="search a mixed-precision plan under a budget")
    add_settings(s, search=True)
    s.add_argument("--method", default="eval-delta", help=f"default eval-delta. {method_help}")
    s.add_argument("--budget", help="e.g. avg-bits=3, size=0.2MB, cr=10, bitops=0.5G, act-mem=64KB (comma = all)")
    s.add_argument("--out", help="results directory, or a .json path for the plan (results beside it, in "
                                 "NAME-results/); default: results/search-MODEL-METHOD")
    s.add_argument("--eval", dest="eval_split", choices=["test", "exact", "train"],
                   help="evaluate the plan on this split after the search")
    s.add_argument("--profile", action="store_true", help="print where the search's time went (stages, probes by "
                   "start layer, peak memory); it is always in summary.json")
    add_ptq(s)
    add_method_options(s)


def _add_apply_eval(sub: Any) -> None:
    a = sub.add_parser("apply", help="quantize a model with a plan and save it")
    add_settings(a)
    a.add_argument("--plan", required=True, help="plan.json to quantize with")
    a.add_argument("--out", required=True, help="output file (.pt): quantized state dict + plan")
    add_ptq(a)

    e = sub.add_parser("eval", help="top-1 of the fp model or of a plan on a split")
    add_settings(e)
    e.add_argument("--split", default="test", help="test | exact | train (cifar10); train | test (digits)")
    e.add_argument("--plan", help="plan.json to apply first")
    e.add_argument("--quantized", help="a saved quantized model (mpqkit apply --out, mpqkit finetune's model.pt)")
    e.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    add_ptq(e)


def _add_sweep_bench(sub: Any, method_help: str) -> None:
    # lazy: the CLI imports only what the command it runs uses
    from .sensitivity import METHODS

    for name, help_ in (("sweep", "one method over many budgets from one sensitivity: frontier CSV + PNG"),
                        ("bench", "methods × budgets × PTQ backends: results.csv, pareto.png, report.html")):
        b = sub.add_parser(name, help=help_)
        add_settings(b, search=True)
        if name == "sweep":
            b.add_argument("--method", required=True, help=method_help)
        else:
            b.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (every "
                           f"registered: {', '.join(METHODS.names())})")
        b.add_argument("--budgets", required=True, help="key=start:stop:step (e.g. avg-bits=2.5:4:0.25) or "
                       "budgets separated by ';'")
        b.add_argument("--ptq", default="default" if name == "sweep" else "default,brecq",
                       help="comma-separated PTQ recipes: default (the quantizer the plan was searched under), "
                            "or steps joined by + (cle, minmax|mse, nearest|gptq|adaround|brecq|qdrop, bc; e.g. "
                            f"gptq+bc); default: {'default' if name == 'sweep' else 'default,brecq'}")
        b.add_argument("--recon-iters", type=int, help="reconstruction iterations per unit (default 500)")
        b.add_argument("--splits", default="test,exact", help="evaluation splits (default test,exact)")
        b.add_argument("--draws", type=positive_int, default=1, help="calibration draws K (seeds --seed … --seed+K-1); every "
                       "method sees the same K draws, and the tables give mean ± std and paired differences with "
                       "95 %% intervals (default 1; the published results use 5)")
        b.add_argument("--out", required=True, help="results directory (rerun to resume)")
        add_method_options(b)


def _add_proxies_report(sub: Any) -> None:
    x = sub.add_parser("proxies", help="rank correlation of each method's sensitivity with the true single-layer "
                                       "top-1 drop on the test split (table + scatter PNG)")
    add_settings(x, search=True)
    x.add_argument("--methods", help="comma-separated (default: eval-delta,hawq,mpqco,mixquant,mixquant-ilp,infoq)")
    x.add_argument("--out", help="results directory (default results/proxies-MODEL; a bench directory adds it to "
                                 "its report.html)")
    add_method_options(x)
    r = sub.add_parser("report", help="rewrite the outputs of bench/sweep directories; optionally one Markdown file")
    r.add_argument("dirs", nargs="+", help="bench or sweep results directories")
    r.add_argument("--markdown", help="write the tables of all directories into this Markdown file")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _add_finetune(sub: Any) -> None:
    f = sub.add_parser("finetune", help="quantization-aware fine-tuning (LSQ) of a plan on the train split")
    add_settings(f)
    f.add_argument("--plan", required=True, help="plan.json to quantize and fine-tune")
    f.add_argument("--out", required=True, help="folder: checkpoint.pt (resume), model.pt, plan.json, summary.json")
    f.add_argument("--epochs", type=positive_int, default=5, help="epochs over the train split (default 5)")
    f.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, cosine to 0 (default 1e-4)")
    f.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (default 128)")
    f.add_argument("--no-distill", dest="distill", action="store_false",
                   help="cross-entropy with the labels instead of KL to the fp model's logits")
    f.add_argument("--augment", choices=["crop-flip", "none"], help="default: crop-flip for cifar10, none otherwise")
    f.add_argument("--seed", type=int, default=0, help="seed of the held-out images, the image order and the "
                   "augmentation (default 0); the PTQ's calibration set is the plan's own")
    f.add_argument("--heldout", type=int, default=1000,
                   help="training images kept out of training for the per-epoch top-1 (default 1000)")
    f.add_argument("--train-size", type=positive_int,
                   help="images per epoch, a new random draw from the train split each epoch (default: all)")
    f.add_argument("--lsq-steps", choices=["log", "linear"], default="log",
                   help="train step sizes as log s (relative Adam steps, default) or as s")
    f.add_argument("--train-norm", action="store_true",
                   help="also train the norm layers' affine scale and shift (their statistics stay frozen)")
    f.add_argument("--allow-small-data", action="store_true",
                   help="fine-tune even on a train split of fewer than 5,000 images (over-fits)")
    add_ptq(f)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argument error, printed as one line (2): a code, like every command
        return e.code if isinstance(e.code, int) else 2
    if hasattr(args, "data") and args.data is None:
        # lazy: the CLI imports only what the command it runs uses
        from .zoo.models import FIXED_RESOLUTION

        args.data = FIXED_RESOLUTION.get(getattr(args, "model", ""), "cifar10")
    quiet = getattr(args, "quiet", False) or not getattr(args, "progress", True)  # -q: its own, or the settings'
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s")
    # lazy: the CLI imports only what the command it runs uses
    from .export.cli import cmd_export

    try:
        return {"demo": cmd_demo, "search": cmd_search, "apply": cmd_apply, "eval": cmd_eval,
                "layers": cmd_layers, "export": cmd_export, "finetune": cmd_finetune, "sweep": cmd_bench, "bench": cmd_bench,
                "report": cmd_report, "proxies": cmd_proxies}[args.command](args)
    except MpqkitError as e:
        print(f"mpqkit: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    except OSError as e:  # a file system failure not caught earlier: still one line, never a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"mpqkit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpqkit: interrupted (cached probes are kept; rerun to resume)", file=sys.stderr)
        return 130


def _print(obj: dict[str, Any], as_json: bool, text: str) -> None:
    # lazy: the CLI imports only what the command it runs uses
    from .api import results_json

    print(results_json(obj) if as_json else text)


def _out_paths(out: str | None, default: str) -> tuple[Path, Path | None]:
    """(results dir, extra plan path): ``--out plan.json`` writes the plan there, results beside it."""
    if out is not None and out.strip() in ("", "-"):
        raise MpqkitError(f"--out {out!r} is not a path (mpqkit writes results into a folder; stdout is not one)")
    p = Path(out or default)
    if p.suffix == ".json":
        results = p.with_name(p.stem + "-results")
        if len(results.name.encode()) > 255:  # the file system's name limit: fail now, not after the search
            raise MpqkitError(f"--out {p.name[:40]}…: the results folder beside it ({len(results.name.encode())}-byte "
                              "name) would exceed the file system's 255-byte limit; choose a shorter name")
        return results, p
    return p, None


def cmd_search(args: argparse.Namespace) -> int:
    # lazy: the CLI imports only what the command it runs uses
    from . import api
    from .fileutil import check_output_file

    settings = settings_from_args(args)
    options = api.method_options_for([args.method], given_options(args))[args.method]
    results_dir, plan_path = _out_paths(args.out, f"results/search-{Path(args.model).name}-{args.method}")
    if plan_path is not None:
        check_output_file(plan_path, "plan file (--out)")  # before the search, not after it
    ptq_kw = ptq_kwargs(args)
    if not args.eval_split and ptq_kw["ptq"] is not None:
        raise MpqkitError("--ptq applies to the evaluation: add --eval test (or use mpqkit apply/eval --plan)")
    res = api.search(args.model, args.data, args.budget, args.method, settings=settings, options=options,
                     out=results_dir)
    if plan_path is not None:
        res.plan.save(plan_path)
    plan_file = plan_path or results_dir / "plan.json"
    out: dict[str, Any] = {"plan": str(plan_file), "results_dir": str(results_dir), "costs": res.plan.costs,
                           "solver": res.solution.to_dict(), "seconds": res.seconds,
                           "bits": {f: [lq.w_bits, lq.a_bits] for f, lq in res.plan.layers.items()}}
    if args.eval_split:
        out["eval"] = api.evaluate(args.model, args.data, args.eval_split, res.plan, settings=settings, **ptq_kw)
    c = res.plan.costs
    text = (f"method {args.method} · budget {args.budget} · {c['weight_mb']:.4f} MB (cr {c['compression']:.2f}) · "
            f"avg w-bits {c['avg_w_bits_searched']:.3f} · {c['bitops'] / 1e9:.4f} GBitOps\n"
            f"solver {res.solution.solver}: {res.solution.status}"
            + (f" (gap {res.solution.gap:.2e})" if res.solution.gap is not None else "")
            + f" in {res.solution.seconds:.2f}s · search {res.seconds['total']:.1f}s\n"
            + "bits (w/a): " + " ".join(f"{f}={lq.w_bits}/{lq.a_bits}" for f, lq in res.plan.layers.items()))
    dec = res.table.decision if res.table is not None else None
    for t in (dec.trials if dec is not None and dec.trials else []):
        text += (f"\n  tried {t['method']:<22} " + (f"error: {t['error']}" if "error" in t else
                 (f"held-out loss {t['heldout_loss']:.4f}, top-1 {100 * t['heldout_top1']:.2f} %"
                  if "heldout_loss" in t else f"{t.get('probes', 0)} probes, no move helped")
                 + (" ← chosen" if t.get("chosen") else "") + (" (kept)" if t.get("kept") else "")))
    ref = res.plan.provenance.get("refine")
    if ref:
        text += (f"\nrefine: {ref['probes']} probes, calibration loss (half A / half B) "
                 f"{ref['objective_before']['half_a']:.4f} / {ref['objective_before']['half_b']:.4f} → "
                 f"{ref['objective_after']['half_a']:.4f} / {ref['objective_after']['half_b']:.4f}, "
                 f"{len(ref['moves'])} moves ({ref['stopped']})")
    for w in res.plan.provenance.get("warnings", []):
        text += f"\nWARNING: {w}"
    if args.profile:
        # lazy: the CLI imports only what the command it runs uses
        from .profile import format_profile

        out["profile"] = res.profile
        text += "\n" + format_profile(res.profile)
    if "eval" in out:
        text += f"\ntop-1 on {args.data}/{args.eval_split}: {100 * out['eval']['top1']:.2f} %"
    text += f"\nplan written to {plan_file}; results (per-layer table, bits chart, sensitivities) in {results_dir}/"
    _print(out, args.json, text)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    # lazy: the CLI imports only what the command it runs uses
    from . import api
    from .fileutil import check_output_file
    from .plan import Plan

    check_output_file(Path(args.out), "quantized model file (--out)")
    settings = settings_from_args(args)
    plan = Plan.load(args.plan)
    if settings.progress:
        print(f"quantizing {args.model} with {args.plan}" + (f" (ptq {args.ptq})" if args.ptq else "") + " …",
              file=sys.stderr)
    qmodel = api.apply_plan(args.model, plan, args.data, settings=settings, **ptq_kwargs(args))
    out = api.save_quantized(qmodel, plan, args.out)
    _print({"out": str(out)}, args.json, f"quantized model written to {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    # lazy: the CLI imports only what the command it runs uses
    from . import api

    res = api.finetune(args.model, args.plan, args.data, args.out, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, distill=args.distill, augment=args.augment, heldout=args.heldout,
                       train_size=args.train_size, steps=args.lsq_steps, train_norm=args.train_norm,
                       allow_small_data=args.allow_small_data,
                       settings=settings_from_args(args), **ptq_kwargs(args))
    ft = res["finetune"]
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    _print(res, args.json, f"fine-tuned {res['model']} for {ft['epochs_done']} epoch(s) in {res['seconds']:.0f} s: "
           f"held-out top-1 {fmt(ft['heldout_top1_before'])} → {fmt(ft['heldout_top1'])}; "
           f"{args.out}/model.pt and {args.out}/plan.json written")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # lazy: the CLI imports only what the command it runs uses
    from . import api

    res = api.evaluate(args.model, args.data, args.split, args.plan, settings=settings_from_args(args),
                       limit=args.limit, quantized=args.quantized, **ptq_kwargs(args))
    _print(res, args.json, f"{res['model']} on {res['data']}/{res['split']} ({res['n']} images)"
           + (f" with plan {args.plan}" + (f" (ptq {args.ptq})" if args.ptq else "") if args.plan else
              f" quantized model {args.quantized}" if args.quantized else " fp32")
           + f": top-1 {100 * res['top1']:.2f} %, loss {res['loss']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``sweep`` (one method) and ``bench`` (many): ``api.bench`` measures, ``report`` renders."""
    # lazy: the CLI imports only what the command it runs uses
    from . import api
    from .budget import expand_budgets
    from .report.bench import bench_title, write_outputs
    from .sensitivity import METHODS

    budgets = expand_budgets(args.budgets)
    if args.command == "sweep":
        methods = [METHODS.get(args.method).name]
    else:
        methods = METHODS.names() if args.methods == "all" else [METHODS.get(m.strip()).name
                                                                 for m in args.methods.split(",") if m.strip()]
    options = api.method_options_for(methods, given_options(args))
    ptqs = [None if p == "default" else p for p in (t.strip() for t in args.ptq.split(",")) if p]
    settings = settings_from_args(args)
    rows = api.bench(args.model, args.data, methods, budgets, args.out, ptqs=ptqs, settings=settings,
                     options=options, splits=[s for s in args.splits.split(",") if s], draws=args.draws,
                     recon_options={"iters": args.recon_iters} if args.recon_iters else None)
    # lazy: the CLI imports only what the command it runs uses
    from .quant.ptq import parse_ptq

    name = api.load_model(args.model, settings).name
    # the settings that change every row beside the methods' own: the report's section says them
    changed = ([f"--refine {settings.refine}"] if settings.refine else []) + \
        ([f"--recon-iters {args.recon_iters}"] if args.recon_iters and any(
            p is not None and parse_ptq(p).recon is not None for p in ptqs) else [])
    title = bench_title(f"{name} / {args.data}" + (f" ({', '.join(changed)})" if changed else ""), rows)
    paths = write_outputs(rows, Path(args.out), title)
    text = paths["md"].read_text() + f"\nwritten: {paths['csv']}, {paths['pareto']}, {paths['html']}"
    _print({"rows": rows, "files": {k: str(v) for k, v in paths.items()}}, args.json, text)
    return 0


def cmd_proxies(args: argparse.Namespace) -> int:
    # lazy: the CLI imports only what the command it runs uses
    from . import api
    from .sensitivity import METHODS

    methods = None if not args.methods else [METHODS.get(m.strip()).name for m in args.methods.split(",") if m.strip()]
    out = Path(args.out or f"results/proxies-{Path(args.model).name}")
    # lazy: the CLI imports only what the command it runs uses
    from .report.proxies import DEFAULT_METHODS

    options = api.method_options_for(methods or list(DEFAULT_METHODS), given_options(args))
    res = api.proxies(args.model, args.data, out, methods, settings=settings_from_args(args), options=options)
    text = (out / "proxies.md").read_text() + f"\nwritten: {out}/proxies.json, proxies.csv, proxies.png"
    _print({"correlations": res["correlations"], "out": str(out)}, args.json, text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    # lazy: the CLI imports only what the command it runs uses
    from .fileutil import check_output_file
    from .report.bench import write_markdown_index

    if args.markdown:
        check_output_file(args.markdown, "Markdown file (--markdown)")

    for line in write_markdown_index([Path(d) for d in args.dirs], args.markdown,
                                     " ".join(["mpqkit report", *args.dirs, *(["--markdown", args.markdown]
                                                                              if args.markdown else [])])):
        if not args.quiet:
            print(line)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    # lazy: the CLI imports only what the command it runs uses
    from . import api

    res = api.layers(args.model, settings_from_args(args))
    text = "\n".join(f"{r['layer']:<28} {r['kind']:<6} {r['weight_numel']:>9} params {r['macs']:>12} MACs  "
                     f"in {r['in_shape']}" for r in res["layers"])
    text += (f"\n{len(res['layers'])} layers · fp32 size {res['fp32_bytes'] / 2**20:.4f} MB · tie groups: "
             f"{res['tie_groups'] or 'none'}")
    _print(res, args.json, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: digits CNN, no downloads, no ../shared needed."""
    # lazy: the CLI imports only what the command it runs uses
    from . import api

    api.demo(args.out, args.budget, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
