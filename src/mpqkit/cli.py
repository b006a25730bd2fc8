"""The ``mpqkit`` command: demo | search | apply | eval | export | layers. A thin layer over ``mpqkit.api``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import MpqkitError


def _bits_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", default="resnet20", help="resnet20/32/44/56, resnet20-orig, digits-cnn, or a torchvision name")
    p.add_argument("--checkpoint", help="weights file (overrides the models directory)")
    p.add_argument("--random-init", action="store_true", help="use random weights (explicit opt-in)")
    p.add_argument("--models-dir", help="models directory (default $MPQKIT_MODELS, else ../shared/models)")
    if data:
        p.add_argument("--data", default="cifar10", help="cifar10, digits, or an ImageFolder directory")
        p.add_argument("--data-root", help="data root (default $MPQKIT_DATA, else ../shared/data)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _ptq(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("post-training quantizer")
    g.add_argument("--ptq", choices=["minmax", "mse", "adaround", "brecq", "qdrop"],
                   help="minmax/mse: range estimator of weights and activations; adaround (layer-wise), brecq "
                        "(block-wise + LSQ activation steps), qdrop (brecq + QDrop): reconstruct on the "
                        "calibration set (default: the plan's quantizer, MSE ranges, no reconstruction)")
    g.add_argument("--recon-iters", type=int, help="reconstruction iterations per block/layer (default 500)")
    g.add_argument("--recon-batch", type=int, help="reconstruction batch size (default 32)")
    g.add_argument("--qdrop", type=float, help="QDrop probability of keeping an activation fp (qdrop: 0.5)")


def _ptq_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"iters": args.recon_iters, "batch_size": args.recon_batch, "drop": args.qdrop}
    opts = {k: v for k, v in opts.items() if v is not None}
    if opts and args.ptq is None:
        raise MpqkitError("--recon-iters/--recon-batch/--qdrop need --ptq adaround|brecq|qdrop")
    return {"ptq": args.ptq, "recon_options": opts or None, "progress": not args.quiet}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mpqkit", description="Mixed-precision quantization: search, apply, evaluate.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="digits CNN: search (each method) → plan → quantize → eval → report, offline")
    d.add_argument("--out", default="results/demo")
    d.add_argument("--budget", default="avg-bits=3")
    d.add_argument("-q", "--quiet", action="store_true")

    s = sub.add_parser("search", help="search a mixed-precision plan under a budget")
    _common(s)
    s.add_argument("--method", default="eval-delta")
    s.add_argument("--budget", help="e.g. avg-bits=3, size=0.2MB, cr=10, bitops=0.5G, act-mem=64KB (comma = all)")
    s.add_argument("--w-bits", type=int, help="uniform: weight bits; search a: fixed weight bits")
    s.add_argument("--a-bits", type=int, help="activation bits when activations are not searched (default 8)")
    s.add_argument("--search", choices=["w", "a", "wa"], default="w", help="what to search (default weights)")
    s.add_argument("--w-candidates", type=_bits_list, default=[2, 3, 4, 5, 6, 8])
    s.add_argument("--a-candidates", type=_bits_list, default=[4, 6, 8])
    s.add_argument("--fixed", help="comma-separated layers kept at --fixed-bits (default: first and last)")
    s.add_argument("--fixed-bits", type=_bits_list, default=[8, 8], help="w,a bits of fixed layers (default 8,8)")
    s.add_argument("--w-per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    s.add_argument("--w-symmetric", action="store_true", help="symmetric weights (default asymmetric)")
    s.add_argument("--w-range", choices=["mse", "minmax", "percentile"], default="mse")
    s.add_argument("--a-symmetric", action="store_true", help="symmetric activations (default asymmetric)")
    s.add_argument("--a-range", choices=["mse", "minmax", "percentile"], default="mse")
    s.add_argument("--calib-size", "--sens-samples", dest="calib_size", type=int, default=1024,
                   help="calibration / sensitivity set size (train images, fixed seed)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--time-limit", type=float, default=60.0, help="solver time limit, seconds")
    s.add_argument("--alpha", type=float, default=1.0, help="weight of activation scores in the ILP")
    s.add_argument("--out", help="results directory, or a .json path for the plan (results beside it)")
    iq = s.add_argument_group("infoq")
    iq.add_argument("--infoq-target", choices=["labels", "input"], help="SMI against labels or input embedding")
    iq.add_argument("--observers", help="'all' later layers (default) or 'last-K'")
    iq.add_argument("--projections", type=int, help="random projections K for sliced MI (default 128)")
    iq.add_argument("--mi-estimator", choices=["knn", "binned"], help="1-D MI estimator for labels (default knn)")
    cl = s.add_argument_group("clado")
    cl.add_argument("--clado-act-bits", help="activation bits of every layer during CLADO probes (default 8; 'fp')")
    cl.add_argument("--workers", type=int, help="clado, eval-delta: run probes in N parallel workers (shared cache)")
    cl.add_argument("--runner", choices=["local", "ray"], help="where --workers run: local processes (default) or Ray")
    cl.add_argument("--address", help="Ray cluster address (e.g. auto, ray://head:10001); default: a local Ray")
    cl.add_argument("--psd", choices=["project", "shift", "none"],
                    help="G treatment: eigenvalue projection (default), exact diagonal shift, or none")
    mq = s.add_argument_group("mixquant")
    mq.add_argument("--qem", type=float, help="quantization error multiplier (default: bisected to the budget)")
    mq.add_argument("--bref", type=int, help="reference bits of the QE rule (default 8)")
    sp = s.add_argument_group("smpq / dmpq (one cached supernet run serves both)")
    sp.add_argument("--preset", choices=["quick", "full"], help="quick (CPU: 10k train images, 6 epochs, default) "
                    "or full (GPU: 50k images, 30 epochs)")
    sp.add_argument("--train-size", type=int, help="train images for the supernet (half weights, half α)")
    sp.add_argument("--epochs", type=int, help="supernet epochs (the first --warmup train weights only)")
    sp.add_argument("--warmup", type=int, help="warm-up epochs")
    sp.add_argument("--permutations", type=int, help="Monte-Carlo Shapley permutations per epoch (default 10)")
    sp.add_argument("--select", choices=["argmax", "ilp"], help="argmax α per layer (default; the ILP only when "
                    "over budget) or always the ILP on the method's costs (plans that fill the budget)")
    sp.add_argument("--lam", type=float, help="weight of the expected-bits penalty in the α loss (default 0.5)")
    bl = s.add_argument_group("baselines")
    bl.add_argument("--max-drop", type=float, help="greedy: accuracy drop target, points on the calibration set (default 1.0)")
    bl.add_argument("--hawq-samples", type=int, help="hawq: calibration images in the Hessian products (default 256)")
    bl.add_argument("--hawq-iters", type=int, help="hawq: maximum Hutchinson iterations (default 200)")
    bl.add_argument("--hawq-tol", type=float, help="hawq: stop when the running means change by less (default 1e-2)")
    s.add_argument("--cache-dir", help="probe cache (default $MPQKIT_CACHE, else ~/.cache/mpqkit)")
    s.add_argument("--no-cache", action="store_true")
    s.add_argument("--batch-size", type=int, help="probe batch size (default: ~16 MB for the largest layer input)")
    s.add_argument("--eval", dest="eval_split", choices=["test", "exact", "train"],
                   help="evaluate the plan on this split after the search")
    _ptq(s)

    a = sub.add_parser("apply", help="quantize a model with a plan and save it")
    _common(a)
    a.add_argument("--plan", required=True)
    a.add_argument("--out", required=True, help="output file (.pt): quantized state dict + plan")
    _ptq(a)

    e = sub.add_parser("eval", help="top-1 of the fp model or of a plan on a split")
    _common(e)
    e.add_argument("--split", default="test", help="test | exact | train (cifar10); train | test (digits)")
    e.add_argument("--plan", help="plan.json to apply first")
    e.add_argument("--limit", type=int, help="evaluate only the first N images")
    _ptq(e)

    for name, help_ in (("sweep", "one method over many budgets from one sensitivity: frontier CSV + PNG"),
                        ("bench", "methods × budgets × PTQ backends: results.csv, pareto.png, report.html")):
        b = sub.add_parser(name, help=help_)
        _common(b)
        if name == "sweep":
            b.add_argument("--method", required=True)
        else:
            b.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (every registered)")
        b.add_argument("--budgets", required=True, help="key=start:stop:step (e.g. avg-bits=2.5:4:0.25) or "
                       "budgets separated by ';'")
        b.add_argument("--ptq", default="default" if name == "sweep" else "default,brecq",
                       help="comma-separated PTQ backends: default (the plan's quantizer), minmax, mse, adaround, "
                            "brecq, qdrop")
        b.add_argument("--recon-iters", type=int, help="reconstruction iterations per unit (default 500)")
        b.add_argument("--w-candidates", type=_bits_list, default=[2, 3, 4, 5, 6, 8])
        b.add_argument("--calib-size", type=int, default=1024)
        b.add_argument("--time-limit", type=float, default=60.0)
        b.add_argument("--splits", default="test,exact", help="evaluation splits (default test,exact)")
        b.add_argument("--out", required=True, help="results directory (rerun to resume)")
    x = sub.add_parser("proxies", help="rank correlation of each method's sensitivity with the true single-layer "
                                       "top-1 drop on the test split (table + scatter PNG)")
    _common(x)
    x.add_argument("--methods", help="comma-separated (default: eval-delta,hawq,mpqco,mixquant,mixquant-ilp,infoq)")
    x.add_argument("--w-candidates", type=_bits_list, default=[2, 3, 4, 5, 6, 8])
    x.add_argument("--calib-size", type=int, default=1024)
    x.add_argument("--out", help="results directory (default results/proxies-MODEL; a bench directory adds it to "
                                 "its report.html)")
    r = sub.add_parser("report", help="rewrite the outputs of bench/sweep directories; optionally one Markdown file")
    r.add_argument("dirs", nargs="+", help="bench or sweep results directories")
    r.add_argument("--markdown", help="write the tables of all directories into this Markdown file")
    r.add_argument("-q", "--quiet", action="store_true")

    g = sub.add_parser("layers", help="list quantizable layers, costs and tie groups")
    _common(g, data=False)

    from .export.cli import add_parser as add_export_parser

    add_export_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s")
    from .export.cli import cmd_export

    try:
        return {"demo": cmd_demo, "search": cmd_search, "apply": cmd_apply, "eval": cmd_eval,
                "layers": cmd_layers, "export": cmd_export, "sweep": cmd_bench, "bench": cmd_bench,
                "report": cmd_report, "proxies": cmd_proxies}[args.command](args)
    except MpqkitError as e:
        print(f"mpqkit: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("mpqkit: interrupted (cached probes are kept; rerun to resume)", file=sys.stderr)
        return 130


def _print(obj: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else text)


def _out_paths(out: str | None) -> tuple[Path | None, Path | None]:
    """(results dir, extra plan path): ``--out plan.json`` writes the plan there, results beside it."""
    if out is None:
        return None, None
    p = Path(out)
    if p.suffix == ".json":
        return p.with_name(p.stem + "-results"), p
    return p, None


def cmd_search(args: argparse.Namespace) -> int:
    from . import api
    from .quant.config import QuantConfig

    qconfig = QuantConfig(w_per_channel=not args.w_per_tensor, w_symmetric=args.w_symmetric, w_range=args.w_range,
                          a_symmetric=args.a_symmetric, a_range=args.a_range)
    results_dir, plan_path = _out_paths(args.out)
    ptq_kw = _ptq_kwargs(args)  # checked before any work
    if not args.eval_split and ptq_kw["ptq"] is not None:
        raise MpqkitError("--ptq applies to the evaluation: add --eval test (or use mpqkit apply/eval --plan)")
    fixed = None if args.fixed is None else [f for f in args.fixed.split(",") if f]
    if len(args.fixed_bits) != 2:
        raise MpqkitError("--fixed-bits takes two integers: w,a")
    res = api.search(args.model, args.data, args.budget, args.method, w_bits=args.w_bits, a_bits=args.a_bits,
                     search=args.search, w_candidates=args.w_candidates, a_candidates=args.a_candidates,
                     fixed=fixed, fixed_bits=tuple(args.fixed_bits), calib_size=args.calib_size, seed=args.seed, qconfig=qconfig,
                     time_limit=args.time_limit, alpha=args.alpha, out=results_dir, checkpoint=args.checkpoint,
                     data_root=args.data_root, models_dir=args.models_dir,
                     engine_options={"cache_dir": args.cache_dir, "use_cache": not args.no_cache,
                                     "batch_size": args.batch_size},
                     method_options=_method_options(args), progress=not args.quiet, device=args.device)
    if plan_path is not None:
        res.plan.save(plan_path)
    out: dict[str, Any] = {"plan": str(plan_path or (results_dir / "plan.json" if results_dir else "")),
                           "results_dir": str(results_dir) if results_dir else None,
                           "costs": res.plan.costs, "solver": res.solution.to_dict(), "seconds": res.seconds,
                           "bits": {f: [lq.w_bits, lq.a_bits] for f, lq in res.plan.layers.items()}}
    if args.eval_split:
        ev = api.evaluate(args.model, args.data, args.eval_split, res.plan, checkpoint=args.checkpoint,
                          data_root=args.data_root, models_dir=args.models_dir, device=args.device, **ptq_kw)
        out["eval"] = ev
    c = res.plan.costs
    text = (f"method {args.method} · budget {args.budget} · {c['weight_mb']:.4f} MB (cr {c['compression']:.2f}) · "
            f"avg w-bits {c['avg_w_bits_searched']:.3f} · {c['bitops'] / 1e9:.4f} GBitOps\n"
            f"solver {res.solution.solver}: {res.solution.status}"
            + (f" (gap {res.solution.gap:.2e})" if res.solution.gap is not None else "")
            + f" in {res.solution.seconds:.2f}s · search {res.seconds['total']:.1f}s\n"
            + "bits (w/a): " + " ".join(f"{f}={lq.w_bits}/{lq.a_bits}" for f, lq in res.plan.layers.items()))
    if "eval" in out:
        text += f"\ntop-1 on {args.data}/{args.eval_split}: {100 * out['eval']['top1']:.2f} %"
    if out["plan"]:
        text += f"\nplan written to {out['plan']}"
    if results_dir:
        text += f"; results (per-layer table, bits chart, sensitivities) in {results_dir}/"
    _print(out, args.json, text)
    return 0


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Method-specific flags that were given (methods ignore the options that are not theirs)."""
    given = {"target": args.infoq_target, "observers": args.observers, "projections": args.projections,
             "estimator": args.mi_estimator, "qem": args.qem, "bref": args.bref,
             "act_bits": args.clado_act_bits, "psd": args.psd, "workers": args.workers, "runner": args.runner, "address": args.address, "max_drop": args.max_drop,
             "hawq_samples": args.hawq_samples, "max_iter": args.hawq_iters, "tol": args.hawq_tol,
             "preset": args.preset, "train_size": args.train_size, "epochs": args.epochs, "warmup": args.warmup,
             "permutations": args.permutations, "lam": args.lam, "select": args.select}
    return {k: v for k, v in given.items() if v is not None}


def cmd_apply(args: argparse.Namespace) -> int:
    from . import api
    from .plan import Plan

    plan = Plan.load(args.plan)
    qmodel = api.apply_plan(args.model, plan, args.data, checkpoint=args.checkpoint, data_root=args.data_root,
                            models_dir=args.models_dir, device=args.device, **_ptq_kwargs(args))
    out = api.save_quantized(qmodel, plan, args.out)
    _print({"out": str(out)}, args.json, f"quantized model written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import api

    ptq = _ptq_kwargs(args)
    if args.plan is None and ptq["ptq"] is not None:
        raise MpqkitError("--ptq needs --plan (there is nothing to quantize in the fp model)")
    kw = ptq if args.plan else {"progress": ptq["progress"]}
    res = api.evaluate(args.model, args.data, args.split, args.plan, limit=args.limit, checkpoint=args.checkpoint,
                       data_root=args.data_root, models_dir=args.models_dir, device=args.device, **kw)
    _print(res, args.json, f"{res['model']} on {res['data']}/{res['split']} ({res['n']} images)"
           + (f" with plan {args.plan}" + (f" (ptq {args.ptq})" if args.ptq else "") if args.plan else " fp32")
           + f": top-1 {100 * res['top1']:.2f} %, loss {res['loss']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``sweep`` (one method) and ``bench`` (many) share the loop in ``report/bench.py``."""
    from .budget import expand_budgets
    from .quant.brecq import PTQ_BACKENDS
    from .report.bench import bench_title, run_bench, write_outputs
    from .sensitivity import METHODS
    from .zoo.models import get_model

    budgets = expand_budgets(args.budgets)
    if args.command == "sweep":
        methods = [METHODS.get(args.method).name]
    else:
        methods = METHODS.names() if args.methods == "all" else [METHODS.get(m.strip()).name
                                                                 for m in args.methods.split(",") if m.strip()]
    ptqs: list[str | None] = []
    for p in (t.strip() for t in args.ptq.split(",") if t.strip()):
        if p != "default" and p not in PTQ_BACKENDS:
            raise MpqkitError(f"unknown PTQ backend '{p}', expected default or one of {sorted(PTQ_BACKENDS)}")
        ptqs.append(None if p == "default" else p)
    out = Path(args.out)
    _check_writable(out)
    model = get_model(args.model, checkpoint=args.checkpoint, models_dir=args.models_dir,
                      random_init=args.random_init)
    search_kwargs = {"w_candidates": args.w_candidates, "calib_size": args.calib_size, "time_limit": args.time_limit,
                     "data_root": args.data_root, "device": args.device}
    rows = run_bench(model, args.data, methods, budgets, ptqs, out,
                     splits=[s for s in args.splits.split(",") if s], search_kwargs=search_kwargs,
                     recon_options={"iters": args.recon_iters} if args.recon_iters else None,
                     progress=not args.quiet)
    title = bench_title(f"{model.name} / {args.data}", rows)
    paths = write_outputs(rows, out, title)
    text = (paths["md"].read_text() + f"\nwritten: {paths['csv']}, {paths['pareto']}, {paths['html']}")
    _print({"rows": rows, "files": {k: str(v) for k, v in paths.items()}}, args.json, text)
    return 0


def _check_writable(out: Path) -> None:
    """Fail before any measurement when the results directory cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mpqkit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MpqkitError(f"results directory {out} is not writable: {e.strerror or e}") from None


def cmd_proxies(args: argparse.Namespace) -> int:
    from .report.proxies import DEFAULT_METHODS, proxy_report
    from .sensitivity import METHODS

    methods = DEFAULT_METHODS if not args.methods else [METHODS.get(m.strip()).name for m in args.methods.split(",")
                                                        if m.strip()]
    out = Path(args.out or f"results/proxies-{args.model}")
    _check_writable(out)
    res = proxy_report(args.model, args.data, out, methods, args.w_candidates, args.calib_size,
                       data_root=args.data_root, progress=not args.quiet)
    text = (out / "proxies.md").read_text() + f"\nwritten: {out}/proxies.json, proxies.csv, proxies.png"
    _print({"correlations": res["correlations"], "out": str(out)}, args.json, text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .plan import atomic_write_text
    from .report.bench import _load_rows, bench_title, write_outputs

    md = []
    for d in args.dirs:
        rows = _load_rows(Path(d) / "rows.jsonl")
        if not rows:
            raise MpqkitError(f"{d} has no rows.jsonl: not a bench or sweep results directory")
        title = bench_title(_bench_prefix(Path(d), rows), rows)
        paths = write_outputs(rows, Path(d), title)
        md.append(paths["md"].read_text())
        if (Path(d) / "proxies.md").exists():  # written by mpqkit proxies into the same directory
            md.append((Path(d) / "proxies.md").read_text())
        print(f"{d}: {len(rows)} rows → {paths['html']}")
    if args.markdown:
        head = ("# Results\n\nGenerated by `mpqkit report " + " ".join(args.dirs) + f" --markdown {args.markdown}` "
                "from the rows `mpqkit bench` measured (and `mpqkit proxies`, where run). Top-1 in %; "
                "accuracy on this machine's CIFAR-10 copy is ~6 points below published numbers (JPEG pixels). "
                "'search s' is the wall time of the search call in that run: a method's first budget includes "
                "measuring its sensitivity, later budgets reuse it and only solve; probes already in the disk cache from an earlier run are read, "
                "not measured, so a cached method shows a fraction of a second.\n\n")
        atomic_write_text(Path(args.markdown), head + "\n".join(md))
        print(f"tables written to {args.markdown}")
    return 0


def _bench_prefix(d: Path, rows: list[dict]) -> str:
    """'<model> / <data>' of a results directory: from title.txt, else (a run stopped before writing
    it) from the first readable plan of its rows, else the directory name."""
    if (d / "title.txt").exists():
        return (d / "title.txt").read_text().strip().split(":")[0]
    for r in rows:
        try:
            plan = json.loads(Path(r["plan"]).read_text())
            return f"{plan['model']['name']} / {plan['provenance']['data']}"
        except (KeyError, TypeError, OSError, ValueError):
            continue
    return d.name


def cmd_layers(args: argparse.Namespace) -> int:
    from .api import load_model
    from .budget import Ledger
    from .graph import discover

    bundle = load_model(args.model, args.checkpoint, args.models_dir, args.random_init)
    graph = discover(bundle.model, bundle.input_shape)
    rows = [{"layer": l.fqn, "kind": l.kind, "weight_numel": l.weight_numel, "macs": l.macs,
             "in_shape": list(l.in_shape)} for l in graph.layers]
    ledger = Ledger(graph)
    text = "\n".join(f"{r['layer']:<28} {r['kind']:<6} {r['weight_numel']:>9} params {r['macs']:>12} MACs  in {r['in_shape']}"
                     for r in rows)
    text += f"\n{len(rows)} layers · fp32 size {ledger.fp32_bytes / 2**20:.4f} MB · tie groups: {graph.tie_groups or 'none'}"
    _print({"layers": rows, "tie_groups": graph.tie_groups, "fp32_bytes": ledger.fp32_bytes}, args.json, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: digits CNN, no downloads, no ../shared needed."""
    from . import api
    from .plan import atomic_write_text

    t0 = time.perf_counter()
    out = Path(args.out)
    model, data = "digits-cnn", "digits"
    fp = api.evaluate(model, data, "test")
    print(f"[demo] {model} fp32 top-1 on digits/test ({fp['n']} images): {100 * fp['top1']:.2f} %")
    rows = [("fp32", "-", 32.0, fp["top1"], None)]
    runs = [("eval-delta", "eval-delta", {}), ("infoq", "infoq", {"method_options": {"projections": 32}}),
            ("clado", "clado", {"w_candidates": (2, 4, 8), "time_limit": 10}),
            ("mixquant", "mixquant", {}), ("uniform", "uniform", {})]
    for label, method, kw in runs:
        res = api.search(model, data, args.budget, method, calib_size=512, out=out / label,
                         progress=not args.quiet, **kw)
        ev = api.evaluate(model, data, "test", res.plan)
        c = res.plan.costs
        rows.append((label, args.budget, c["avg_w_bits_searched"], ev["top1"], c["weight_mb"] * 2**20 / 1024))
        bits = " ".join(str(lq.w_bits) for lq in res.plan.layers.values())
        print(f"[demo] {label:<10} {args.budget}: w-bits per layer [{bits}] · {c['weight_bytes'] / 1024:.2f} KB · "
              f"top-1 {100 * ev['top1']:.2f} % · search {res.seconds['total']:.1f}s → {out / label}")
    lines = ["| plan | budget | avg w-bits (searched) | weight KB | top-1 digits/test |", "|---|---|---:|---:|---:|"]
    for label, budget, avg, top1, kb in rows:
        lines.append(f"| {label} | {budget} | {avg:.3f} | {'' if kb is None else f'{kb:.2f}'} | {100 * top1:.2f} % |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[demo] done in {time.perf_counter() - t0:.1f}s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
