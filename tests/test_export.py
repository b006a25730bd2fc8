"""Export: bit packing, QDQ ONNX checked in onnxruntime, packed-file round trip, the CLI command."""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpqkit
from mpqkit.api import load_model, load_split
from mpqkit.budget import Ledger
from mpqkit.errors import CheckpointError, MpqkitError, PlanError
from mpqkit.export import check_onnx, export_onnx, load_packed, pack_bits, save_packed, unpack_bits
from mpqkit.export.onnx import container, quant_layers
from mpqkit.graph import discover
from mpqkit.plan import LayerQuant, Plan
from mpqkit.quant.primitives import quantize
from mpqkit.zoo.data import LabeledData

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402

SHAPE = (1, 8, 8)  # digits-cnn input


# ------------------------------------------------------------------ bit packing
@settings(max_examples=20, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    values = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70)), dtype=np.int64)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-values.size * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, values.size), values)


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_every_width_full_range(bits):
    values = np.arange(2**bits, dtype=np.int64)[::max(1, 2**bits // 997)]
    assert np.array_equal(unpack_bits(pack_bits(values, bits), bits, values.size), values)


def test_pack_bit_order_is_little_endian():
    assert pack_bits(np.array([5, 3]), 3).tolist() == [0b011101]  # 5 = 101, 3 = 011, LSB first
    assert pack_bits(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(np.array([0x1234]), 16).tolist() == [0x34, 0x12]
    with pytest.raises(ValueError, match="values must be in"):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(np.array([0]), 17)


# ------------------------------------------------------------------ digits CNN
@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    plan = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", calib_size=256, progress=False).plan
    qmodel = mpqkit.apply_plan("digits-cnn", plan, "digits")
    return plan, qmodel, load_split("digits", "test")


def odd_plan(base: Plan) -> Plan:
    """a_bits 4 and 3, w_bits 2/3/5, one symmetric and one per-tensor layer: every container path."""
    layers = {"conv1": LayerQuant(8, 8), "conv2": LayerQuant(2, 4), "conv3": LayerQuant(3, 3, w_symmetric=True),
              "fc": LayerQuant(5, 4, w_granularity="per_tensor")}
    return Plan(layers=layers, model_name=base.model_name, model_sha256=base.model_sha256,
                method="manual", method_params=base.method_params, provenance=base.provenance)


def initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.filterwarnings("ignore:ONNX has no integer type")
def test_onnx_digits_matches_pytorch(digits, tmp_path):
    plan, qmodel, data = digits
    path = tmp_path / "digits.onnx"
    rep = export_onnx(qmodel, plan, (1, 8, 8), path)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 2 * len(plan.layers) and ops.count("QuantizeLinear") == len(plan.layers)
    inits = initializers(path)
    for fqn, m in quant_layers(qmodel).items():
        assert f"{fqn}.weight" not in inits  # no float copy of a quantized weight
        codes = quantize(m.weight, m.w_scale, m.w_zero_point, *m._w_range)
        stored = numpy_helper.to_array(inits[f"{fqn}.weight_quantized"]).astype(np.int64)
        assert np.array_equal(stored, codes.to(torch.int64).numpy())  # mpqkit's own integer codes
    assert rep.weight_types["conv1"] == "UINT8"
    res = check_onnx(path, qmodel, data, batch_size=250)
    assert res["top1_onnx"] == res["top1_torch"] and abs(res["top1_diff_pt"]) <= 0.1
    assert res["argmax_agreement"] == 1.0
    assert res["max_abs_logit_diff"] < 0.05  # float summation order; a rare activation code one step off
    assert res["session_options"]["intra_op_num_threads"] == 1


def test_onnx_odd_bits_use_4_bit_types_and_warn(digits, tmp_path):
    plan = odd_plan(digits[0])
    qmodel = mpqkit.apply_plan("digits-cnn", plan, "digits")
    path = tmp_path / "odd.onnx"
    with pytest.warns(UserWarning, match="conv2 weight 2-bit -> UINT4") as rec:
        rep = export_onnx(qmodel, plan, (1, 8, 8), path)
    msg = str(rec[0].message)
    assert all(s in msg for s in ("conv3 weight 3-bit -> INT4", "fc weight 5-bit -> UINT8", "conv3 act 3-bit -> UINT4"))
    inits = initializers(path)
    assert inits["conv2.weight_quantized"].data_type == TensorProto.UINT4
    assert inits["conv2.input_zero_point"].data_type == TensorProto.UINT4
    assert inits["conv3.weight_quantized"].data_type == TensorProto.INT4
    assert inits["fc.weight_quantized"].data_type == TensorProto.UINT8
    assert inits["fc.weight_scale"].dims == []  # per tensor
    w = numpy_helper.to_array(inits["conv2.weight_quantized"]).astype(np.int64)
    assert 0 <= w.min() and w.max() <= 3  # stored integers stay in the plan's 2-bit range
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Clip") == 1  # conv3's 3-bit input
    assert rep.act_types["conv2"] == "UINT4"
    res = check_onnx(path, qmodel, digits[2], batch_size=500)
    assert res["argmax_agreement"] >= 0.99 and abs(res["top1_diff_pt"]) <= 0.5


def test_container_choice():
    assert container(0, 255, 21)[0] == 8 and container(-8, 7, 21)[0] == 4 and container(0, 4095, 21)[0] == 16
    assert container(0, 15, 13)[0] == 8  # no 4-bit types before opset 21
    with pytest.raises(MpqkitError, match="opset 21"):
        container(0, 4095, 13)


# ------------------------------------------------------------------ packed file
@pytest.mark.parametrize("which", ["searched", "odd"])
def test_packed_round_trip_identical(digits, tmp_path, which):
    """Unfolded (fold_bn=False): bit-identical logits; the bytes are the ledger plus qparams/stats/header."""
    plan, qmodel, data = digits
    if which == "odd":
        plan = odd_plan(plan)
        qmodel = mpqkit.apply_plan("digits-cnn", plan, "digits")
    rep = save_packed(qmodel, plan, tmp_path / "m.mpqk", fold_bn=False, input_shape=SHAPE)
    assert rep.file_bytes == rep.weights + rep.params + rep.qparams + rep.buffers + rep.header
    bundle = load_model("digits-cnn")
    ledger = Ledger(discover(bundle.model, bundle.input_shape)).summary(plan.assignment())["weight_bytes"]
    assert rep.ledger_weight_bytes == pytest.approx(ledger)
    assert rep.weights + rep.params - ledger < len(plan.layers)  # only per-layer byte rounding
    again = load_packed(rep.path, "digits-cnn")
    with torch.inference_mode():
        assert torch.equal(again(data.images), qmodel(data.images))


@pytest.mark.parametrize("which", ["searched", "odd"])
def test_packed_bn_folded(digits, tmp_path, which):
    """Folded (default): no BN left, integer codes unchanged, the same predictions, and the stored
    parameters are the ledger's size (scale + bias replace BN weight + bias)."""
    plan, qmodel, data = digits
    if which == "odd":
        plan = odd_plan(plan)
        qmodel = mpqkit.apply_plan("digits-cnn", plan, "digits")
    rep = save_packed(qmodel, plan, tmp_path / "m.mpqk", input_shape=SHAPE)
    assert rep.folded_bn == 3 and rep.buffers == 0  # conv1/2/3 → bn1/2/3: no running statistics stored
    again = load_packed(rep.path, "digits-cnn")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in again.modules())
    with torch.inference_mode():
        a, b = again(data.images), qmodel(data.images)
    # BN inside the weights rounds differently; now and then that moves a downstream activation code
    # by one step, so logits agree closely on average, not bit for bit
    assert (a - b).abs().mean() < 1e-3
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99
    w_scale_bytes = sum(m.w_scale.numel() * 4 for m in again.modules() if getattr(m, "w_spec", None) is not None)
    assert rep.weights + rep.params + w_scale_bytes - rep.ledger_weight_bytes < 4 * 10 + len(plan.layers)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_packed_sizes_are_the_ledgers(digits, tmp_path, monkeypatch, fold_bn):
    """The report's ledger figures are budget.Ledger's (not a copy of its formula), per layer and in total;
    each layer's packed weight is the ledger's size rounded up to whole bytes."""
    plan = odd_plan(digits[0])
    qmodel = mpqkit.apply_plan("digits-cnn", plan, "digits")
    bundle = load_model("digits-cnn")
    ledger, a = Ledger(discover(bundle.model, bundle.input_shape)), plan.assignment()
    rep = save_packed(qmodel, plan, tmp_path / "m.mpqk", fold_bn=fold_bn, input_shape=SHAPE)
    assert rep.ledger_weight_bytes == ledger.summary(a)["weight_bytes"]
    assert set(rep.layer_bytes) == set(rep.ledger_layer_bytes) == set(plan.layers)
    for fqn in plan.layers:
        assert rep.ledger_layer_bytes[fqn] == ledger.layer_cost("size", fqn, *a[fqn])
        assert rep.layer_bytes[fqn] == math.ceil(rep.ledger_layer_bytes[fqn])
    assert sum(rep.layer_bytes.values()) == rep.weights
    assert rep.to_dict()["gap_pct"] == pytest.approx(100 * (rep.file_bytes / rep.ledger_weight_bytes - 1))
    # a change of the ledger's cost model shows up in the report: there is no second formula in export/
    orig = Ledger.layer_cost
    monkeypatch.setattr(Ledger, "layer_cost", lambda self, m, *args: 2 * orig(self, m, *args))
    doubled = save_packed(qmodel, plan, tmp_path / "m2.mpqk", fold_bn=fold_bn, input_shape=SHAPE)
    assert doubled.ledger_layer_bytes == {f: 2 * v for f, v in rep.ledger_layer_bytes.items()}
    assert doubled.ledger_weight_bytes == pytest.approx(2 * rep.ledger_weight_bytes - ledger.constant("size"))


def test_packed_refuses_a_plan_the_model_is_not_quantized_with(digits, tmp_path):
    plan, qmodel, _ = digits
    with pytest.raises(PlanError, match="not quantized with this plan.*conv2"):
        save_packed(qmodel, odd_plan(plan), tmp_path / "m.mpqk", input_shape=SHAPE)
    assert not (tmp_path / "m.mpqk").exists()


class _HalfWrite:
    """A file object whose ``write`` stores half of the bytes, then fails as on a full disk."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device")


class _FailingWrites:
    """Stands in for ``os`` in mpqkit.fileutil: files opened by fd fail half-way through a write."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fdopen(fd, *args, **kwargs):
        return _HalfWrite(os.fdopen(fd, *args, **kwargs))


@pytest.mark.filterwarnings("ignore:ONNX has no integer type")
@pytest.mark.parametrize("fmt", ["onnx", "packed"])
@pytest.mark.parametrize("earlier", [False, True])
def test_failed_write_leaves_no_partial_file(digits, tmp_path, monkeypatch, fmt, earlier):
    """A write that fails half-way leaves nothing at the path (or the earlier file untouched), and no temp file."""
    import mpqkit.fileutil

    plan, qmodel, _ = digits
    path = tmp_path / f"m.{fmt}"
    if earlier:
        path.write_bytes(b"earlier export")
    monkeypatch.setattr(mpqkit.fileutil, "os", _FailingWrites())
    with pytest.raises(OSError, match="No space left"):
        if fmt == "onnx":
            export_onnx(qmodel, plan, SHAPE, path)
        else:
            save_packed(qmodel, plan, path, input_shape=SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([path.name] if earlier else [])
    if earlier:
        assert path.read_bytes() == b"earlier export"
    monkeypatch.undo()  # the same write without the failure replaces the file
    if fmt == "onnx":
        assert export_onnx(qmodel, plan, SHAPE, path).bytes == path.stat().st_size
    else:
        assert save_packed(qmodel, plan, path, input_shape=SHAPE).file_bytes == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_packed_rejects_corrupt_and_other_model(digits, tmp_path):
    plan, qmodel, _ = digits
    path = save_packed(qmodel, plan, tmp_path / "m.mpqk", input_shape=SHAPE).path
    (tmp_path / "bad.mpqk").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="not an mpqkit packed model file"):
        load_packed(tmp_path / "bad.mpqk", "digits-cnn")
    (tmp_path / "short.mpqk").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_packed(tmp_path / "short.mpqk", "digits-cnn")
    with pytest.raises(MpqkitError):
        load_packed(path, "resnet20")


# ------------------------------------------------------------------ torchvision model
def test_mobilenet_v2_w8a8_exports_and_runs(tmp_path):
    torch.set_num_threads(1)
    bundle = load_model("mobilenet_v2", random_init=True)
    g = torch.Generator().manual_seed(0)
    data = LabeledData(torch.randn(4, 3, 64, 64, generator=g), torch.zeros(4, dtype=torch.long), "random", "train", 1000)
    plan = mpqkit.search(bundle, data, None, "uniform", w_bits=8, a_bits=8, calib_size=4, progress=False).plan
    qmodel = mpqkit.apply_plan(bundle, plan, data)
    rep = export_onnx(qmodel, plan, (3, 64, 64), tmp_path / "mbv2.onnx")
    assert set(rep.weight_types.values()) == {"UINT8"} and len(rep.weight_types) == len(plan.layers)
    res = check_onnx(rep.path, qmodel, data, batch_size=2)
    assert res["n"] == 4 and res["argmax_agreement"] == 1.0


# ------------------------------------------------------------------ command line
def parse(*argv: str) -> argparse.Namespace:
    from mpqkit.export.cli import add_parser

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["export", *argv])


@pytest.mark.filterwarnings("ignore:ONNX has no integer type")
@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"), ("packed", "mpqk")])
def test_cli_export_check(digits, tmp_path, capsys, fmt, suffix):
    from mpqkit.export.cli import cmd_export

    plan_path = digits[0].save(tmp_path / "plan.json")
    out = tmp_path / f"m.{suffix}"
    def args_list(plan_path, out):
        return ["--model", "digits-cnn", "--data", "digits", "--plan", str(plan_path), "--format", fmt,
                "--out", str(out), "--check", "--limit", "100", "--json"]

    assert cmd_export(parse(*args_list(plan_path, out))) == 0 and out.is_file()
    res = json.loads(capsys.readouterr().out)
    assert res["check"]["n"] == 100 and res["check"]["top1_diff_pt"] == 0.0
    assert res["check"]["tolerance_pt"] == 0.5 and res["check"]["passed"] is True
    if fmt == "packed":  # BN folded by default; --no-fold-bn reproduces the fake-quant logits exactly
        assert res["export"]["folded_bn"] == 3
        assert cmd_export(parse(*args_list(plan_path, out), "--no-fold-bn")) == 0
        assert json.loads(capsys.readouterr().out)["check"]["identical"]


def _zero_weight_codes(monkeypatch):
    """A broken packed writer: every weight code is stored as the lowest code."""
    from mpqkit.export import packed

    orig = packed._encode
    monkeypatch.setattr(packed, "_encode", lambda t, enc, spec, m: bytes(len(orig(t, enc, spec, m)))
                        if enc == "codes" else orig(t, enc, spec, m))


def test_cli_check_fails_beyond_tolerance(digits, tmp_path, monkeypatch, capsys):
    """Within the tolerance: exit 0, the tolerance printed; a broken export beyond it: exit 2, one error line."""
    from mpqkit.cli import main

    plan_path = digits[0].save(tmp_path / "plan.json")
    argv = ["export", "--model", "digits-cnn", "--data", "digits", "--plan", str(plan_path), "--format", "packed",
            "--out", str(tmp_path / "m.mpqk"), "--check", "--limit", "100", "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(+0.00 pt, tolerance 0.5 pt)" in out and out.rstrip().endswith(": passed")

    _zero_weight_codes(monkeypatch)
    assert main([*argv, "--tolerance", "1.5"]) == 2
    captured = capsys.readouterr()
    assert "tolerance 1.5 pt" in captured.out and "FAILED" in captured.out
    err = captured.err.strip()
    assert err.startswith("mpqkit: error: export check failed: top-1 of the packed export differs from PyTorch by -")
    assert "more than --tolerance 1.5 pt" in err and "\n" not in err


def test_cli_check_logit_tolerance(digits, tmp_path, capsys):
    """BN folding moves logits by float rounding: --logit-tolerance 0 fails, and the JSON says why. (Whether
    rounding flips an activation code on these 100 images depends on the plan: this nearest-rounding plan
    does; the GPTQ plan of the fixture happens to give identical logits.)"""
    from mpqkit.cli import main
    from mpqkit.quant.config import QuantConfig

    plan = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", calib_size=256, progress=False,
                         qconfig=QuantConfig(rounding="nearest")).plan
    plan_path = plan.save(tmp_path / "plan.json")
    argv = ["export", "--model", "digits-cnn", "--data", "digits", "--plan", str(plan_path), "--format", "packed",
            "--out", str(tmp_path / "m.mpqk"), "--check", "--limit", "100", "-q", "--json"]
    assert main([*argv, "--logit-tolerance", "0"]) == 2
    captured = capsys.readouterr()
    check = json.loads(captured.out)["check"]
    assert check["logit_tolerance"] == 0 and check["passed"] is False and check["max_abs_logit_diff"] > 0
    assert "exceeds --logit-tolerance 0" in captured.err
    assert main([*argv, "--no-fold-bn", "--logit-tolerance", "0"]) == 0  # bit-identical
    assert json.loads(capsys.readouterr().out)["check"]["passed"] is True


def test_cli_negative_tolerance_is_refused(tmp_path, capsys):
    from mpqkit.cli import main

    argv = ["export", "--model", "digits-cnn", "--data", "digits", "--plan", str(tmp_path / "none.json"),
            "--out", str(tmp_path / "m.onnx"), "--check", "--tolerance", "-1"]
    assert main(argv) == 2
    assert "--tolerance must be a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_missing_plan_is_one_clear_error(tmp_path):
    from mpqkit.export.cli import cmd_export

    args = parse("--model", "digits-cnn", "--data", "digits", "--plan", str(tmp_path / "none.json"), "--out", "x.onnx")
    with pytest.raises(MpqkitError, match="plan file not found"):
        cmd_export(args)
