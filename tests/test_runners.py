"""Runners: Ray workers give the local loop's exact tables and plans; device choice."""
from __future__ import annotations

import pytest
import torch

import mpqkit
from mpqkit.device import resolve_device
from mpqkit.errors import MpqkitError

BITS = (2, 4, 8)


def test_ray_runner_equals_local(tmp_path):
    ray = pytest.importorskip("ray")
    kw = dict(w_candidates=BITS, calib_size=128, progress=False, time_limit=5)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one local 2-worker instance for both
    try:
        _compare(tmp_path, kw)
    finally:
        ray.shutdown()


def _compare(tmp_path, kw):
    for method in ("clado", "eval-delta"):
        local = mpqkit.search("digits-cnn", "digits", "avg-bits=4", method,
                              cache_dir=str(tmp_path / f"{method}-a"), **kw)
        ray_ = mpqkit.search("digits-cnn", "digits", "avg-bits=4", method,
                             options={"workers": 2, "runner": "ray"},
                             cache_dir=str(tmp_path / f"{method}-b"), **kw)
        assert ray_.table.w == local.table.w and ray_.table.pairs == local.table.pairs
        assert ray_.plan.to_dict()["layers"] == local.plan.to_dict()["layers"]
        # the driver ran only its reference probes: everything else came from the Ray actors
        assert ray_.engine_stats["probes_run"] < local.engine_stats["probes_run"]


def test_device_resolution():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MpqkitError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(MpqkitError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unknown_runner_is_refused():
    with pytest.raises(MpqkitError, match="runner.*must be one of local, ray"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "eval-delta", calib_size=64, progress=False,
                      options={"workers": 2, "runner": "slurm"})
