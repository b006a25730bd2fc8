"""SMPQ / DMPQ: the Monte-Carlo Shapley estimator against exact values, and the shared supernet run."""
from __future__ import annotations

import itertools
import math

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


def test_smpq_and_dmpq_share_one_cached_supernet_run(tmp_path, monkeypatch):
    opts = {"train_size": 600, "epochs": 3, "warmup": 1, "permutations": 3}
    kw = dict(calib_size=128, progress=False, engine_options={"cache_dir": str(tmp_path)}, method_options=opts)
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
        assert res.table.meta["argmax_bits"] == argmax
        if res.solution.solver == "argmax":
            assert {f: lq.w_bits for f, lq in res.plan.layers.items() if f in argmax} == argmax
    assert len(s.table.meta["history"]) == 3 and "shapley_s" in s.table.meta["history"][-1]
    filled = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq",
                           **{**kw, "method_options": {**opts, "select": "ilp"}})
    assert filled.solution.solver != "argmax" and filled.plan.costs["avg_w_bits_searched"] <= 4 + 1e-9


def test_killed_supernet_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    opts = {"train_size": 600, "epochs": 3, "warmup": 1, "permutations": 2}
    kw = dict(calib_size=128, progress=False, method_options=opts)
    ref = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", engine_options={"cache_dir": str(tmp_path / "a")},
                        **kw)
    real = sh._shapley
    n = {"calls": 0}

    def dies_second_time(*a, **k):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sh, "_shapley", dies_second_time)
    with pytest.raises(KeyboardInterrupt):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", engine_options={"cache_dir": str(tmp_path / "b")},
                      **kw)
    monkeypatch.setattr(sh, "_shapley", real)
    again = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "smpq", engine_options={"cache_dir": str(tmp_path / "b")},
                          **kw)
    assert again.table.meta["alpha_s"] == ref.table.meta["alpha_s"]
    assert again.table.meta["shapley"] == ref.table.meta["shapley"]
