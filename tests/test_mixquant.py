"""MixQuant's round-off search: data-free, the QEM rule, bisection to a budget, and where bits go."""
from __future__ import annotations

import pytest
import torch

import mpqkit
from mpqkit.errors import InfeasibleBudgetError
from mpqkit.quant.config import QuantConfig

from conftest import make_tiny, tiny_data


@pytest.fixture
def tiny_outlier():
    """conv2 gets one huge weight. With a per-tensor min-max quantizer the outlier sets the step, so
    even at 8 bits most weights round coarsely and the error *ratio* QE(b)/QE(8) grows more slowly
    as bits drop: the rule, which compares ratios, lets that layer go lower than its neighbours."""
    m = make_tiny()
    with torch.no_grad():
        m.conv2.weight[0, 0, 0, 0] = 25 * m.conv2.weight.abs().max()
    return m


def _search(model, budget=None, method="mixquant", **opts):
    return mpqkit.search(model, tiny_data(model), budget, method, input_shape=(3, 8, 8), progress=False,
                         qconfig=QuantConfig(w_per_channel=False, w_range="minmax"), fixed=[], options=opts)


def test_rule_is_data_free_and_exact(tiny_outlier):
    r = _search(tiny_outlier, qem=64.0, rule="relative")
    assert r.engine_stats == {}  # no probe engine was ever built: MixQuant needs no data
    for f, lq in r.plan.layers.items():
        ratios = r.table.w[f]
        ok = [b for b in sorted(ratios) if ratios[b] <= 64.0]
        assert lq.w_bits == ok[0]  # the smallest bits within QEM of the 8-bit round-off error
    bits = {f: lq.w_bits for f, lq in r.plan.layers.items()}
    assert r.table.w["conv2"][4] < r.table.w["conv3"][4]
    assert bits["conv2"] < bits["conv3"]  # flatter error curve → fewer bits for the same multiplier


@pytest.mark.parametrize("rule", ["absolute", "relative"])
def test_bisection_meets_budget_with_most_bits(tiny_outlier, rule):
    r = _search(tiny_outlier, "avg-bits=4", rule=rule)
    assert r.plan.costs["avg_w_bits_searched"] <= 4 + 1e-9
    qem = r.solution.info["qem"]
    tighter = _search(tiny_outlier, qem=qem * 0.9, rule=rule)  # a slightly smaller QEM already breaks the budget
    assert tighter.plan.costs["avg_w_bits_searched"] > 4
    with pytest.raises(InfeasibleBudgetError, match="raise --qem"):
        _search(tiny_outlier, "avg-bits=3", qem=1e-30 if rule == "absolute" else 1.0, rule=rule)


def test_mixquant_ilp_uses_roundoff_as_sensitivity(tiny_outlier):
    r = _search(tiny_outlier, "avg-bits=4", method="mixquant-ilp")
    assert r.solution.solver == "ilp-highs" and r.engine_stats == {}
    assert r.plan.costs["avg_w_bits_searched"] <= 4 + 1e-9
    for s in r.table.w.values():
        assert s[2] > s[4] > s[8] > 0


def test_rules_score_what_they_say_and_differ(tiny_outlier):
    """--mixquant-rule: absolute compares QE itself with one network-wide threshold, so the layer with
    the outlier (large round-off error at every width) gets the most bits — the opposite of the
    relative rule; weighted scales QE by the layer's share of the weights."""
    rel = _search(tiny_outlier, "avg-bits=4", rule="relative")
    ab = _search(tiny_outlier, "avg-bits=4")  # the default rule
    wt = _search(tiny_outlier, "avg-bits=4", rule="weighted")
    qe = rel.table.meta["qe"]
    numel = {f: tiny_outlier.get_submodule(f).weight.numel() for f in qe}
    for f in qe:
        for b in (2, 4, 8):
            assert ab.table.w[f][b] == pytest.approx(qe[f][b])
            assert wt.table.w[f][b] == pytest.approx(qe[f][b] * numel[f] / sum(numel.values()))
    assert ab.table.meta["rule"] == "absolute"
    for r in (ab, wt):
        assert r.plan.costs["avg_w_bits_searched"] <= 4 + 1e-9 and r.plan.method_params["rule"] == r.table.meta["rule"]
    bits = {name: {f: lq.w_bits for f, lq in r.plan.layers.items()} for name, r in (("rel", rel), ("abs", ab))}
    assert bits["abs"]["conv2"] > bits["rel"]["conv2"]
    assert bits["abs"]["conv2"] == max(bits["abs"].values())
    with pytest.raises(mpqkit.errors.MpqkitError, match="rule"):
        _search(tiny_outlier, "avg-bits=4", rule="median")
