"""Where a search's time goes (``mpqkit.profile``): stages recorded through the whole stack, in summary.json."""
from __future__ import annotations

import json
import time

import mpqkit
from mpqkit.profile import Profile, format_profile, probe_done, profiling, stage


def test_nested_stages_count_once_and_nothing_is_recorded_without_a_profile():
    with stage("outside"):  # no open profile: a no-op
        probe_done("x", 1.0)
    with profiling() as prof:
        with stage("outer"):
            time.sleep(0.02)
            with stage("inner"):
                time.sleep(0.03)
        probe_done("conv1", 0.5)
        probe_done("conv1", 0.25)
    d = prof.to_dict()
    assert d["stages"]["inner"]["seconds"] >= 0.03 and 0.02 <= d["stages"]["outer"]["seconds"] < 0.03 + 0.02
    assert sum(v["seconds"] for v in d["stages"].values()) <= d["wall_seconds"] + 1e-3
    assert d["probes_by_start_layer"] == {"conv1": {"probes": 2, "mean_ms": 375.0}}
    assert "outside" not in d["stages"] and d["peak_rss_mb"] > 0
    assert "conv1 2 × 375 ms" in format_profile(d)
    assert isinstance(Profile().to_dict()["stages"]["other"]["seconds"], float)


def test_a_search_says_where_its_time_went(tmp_path):
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", calib_size=256, progress=False,
                        out=tmp_path / "r")
    stages = res.profile["stages"]
    for name in ("calibration set", "fp reference", "probes", "layer PTQ (GPTQ)", "solver"):
        assert stages[name]["calls"] >= 1, name  # every stage was timed (a cached digits draw may take < 1 ms)
    for name in ("fp reference", "probes", "layer PTQ (GPTQ)"):
        assert stages[name]["seconds"] > 0, name
    n_probes = sum(v["probes"] for v in res.profile["probes_by_start_layer"].values())
    assert n_probes == res.engine_stats["probes_run"]  # every probe the engine ran, by its start layer
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["profile"]["stages"].keys() == stages.keys()


def test_prefix_cache_default_is_sized_to_the_machine(monkeypatch):
    from mpqkit.engine import probe

    mb = probe.default_prefix_cache_mb()
    assert 0 < mb <= 2048
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert probe.default_prefix_cache_mb() == 2048.0


def test_each_stage_gets_the_resident_peak_seen_while_it_ran():
    import sys

    import numpy as np
    import pytest

    from mpqkit.profile import RssSampler, resident_mb
    if not sys.platform.startswith("linux") or resident_mb() == 0:
        pytest.skip("reads /proc/self/status")
    with profiling() as prof:
        with stage("big"):
            a = np.ones(2 ** 27 // 8 * 3)  # 384 MB, touched
            time.sleep(0.3)
            del a
        with stage("small"):
            time.sleep(0.3)
    d = prof.to_dict()
    big, small = d["stages"]["big"]["peak_mb"], d["stages"]["small"]["peak_mb"]
    assert big - small > 300  # the buffer is charged to its own stage only, not to the one after it
    assert d["search_peak_mb"] == big and d["peak_rss_mb"] >= big - 1  # ru_maxrss is the process's, never below
    assert "peak" in format_profile(d)
    with RssSampler(interval=0.01) as s:
        b = np.ones(2 ** 27 // 8 * 2)  # 256 MB
        time.sleep(0.1)
        del b
    assert s.peak - resident_mb() > 200
