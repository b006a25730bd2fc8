"""Every script under benchmarks/ imports (only public mpqkit names that exist) and parses --help; smoke runs on digits."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_runs_help(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_benchmark_scripts_use_only_public_names():
    for script in SCRIPTS:
        for line in script.read_text().splitlines():
            if line.startswith("from mpqkit") and " import " in line:
                names = [n.strip() for n in line.split(" import ", 1)[1].split(",")]
                assert not [n for n in names if n.startswith("_")], (script.name, line)


def test_finetune_plans_fine_tunes_then_tests_then_resumes(tmp_path, monkeypatch):
    """benchmarks/finetune_plans.py on the digits model: --no-test fine-tunes and writes no row; the
    same command without it finds the finished folder (no training again) and writes one paired row;
    a rerun writes nothing new."""
    import importlib.util
    import json

    from mpqkit import api

    spec = importlib.util.spec_from_file_location("finetune_plans", ROOT / "benchmarks" / "finetune_plans.py")
    fp = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "finetune_plans", fp)  # its dataclass looks its module up
    spec.loader.exec_module(fp)
    src = tmp_path / "src"
    res = api.search("digits-cnn", "digits", "avg-bits=4", method="uniform", out=src / "search",
                     calib_size=64, progress=False)
    (src / "rows.jsonl").write_text(json.dumps({
        "method": "uniform", "budget": "avg-bits=4", "ptq": None, "draw": 0, "seed": 0, "avg_w_bits": 4.0,
        "top1_test": 0.0, "search_s": 1.0, "plan": str(src / "search" / "plan.json")}) + "\n")
    argv = ["--src", str(src), "--out", str(tmp_path / "out"), "--model", "digits-cnn", "--data", "digits",
            "--methods", "uniform", "--budgets", "avg-bits=4", "--draws", "0", "--epochs", "1",
            "--allow-small-data"]
    fp.main(argv + ["--no-test"])
    folder = tmp_path / "out" / "plans" / "uniform" / "avg-bits=4" / "draw0" / "lsq-1ep"
    assert fp.finished(folder) is not None and not (tmp_path / "out" / "rows.jsonl").exists()
    stamp = (folder / "model.pt").stat().st_mtime_ns
    fp.main(argv)
    assert (folder / "model.pt").stat().st_mtime_ns == stamp  # evaluated, not trained again
    before, tuned = [json.loads(x) for x in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert tuned["ptq"] == "lsq-1ep" and tuned["device"] == "cpu" and before["ptq"] is None  # the plan as it was
    assert tuned["top1_before"] == before["top1_test"] == 100 * api.evaluate(
        "digits-cnn", "digits", "test", plan=res.plan, progress=False)["top1"]
    assert 0 < tuned["top1_test"] <= 100 and tuned["avg_w_bits"] == before["avg_w_bits"] == 4.0
    fp.main(argv)
    assert len((tmp_path / "out" / "rows.jsonl").read_text().splitlines()) == 2


def test_search_cost_records_each_method_once_and_writes_its_table(tmp_path, monkeypatch):
    """benchmarks/search_cost.py on the digits model: one cold process per method, a cost record with its
    peak resident memory, a table row per method; a rerun runs nothing again."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("search_cost", ROOT / "benchmarks" / "search_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    out = tmp_path / "cost"
    argv = ["--model", "digits-cnn", "--methods", "uniform,mixquant-ilp", "--budgets", "avg-bits=3", "--out", str(out),
            "--", "--max-memory", "20000"]
    mod.main(argv)
    records = [json.loads(x) for x in (out / "cost.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["uniform", "mixquant-ilp"]
    assert all(r["exit"] == 0 and not r["timed_out"] and r["peak_rss_mb"] > 50 for r in records)
    table = (out / "cost.md").read_text()
    assert "| digits-cnn | uniform | 1 |" in table and "| digits-cnn | mixquant-ilp | 1 |" in table
    assert table.count("| 20000 |") == 2  # the limit each process ran under
    cells = next(x for x in table.splitlines() if "| mixquant-ilp |" in x).split("|")
    assert float(cells[8]) > 50 and float(cells[9]) > 50  # the search's own peak, its PTQ + evaluation's peak
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"fp32", "uniform", "mixquant-ilp"}
    mod.main(argv)  # resumes: nothing measured again
    assert len((out / "cost.jsonl").read_text().splitlines()) == 2
