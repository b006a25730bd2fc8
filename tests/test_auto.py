"""auto: the plan of the candidate with the lowest held-out loss (images disjoint from the
calibration draw), refined only where the held-out loss does not rise; every candidate is listed."""
from __future__ import annotations

import math

import pytest

import mpqkit
from mpqkit import api

KW = dict(calib_size=384, progress=False)


def test_auto_keeps_the_best_held_out_plan_and_lists_what_it_tried():
    opts = {"methods": "uniform,eval-delta,mixquant-ilp,mpqco,greedy", "heldout": 512, "refine": 0}
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "auto", options=opts, **KW)
    trials = res.table.decision.trials
    assert [t["method"] for t in trials] == opts["methods"].split(",")
    ok = [t for t in trials if "heldout_loss" in t]
    best = min(ok, key=lambda t: (t["heldout_loss"], t["method"]))
    assert [t for t in trials if t.get("chosen")] == [best]
    same = mpqkit.search("digits-cnn", "digits", "avg-bits=3", best["method"], **KW)
    assert res.plan.assignment() == same.plan.assignment()  # no refinement: the chosen method's plan
    assert res.plan.provenance["solver"]["trials"][0]["method"] == "uniform"
    assert all(math.isfinite(t["heldout_loss"]) for t in ok)
    # the held-out images are disjoint from the calibration draw
    calib = api.calibration_set("digits", 384, 0)
    held = api.heldout_set("digits", 384, 512, 0, None)
    train = api.load_split("digits", "train")
    key = {tuple(x.flatten().tolist()): i for i, x in enumerate(train.images)}
    assert not {key[tuple(x.flatten().tolist())] for x in calib.images} & {key[tuple(x.flatten().tolist())]
                                                                            for x in held.images}


def test_auto_refines_and_keeps_only_what_holds_out():
    opts = {"methods": "uniform,mixquant-ilp", "heldout": 512, "refine": 30}
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "auto", options=opts, **KW)
    last = res.table.decision.trials[-1]
    assert last["method"].endswith("+ refine") and last["probes"] <= 30
    chosen = next(t for t in res.table.decision.trials if t.get("chosen"))
    if last.get("kept"):
        assert last["heldout_loss"] <= chosen["heldout_loss"]
    assert not res.solution.info.get("violations")


def test_auto_needs_a_budget_and_no_recursion():
    with pytest.raises(mpqkit.errors.MpqkitError, match="needs a --budget"):
        mpqkit.search("digits-cnn", "digits", None, "auto", **KW)
    with pytest.raises(mpqkit.errors.MpqkitError, match="cannot include auto"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=3", "auto", options={"methods": "auto,uniform"}, **KW)


def test_bench_solves_auto_anew_at_every_budget(tmp_path):
    """auto's table holds a plan made for one budget: a sweep must not reuse it for the next."""
    rows = api.sweep("digits-cnn", "digits", "auto", ["avg-bits=2.5", "avg-bits=4"], tmp_path / "s", splits=["test"],
                     options={"auto": {"methods": "uniform,eval-delta", "heldout": 256, "refine": 0}}, **KW)
    bits = {r["budget"]: r["avg_w_bits"] for r in rows if r["method"] == "auto"}
    assert bits["avg-bits=2.5"] <= 2.5 + 1e-9 and bits["avg-bits=4"] > 2.5


def test_auto_with_a_small_calibration_set_skips_refinement_with_a_warning():
    """128 images are one chunk: refinement cannot choose on one half and confirm on the other."""
    opts = {"methods": "uniform,mixquant-ilp", "heldout": 256, "refine": 30}
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "auto", options=opts, calib_size=128, progress=False)
    assert "refinement skipped" in res.table.meta["refine"]["skipped"]
    assert any("refinement skipped" in w for w in res.plan.provenance["warnings"])
    assert not any(t["method"].endswith("+ refine") for t in res.table.decision.trials)


def test_auto_passes_candidate_flags_to_its_candidates():
    """`--method auto --mpqco-output logit` runs auto's mpqco candidate with that option (and the plan
    records it); a flag no candidate has, or an option for a method that is not a candidate, is an error."""
    opts = api.method_options_for(["auto"], {"mpqco_output": "logit", "methods": "mpqco", "refine": 0,
                                             "heldout": 256})["auto"]
    assert opts.candidate_map() == {"mpqco": {"mpqco_output": "logit"}}
    tables = {}
    for form in ("logit", "prob"):
        o = opts.replace(candidate_options={"mpqco": {"mpqco_output": form}})
        res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "auto", options=o, **KW)
        direct = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "mpqco", options={"mpqco_output": form}, **KW)
        assert res.table.w == direct.table.w
        assert res.plan.method_params["candidate_options"] == f'{{"mpqco": {{"mpqco_output": "{form}"}}}}'
        tables[form] = res.table.w
    assert tables["logit"] != tables["prob"]  # the option reached the candidate
    run = api.method_options_for(["auto"], {"workers": 2})["auto"]  # execution only: reaches eval-delta, not the plan
    assert run.candidate_map() == {"eval-delta": {"workers": 2}} and run.to_params()["candidate_options"] == ""
    with pytest.raises(mpqkit.errors.MpqkitError, match="--psd is an option of clado"):
        api.method_options_for(["auto"], {"psd": "project"})
    with pytest.raises(mpqkit.errors.MpqkitError, match="not one of its candidates"):
        api.method_options_for(["auto"], {"candidate_options": '{"clado": {}}'})
    with pytest.raises(mpqkit.errors.MpqkitError, match="not JSON"):
        api.method_options_for(["auto"], {"candidate_options": "{mpqco"})
