"""SMPQ / DMPQ: the Monte-Carlo Shapley estimator against exact values, and the shared supernet run."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

import mpqkit
from mpqkit.sensitivity import shapley as sh
from mpqkit.sensitivity.shapley import shapley_mc


def exact_shapley(players, value):
    n = len(players)
    out = {}
    for p in players:
        others = [q for q in players if q != p]
        total = 0.0
        for k in range(n):
            for s in itertools.combinations(others, k):
                w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                total += w * (value(frozenset(s) | {p}) - value(frozenset(s)))
        out[p] = total
    return out


def test_additive_game_is_exact_with_zero_spread():
    w = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    mean, std, est = shapley_mc(list(w), lambda s: sum(w[p] for p in s), permutations=7, truncate=0)
    assert mean == pytest.approx(w) and all(v == 0 for v in std.values()) and est == pytest.approx(w)


@pytest.mark.parametrize("name,players,value", [
    ("glove", ["L1", "L2", "R1"], lambda s: min(sum(p.startswith("L") for p in s), sum(p.startswith("R") for p in s))),
    ("majority", ["x", "y", "z"], lambda s: 1.0 if len(s) >= 2 else 0.0),
    ("weighted-vote", ["A", "B", "C", "D"],  # quota 6 with weights 4, 2, 1, 1
     lambda s: 1.0 if sum({"A": 4, "B": 2, "C": 1, "D": 1}[p] for p in s) >= 6 else 0.0),
])
def test_monte_carlo_matches_exact_shapley(name, players, value):
    exact = exact_shapley(players, value)
    mean, std, est = shapley_mc(players, value, permutations=4000, truncate=0, seed=1)
    for p in players:
        assert mean[p] == pytest.approx(exact[p], abs=0.03), (name, p, mean[p], exact[p])
        assert est[p] == pytest.approx(mean[p] - std[p])
    assert sum(mean.values()) == pytest.approx(value(frozenset(players)) - value(frozenset()))  # efficiency


def test_truncation_stops_permutations_early_and_zeroes_the_rest():
    w = {"a": 6.0, "b": 2.0, "c": 1.0, "d": 1.0}
    calls = {"n": 0}

    def value(s):
        calls["n"] += 1
        return sum(w[p] for p in s)

    mean, _, _ = shapley_mc(list(w), value, permutations=50, truncate=0.5, seed=0)
    truncated_calls = calls["n"]
    calls["n"] = 0
    full, _, _ = shapley_mc(list(w), value, permutations=50, truncate=0, seed=0)
    assert truncated_calls < calls["n"]  # fewer evaluations
    # 'a' is worth more than half the total: once it leaves, the permutation stops, so players
    # after it get 0 and their estimates fall below the exact (additive) values; 'a' keeps its own
    assert mean["a"] == pytest.approx(6.0) and full["b"] == pytest.approx(2.0) and mean["b"] < 2.0


def test_layer_game_is_the_exact_shapley_value_of_each_layers_own_game():
    """Layer i's game: its bit candidates are the players, every other layer keeps all of its own."""
    rng = __import__("random").Random(3)
    table = {}

    def value(present):  # a non-additive game over (layer, bits) players
        key = frozenset(present)
        if key not in table:
            table[key] = rng.random() * len(key) ** 0.5
        return table[key]

    n_layers, n_bits = 3, 4
    phi = sh.shapley_layer_exact(n_layers, n_bits, value)
    everyone = frozenset((i, j) for i in range(n_layers) for j in range(n_bits))
    for i in range(n_layers):
        others = everyone - {(i, j) for j in range(n_bits)}
        own = exact_shapley([(i, j) for j in range(n_bits)], lambda s: value(others | s))
        for j in range(n_bits):
            assert phi[(i, j)] == pytest.approx(own[(i, j)], abs=1e-12)
        # efficiency within the layer: the values add up to v(all) − v(layer i empty)
        assert sum(phi[(i, j)] for j in range(n_bits)) == pytest.approx(value(everyone) - value(others))
    with pytest.raises(mpqkit.errors.MpqkitError, match="too many"):
        sh.shapley_layer_exact(1, sh.LAYER_GAME_MAX_BITS + 1, value)


def test_smpq_by_exact_layer_shapley_ranks_the_bits_and_moves_the_choice(tmp_path):
    """With the exact layer game the Shapley term is no longer noise: per layer the values grow with
    the bits (a layer's 2-bit weights are worth less than its 8-bit ones), the Shapley-updated α
    chooses differently from DMPQ's α, and --smpq-score shapley plans by the values within the budget."""
    opts = {"train_size": 600, "epochs": 3, "warmup": 1, "game": "layer"}
    kw = dict(calib_size=128, progress=False, cache_dir=str(tmp_path))
    s = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "smpq", options=opts, **kw)
    d = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "dmpq", options=opts, **kw)
    phi = s.table.meta["shapley_mean"]
    assert all(row[0] < row[-1] for row in phi)  # 2 bits are worth less than 8
    assert all("shapley_snr" not in h for h in s.table.meta["history"])  # exact: no sampling noise to report
    assert s.plan.assignment() != d.plan.assignment()
    by = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "smpq", options={**opts, "score": "shapley"}, **kw)
    assert by.table.meta["score"].startswith("max Shapley")
    assert by.plan.costs["avg_w_bits_searched"] <= 3 + 1e-9
    # the ILP maximised the summed values: no plan within the budget sums higher
    bits = [2, 3, 4, 5, 6, 8]
    total = lambda a: sum(phi[i][bits.index(a[f][0])] for i, f in enumerate(by.ledger.searched))  # noqa: E731
    assert total(by.plan.assignment()) >= total(s.plan.assignment()) - 1e-9  # s's plan is within the budget too


def test_smpq_and_dmpq_share_one_cached_supernet_run(tmp_path, monkeypatch):
    opts = {"train_size": 600, "epochs": 3, "warmup": 1, "permutations": 3}
    kw = dict(calib_size=128, progress=False, cache_dir=str(tmp_path), options=opts)
    s = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", **kw)
    calls = []
    monkeypatch.setattr(sh, "_shapley", lambda *a, **k: calls.append(1))  # must not be needed again
    d = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "dmpq", **kw)
    assert not calls
    assert s.table.meta["alpha"] == d.table.meta["alpha"]  # the same run
    for res, key in ((s, "alpha_s"), (d, "alpha")):
        alpha = res.table.meta[key]
        bits = [2, 3, 4, 5, 6, 8]  # the default candidates
        argmax = {f: bits[max(range(len(bits)), key=a.__getitem__)] for f, a in zip(res.ledger.searched, alpha)}
        assert res.table.decision.argmax_bits == argmax
        if res.solution.solver == "argmax":
            assert {f: lq.w_bits for f, lq in res.plan.layers.items() if f in argmax} == argmax
    assert len(s.table.meta["history"]) == 3 and "shapley_s" in s.table.meta["history"][-1]
    filled = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq",
                           **{**kw, "options": {**opts, "select": "ilp"}})
    assert filled.solution.solver != "argmax" and filled.plan.costs["avg_w_bits_searched"] <= 4 + 1e-9


def test_killed_supernet_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    opts = {"train_size": 600, "epochs": 3, "warmup": 1, "permutations": 2}
    kw = dict(calib_size=128, progress=False, options=opts)
    ref = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", cache_dir=str(tmp_path / "a"), **kw)
    real = sh._shapley
    n = {"calls": 0}

    def dies_second_time(*a, **k):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sh, "_shapley", dies_second_time)
    with pytest.raises(KeyboardInterrupt):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", cache_dir=str(tmp_path / "b"), **kw)
    resumed = []
    monkeypatch.setattr(sh, "_shapley", lambda *a, **k: resumed.append(1) or real(*a, **k))
    again = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", cache_dir=str(tmp_path / "b"), **kw)
    assert len(resumed) == 1  # only the epoch that was killed is run again
    assert again.table.meta["alpha_s"] == ref.table.meta["alpha_s"]
    assert again.table.meta["alpha"] == ref.table.meta["alpha"]
    assert again.table.meta["shapley"] == ref.table.meta["shapley"]


def test_supernet_quantizes_with_the_runs_quantizer_settings():
    import torch

    from mpqkit.quant.config import QuantConfig
    from mpqkit.quant.observers import quantize_weight

    model = mpqkit.api.load_model("digits-cnn").model
    layers, bits = ["conv2", "conv3"], [2, 4, 8]
    sym = QuantConfig(w_per_channel=False, w_symmetric=True, w_range="minmax")
    quantized = {}
    for name, qc in (("default", QuantConfig()), ("sym", sym)):
        sup = sh.Supernet(model, layers, bits, qc)
        for f, m in zip(layers, sup.mixers):
            w = sup.net.get_submodule(f).weight
            for b, q in zip(bits, m.quantized()):
                assert torch.equal(q, quantize_weight(w, qc.w_spec(b)))  # the shared quantizer, these settings
                quantized[name, f, b] = q
    q2 = quantized["sym", "conv2", 2]  # symmetric per tensor, 2 bits: the levels {-2, -1, 0, 1}·one scale
    assert len(torch.unique(q2)) <= 4 and 0.0 in q2
    for f in layers:
        for b in bits:
            assert not torch.equal(quantized["default", f, b], quantized["sym", f, b])
    # straight-through estimator: the fp weights get gradients through the quantizer
    sup = sh.Supernet(model, layers, bits, sym)
    sup(torch.zeros(2, 1, 8, 8).normal_()).square().sum().backward()
    assert all(float(sup.net.get_submodule(f).weight.grad.abs().sum()) > 0 for f in layers)
    # ranges fixed once per epoch ("epoch") stay put while W moves; per step they follow W
    m = sup.mixers[0]
    with torch.no_grad():
        m.fix_ranges(True)
        m.layer.weight.mul_(3)
        fixed = m.quantized()[-1]
        m.fix_ranges(False)
        assert float(fixed.abs().max()) < float(m.quantized()[-1].abs().max())


def test_search_qconfig_reaches_the_supernet_and_its_cache_key(tmp_path, monkeypatch):
    from mpqkit.quant.config import QuantConfig

    kw = dict(calib_size=128, progress=False, cache_dir=str(tmp_path),
              options={"train_size": 300, "epochs": 1, "warmup": 0, "permutations": 1})
    default = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", **kw)
    sym = QuantConfig(w_per_channel=False, w_symmetric=True)
    real, calls = sh._shapley, []
    monkeypatch.setattr(sh, "_shapley", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", qconfig=sym, **kw)
    assert calls  # a run under other quantizer settings is not read from the default's records
    assert other.table.meta["supernet_quantizer"] == sym.to_dict()
    assert default.table.meta["supernet_quantizer"] == QuantConfig().to_dict()
    assert other.table.meta["alpha"] != default.table.meta["alpha"]


def _supernet_records(root, kind):
    import json

    for path in sorted(root.rglob("*.json")):
        entry = json.loads(path.read_text())
        if entry["payload"].get("kind") == f"smpq-supernet-{kind}":
            yield path, entry


def test_corrupt_supernet_records_are_recomputed_not_trusted(tmp_path, monkeypatch):
    import json

    opts = {"train_size": 600, "epochs": 3, "warmup": 1, "permutations": 2}
    kw = dict(calib_size=128, progress=False, options=opts)
    ref = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", cache_dir=str(tmp_path / "a"), **kw)
    real = sh._shapley
    n = {"calls": 0}

    def counted(*a, **k):
        n["calls"] += 1
        if n.get("die") == n["calls"]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sh, "_shapley", counted)
    n["die"] = 2  # killed during epoch 2: the states after epochs 1 and 2 are on disk
    with pytest.raises(KeyboardInterrupt):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", cache_dir=str(tmp_path / "b"), **kw)
    states = list(_supernet_records(tmp_path / "b", "state"))
    assert [e["payload"]["epoch"] for _, e in states] and not list(_supernet_records(tmp_path / "b", "result"))
    for path, entry in states:  # tampered, still valid JSON: only the checksum tells
        entry["payload"]["history"][0]["val_top1"] = 0.123
        path.write_text(json.dumps(entry))
    n.update(calls=0, die=None)
    again = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", cache_dir=str(tmp_path / "b"), **kw)
    assert n["calls"] == 2  # every post-warm-up epoch recomputed: no resume from a corrupt state
    assert again.table.meta["alpha_s"] == ref.table.meta["alpha_s"]
    assert again.table.meta["history"][0]["val_top1"] != 0.123
    ((path, entry),) = _supernet_records(tmp_path / "b", "result")
    assert not list(_supernet_records(tmp_path / "b", "state"))  # dropped once the run finished
    entry["payload"]["alpha_s"][0][0] += 100.0
    path.write_text(json.dumps(entry))
    n["calls"] = 0
    third = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", cache_dir=str(tmp_path / "b"), **kw)
    assert n["calls"] == 2
    assert third.table.meta["alpha_s"] == ref.table.meta["alpha_s"]
    assert third.table.meta["shapley"] == ref.table.meta["shapley"]


def test_budget_penalty_draws_the_expected_cost_to_the_budget(tmp_path):
    """penalty=budget pulls E[avg bits] under softmax(α) down toward a small budget and up toward a
    large one (from the uniform start, 4.67 bits over {2,3,4,5,6,8}); the blind bits penalty pulls
    both down, so one of its runs serves every budget while a budget-targeted run serves only its own."""
    opts = {"train_size": 1000, "epochs": 4, "warmup": 1, "permutations": 1, "lam": 2.0}
    kw = dict(calib_size=128, progress=False, cache_dir=str(tmp_path))
    start = sum([2, 3, 4, 5, 6, 8]) / 6
    runs = {}
    for penalty in ("budget", "bits"):
        for b in (3, 6):
            res = mpqkit.search("digits-cnn", "digits", f"avg-bits={b}", "dmpq", **kw,
                                options={**opts, "penalty": penalty})
            runs[penalty, b] = res
    got = {k: r.table.meta["history"][-1]["expected_avg_bits"] for k, r in runs.items()}
    assert got["budget", 3] < start - 0.05 and got["budget", 6] > start + 0.05
    assert got["bits", 3] < start and got["bits", 3] == got["bits", 6]  # one run, blind to the budget
    usage = [h["budget_usage"] for h in runs["budget", 3].table.meta["history"]]
    assert abs(usage[-1] - 1) < abs(usage[0] - 1)  # closer to the budget than after the warm-up epoch
    assert runs["budget", 3].table.for_budget and not runs["budget", 3].table.reusable
    assert not runs["bits", 3].table.for_budget and runs["bits", 3].table.reusable


def test_bench_trains_a_budget_targeted_supernet_for_each_budget(tmp_path):
    """A sweep must not solve a budget from a supernet trained for another one (the table is for_budget)."""
    from mpqkit import api

    opts = {"train_size": 600, "epochs": 2, "warmup": 1, "permutations": 1, "lam": 2.0}
    rows = api.bench("digits-cnn", "digits", ["dmpq"], ["avg-bits=3", "avg-bits=6"], tmp_path / "b",
                     options={"dmpq": opts}, splits=("test",), calib_size=128, progress=False,
                     cache_dir=str(tmp_path / "c"))
    plans = [r["plan"] for r in rows if r["method"] == "dmpq"]
    final = [json.loads((Path(p).parent / "sensitivity.json").read_text())["meta"]["history"][-1] for p in plans]
    assert final[0]["expected_avg_bits"] < final[1]["expected_avg_bits"]  # two runs, each drawn to its budget
    assert final[0]["budget_usage"] != final[1]["budget_usage"]


def test_prefix_values_equal_full_forwards_on_a_residual_net():
    """Shapley coalition values started at the earliest changed layer (kept live tensors, skip branch
    included) are exactly those of a full supernet forward, and run fewer layers."""
    import torch
    from torch import nn

    from mpqkit.zoo.data import LabeledData

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x)))
            x = x + torch.relu(self.c3(torch.relu(self.c2(x))))  # skip branch live across c2, c3
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    net = Res().eval()
    sup = sh.Supernet(net, ["c1", "c2", "c3", "fc"], [2, 4, 8]).eval()
    with torch.no_grad():
        sup.alpha.normal_()
    val = LabeledData(torch.randn(40, 3, 8, 8), torch.randint(0, 4, (40,)), "t", "test", 4)
    for m in sup.mixers:
        m.freeze(True)
    players = [(i, j) for i in range(4) for j in range(3)]
    for kind in ("soft", "top1"):
        fast = sh._PrefixValue(sup, val, kind)

        def full(present):
            for i, m in enumerate(sup.mixers):
                m.mask = torch.tensor([1.0 if (i, j) in present else 0.0 for j in range(3)])
            try:
                return sh._coalition_value(sup(val.images), val.labels, kind)
            finally:
                for m in sup.mixers:
                    m.mask = torch.ones(3)

        with torch.no_grad():
            a = shapley_mc(players, fast, permutations=5, truncate=0, seed=1)
            b = shapley_mc(players, full, permutations=5, truncate=0, seed=1)
        assert a == b
        assert 0 < fast.layer_runs < 5 * len(players) * 4  # fewer layers than full forwards


def test_prefix_values_fall_back_to_full_forwards_beyond_the_memory_limit(monkeypatch):
    import torch

    from mpqkit.zoo.data import LabeledData

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    sup = sh.Supernet(net, ["0", "2"], [2, 8]).eval()
    val = LabeledData(torch.randn(10, 3, 8, 8), torch.randint(0, 3, (10,)), "t", "test", 3)
    for m in sup.mixers:
        m.freeze(True)
    with torch.no_grad():
        assert sh._PrefixValue(sup, val, "soft").full_value > 0
        with pytest.raises(ValueError, match="MiB"):
            sh._PrefixValue(sup, val, "soft", limit=1000)


def test_shapley_on_pretrained_weights_plays_on_the_model_the_plan_is_applied_to(tmp_path, monkeypatch):
    """--shapley-weights pretrained: the game mixes the pretrained weights with the trained α (the
    supernet's own weights drift during training and are co-trained with α's favourite bits)."""
    import torch

    seen = []
    real = sh._shapley

    def spy(net, val, cfg, seed, **kw):
        seen.append(({k: v.clone() for k, v in net.net.state_dict().items()}, net.alpha.detach().clone()))
        return real(net, val, cfg, seed, **kw)

    monkeypatch.setattr(sh, "_shapley", spy)
    opts = {"train_size": 600, "epochs": 2, "warmup": 1, "game": "layer"}
    kw = dict(calib_size=128, progress=False, cache_dir=str(tmp_path))
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "smpq", options={**opts, "shapley_weights": "pretrained"},
                        **kw)
    pre = mpqkit.api.load_model("digits-cnn", mpqkit.api.resolve_settings(None, {})).model.state_dict()
    weights, alpha = seen[-1]
    assert all(torch.equal(weights[k], pre[k]) for k in pre)  # the pretrained weights, untouched
    assert torch.allclose(alpha, torch.tensor(res.table.meta["alpha"]))  # mixed by the trained α
    mpqkit.search("digits-cnn", "digits", "avg-bits=3", "smpq", options=opts, **kw)  # the default: supernet weights
    weights, _ = seen[-1]
    assert not all(torch.equal(weights[k], pre[k]) for k in pre)


def test_a_chunked_training_step_gives_the_whole_batch_gradients():
    """``step_backward`` in chunks (how a 224 x 224 step fits in memory): every parameter's gradient,
    α's with the penalty included, equals one pass over the whole batch (no train-mode BatchNorm here)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    alpha, grads = torch.randn(2, 3), []
    for chunk in (12, 5, 1):
        sup = sh.Supernet(net, ["0", "3"], [2, 4, 8])
        with torch.no_grad():
            sup.alpha.copy_(alpha)
        penalty = 0.5 * sup.expected_bits(torch.tensor([108.0, 432.0])) / 8
        sh.step_backward(sup, x, y, chunk, penalty)
        grads.append({n: p.grad.clone() for n, p in sup.named_parameters()})
    assert set(grads[0]) >= {"alpha", "net.0.weight", "net.0.bias", "net.3.weight"}
    for other in grads[1:]:
        for n, g in grads[0].items():
            assert torch.allclose(other[n], g, rtol=1e-4, atol=1e-6), n


def test_supernet_memory_counts_one_training_chunk_and_the_train_images():
    """smpq/dmpq declare their memory (``--max-memory`` refuses them before training when it is too
    small): one chunk's backward pass plus the train images; 224 x 224 steps run 8 images at a time."""
    import dataclasses

    import torch

    from mpqkit.graph import discover
    from mpqkit.loading import load_model
    from mpqkit.sensitivity.base import SearchContext
    from mpqkit.sensitivity.gradients import grad_pass_mb
    from mpqkit.sensitivity.registry import METHODS
    from mpqkit.settings import RunSettings
    from mpqkit.zoo.data import LabeledData

    assert sh.train_chunk(torch.zeros(2, 3, 32, 32), 128) == 128
    assert sh.train_chunk(torch.zeros(2, 3, 224, 224), 128) == 8
    bundle = load_model("digits-cnn", RunSettings())
    graph = discover(bundle.model, bundle.input_shape)
    train = lambda n, seed: LabeledData(torch.zeros(n, 1, 8, 8), torch.zeros(n).long(), "t", "train", 10)  # noqa: E731
    ctx = SearchContext(model=bundle.model, graph=graph, calib_images=torch.zeros(8, 1, 8, 8),
                        calib_labels=torch.zeros(8).long(), searched=graph.names, w_bits=[2, 8], a_bits=[8],
                        load_train=train)
    for name in ("smpq", "dmpq"):
        m = METHODS.get(name)
        mb = m.memory(dataclasses.replace(ctx, options=m.make_options({"train_size": 1000, "preset": "quick"})))
        assert mb == pytest.approx(grad_pass_mb(graph, 128) + 1000 * 64 * 4 / 2 ** 20)
