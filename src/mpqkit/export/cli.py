"""``mpqkit export``: write a quantized model as QDQ ONNX or as a packed file, optionally verified."""
from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch

from ..errors import MpqkitError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to the ``mpqkit`` sub-parsers."""
    from ..cli import _common

    x = subparsers.add_parser("export", help="export a quantized model: QDQ ONNX or bit-packed file")
    _common(x)
    x.add_argument("--plan", required=True, help="plan.json to quantize with")
    x.add_argument("--format", choices=["onnx", "packed"], default="onnx")
    x.add_argument("--out", required=True, help="output file (.onnx, or e.g. .mpqk for packed)")
    x.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21: int4/uint4 types)")
    x.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                   help="packed: keep BatchNorm unfolded (bit-identical logits, larger file)")
    x.add_argument("--check", action="store_true",
                   help="compare the exported model with the PyTorch fake-quant model on --data/--split")
    x.add_argument("--split", default="test", help="split for --check (default test)")
    x.add_argument("--limit", type=int, help="check only the first N images")
    x.add_argument("--batch-size", type=int, default=500, help="batch size for --check")
    return x


def cmd_export(args: argparse.Namespace) -> int:
    from .. import api
    from ..plan import Plan

    bundle = api.load_model(args.model, args.checkpoint, args.models_dir, args.random_init)
    plan = Plan.load(args.plan)
    qmodel = api.apply_plan(bundle, plan, args.data, data_root=args.data_root)
    out: dict[str, Any] = {"model": bundle.name, "plan": args.plan, "format": args.format}
    if args.format == "onnx":
        from .onnx import export_onnx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # widened types are listed in the output below
            rep = export_onnx(qmodel, plan, bundle.input_shape, args.out, opset=args.opset)
        out["export"] = rep.to_dict()
        text = f"ONNX (opset {rep.opset}, {rep.bytes} bytes) written to {rep.path}"
        if rep.widened:
            text += f"\nwidened to the next ONNX integer type: {'; '.join(rep.widened)}"
    else:
        from .packed import save_packed

        prep = save_packed(qmodel, plan, args.out, fold_bn=args.fold_bn)
        out["export"] = prep.to_dict()
        text = (f"packed model ({prep.file_bytes} bytes; ledger weight size {prep.ledger_weight_bytes:.0f} bytes, "
                f"{prep.gap_pct:+.2f} %) written to {prep.path}")
    if args.check:
        data = api.load_split(args.data, args.split, args.data_root, args.limit)
        api.check_compatible(bundle, data)
        res = _check(args, bundle, qmodel, data)
        out["check"] = res
        text += (f"\ncheck on {data.name}/{data.split} ({res['n']} images): top-1 {args.format} "
                 f"{100 * res['top1_export']:.2f} % vs PyTorch {100 * res['top1_torch']:.2f} % "
                 f"({res['top1_diff_pt']:+.2f} pt), max |logit diff| {res['max_abs_logit_diff']:.3g}")
    if args.json:
        import json

        print(json.dumps(out, indent=2, default=str))
    else:
        print(text)
    return 0


def _check(args: argparse.Namespace, bundle: Any, qmodel: torch.nn.Module, data: Any) -> dict[str, Any]:
    if args.format == "onnx":
        from .onnx import check_onnx

        res = check_onnx(args.out, qmodel, data, args.batch_size)
        return {**res, "top1_export": res["top1_onnx"]}
    from .packed import load_packed

    again = load_packed(args.out, bundle)
    return compare_models(again, qmodel, data, args.batch_size)


@torch.inference_mode()
def compare_models(model: torch.nn.Module, ref: torch.nn.Module, data: Any, batch_size: int) -> dict[str, Any]:
    """Top-1 of ``model`` and ``ref`` on ``data``, and how far their logits are apart."""
    from ..quant.apply import model_device

    n = c_model = c_ref = 0
    max_diff = 0.0
    for images, labels in data.batches(batch_size):
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
