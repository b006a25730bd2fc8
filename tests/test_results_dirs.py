"""Results directories describe one run (issue 31): one writer at a time, no duplicate rows, strict
JSON, no stale files from an earlier run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpqkit.cli import main
from mpqkit.errors import MpqkitError
from mpqkit.fileutil import LOCK_NAME, json_text, writer_lock

ROOT = Path(__file__).parents[1]
BENCH = ["bench", "--model", "digits-cnn", "--data", "digits", "--methods", "uniform,eval-delta", "--budgets",
         "avg-bits=4", "--ptq", "default", "--splits", "test", "--calib-size", "64", "-q"]


def test_two_concurrent_benches_write_each_row_once(tmp_path):
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MPQKIT_CACHE": str(tmp_path / "cache")}
    code = "import sys; from mpqkit.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, *BENCH, "--out", str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    keys = [(r["method"], r["budget"], r["ptq"], r.get("draw", 0)) for r in rows]
    assert len(keys) == len(set(keys)) == 3  # fp32 + two methods, each once
    # one run wrote them; the other either stopped at the lock with one line or found them all measured
    for rc, err in results:
        assert rc == 0 or (rc == 2 and "another mpqkit run" in err and err.count("\n") == 1), err
    assert not (out / LOCK_NAME).exists()


def test_lock_names_the_holder_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "b"
    with writer_lock(out.parent, "x"):  # the parent only; not this folder
        pass
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))  # a live holder
    assert main([*BENCH, "--out", str(out)]) == 2
    assert "another mpqkit run (pid" in capsys.readouterr().err
    assert not (out / "rows.jsonl").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))  # gone
    assert main([*BENCH, "--out", str(out)]) == 0
    assert (out / "rows.jsonl").exists() and not (out / LOCK_NAME).exists()


def test_repeated_budgets_ptqs_splits_methods_are_measured_once(tmp_path, caplog):
    out = tmp_path / "b"
    argv = ["bench", "--model", "digits-cnn", "--data", "digits", "--methods", "uniform,uniform",
            "--budgets", "avg-bits=4;avg-bits=4; avg-bits=4.0 ", "--ptq", "default,default",
            "--splits", "test,test", "--calib-size", "64", "-q", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in rows] == [("fp32", "-"), ("uniform", "avg-bits=4")]
    assert "given more than once; measured once" in caplog.text
    assert "--ptq: default given more than once" in caplog.text and "None" not in caplog.text


def test_a_numpy_integer_seed_is_a_seed():
    import numpy as np

    from mpqkit.settings import RunSettings

    s = RunSettings(seed=np.int64(3))
    assert s.seed == 3 and type(s.seed) is int
    with pytest.raises(MpqkitError, match="--seed"):
        RunSettings(seed=np.float64(3.0))


def test_json_is_strict():
    assert json_text({"a": [1.0, 2]}, "x") == '{"a": [1.0, 2]}'
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(MpqkitError, match=r"summary holds a non-finite number at costs\.per_layer\.1"):
            json_text({"costs": {"per_layer": [0.5, bad]}}, "summary")


def test_a_search_directory_holds_only_this_searchs_files(tmp_path):
    out = tmp_path / "s"
    common = ["search", "--model", "digits-cnn", "--data", "digits", "--calib-size", "64", "-q", "--out", str(out)]
    assert main([*common, "--method", "eval-delta", "--budget", "avg-bits=4"]) == 0
    assert (out / "sensitivity.json").exists()
    assert main([*common, "--method", "uniform", "--w-bits", "4"]) == 0
    assert not (out / "sensitivity.json").exists()  # eval-delta's table is not uniform's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "uniform" and sorted(summary["files"]) == sorted(
        p.name for p in out.iterdir() if p.is_file())


def test_bench_that_fails_before_writing_leaves_no_directory(tmp_path):
    out = tmp_path / "never"
    assert main(["bench", "--model", "digits-cnn", "--data", "digits", "--methods", "uniform", "--budgets",
                 "avg-bits=4", "--splits", "exact", "--out", str(out), "-q"]) == 2
    assert not out.exists()


def test_report_counts_a_repeated_row_once_and_names_a_garbage_file(tmp_path, caplog, capsys):
    from mpqkit.report.bench import load_rows

    d = tmp_path / "r"
    d.mkdir()
    row = {"method": "uniform", "budget": "avg-bits=4", "ptq": None, "draw": 0, "top1_test": 90.0, "avg_w_bits": 4.0}
    (d / "rows.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "top1_test": 10.0}) + "\n")
    assert [r["top1_test"] for r in load_rows(d / "rows.jsonl")] == [90.0]
    assert "1 repeated row(s) ignored" in caplog.text
    (d / "rows.jsonl").write_text("garbage\n")
    assert main(["report", str(d)]) == 2
    assert "holds no readable row" in capsys.readouterr().err


def test_plan_naming_another_model_or_without_provenance_warns(tmp_path, caplog):
    from mpqkit import api
    from mpqkit.plan import Plan

    plan = api.search("digits-cnn", "digits", None, "uniform", w_bits=4, calib_size=64, progress=False).plan
    plan.model_name = "renamed"
    api.apply_plan("digits-cnn", plan, "digits", calib_size=64, progress=False)
    assert "names model 'renamed' but is applied to 'digits-cnn'" in caplog.text
    bare = Plan(layers=plan.layers, model_name="digits-cnn", model_sha256=plan.model_sha256)
    api.apply_plan("digits-cnn", bare, "digits", calib_size=64, progress=False)
    assert "the plan has no provenance" in caplog.text


def test_disk_full_names_the_file_and_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    """A write that fails for lack of space (the file system names no file) is one line naming the file
    being written, and a results folder the run created stays behind only if something was written."""
    import mpqkit.fileutil
    from test_export import _FailingWrites

    monkeypatch.setattr(mpqkit.fileutil, "os", _FailingWrites())
    out = tmp_path / "s"
    code = main(["search", "-q", "--model", "digits-cnn", "--data", "digits", "--method", "uniform",
                 "--budget", "avg-bits=4", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and f"({out}/" in err
    assert not out.exists()
