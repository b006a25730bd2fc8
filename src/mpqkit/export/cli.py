"""``mpqkit export``: write a quantized model as QDQ ONNX or as a packed file, optionally verified."""
from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

import torch

from ..cli_args import positive_int
from ..errors import MpqkitError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to the ``mpqkit`` sub-parsers."""
    # lazy: the CLI imports only what the command it runs uses
    from ..cli_args import add_settings

    x = subparsers.add_parser("export", help="export a quantized model: QDQ ONNX or bit-packed file")
    add_settings(x)
    src = x.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan.json to quantize with")
    src.add_argument("--quantized", help="a saved quantized model (mpqkit apply --out, mpqkit finetune's model.pt)")
    x.add_argument("--format", choices=["onnx", "packed"], default="onnx",
                   help="onnx: QDQ ONNX checked in onnxruntime (default); packed: bit-packed weights file")
    x.add_argument("--out", required=True, help="output file (.onnx, or e.g. .mpqk for packed)")
    x.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21: int4/uint4 types)")
    x.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                   help="packed: keep BatchNorm unfolded (bit-identical logits, larger file)")
    x.add_argument("--check", action="store_true",
                   help="compare the exported model with the PyTorch fake-quant model on --data/--split")
    x.add_argument("--split", default="test", help="split for --check (default test)")
    x.add_argument("--limit", type=positive_int, help="check only the first N images")
    x.add_argument("--batch-size", type=positive_int, default=500, help="batch size for --check")
    x.add_argument("--tolerance", type=float, default=0.5,
                   help="--check fails (exit 2) when top-1 of the export and of PyTorch differ by more than this "
                        "many points (default %(default)s; one image is 100/N points of an N-image check)")
    x.add_argument("--logit-tolerance", type=float,
                   help="--check also fails when max |logit difference| exceeds this (default: not checked)")
    return x


def _quantized_model(args: argparse.Namespace, settings: Any) -> tuple[Any, Any, Any]:
    """(model bundle, plan, quantized model) from ``--quantized FILE`` or from ``--plan`` applied now."""
    # lazy: the CLI imports only what the command it runs uses
    from .. import api
    from ..plan import Plan

    bundle = api.load_model(args.model, settings)
    if args.quantized:
        qmodel = api.on_device(api.load_quantized(bundle, args.quantized, settings=settings), settings.device)
        return bundle, qmodel.mpqkit_plan, qmodel
    plan = Plan.load(args.plan)
    return bundle, plan, api.apply_plan(bundle, plan, args.data, settings=settings)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a quantized model; with ``--check``, fail (MpqkitError) when it is off by more than the tolerances."""
    # lazy: the CLI imports only what the command it runs uses
    from .. import api
    from ..cli_args import settings_from_args
    from ..fileutil import check_output_file
    from .onnx import export_onnx
    from .packed import save_packed

    for flag, tol in (("--tolerance", args.tolerance), ("--logit-tolerance", args.logit_tolerance)):
        if tol is not None and not tol >= 0:  # NaN too
            raise MpqkitError(f"{flag} must be a number >= 0, got {tol}")
    check_output_file(args.out, "the export file")  # before any work
    settings = settings_from_args(args)
    bundle, plan, qmodel = _quantized_model(args, settings)
    out: dict[str, Any] = {"model": bundle.name, "plan": args.plan or args.quantized, "format": args.format}
    if args.format == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # widened types are listed in the output below
            rep = export_onnx(qmodel, plan, bundle.input_shape, args.out, opset=args.opset,
                              input_dtype=bundle.input_dtype)
        out["export"] = rep.to_dict()
        text = f"ONNX (opset {rep.opset}, {rep.bytes} bytes) written to {rep.path}"
        if rep.widened:
            text += f"\nwidened to the next ONNX integer type: {'; '.join(rep.widened)}"
    else:
        prep = save_packed(qmodel, plan, args.out, fold_bn=args.fold_bn, input_shape=bundle.input_shape)
        out["export"] = prep.to_dict()
        text = (f"packed model ({prep.file_bytes} bytes; ledger weight size {prep.ledger_weight_bytes:.0f} bytes, "
                f"{prep.gap_pct:+.2f} %) written to {prep.path}")
    failures: list[str] = []
    if args.check:
        data = api.load_split(args.data, args.split, settings, args.limit)
        api.check_compatible(bundle, data)
        res = _check(args, bundle, qmodel, data)
        diff, logit_diff, lt = res["top1_diff_pt"], res["max_abs_logit_diff"], args.logit_tolerance
        if abs(diff) > args.tolerance + 1e-9:
            failures.append(f"top-1 of the {args.format} export differs from PyTorch by {diff:+.2f} pt on {res['n']} "
                            f"images, more than --tolerance {args.tolerance:g} pt")
        if lt is not None and not logit_diff <= lt:
            failures.append(f"max |logit difference| {logit_diff:.3g} exceeds --logit-tolerance {lt:g}")
        res.update(tolerance_pt=args.tolerance, logit_tolerance=lt, passed=not failures)
        out["check"] = res
        text += (f"\ncheck on {data.name}/{data.split} ({res['n']} images): top-1 {args.format} "
                 f"{100 * res['top1_export']:.2f} % vs PyTorch {100 * res['top1_torch']:.2f} % "
                 f"({diff:+.2f} pt, tolerance {args.tolerance:g} pt), max |logit diff| {logit_diff:.3g}"
                 + (f" (tolerance {lt:g})" if lt is not None else "") + (": FAILED" if failures else ": passed"))
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(text)
    if failures:
        raise MpqkitError(f"export check failed: {'; '.join(failures)} (the exported file is kept: {args.out})")
    return 0


def _check(args: argparse.Namespace, bundle: Any, qmodel: torch.nn.Module, data: Any) -> dict[str, Any]:
    progress = args.progress  # -q (a settings flag) turns it off
    if args.format == "onnx":
        # lazy: the CLI imports only what the command it runs uses
        from .onnx import check_onnx

        res = check_onnx(args.out, qmodel, data, args.batch_size, progress=progress)
        return {**res, "top1_export": res["top1_onnx"]}
    # lazy: the CLI imports only what the command it runs uses
    from .packed import load_packed

    again = load_packed(args.out, bundle)
    return compare_models(again, qmodel, data, args.batch_size, progress=progress)


@torch.inference_mode()
def compare_models(model: torch.nn.Module, ref: torch.nn.Module, data: Any, batch_size: int,
                   progress: bool = False) -> dict[str, Any]:
    """Top-1 of ``model`` and ``ref`` on ``data``, and how far their logits are apart."""
    # lazy: the CLI imports only what the command it runs uses
    from tqdm.auto import tqdm

    # lazy: the CLI imports only what the command it runs uses
    from ..quant.apply import model_device

    n = c_model = c_ref = 0
    max_diff = 0.0
    for images, labels in tqdm(data.batches(batch_size), total=-(-len(data) // batch_size), desc="check export",
                               unit="batch", disable=not progress, leave=False):
        a, b = model(images).cpu(), ref(images.to(model_device(ref))).cpu()
        max_diff = max(max_diff, float((a - b).abs().max()))
        c_model += int((a.argmax(1) == labels).sum())
        c_ref += int((b.argmax(1) == labels).sum())
        n += len(labels)
    if n == 0:
        raise MpqkitError("the check data is empty")
    return {"n": n, "top1_export": c_model / n, "top1_torch": c_ref / n,
            "top1_diff_pt": 100 * (c_model - c_ref) / n, "max_abs_logit_diff": max_diff,
            "identical": max_diff == 0.0}
