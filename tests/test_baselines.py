"""Baselines: HAWQ (Hutchinson traces vs exact), MPQCO (vs a per-sample loop), greedy (measured Pareto list)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpqkit
from mpqkit.graph import discover
from mpqkit.errors import MpqkitError
from mpqkit.quant.observers import quantize_weight
from mpqkit.sensitivity.base import SearchContext
from mpqkit.sensitivity.hessian import hutchinson_traces

from conftest import make_tiny, tiny_data


def _ctx(model, data, searched, **options):
    graph = discover(model, (3, 8, 8))
    return SearchContext(model=model, graph=graph, calib_images=data.images, calib_labels=data.labels,
                         searched=searched, w_bits=[2, 4, 8], a_bits=[None], options=options)


def _exact_trace(model, data, fqn, n):
    """Tr(H) of the mean calibration loss w.r.t. one layer's weight, from unit vectors."""
    w = model.get_submodule(fqn).weight
    x, y = data.images[:n], data.labels[:n]
    w.requires_grad_(True)
    try:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), w, create_graph=True)[0].reshape(-1)
        return sum(float(torch.autograd.grad(g[i], w, retain_graph=True)[0].reshape(-1)[i]) for i in range(g.numel()))
    finally:
        w.requires_grad_(False)


def test_hutchinson_matches_exact_trace_and_is_seed_stable():
    model = make_tiny()
    data = tiny_data(model, n=96)
    layers = ["conv3", "fc"]
    ctx = _ctx(model, data, layers)
    a, info = hutchinson_traces(ctx, n_samples=96, max_iter=250, tol=1e-3, seed=0)
    b, _ = hutchinson_traces(ctx, n_samples=96, max_iter=250, tol=1e-3, seed=1)
    for f in layers:
        exact = _exact_trace(model, data, f, 96)
        assert a[f] == pytest.approx(exact, rel=0.15), (f, a[f], exact)
        assert abs(a[f] - b[f]) / exact < 0.2
    assert info["iterations"] <= 250 and not info["fisher_fallback"]


def test_hutchinson_in_smaller_chunks_for_large_inputs_gives_the_same_traces(monkeypatch):
    """The Hessian-vector chunk shrinks with the input size (memory), never the result."""
    from mpqkit.sensitivity import hessian

    assert hessian.hvp_chunk(torch.zeros(4, 3, 224, 224)) == 8 and hessian.hvp_chunk(torch.zeros(4, 3, 32, 32)) == 128
    model = make_tiny()
    data = tiny_data(model, n=96)
    ctx = _ctx(model, data, ["conv3", "fc"])
    one, _ = hutchinson_traces(ctx, n_samples=96, max_iter=20, tol=1e-3, seed=0)
    monkeypatch.setattr(hessian, "HVP_CHUNK_ELEMENTS", 24 * 3 * 8 * 8)  # 24 images per chunk: 4 chunks
    assert hessian.hvp_chunk(data.images) == 24
    four, _ = hutchinson_traces(ctx, n_samples=96, max_iter=20, tol=1e-3, seed=0)
    assert four == pytest.approx(one, rel=1e-4)


def test_fisher_traces_are_the_mean_squared_per_sample_gradient_and_auto_takes_them_for_depthwise_nets():
    """hawq --hawq-curvature fisher: Tr(F) = mean_n ||grad_W l_n||^2 exactly (a loop over the images here);
    the default (auto) measures it on a model with a depthwise convolution and Hessian traces otherwise,
    and the table says which."""
    from mpqkit.sensitivity.hessian import fisher_traces

    model = make_tiny()
    data = tiny_data(model, n=48)
    ctx = _ctx(model, data, ["conv3", "fc"])
    got = fisher_traces(ctx, 32)
    for f in ("conv3", "fc"):
        w = model.get_submodule(f).weight
        w.requires_grad_(True)
        try:
            want = sum(float(torch.autograd.grad(F.cross_entropy(model(data.images[i:i + 1]), data.labels[i:i + 1]),
                                                 w)[0].pow(2).sum()) for i in range(32)) / 32
        finally:
            w.requires_grad_(False)
        assert got[f] == pytest.approx(want, rel=1e-5)
    torch.manual_seed(0)
    dw = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                       nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    kw = dict(input_shape=(3, 8, 8), w_candidates=(2, 4, 8), calib_size=48, progress=False, use_cache=False)
    for net, expected in ((dw, "fisher"), (make_tiny(), "hessian")):
        res = mpqkit.search(net, tiny_data(net, n=48), "avg-bits=4", "hawq", **kw)
        assert res.table.meta["curvature"] == expected
        assert ("Fisher" in res.table.meta["score"]) == (expected == "fisher")
    forced = mpqkit.search(dw, tiny_data(dw, n=48), "avg-bits=4", "hawq", options={"curvature": "hessian"}, **kw)
    assert forced.table.meta["curvature"] == "hessian" and "hutchinson" in forced.table.meta


class _NoSecondDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # as ops whose double backward is not implemented
            raise RuntimeError("double backward of _NoSecondDerivative is not implemented")
        return g


class HalfTwiceNet(nn.Module):
    """conv1 → op without a second derivative → conv2 → fc: only conv1's double backward fails."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.tanh(self.conv2(_NoSecondDerivative.apply(x)))
        return self.fc(x.mean((2, 3)))


def test_hawq_falls_back_per_layer_when_double_backward_fails(caplog):
    torch.manual_seed(0)
    model = HalfTwiceNet().eval()
    data = tiny_data(model, n=64)
    with caplog.at_level(logging.WARNING, logger="mpqkit"):
        res = mpqkit.search(model, data, "avg-bits=4", "hawq", input_shape=(3, 8, 8), fixed=[], w_candidates=(2, 4, 8),
                            calib_size=64, progress=False)
    info = res.table.meta["hutchinson"]
    assert info["fisher_fallback"] == ["conv1"]
    assert "double backward fails for layer conv1" in caplog.text
    assert res.table.meta["traces"]["conv1"] > 0  # the Fisher trace is a sum of squares
    # scores are trace/n · ||dW||^2: more bits, smaller score
    for f, row in res.table.w.items():
        assert row[2] >= row[4] >= row[8] >= 0
    assert res.table.w["conv1"][2] > res.table.w["conv1"][4] > res.table.w["conv1"][8]


@pytest.mark.parametrize("output,chunk", [("prob", None), ("logit", None), ("prob", 7)])
def test_mpqco_equals_a_per_sample_loop(output, chunk, monkeypatch):
    """... whatever the chunk of the vmapped per-sample gradients (it shrinks with the input size:
    memory, never the result)."""
    from mpqkit.sensitivity import mpqco
    from mpqkit.sensitivity.gradients import chunk_size

    assert chunk_size(torch.zeros(2, 3, 224, 224), mpqco.CHUNK_ELEMENTS, 32) == 8
    assert chunk_size(torch.zeros(2, 3, 32, 32), mpqco.CHUNK_ELEMENTS, 32) == 32
    if chunk:
        monkeypatch.setattr(mpqco, "CHUNK_ELEMENTS", chunk * 3 * 8 * 8)  # 7 images per chunk: 6 chunks
    model = make_tiny()
    data = tiny_data(model, n=40)
    res = mpqkit.search(model, data, "avg-bits=4", "mpqco", input_shape=(3, 8, 8), w_candidates=(2, 4, 8),
                        calib_size=40, progress=False, options={"mpqco_output": output},
                        qconfig=mpqkit.api.QuantConfig(rounding="nearest"))  # ΔW: nearest rounding, as below
    assert res.table.meta["output"] == output
    f = "conv2"
    w = model.get_submodule(f).weight
    x, y = data.sample(40, 0).images, data.sample(40, 0).labels  # the search's calibration subset
    expected = {b: 0.0 for b in (2, 4, 8)}
    w.requires_grad_(True)
    try:
        for i in range(len(x)):
            out = model(x[i:i + 1])[0]
            z = (out.softmax(0) if output == "prob" else out)[y[i]]  # ∇p_y / p_y, literally
            g = torch.autograd.grad(z, w)[0]
            for b in expected:
                d = quantize_weight(w.detach(), mpqkit.api.QuantConfig().w_spec(b)) - w.detach()
                expected[b] += float((g * d).sum() / z.detach()) ** 2
    finally:
        w.requires_grad_(False)
    for b in expected:
        assert res.table.w[f][b] == pytest.approx(expected[b] / (2 * len(x)), rel=1e-3)


def test_mpqco_prob_is_not_ruled_by_one_near_zero_logit():
    """An image whose true-class logit is ~0 rules the logit form (METHODS.md's wording); the
    probability form (default) is bounded: ∇p_y / p_y = ∇ log p_y."""
    from mpqkit.zoo.data import LabeledData

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(32, 1, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
        model[3].bias -= model(x)[0, y[0]] - 1e-4  # image 0's true-class logit becomes 1e-4, its argmax stays
        assert model(x)[0].argmax() == y[0]
    data = LabeledData(images=x, labels=y, name="toy", split="train", classes=3)

    def table(output):
        return mpqkit.search(model, data, "avg-bits=4", "mpqco", input_shape=(1, 8), w_candidates=(2, 4, 8),
                             calib_size=32, progress=False, options={"mpqco_output": output}).table

    logit, prob = table("logit"), table("prob")
    assert logit.meta["tiny_logits"] == 0  # 1e-4 is above the division floor: nothing flags it
    # the logit table is ~all image 0: ≥ 1e5 × the probability table, whose terms are bounded
    assert logit.w["3"][2] > 1e5 * prob.w["3"][2]


def test_greedy_pareto_list_and_max_drop(tmp_path):
    # nearest rounding: damage that compounds across layers (GPTQ keeps all-2-bit digits within 0.2 points)
    res = mpqkit.search("digits-cnn", "digits", None, "greedy", calib_size=512, progress=False,
                        options={"max_drop": 1.0}, out=tmp_path / "g", qconfig=mpqkit.api.QuantConfig(rounding="nearest"))
    assert len((tmp_path / "g" / "pareto.csv").read_text().splitlines()) == 1 + len(res.table.decision.pareto)
    pareto = res.table.decision.pareto
    sizes = [p["avg_w_bits"] for p in pareto]
    assert sizes == sorted(sizes, reverse=True) and len(pareto) == 1 + len(res.ledger.searched) * 5
    pick = res.solution.info["step"]
    assert pareto[pick]["drop_pct"] <= 1.0
    assert all(p["drop_pct"] > 1.0 for p in pareto[pick + 1:])  # the smallest point within the target
    assert res.plan.costs["avg_w_bits_searched"] == pytest.approx(pareto[pick]["avg_w_bits"])
    # the accuracy of each point is measured on the combined configuration, not summed from singles
    singles = res.table.meta["delta_top1"]["w"]
    assert pareto[-1]["drop_pct"] > max(-100 * v for v in singles.values())
    with pytest.raises(MpqkitError, match="weight bits only"):
        mpqkit.search("digits-cnn", "digits", "bitops=1G", "greedy", search="wa", calib_size=256, progress=False)


def test_hawq_traces_are_cached_with_the_probes(tmp_path, monkeypatch):
    """A second HAWQ search on the same draw reads its Hessian traces from the probe cache
    (auto runs hawq after a bench already did); another seed measures anew."""
    model = make_tiny()
    data = tiny_data(model, n=64)
    kw = dict(input_shape=(3, 8, 8), w_candidates=(2, 4, 8), calib_size=64, progress=False, cache_dir=str(tmp_path))
    first = mpqkit.search(model, data, "avg-bits=4", "hawq", **kw)
    import mpqkit.sensitivity.hessian as hessian

    real = hessian.hutchinson_traces
    monkeypatch.setattr(hessian, "hutchinson_traces", lambda *a, **k: pytest.fail("traces measured again"))
    again = mpqkit.search(model, data, "avg-bits=4", "hawq", **kw)
    assert again.table.w == first.table.w
    monkeypatch.setattr(hessian, "hutchinson_traces", real)
    other = mpqkit.search(model, data, "avg-bits=4", "hawq", seed=1, **kw)
    assert other.table.meta["traces"] != first.table.meta["traces"]
