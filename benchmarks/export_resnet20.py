"""Deployable output on ResNet-20 (issue-7 figures): ONNX QDQ and packed files vs the ledger.

    .venv/bin/python benchmarks/export_resnet20.py [--out benchmarks/results/export_resnet20]

For eval-delta plans at avg-bits 4 and 3: export to ONNX (checked in onnxruntime on the 10k test
split against the PyTorch fake-quant model) and to packed files (BN folded, the default; and
unfolded, bit-exact), with file sizes next to the ledger's weight size. Then a torchvision
MobileNetV2 (random weights, uniform W8A8) exports and runs: a structural check.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import mpqkit
from mpqkit.api import load_model, load_split
from mpqkit.export import check_onnx, export_onnx, load_packed, save_packed
from mpqkit.export.cli import compare_models
from mpqkit.plan import atomic_write_text
from mpqkit.zoo.data import LabeledData
from mpqkit.quant.config import QuantConfig

# measured with nearest rounding, before GPTQ became the default quantizer: pinned, so a rerun reproduces it
NEAREST = QuantConfig(rounding="nearest")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/export_resnet20")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="cifar10")
    args = ap.parse_args(argv)
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="export-bench-"))
    bundle = load_model(args.model)
    test = load_split(args.data, "test")
    rows = []
    for bits in (4, 3):
        plan = mpqkit.search(bundle, args.data, f"avg-bits={bits}", "eval-delta", progress=False, qconfig=NEAREST).plan
        q = mpqkit.apply_plan(bundle, plan, args.data)
        onnx_rep = export_onnx(q, plan, bundle.input_shape, tmp / f"r20_{bits}.onnx")
        onnx_chk = check_onnx(onnx_rep.path, q, test)
        row = {"plan": f"eval-delta avg-bits={bits}", "top1_torch": 100 * onnx_chk["top1_torch"],
               "top1_onnx": 100 * onnx_chk["top1_onnx"], "onnx_max_logit_diff": onnx_chk["max_abs_logit_diff"],
               "onnx_bytes": onnx_rep.bytes}
        for fold in (True, False):
            rep = save_packed(q, plan, tmp / f"r20_{bits}_{fold}.mpqk", fold_bn=fold, input_shape=bundle.input_shape)
            chk = compare_models(load_packed(rep.path, bundle), q, test, 500)
            tag = "packed_folded" if fold else "packed_exact"
            row.update({f"{tag}_bytes": rep.file_bytes, f"{tag}_gap_pct": rep.gap_pct,
                        f"{tag}_top1": 100 * chk["top1_export"], f"{tag}_max_logit_diff": chk["max_abs_logit_diff"]})
            row["ledger_bytes"] = rep.ledger_weight_bytes
        rows.append(row)
        print(json.dumps(row), flush=True)

    mb = load_model("mobilenet_v2", random_init=True)
    torch.manual_seed(0)
    imgs = LabeledData(torch.randn(8, 3, 224, 224), torch.zeros(8, dtype=torch.long), "random", "train", 1000)
    plan = mpqkit.search(mb, imgs, None, "uniform", w_bits=8, a_bits=8, calib_size=8, progress=False, qconfig=NEAREST).plan
    q = mpqkit.apply_plan(mb, plan, imgs)
    rep = export_onnx(q, plan, mb.input_shape, tmp / "mbv2.onnx")
    chk = check_onnx(rep.path, q, imgs, batch_size=8)
    mbv2 = {"layers": len(plan.layers), "onnx_bytes": rep.bytes, "argmax_agreement": chk.get("argmax_agreement"),
            "max_abs_logit_diff": chk["max_abs_logit_diff"]}
    print(json.dumps({"mobilenet_v2": mbv2}), flush=True)

    name = "ResNet-20" if args.model == "resnet20" else args.model
    n_test = "10k" if len(test) == 10_000 else f"{len(test):,}-image"
    lines = [f"# Export of {name} plans ({n_test} test split) and a MobileNetV2 structural check", "",
             "Produced by `.venv/bin/python benchmarks/export_resnet20.py`.", "",
             "| plan | top-1 PyTorch | top-1 ONNX | ONNX max logit diff | ONNX bytes | ledger bytes | packed (BN folded) "
             "bytes | gap % | top-1 | packed (exact) bytes | gap % | max logit diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['top1_torch']:.2f} | {r['top1_onnx']:.2f} | {r['onnx_max_logit_diff']:.3g} | "
                     f"{r['onnx_bytes']} | {r['ledger_bytes']:.0f} | {r['packed_folded_bytes']} | "
                     f"{r['packed_folded_gap_pct']:+.2f} | {r['packed_folded_top1']:.2f} | {r['packed_exact_bytes']} | "
                     f"{r['packed_exact_gap_pct']:+.2f} | {r['packed_exact_max_logit_diff']:.3g} |")
    lines += ["", f"MobileNetV2 (random weights, uniform W8A8, 224×224): {json.dumps(mbv2)}"]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "mobilenet_v2": mbv2}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
