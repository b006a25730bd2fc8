"""GPTQ rounding, bias correction and cross-layer equalization: against direct implementations, their
invariants, and the probe engine building GPTQ layers once (cached)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpqkit.engine.probe import ProbeEngine
from mpqkit.errors import MpqkitError
from mpqkit.graph import discover
from mpqkit.plan import LayerQuant, Plan
from mpqkit.quant.apply import apply_plan
from mpqkit.quant.config import QuantConfig
from mpqkit.quant.equalize import ChannelClip, equalize, find_pairs
from mpqkit.quant.gptq import GptqConfig, InputStats, gptq_round, gptq_weight, input_rows, layer_grid
from mpqkit.quant.layerwise import sequential_ptq
from mpqkit.quant.modules import quantize_module
from mpqkit.quant.observers import QuantSpec
from mpqkit.quant.primitives import fake_quant
from mpqkit.quant.ptq import parse_ptq

from conftest import make_tiny, tiny_data


def _layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {"conv": nn.Conv2d(4, 6, 3, padding=1), "depthwise": nn.Conv2d(6, 6, 3, padding=1, groups=6),
            "grouped": nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), "linear": nn.Linear(10, 5)}[kind]


def _input(kind: str, n: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"conv": (n, 4, 6, 6), "depthwise": (n, 6, 6, 6), "grouped": (n, 4, 7, 7), "linear": (n, 10)}[kind]
    return torch.randn(shape, generator=g).relu() + 0.1 * torch.randn(shape, generator=g)


def _quantized(layer: nn.Module, bits: int, symmetric: bool = False, per_channel: bool = True) -> nn.Module:
    return quantize_module(layer, QuantSpec(bits, symmetric=symmetric, per_channel=per_channel, range_method="minmax"),
                           None)


def _direct_gptq(w: torch.Tensor, h: torch.Tensor, scale, zp, qmin, qmax, damp: float, act_order: bool) -> torch.Tensor:
    """The OBS column loop written out: explicit inverse Hessian, one column at a time, the inverse
    updated by removing each quantized column (no Cholesky, no lazy blocks)."""
    out = torch.empty_like(w, dtype=torch.float64)
    for g in range(w.shape[0]):
        W, H = w[g].double().clone(), h[g].double().clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(len(H))
        H = H + damp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
        Hinv = torch.linalg.inv(H)
        s, z = scale[g].double(), zp[g].double()
        for i in order.tolist():
            col = W[:, i].clone()
            q = ((torch.round(col / s[:, 0]) + z[:, 0]).clamp(qmin, qmax) - z[:, 0]) * s[:, 0]
            out[g, :, i] = q
            err = (col - q) / Hinv[i, i]
            W -= err[:, None] * Hinv[i][None, :]
            Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
            W[:, i] = q  # done: the column stays at its code
    return out


@pytest.mark.parametrize("kind", ["conv", "depthwise", "grouped", "linear"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_the_direct_column_loop(kind, act_order):
    """Same codes as the unoptimised OBS loop, with lazy blocks smaller than the layer (block 4)."""
    q = _quantized(_layer(kind), bits=3)
    stats = InputStats(q)
    stats.add(_input(kind))
    w = q.weight.detach()
    w3 = w.reshape(stats.hessian.shape[0], w.shape[0] // stats.hessian.shape[0], -1)
    scale, zp, qmin, qmax = layer_grid(q)
    fast = gptq_round(w3, stats.hessian, scale, zp, qmin, qmax, GptqConfig(block_size=4, act_order=act_order))
    slow = _direct_gptq(w3, stats.hessian, scale, zp, qmin, qmax, 0.01, act_order)
    codes = lambda v: torch.round(v / scale.double() + zp.double())  # noqa: E731
    assert torch.equal(codes(fast), codes(slow))
    assert not torch.equal(codes(fast), torch.round(w3.double() / scale.double() + zp.double()).clamp(qmin, qmax)), \
        "GPTQ should move some codes away from nearest rounding"


def test_input_rows_reproduce_the_conv():
    for kind in ("conv", "depthwise", "grouped"):
        layer, x = _layer(kind), _input(kind, n=3)
        rows = input_rows(layer, x)
        g = layer.groups
        w = layer.weight.reshape(g, layer.out_channels // g, -1)
        out = torch.einsum("mgd,grd->mgr", rows, w).reshape(rows.shape[0], -1)
        ref = (layer(x) - layer.bias[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, layer.out_channels)
        assert torch.allclose(out, ref, atol=1e-5)
        stats = InputStats(layer, hessian=False)
        stats.add(x)
        assert torch.allclose(stats.mean.float(), rows.mean(0), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["conv", "depthwise", "grouped", "linear"]), bits=st.integers(2, 6),
       symmetric=st.booleans(), per_channel=st.booleans(), seed=st.integers(0, 10_000), n=st.integers(1, 12))
def test_gptq_output_error_never_above_nearest(kind, bits, symmetric, per_channel, seed, n):
    """On the calibration inputs, ‖(W − Ŵ)X‖² of GPTQ (grid chosen per channel) ≤ that of round-to-nearest
    on the layer's own grid, and Ŵ is on the grid returned with it."""
    q = _quantized(_layer(kind, seed), bits, symmetric, per_channel)
    x = _input(kind, n=n, seed=seed + 1)
    stats = InputStats(q)
    stats.add(x)
    w_hat, scale, zp, info = gptq_weight(q, stats.hessian, GptqConfig())

    def err(v: torch.Tensor) -> float:
        d = (q.weight.detach() - v).double()
        out = q._conv_forward(x.double(), d, None) if isinstance(q, nn.Conv2d) else x.double() @ d.T
        return float(out.pow(2).sum())

    rtn = fake_quant(q.weight.detach(), q.w_scale, q.w_zero_point, *q._w_range)
    assert err(w_hat) <= err(rtn) * (1 + 1e-9) + 1e-12
    assert torch.equal(fake_quant(w_hat, scale, zp, *q._w_range), w_hat)  # on the grid it returns
    assert scale.shape == q.w_scale.shape and zp.shape == q.w_zero_point.shape
    assert info["err_gptq"] <= info["err_nearest"] * (1 + 1e-12)  # the same sums in another order
    assert sum(info["grid_counts"]) + info["rows_nearest"] == info["rows"]


def _two_layer_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Conv2d(8, 6, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.2, 3.0)
        net[1].bias.uniform_(-0.2, 0.5)
    return net.eval()


def _images(n: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_bias_correction_zeroes_the_mean_output_shift():
    """After bias correction, each quantized layer's mean output per channel (after the BN that took the
    correction) equals the fp model's on the calibration set; before, it did not."""
    net, x = _two_layer_net(), _images()
    plan = Plan(layers={f: LayerQuant(2, 8) for f, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))})
    q = apply_plan(net, plan, x)
    taps = ["1", "3", "5", "8"]  # BN after conv 0, the depthwise conv, the 1x1 conv, the Linear

    def means(model):
        got = {}
        hs = [model.get_submodule(t).register_forward_hook(
            lambda m, a, o, t=t: got.__setitem__(t, o.transpose(0, 1).reshape(o.shape[1], -1).mean(1))) for t in taps]
        with torch.no_grad():
            model(x)
        for h in hs:
            h.remove()
        return got

    fp = means(net)
    before = means(q)
    assert max(float((before[t] - fp[t]).abs().max()) for t in taps) > 1e-2
    stats = sequential_ptq(q, net, list(x.split(32)), None, True)
    after = means(q)
    for t in taps:
        assert torch.allclose(after[t], fp[t], atol=2e-5), (t, after[t] - fp[t])
    assert q[0].bias is None and len(stats["layers"]) == 4  # the conv before BN got no bias: BN took it


def test_equalization_leaves_fp_outputs_unchanged_and_balances_ranges():
    net, x = _two_layer_net(), _images(8)
    ref = net(x)
    pairs = equalize(net)
    assert pairs == [("0", "3"), ("3", "5")]
    assert isinstance(net[2], ChannelClip) and isinstance(net[4], ChannelClip)  # ReLU6 → per-channel clip
    assert torch.allclose(net(x), ref, atol=1e-5)
    # the depthwise conv's rows now have the ranges of the 1x1 conv's input columns
    r_dw = net[3].weight.abs().flatten(1).amax(1)
    r_pw = net[5].weight.abs().transpose(0, 1).flatten(1).amax(1)
    assert torch.allclose(r_dw, r_pw, rtol=1e-3)
    assert find_pairs(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1))) == []  # channels do not match


def test_engine_builds_each_gptq_layer_once_and_reuses_it_from_the_cache(tmp_path):
    tiny = make_tiny()
    data = tiny_data(tiny)
    graph = discover(tiny, (3, 8, 8))
    qc = QuantConfig(rounding="gptq", bias_correction=True)
    kw = dict(qconfig=qc, cache_dir=str(tmp_path), progress=False)
    probes = [{"conv2": (2, None)}, {"conv4": (3, None)}, {"fc": (2, None)}]
    e1 = ProbeEngine(tiny, graph, data.images, data.labels, **kw)
    r1 = e1.run(probes)
    assert e1.stats["ptq_built"] == 6 and e1.stats["ptq_cached"] == 0  # a GPTQ weight and a bias per layer
    e2 = ProbeEngine(tiny, graph, data.images, data.labels, **{**kw, "use_cache": True})
    w1 = e1.quant_layer("conv2", 2, None).weight
    assert e2.stats["ptq_built"] == 0
    w2 = e2.quant_layer("conv2", 2, None).weight
    assert e2.stats["ptq_cached"] == 2 and e2.stats["ptq_built"] == 0
    assert torch.equal(w1.contiguous(), w2.contiguous())
    # the probe results themselves differ from nearest rounding's
    e3 = ProbeEngine(tiny, graph, data.images, data.labels, qconfig=QuantConfig(), use_cache=False, progress=False)
    assert [r.loss for r in e3.run(probes)] != [r.loss for r in r1]


def test_ptq_recipes_parse_to_canonical_names():
    assert parse_ptq("gptq+bc").name == "gptq+bc"
    assert parse_ptq("BC+GPTQ+cle").name == "cle+gptq+bc"
    assert parse_ptq("rtn").name == "nearest"
    r = parse_ptq("brecq+bc")
    assert r.recon == "brecq" and r.bias_correction and r.rounding == "nearest"
    assert parse_ptq("mse").qconfig(QuantConfig(rounding="gptq")).rounding == "nearest"  # a step not named is off
    for bad in ("gptq+brecq", "gptq+gptq", "foo", "", "mse+minmax"):
        with pytest.raises(MpqkitError):
            parse_ptq(bad)


def test_quant_config_from_an_old_plan_means_nearest_rounding():
    old = {k: v for k, v in QuantConfig(rounding="gptq", bias_correction=True).to_dict().items()
           if k not in ("rounding", "bias_correction", "equalize")}
    assert QuantConfig.from_dict(old).rounding == "nearest" and not QuantConfig.from_dict(old).bias_correction
    with pytest.raises(ValueError):
        QuantConfig.from_dict({"bogus": 1})


def test_held_out_engine_measures_the_layers_the_calibration_set_built():
    """auto's held-out engine quantizes with the calibration engine's layers (ranges, GPTQ fitted on
    the calibration images), not with layers refitted on the held-out images."""
    tiny = make_tiny()
    calib, held = tiny_data(tiny, n=64, seed=1), tiny_data(tiny, n=64, seed=2)
    graph = discover(tiny, (3, 8, 8))
    qc = QuantConfig(rounding="gptq")
    cal = ProbeEngine(tiny, graph, calib.images, calib.labels, qconfig=qc, use_cache=False, progress=False)
    shared = ProbeEngine(tiny, graph, held.images, held.labels, qconfig=qc, use_cache=False, progress=False,
                         layers_from=cal)
    own = ProbeEngine(tiny, graph, held.images, held.labels, qconfig=qc, use_cache=False, progress=False)
    assert shared.quant_layer("conv2", 2, 8) is cal.quant_layer("conv2", 2, 8)
    probe = [{f: (2, 8) for f in graph.names}]
    assert shared.run(probe)[0].loss != own.run(probe)[0].loss
    assert "ptq_built" not in shared.stats and cal.stats["ptq_built"] > 0  # builds nothing itself


def test_gradient_methods_perturb_by_the_gptq_weights_the_plan_ships_with():
    """hawq/mpqco's ΔW is the probe engine's GPTQ layer minus W under GPTQ rounding, nearest rounding's otherwise."""
    from mpqkit.quant.observers import quantize_weight
    from mpqkit.sensitivity.base import SearchContext
    from mpqkit.sensitivity.gradients import weight_deltas

    tiny = make_tiny()
    data = tiny_data(tiny)
    graph = discover(tiny, (3, 8, 8))
    got = {}
    for qc in (QuantConfig(rounding="gptq"), QuantConfig(rounding="nearest")):
        ctx = SearchContext(model=tiny, graph=graph, calib_images=data.images, calib_labels=data.labels,
                            searched=["conv2", "fc"], w_bits=[2, 4], a_bits=[8], qconfig=qc,
                            engine_kwargs={"use_cache": False, "progress": False})
        got[qc.rounding] = weight_deltas(ctx)["conv2"][2]
        w = tiny.conv2.weight.detach()
        if qc.rounding == "gptq":
            expect = ctx.engine.quant_layer("conv2", 2, None).weight.detach() - w
        else:
            expect = quantize_weight(w, qc.w_spec(2)) - w
        assert torch.allclose(got[qc.rounding], expect.contiguous())
    assert not torch.allclose(got["gptq"], got["nearest"])


def test_apply_plan_reuses_the_layers_the_search_built(tmp_path):
    """A plan is applied with the very GPTQ layers its search measured: read from the probe cache (none
    recomputed), and the same weights a fresh computation gives."""
    from mpqkit import api

    s = api.RunSettings(calib_size=256, progress=False, cache_dir=str(tmp_path / "c"))
    res = api.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", settings=s)
    assert res.engine_stats["ptq_built"] > 0
    q = api.apply_plan("digits-cnn", res.plan, "digits", settings=s)
    done = q.mpqkit_ptq["gptq"]
    searched = res.ledger.searched
    # the searched layers come from the probes' cache; the fixed ones (8 bits, never probed) are built here
    assert done["cached"] == len(searched) and done["built"] == len(res.plan.layers) - len(searched) > 0
    fresh = api.apply_plan("digits-cnn", res.plan, "digits", settings=s.replace(use_cache=False))
    assert fresh.mpqkit_ptq["gptq"]["built"] == len(res.plan.layers)
    for f in res.plan.layers:
        assert torch.equal(q.get_submodule(f).weight, fresh.get_submodule(f).weight), f


@pytest.mark.parametrize("ptq", ["gptq+bc", "cle+gptq+bc", "gptq-seq"])
def test_quantized_models_with_every_step_save_load_and_export(tmp_path, ptq):
    """Bias correction into a bias-less conv without BN (a new bias), equalization's ChannelClip, and
    sequential GPTQ: the saved model rebuilds bit for bit without calibration data, and its QDQ ONNX
    export matches it in onnxruntime."""
    from mpqkit import api
    from mpqkit.export.onnx import check_onnx, export_onnx
    from mpqkit.zoo.data import LabeledData

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8,
                        bias=False), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 6, 1, bias=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    x = _images(96)
    data = LabeledData(images=x, labels=net(x).argmax(1).detach(), name="t", split="train", classes=4)
    s = api.RunSettings(calib_size=64, progress=False, input_shape=(3, 8, 8), fixed=())
    plan = api.search(net, data, None, "uniform", settings=s.replace(w_bits=3, a_bits=8)).plan
    q = api.apply_plan(net, plan, data, settings=s, ptq=ptq)
    if "bc" in ptq:
        assert q[0].bias is not None and q[5].bias is not None  # no BN after them: their own new bias
    if "cle" in ptq:
        assert isinstance(q[1], ChannelClip)
    path = api.save_quantized(q, plan, tmp_path / "q.pt")
    again = api.load_quantized(net, path, settings=s)
    with torch.no_grad():
        assert torch.equal(q(x), again(x))
    export_onnx(q, plan, (3, 8, 8), tmp_path / "q.onnx")
    rep = check_onnx(tmp_path / "q.onnx", q, data.head(32), 16)
    assert rep["top1_diff_pt"] == 0.0 and rep["max_abs_logit_diff"] < 1e-3


@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear"])
def test_grid_per_channel_is_never_worse_than_any_single_grid(kind):
    """The default tries the MSE grid and shrunk min-max ranges and keeps per channel the lowest output
    error: no single grid (MSE only, min-max only) does better on any channel; at 2 bits some channels
    leave the MSE grid."""
    q = quantize_module(_layer(kind), QuantSpec(2, per_channel=True, range_method="mse"), None)
    stats = InputStats(q)
    stats.add(_input(kind))
    h = stats.hessian
    g = h.shape[0]

    def row_err(cfg):
        w, scale, zp, info = gptq_weight(q, h, cfg)
        d = (q.weight.detach() - w).double().reshape(g, -1, h.shape[-1])
        return torch.einsum("grd,gde,gre->gr", d, h, d), info

    best, info = row_err(GptqConfig())
    for single in (GptqConfig(shrink=()), GptqConfig(own_grid=False, shrink=(1.0,))):
        assert (best <= row_err(single)[0] * (1 + 1e-9) + 1e-15).all()
    assert sum(info["grid_counts"][1:]) > 0  # a shrunk min-max grid won somewhere
    with pytest.raises(MpqkitError):
        GptqConfig(own_grid=False, shrink=())


def test_bench_rows_name_the_canonical_recipe(tmp_path):
    from mpqkit import api

    rows = api.bench("digits-cnn", "digits", ["uniform"], ["avg-bits=4"], tmp_path / "b", ptqs=["bc+GPTQ", None],
                     splits=["test"], calib_size=128, progress=False)
    assert sorted(str(r["ptq"]) for r in rows if r["method"] == "uniform") == ["None", "gptq+bc"]
    with pytest.raises(MpqkitError, match="unknown PTQ step"):
        api.bench("digits-cnn", "digits", ["uniform"], ["avg-bits=4"], tmp_path / "c", ptqs=["gptq+x"])


# One MobileNetV2 depthwise channel (features.1.conv.0.0, channel 21, calibration draw 0): a smooth input makes
# H nearly rank one (eigenvalues 105 and below 0.35). Act-order GPTQ on the 6-bit grid ends with the row's
# largest weight last and clamps it: its error equals round-to-nearest's, ~130x the natural order's.
_DW_W = [-0.30879337, -1.25142574, 1.3814441, -1.57647145, -1.95027399, 0.79636186, 2.06403995, 0.82886642, 0.01625228]
_DW_H = [[11.72294763, 11.72093193, 11.60704803, 11.71730762, 11.71541636, 11.60221584, 11.60401627, 11.602826, 11.49186932],
         [11.72093193, 11.83173446, 11.72087961, 11.71600688, 11.82606247, 11.71541636, 11.60340313, 11.71176311, 11.602826],
         [11.60704803, 11.72087961, 11.7244562, 11.60290041, 11.71600688, 11.71887324, 11.49258203, 11.60340313, 11.6055733],
         [11.71730762, 11.71600688, 11.60290041, 11.82791046, 11.82588677, 11.71104801, 11.71730762, 11.71541636, 11.60221584],
         [11.71546208, 11.82610471, 11.71604454, 11.82588677, 11.93766543, 11.82588677, 11.71600688, 11.82606247, 11.71541636],
         [11.60225382, 11.71545739, 11.71887324, 11.71104801, 11.82588677, 11.82948235, 11.60290041, 11.71600688, 11.71887324],
         [11.60405241, 11.60340313, 11.49258203, 11.71730762, 11.71600688, 11.60290041, 11.71702416, 11.7150085, 11.60121221],
         [11.602826, 11.71176311, 11.60340313, 11.71541636, 11.82606247, 11.71600688, 11.7150085, 11.82576489, 11.7150085],
         [11.49190206, 11.60286516, 11.60561163, 11.60221584, 11.71541636, 11.71887324, 11.60121221, 11.7150085, 11.71859116]]


def test_gptq_natural_order_candidate_rescues_a_nearly_singular_depthwise_row():
    conv = nn.Conv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(_DW_W).reshape(1, 1, 3, 3))
    q = quantize_module(conv, QuantSpec(6, per_channel=True, range_method="mse"), None)
    h = torch.tensor(_DW_H, dtype=torch.float64)
    h = ((h + h.T) / 2)[None]

    def row_err(cfg: GptqConfig) -> float:
        w, *_ = gptq_weight(q, h, cfg)
        d = (q.weight.detach() - w).double().reshape(1, -1)
        return float(d @ h[0] @ d.T)

    act_only = row_err(GptqConfig(natural_order=False))
    natural = row_err(GptqConfig(act_order=False))
    both = row_err(GptqConfig())
    assert both <= min(act_only, natural) * (1 + 1e-9)
    assert both < act_only / 20  # the act-order candidates alone stay at round-to-nearest's error
