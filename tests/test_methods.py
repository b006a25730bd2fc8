"""Method behaviour on the embedded digits CNN (real trained model, no ../shared needed)."""
from __future__ import annotations

import json

import pytest

import mpqkit
from mpqkit.budget import Ledger, parse_budget
from mpqkit.errors import BudgetError, InfeasibleBudgetError, UnknownNameError
from mpqkit.sensitivity import METHODS


def test_registry_lists_methods():
    assert {"uniform", "eval-delta"} <= set(METHODS.names())
    with pytest.raises(UnknownNameError, match="eval-delta"):
        METHODS.get("nope")


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    # nearest rounding: under GPTQ uniform W3 is nearly lossless on digits, and the ILP's plan is uniform's
    rtn = mpqkit.api.QuantConfig(rounding="nearest")
    ed = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", calib_size=512, out=out / "ed",
                       progress=False, cache_dir=str(out / "cache"), qconfig=rtn, prune=False)  # the whole table
    un = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "uniform", calib_size=512, progress=False, qconfig=rtn)
    return ed, un, out


def test_eval_delta_scores_are_measured_loss_increases(digits_runs):
    ed, _, _ = digits_runs
    table = ed.table
    # ΔL is a measured loss difference: at 2 bits every searched layer loses much more than at 8
    for f, scores in table.w.items():
        assert scores[2] > scores[8]
        assert abs(scores[8]) < 0.05
    assert table.meta["probes"] == len(ed.ledger.searched) * 6


def test_eval_delta_gives_bits_where_loss_says_and_beats_uniform(digits_runs):
    ed, un, _ = digits_runs
    # same budget, both met exactly as the ledger counts it
    for r in (ed, un):
        assert r.plan.costs["avg_w_bits_searched"] <= 3.0 + 1e-9
    # the ILP's plan minimises the sum of measured ΔL: it is no worse than uniform's sum
    t = ed.table
    ed_sum = sum(t.w[f][ed.plan.layers[f].w_bits] for f in ed.ledger.searched)
    un_sum = sum(t.w[f][un.plan.layers[f].w_bits] for f in un.ledger.searched)
    assert ed_sum <= un_sum + 1e-12
    ev_ed = mpqkit.evaluate("digits-cnn", "digits", "train", ed.plan)
    ev_un = mpqkit.evaluate("digits-cnn", "digits", "train", un.plan)
    assert ev_ed["loss"] < ev_un["loss"]


def test_results_directory(digits_runs):
    _, _, out = digits_runs
    for name in ("plan.json", "layers.csv", "layers.md", "sensitivity.json", "summary.json", "bits.png"):
        assert (out / "ed" / name).stat().st_size > 0
    plan = mpqkit.Plan.load(out / "ed" / "plan.json")
    assert plan.method == "eval-delta" and plan.provenance["calib"]["n"] == 512
    assert plan.layers["conv1"].w_bits == 8 and plan.layers["fc"].a_bits == 8  # first/last fixed at 8/8
    summary = json.loads((out / "ed" / "summary.json").read_text())
    assert summary["costs"] == plan.costs


def test_joint_wa_search_under_bitops():
    graph_costs = mpqkit.search("digits-cnn", "digits", "avg-bits=8", "uniform", w_bits=8, a_bits=8,
                                calib_size=256, progress=False).plan.costs
    budget = f"bitops={graph_costs['bitops'] * 0.5 / 1e9}G"
    r = mpqkit.search("digits-cnn", "digits", budget, "eval-delta", search="wa", calib_size=256, progress=False)
    assert r.plan.costs["bitops"] <= graph_costs["bitops"] * 0.5
    assert r.table.a and all(set(v) == {4, 6, 8} for v in r.table.a.values())
    assert any(lq.a_bits != 8 or lq.w_bits != 8 for lq in r.plan.layers.values())


def test_uniform_and_errors():
    r = mpqkit.search("digits-cnn", "digits", None, "uniform", w_bits=4, a_bits=8, calib_size=128, progress=False)
    assert {(lq.w_bits, lq.a_bits) for f, lq in r.plan.layers.items() if f in r.ledger.searched} == {(4, 8)}
    with pytest.raises(BudgetError, match="needs a --budget"):
        mpqkit.search("digits-cnn", "digits", None, "eval-delta", calib_size=128, progress=False)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible value is avg-bits=2"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=1", "eval-delta", calib_size=128, progress=False)
    with pytest.raises(UnknownNameError, match="unknown layer"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", fixed=["conv7"], progress=False)


def test_nan_weights_are_refused():
    import torch

    from mpqkit.errors import CheckpointError
    from mpqkit.zoo import get_model

    m = get_model("digits-cnn").model
    with torch.no_grad():
        m.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="conv2.weight.*NaN"):
        mpqkit.search(m, "digits", "avg-bits=3", input_shape=(1, 8, 8), progress=False)


def test_infoq_scores_follow_information_loss_and_target():
    """InfoQ: scores fall with bits; the input-relevant variant never looks at the labels (shuffling
    them leaves it unchanged) while the label variant does change."""
    import torch

    from mpqkit.zoo import load_data

    data = load_data("digits", "train")
    kw = dict(calib_size=384, progress=False, options={"projections": 32})
    lab = mpqkit.search("digits-cnn", data, "avg-bits=3", "infoq", **kw)
    for scores in lab.table.w.values():
        assert scores[2] > scores[4] > 0 and scores[8] == 0.0  # the 8-bit probe *is* the reference
    assert lab.plan.costs["avg_w_bits_searched"] <= 3
    shuffled = type(data)(data.images, data.labels[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))],
                          data.name, data.split, data.classes)
    kw_in = dict(kw, options={"projections": 32, "target": "input"})
    inp = mpqkit.search("digits-cnn", data, "avg-bits=3", "infoq", **kw_in).table.w
    inp_shuf = mpqkit.search("digits-cnn", shuffled, "avg-bits=3", "infoq", **kw_in).table.w
    lab_shuf = mpqkit.search("digits-cnn", shuffled, "avg-bits=3", "infoq", **kw).table.w
    assert inp == inp_shuf
    assert lab_shuf != lab.table.w
    # 1-D projections of the logits keep a good part of log(10) ≈ 2.3 nats about the label
    assert 0.5 < lab.table.meta["smi_ref"]["fc"] < 2.31


def test_infoq_auto_target_leaves_labels_with_too_few_images_per_class():
    """With (nearly) one image per class the k-NN MI against the labels is 0 for every layer; the
    default target then measures against the fp embedding and says so in the plan."""
    import torch

    from mpqkit.sensitivity.infoflow import _auto_target

    assert _auto_target(torch.arange(10).repeat(20), 3, "knn") == ("labels", None)
    target, why = _auto_target(torch.arange(128), 3, "knn")
    assert target == "input" and "too few" in why
    data = mpqkit.zoo.load_data("digits", "train")
    n = 60  # about 6 images of each digit: enough others of its class for k = 2, not for k = 20
    kw = dict(calib_size=n, progress=False)
    res = mpqkit.search("digits-cnn", data, "avg-bits=3", "infoq", options={"projections": 16, "knn_k": 20}, **kw)
    assert res.table.meta["target_used"] == "input"
    assert any("too few for the k-NN MI" in w for w in res.plan.provenance["warnings"])
    forced = mpqkit.search("digits-cnn", data, "avg-bits=3", "infoq",
                           options={"projections": 16, "knn_k": 20, "target": "input"}, **kw)
    assert forced.table.w == res.table.w
    ok = mpqkit.search("digits-cnn", data, "avg-bits=3", "infoq", options={"projections": 16, "knn_k": 2}, **kw)
    assert ok.table.meta["target_used"] == "labels" and "warnings" not in ok.plan.provenance


def test_infoq_observer_choice_and_resume(tmp_path):
    cache = {"cache_dir": str(tmp_path)}
    kw = dict(calib_size=256, progress=False, **cache)
    last = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "infoq",
                         options={"projections": 16, "observers": "last-1"}, **kw)
    assert set(last.table.meta["smi_ref"]) == {"fc"}
    again = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "infoq",
                          options={"projections": 16, "observers": "last-1"}, **kw)
    assert again.engine_stats["probes_run"] == 0 and again.table.w == last.table.w  # all memoised


def test_infoq_keeps_one_layer_cut_at_a_time(monkeypatch):
    """InfoQ visits layers once, in network order: it drops the reference's earlier layer-cut tensors
    (``ProbeEngine.forget_before``) instead of filling the prefix cache, with the same table."""
    from mpqkit.engine.probe import ProbeEngine

    most = {"kept": 0}
    keep = ProbeEngine._keep

    def counting(self, key, envs):
        envs = keep(self, key, envs)
        most["kept"] = max(most["kept"], len(self._snapshots))
        return envs

    monkeypatch.setattr(ProbeEngine, "_keep", counting)
    kw = dict(calib_size=128, progress=False, use_cache=False, options={"projections": 16})
    lean = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "infoq", **kw)
    lean_most = most["kept"]
    monkeypatch.setattr(ProbeEngine, "forget_before", lambda self, base, fqn: 0)
    most["kept"] = 0
    full = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "infoq", **kw)
    assert lean.table.w == full.table.w and lean.table.a == full.table.a
    assert lean_most <= 3 < most["kept"]  # fp input, the current cut and the one being walked to
