"""Export: bit packing, QDQ ONNX checked in onnxruntime, packed-file round trip, the CLI command."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpqkit
from mpqkit.api import load_model, load_split
from mpqkit.budget import Ledger
from mpqkit.errors import CheckpointError, MpqkitError
from mpqkit.export import check_onnx, export_onnx, load_packed, pack_bits, save_packed, unpack_bits
from mpqkit.export.onnx import container, quant_layers
from mpqkit.graph import discover
from mpqkit.plan import LayerQuant, Plan
from mpqkit.quant.primitives import quantize
from mpqkit.zoo.data import LabeledData

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402


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
    rep = save_packed(qmodel, plan, tmp_path / "m.mpqk", fold_bn=False)
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
    rep = save_packed(qmodel, plan, tmp_path / "m.mpqk")
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


def test_packed_rejects_corrupt_and_other_model(digits, tmp_path):
    plan, qmodel, _ = digits
    path = save_packed(qmodel, plan, tmp_path / "m.mpqk").path
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
    import json

    res = json.loads(capsys.readouterr().out)
    assert res["check"]["n"] == 100 and res["check"]["top1_diff_pt"] == 0.0
    if fmt == "packed":  # BN folded by default; --no-fold-bn reproduces the fake-quant logits exactly
        assert res["export"]["folded_bn"] == 3
        assert cmd_export(parse(*args_list(plan_path, out), "--no-fold-bn")) == 0
        assert json.loads(capsys.readouterr().out)["check"]["identical"]


def test_cli_export_missing_plan_is_one_clear_error(tmp_path):
    from mpqkit.export.cli import cmd_export

    args = parse("--model", "digits-cnn", "--data", "digits", "--plan", str(tmp_path / "none.json"), "--out", "x.onnx")
    with pytest.raises(MpqkitError, match="plan file not found"):
        cmd_export(args)
