"""The transformer path: a BERT encoder classifier on token ids (tiny and random here: no download),
its attention projections as searchable layers, and the MiniLM / SST-2 zoo entry when installed."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import assert_on_planned_grid
from mpqkit import api
from mpqkit.errors import MissingResourceError
from mpqkit.graph import discover
from mpqkit.zoo.data import LabeledData
from mpqkit.zoo.text import BertClassifier

torch.set_num_threads(1)


def _tiny() -> BertClassifier:
    torch.manual_seed(0)
    return BertClassifier(vocab=50, hidden=16, layers=2, heads=2, inter=32, max_pos=16, num_classes=3).eval()


def _tokens(n: int = 48, length: int = 8) -> LabeledData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n, length), generator=g)
    keep = torch.randint(2, length + 1, (n,), generator=g)
    ids[torch.arange(length)[None, :] >= keep[:, None]] = 0  # right-padded sentences of 2..8 tokens
    return LabeledData(ids, torch.randint(0, 3, (n,), generator=g), "tokens", "train", 3)


def test_padding_does_not_change_the_logits():
    net, data = _tiny(), _tokens()
    wider = torch.cat([data.images, torch.zeros(len(data), 4, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(net(wider), net(data.images))
        torch.testing.assert_close(net(data.images.float()), net(data.images))  # the float copy discovery feeds
        assert torch.isfinite(net(torch.zeros(2, 8))).all()  # an all-[PAD] row: no NaN


def test_every_projection_is_a_searchable_layer_and_quantizes(caplog):
    net, data = _tiny(), _tokens()
    g = discover(net, (8,))
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    assert g.names == [f"encoder.layer.{i}.{p}" for i in range(2) for p in per_layer] + ["classifier"]
    assert tuple(g.names[:3]) in g.tie_groups
    with caplog.at_level(logging.WARNING, logger="mpqkit"):
        res = api.search(net, data, "avg-bits=4", "eval-delta", input_shape=(8,), calib_size=32)
    assert "full forward" not in caplog.text and "fall" not in caplog.text  # the probe engine traced it
    assert res.plan.costs["avg_w_bits_searched"] <= 4.0 + 1e-9
    q = api.apply_plan(net, res.plan, data, input_shape=(8,), calib_size=32)
    assert type(q.get_submodule("encoder.layer.0.attention.self.query")).__name__ == "QuantLinear"
    for name in ("encoder.layer.1.attention.self.value", "encoder.layer.0.attention.self.query"):
        assert_on_planned_grid(q.get_submodule(name), res.plan.layers[name].w_bits)  # at the planned bits
    ev = api.evaluate(net, data, "train", res.plan, input_shape=(8,), calib_size=32)
    assert 0.0 <= ev["top1"] <= 1.0


def _minilm():
    try:
        from mpqkit.zoo.models import get_model

        return get_model("minilm-sst2")
    except MissingResourceError as e:
        pytest.skip(f"minilm-sst2 not installed (make text): {e}")


@pytest.mark.integration
def test_minilm_sst2_lists_attention_and_classifies():
    bundle = _minilm()
    names = discover(bundle.model, bundle.input_shape).names
    assert len(names) == 37 and sum(".attention.self." in n for n in names) == 18
    from mpqkit.zoo.data import load_data

    dev = load_data("sst2", "test", limit=200)
    with torch.no_grad():
        acc = 100 * float((bundle.model(dev.images).argmax(1) == dev.labels).float().mean())
    assert acc >= 75.0, acc


def test_token_model_exports_to_onnx_with_integer_input(tmp_path):
    pytest.importorskip("onnxruntime")
    from mpqkit.export import check_onnx, export_onnx

    from mpqkit.quant.config import QuantConfig

    net, data = _tiny(), _tokens()
    plan = api.search(net, data, "avg-bits=4", "eval-delta", input_shape=(8,), calib_size=32,
                      qconfig=QuantConfig(matmul_a_bits=8)).plan  # the matmul taps export as float ops
    q = api.apply_plan(net, plan, data, input_shape=(8,), calib_size=32)
    path = tmp_path / "bert.onnx"
    export_onnx(q, plan, (8,), path, input_dtype=torch.long)
    import onnx

    assert onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    res = check_onnx(path, q, data)
    assert res["argmax_agreement"] >= 0.95 and res["max_abs_logit_diff"] < 0.1, res


def test_matmul_inputs_quantize_only_when_asked():
    from mpqkit.quant.config import QuantConfig
    from mpqkit.quant.modules import QuantAct

    net, data = _tiny(), _tokens()
    plain = api.search(net, data, "avg-bits=8", "uniform", input_shape=(8,), calib_size=32, w_bits=8).plan
    q = api.apply_plan(net, plain, data, input_shape=(8,), calib_size=32)
    assert not any(isinstance(m, QuantAct) for m in q.modules())  # default: attention matmuls stay fp32
    res = api.search(net, data, "avg-bits=8", "uniform", input_shape=(8,), calib_size=32, w_bits=8,
                     qconfig=QuantConfig(matmul_a_bits=4))
    assert res.plan.method_params["qconfig"]["matmul_a_bits"] == 4  # recorded, so apply reproduces it
    q4 = api.apply_plan(net, res.plan, data, input_shape=(8,), calib_size=32)
    taps = [n for n, m in q4.named_modules() if isinstance(m, QuantAct)]
    assert len(taps) == 8 and "encoder.layer.0.attn_in" in taps  # q, k, v, probabilities x 2 layers
    with torch.no_grad():
        x = data.images
        d8 = (q(x) - net(x)).abs().max()
        d4 = (q4(x) - net(x)).abs().max()
    assert d4 > d8  # 4-bit attention inputs perturb the logits more than fp32 ones
    probs = q4.get_submodule("encoder.layer.0.attn_in")
    assert float(probs.a_scale) * (probs._a_range[1] - probs._a_range[0]) <= 1.0 + 1e-3  # probabilities in [0, 1]
    with pytest.raises(ValueError, match="matmul_a_bits"):
        QuantConfig(matmul_a_bits=1)
