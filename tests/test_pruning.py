"""Pruned candidates (``RunSettings.prune``) never change the plan: the same plan bytes with pruning on
and off, with fewer probes measured (eval-delta's lazy ILP, greedy's Pareto points under the budget)."""
from __future__ import annotations

import json

import pytest

import mpqkit
from mpqkit.sensitivity.base import SensitivityTable

SETTINGS = dict(calib_size=256, progress=False)


def _plan_bytes(res) -> str:
    return json.dumps(res.plan.to_dict())


def _pair(model, data, budget, method, tmp_path, **kw):
    on = mpqkit.search(model, data, budget, method, prune=True, cache_dir=str(tmp_path / "on"), **SETTINGS, **kw)
    off = mpqkit.search(model, data, budget, method, prune=False, cache_dir=str(tmp_path / "off"), **SETTINGS, **kw)
    return on, off


@pytest.mark.parametrize("budget", ["avg-bits=2.5", "avg-bits=3", "avg-bits=4", "size=0.12x"])
def test_eval_delta_pruned_same_plan_fewer_probes(budget, tmp_path):
    on, off = _pair("digits-cnn", "digits", budget, "eval-delta", tmp_path)
    assert _plan_bytes(on) == _plan_bytes(off)
    assert not off.table.pruned
    n_all = sum(len(v) for v in off.table.w.values())
    assert on.table.meta["probes"] + on.table.meta["pruned"] == n_all
    assert on.engine_stats["probes_run"] < off.engine_stats["probes_run"]
    # what was measured equals the full table's value; a pruned candidate's bound is below its true value
    for f, scores in on.table.w.items():
        for b, v in scores.items():
            assert v == pytest.approx(off.table.w[f][b], abs=1e-12)
    for f, scores in on.table.pruned.items():
        for b, v in scores.items():
            assert v <= off.table.w[f][b] + 1e-12


def test_eval_delta_pruned_refinement_reads_the_same_scores(tmp_path):
    """--refine orders its moves by the table: pruned scores it reads are measured then, same plan."""
    on, off = _pair("digits-cnn", "digits", "avg-bits=3", "eval-delta", tmp_path, refine=12)
    assert _plan_bytes(on) == _plan_bytes(off)


@pytest.mark.parametrize("budget", ["avg-bits=3", "avg-bits=5"])
def test_greedy_measures_only_points_under_the_budget(budget, tmp_path):
    on, off = _pair("digits-cnn", "digits", budget, "greedy", tmp_path)
    assert _plan_bytes(on) == _plan_bytes(off)
    pts_on, pts_off = on.table.decision.pareto, off.table.decision.pareto
    assert [p["bits"] for p in pts_on] == [p["bits"] for p in pts_off]
    measured = [p for p in pts_on if p["measured"]]
    assert 0 < len(measured) < len(pts_on)
    for p, q in zip(pts_on, pts_off):
        if p["measured"]:
            assert p["top1"] == q["top1"]
        else:
            assert p["avg_w_bits"] > float(budget.split("=")[1])  # only points over the budget are skipped


def test_no_pruning_without_a_bound(tmp_path):
    """Cross-entropy can fall below the fp model's: no bound, every candidate measured."""
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", objective="ce",
                        cache_dir=str(tmp_path), **SETTINGS)
    assert not res.table.pruned and res.table.reusable


def test_bounded_scores_merge_measured_over_bounds():
    t = SensitivityTable(w={"a": {2: 0.5}}, pruned={"a": {8: 0.0}, "b": {8: 0.0}})
    assert t.w_bounded == {"a": {8: 0.0, 2: 0.5}, "b": {8: 0.0}}
    assert SensitivityTable(w={"a": {2: 0.5}}).w_bounded == {"a": {2: 0.5}}


def test_a_pruned_table_is_not_reused_for_another_budget(tmp_path):
    """Its bounds are not scores: solving another budget from it would be wrong, so it is refused."""
    from mpqkit.errors import MpqkitError

    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", cache_dir=str(tmp_path), **SETTINGS)
    assert res.table.pruned
    with pytest.raises(MpqkitError, match="prune=False"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "eval-delta", table=res.table, cache_dir=str(tmp_path),
                      **SETTINGS)
    full = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", prune=False, cache_dir=str(tmp_path),
                         **SETTINGS)
    again = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "eval-delta", table=full.table,
                          cache_dir=str(tmp_path), **SETTINGS)
    assert again.plan.costs["avg_w_bits_searched"] <= 4 + 1e-9
