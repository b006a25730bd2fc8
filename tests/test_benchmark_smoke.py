"""Every benchmark script's main(argv) run end to end on the digits CNN (8x8 images, seconds per search), its
outputs checked. The scripts' defaults (ResNet-20 / CIFAR-10, full sizes) are what benchmarks/bench_all.sh runs;
here --model digits-cnn --data digits and small sizes. search_cost.py and finetune_plans.py: test_benchmark_scripts.py."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mpqkit.plan import Plan

ROOT = Path(__file__).parents[1]
DIGITS = ["--model", "digits-cnn", "--data", "digits"]
SEARCHED = ["conv2", "conv3"]  # digits-cnn: conv1 and fc are kept at 8/8


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``text``, split into cells (header and rule rows left out)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.startswith("| ") or i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            continue
        out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def _top1(bench_dir: Path, method: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (bench_dir / "rows.jsonl").read_text().splitlines()]
    return {r["seed"]: r["top1_test"] for r in rows if r["method"] == method and not r.get("error")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine two threads make these tiny tensors many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    """Two 3-draw bench directories on digits, same seeds and calibration size: ``plain`` (uniform and eval-delta,
    full eval-delta tables: --no-prune) and ``refined`` (eval-delta --refine 20: refinement needs > 128 images)."""
    from mpqkit.cli import main

    root = tmp_path_factory.mktemp("bench")
    common = ["bench", "-q", *DIGITS, "--budgets", "avg-bits=3", "--draws", "3", "--calib-size", "256",
              "--ptq", "default", "--splits", "test", "--no-prune"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPQKIT_CACHE", str(root / "cache"))
        assert main([*common, "--methods", "uniform,eval-delta", "--out", str(root / "plain")]) == 0
        assert main([*common, "--methods", "eval-delta", "--refine", "20", "--out", str(root / "refined")]) == 0
    plain, refined = root / "plain", root / "refined"
    assert set(_top1(plain, "uniform")) == set(_top1(plain, "eval-delta")) == set(_top1(refined, "eval-delta")) \
        == {0, 1, 2}
    return plain, refined


def test_claims_pairs_each_claim_by_seed_and_writes_its_table(bench_dirs, tmp_path):
    plain, refined = bench_dirs
    out = tmp_path / "paired_claims.md"
    _script("claims").main([
        "--out", str(out), "--title", "digits claims",
        "--claim", f"eval-delta > uniform;{plain};eval-delta;{plain};uniform",
        "--claim", f"refined > plain;{refined};eval-delta;{plain};eval-delta",
        "--claim", f"eval-delta > uniform at 4 bits;{plain};eval-delta;{plain};uniform;avg-bits=4",
        "--claim", f"BRECQ rows;{plain};eval-delta@brecq;{plain};uniform@brecq"])
    text = out.read_text()
    assert text.startswith("### digits claims (top-1 test)")
    rows = {r[0]: r for r in _table_rows(text)}
    assert list(rows) == ["eval-delta > uniform", "refined > plain", "eval-delta > uniform at 4 bits", "BRECQ rows"]
    for name, (a, b) in {"eval-delta > uniform": (_top1(plain, "eval-delta"), _top1(plain, "uniform")),
                         "refined > plain": (_top1(refined, "eval-delta"), _top1(plain, "eval-delta"))}.items():
        _, budget, n, mean_a, mean_b, diff, interval, verdict = rows[name]
        assert (budget, n) == ("avg-bits=3", "3")
        assert mean_a == f"{statistics.mean(a.values()):.2f} ± {statistics.stdev(a.values()):.2f}"
        assert mean_b == f"{statistics.mean(b.values()):.2f} ± {statistics.stdev(b.values()):.2f}"
        assert diff == f"{statistics.mean(a[s] - b[s] for s in a):+.2f}"
        assert re.fullmatch(r"\[[-+]\d+\.\d\d, [-+]\d+\.\d\d\]", interval)
        assert verdict in ("**holds**", "**reversed**", "not settled")
    # only avg-bits=4 asked for (not measured), and no BRECQ rows: said so, not left out
    assert rows["eval-delta > uniform at 4 bits"][1:3] == ["-", "0"] and rows["BRECQ rows"][1:3] == ["-", "0"]
    assert rows["BRECQ rows"][-1] == "no paired rows yet"


def test_paired_dirs_writes_the_paired_difference_and_refine_columns(bench_dirs):
    plain, refined = bench_dirs
    _script("paired_dirs").main(["--base", str(plain), "--other", str(refined), "--name", "refine",
                                 "--base-label", "plain", "--other-label", "refined"])
    text = (refined / "paired_refine.md").read_text()
    assert "| method | budget | draws | plain mean ± std | agreement | refined mean ± std |" in text
    rows = _table_rows(text)
    assert len(rows) == 1  # uniform is only in the base directory
    method, budget, n, base, agree_b, other, agree_o, diff, interval, verdict, same, probes, moves = rows[0]
    a, b = _top1(refined, "eval-delta"), _top1(plain, "eval-delta")
    assert (method, budget, n) == ("eval-delta", "avg-bits=3", "3")
    assert base == f"{statistics.mean(b.values()):.2f} ± {statistics.stdev(b.values()):.2f}"
    assert other == f"{statistics.mean(a.values()):.2f} ± {statistics.stdev(a.values()):.2f}"
    assert diff == f"{statistics.mean(a[s] - b[s] for s in a):+.2f}"
    assert 0 <= float(agree_b) <= 1 and 0 <= float(agree_o) <= 1
    frac, identical = re.fullmatch(r"(\d\.\d\d) \((\d)/3\)", same).groups()
    pairs = [[Plan.load(d / "plans" / "eval-delta" / "avg-bits=3" / sub / "plan.json").assignment()
              for d in (plain, refined)] for sub in ("", "draw1", "draw2")]
    assert int(identical) == sum(p == q for p, q in pairs)
    agree = [sum(p[f] == q[f] for f in p) / len(p) for p, q in pairs]
    assert frac == f"{statistics.mean(agree):.2f}"
    plans = [refined / "plans" / "eval-delta" / "avg-bits=3" / d / "plan.json" for d in ("", "draw1", "draw2")]
    recs = [json.loads(p.read_text())["provenance"]["refine"] for p in plans]
    assert all(0 < r["probes"] <= 20 for r in recs)  # --refine 20: at most 20 probes per plan
    assert probes == f"{statistics.mean(r['probes'] for r in recs):.0f}"
    assert moves == f"{statistics.mean(len(r['moves']) for r in recs):.1f}"


def test_prune_replay_replays_each_full_table_and_skips_pruned_ones(bench_dirs, tmp_path, capsys):
    plain, _ = bench_dirs
    mod = _script("prune_replay")
    mod.main(["--dir", str(plain), "--model", "digits-cnn", "--budgets", "avg-bits=3"])
    pat = re.compile(r"avg-bits=3 (draw\d): (\d+) of 12 candidates, (\d+) rounds, same plan: (True|False)")
    found = [pat.fullmatch(line) for line in capsys.readouterr().out.splitlines()]
    assert all(found) and sorted(m[1] for m in found) == ["draw0", "draw1", "draw2"]
    for m in found:
        # the two lowest bits of both layers first, then more only as the ILP asks; the lazy rule's plan is the full one
        assert 4 <= int(m[2]) <= 12 and int(m[3]) >= 1 and m[4] == "True"
    # a table measured with pruning is not a full table: skipped
    copy = tmp_path / "bench"
    shutil.copytree(plain / "plans" / "eval-delta", copy / "plans" / "eval-delta")
    table = copy / "plans" / "eval-delta" / "avg-bits=3" / "draw1" / "sensitivity.json"
    table.write_text(json.dumps({**json.loads(table.read_text()), "pruned_lower_bounds": {"conv2": {"8": 0.0}}}))
    mod.main(["--dir", str(copy), "--model", "digits-cnn", "--budgets", "avg-bits=3"])
    assert sorted(line.split(":")[0] for line in capsys.readouterr().out.splitlines()) == ["avg-bits=3 draw0",
                                                                                           "avg-bits=3 draw2"]


def test_auto_selection_scores_the_bench_plans_with_every_rule(bench_dirs, tmp_path):
    plain, _ = bench_dirs
    out = tmp_path / "paired_auto_selection.md"
    _script("auto_selection").main(["--dir", str(plain), *DIGITS, "--budgets", "avg-bits=3",
                                    "--methods", "uniform,eval-delta", "--draws", "3", "--calib-size", "256",
                                    "--heldout", "512", "--out", str(out)])
    rows = _table_rows(out.read_text())
    test = {m: _top1(plain, m) for m in ("uniform", "eval-delta")}
    assert [r[1] for r in rows] == ["kl", "ce", "top1", "agree", "test (best possible)"]  # no auto rows: none run
    for budget, rule, n, mean, picks in rows:
        chosen = picks.split(", ")
        assert budget == "avg-bits=3" and n == ("-" if rule.startswith("test") else "512")
        assert len(chosen) == 3 and set(chosen) <= set(test)
        assert mean == f"{sum(test[m][d] for d, m in enumerate(chosen)) / 3:.2f}"  # the picked plans' test top-1
    best = float(rows[-1][3])
    assert best == pytest.approx(sum(max(test[m][d] for m in test) for d in range(3)) / 3, abs=0.006)
    assert all(float(r[3]) <= best for r in rows)


def test_iqp_random_solves_small_instances_to_the_best_objective(tmp_path):
    out = tmp_path / "iqp"
    _script("iqp_random").main(["--sizes", "4,6", "--time-limit", "5", "--heuristic-s", "0.5", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())
    assert [r["layers"] for r in rows] == [4, 6]
    for r in rows:
        n = r["layers"]
        assert r["linearised_products"] == n * (n - 1) // 2 * 36
        assert _finite(r["milp_objective"], r["milp_bound"], r["heuristic_objective"], r["combined_objective"],
                       r["diag_ilp_plan_under_G"], r["uniform4_under_G"])
        assert r["milp_bound"] <= r["milp_objective"] + 1e-9
        # the combined solver: no worse than local search alone, the diagonal plan or uniform 4-bit (all feasible)
        best = min(r["heuristic_objective"], r["diag_ilp_plan_under_G"], r["uniform4_under_G"])
        assert r["combined_objective"] <= best + 1e-9 and r["combined_status"] == "optimal"
    table = (out / "table.md").read_text()
    assert "| layers | linearised_products | milp_objective |" in table
    assert [c[0] for c in _table_rows(table)] == ["4", "6"]


def test_iqp_resnet56_solves_a_measured_clado_table_with_and_without_the_convex_bound(tmp_path):
    import mpqkit

    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "clado", w_candidates=(2, 4, 8), calib_size=128,
                        progress=False, out=tmp_path / "clado")
    out = tmp_path / "iqp"
    _script("iqp_resnet56").main(["--table", str(tmp_path / "clado" / "sensitivity.json"), "--model", "digits-cnn",
                                  "--budgets", "2.5,3", "--time-limit", "5", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "digits-cnn"
    rows = results["rows"]
    assert [(r["budget"], r["convex_bound"] is not None) for r in rows] == [
        ("avg-bits=2.5", False), ("avg-bits=2.5", True), ("avg-bits=3", False), ("avg-bits=3", True)]
    for before, after in (rows[:2], rows[2:]):
        assert before["objective"] == pytest.approx(after["objective"])  # a tiny problem: both solve it
        for r in (before, after):
            assert _finite(r["objective"], r["bound"]) and r["bound"] <= r["objective"] + 1e-9
    assert rows[3]["convex_bound"] <= rows[3]["objective"] + 1e-9
    # the same problem `mpqkit search --method clado` solved at avg-bits=3
    assert rows[2]["objective"] == pytest.approx(res.solution.objective, rel=1e-6)
    assert len(_table_rows((out / "table.md").read_text())) == 4


def test_gptq_grid_measures_each_grid_per_bit_width(tmp_path):
    out = tmp_path / "grid"
    mod = _script("gptq_grid")
    mod.main([*DIGITS, "--bits", "2,4", "--calib-size", "128", "--out", str(out)])
    text = (out / "table.md").read_text()
    assert text.startswith("# digits-cnn: the grid GPTQ rounds on") and "128 images" in text
    assert "500-image test split" in text  # digits' test split, not CIFAR-10's
    rows = _table_rows(text)
    top1 = {(p, w): float(t) for p, w, t, _ in rows}
    assert list(top1) == [(p, w) for p in ("W2A8", "W4A8") for w in mod.VARIANTS]
    assert all(0 < t <= 100 for t in top1.values())
    # at 2 bits GPTQ recovers most of what nearest rounding loses (on digits: ~50 % vs ~97 %)
    assert top1[("W2A8", "GPTQ, grid per channel (default)")] > top1[("W2A8", "nearest (MSE grid)")] + 10


def test_engine_speedup_gives_the_same_losses_in_both_modes(tmp_path):
    out = tmp_path / "speedup.json"
    _script("engine_speedup").main([*DIGITS, "--bits", "2,4", "--calib", "128", "--out", str(out)])
    s = json.loads(out.read_text())
    assert (s["model"], s["probes"], s["calib"], s["threads"]) == ("digits-cnn", 4 * 2, 128, 1)
    assert s["max_abs_loss_diff"] <= 1e-5  # prefix caching changes the time, not the result
    assert _finite(s["speedup_batched"], s["speedup_median_of_per_probe_ratios"], *s["batched_s"].values(),
                   *s["per_probe_median_s"].values())
    assert s["speedup_batched"] > 0 and all(v > 0 for v in s["per_probe_median_s"].values())


def test_stack_speed_times_both_engines_on_the_same_probes(tmp_path):
    out = tmp_path / "stack.json"
    _script("stack_speed").main([*DIGITS, "--stack", "3", "--calib", "128", "--out", str(out)])
    s = json.loads(out.read_text())
    assert (s["model"], s["calib"], s["stack"]) == ("digits-cnn", 128, 3)
    assert s["probes_stacked"] == s["layers"] * s["probes_per_layer"]  # every layer's probes ran stacked
    assert s["max_abs_loss_diff"] <= 1e-5  # stacking changes the time, not the result
    assert _finite(s["median_ratio_stacked_over_single"], *s["total_s"].values())


@pytest.fixture(scope="module")
def clado_dir(tmp_path_factory):
    """benchmarks/clado_resnet20.py on digits at avg-bits 3 (its results.json is read by clado_joint.py)."""
    root = tmp_path_factory.mktemp("clado")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPQKIT_CACHE", str(root / "cache"))
        mp.setattr(tempfile, "tempdir", str(root))  # its probe caches (mkdtemp, left behind)
        _script("clado_resnet20").main([*DIGITS, "--calib-size", "128", "--budgets", "3", "--naive-sample", "4",
                                        "--time-limit", "5", "--out", str(root / "out")])
    return root / "out"


def test_clado_resnet20_tables_accuracy_iqp_and_probe_cost(clado_dir):
    results = json.loads((clado_dir / "results.json").read_text())
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["clado", "clado-diag", "eval-delta (ILP)", "uniform"]
    for r in rows:
        assert r["budget"] == "avg-bits=3" and r["avg_w_bits"] <= 3 + 1e-9 and 0 < r["top1_test"] <= 100
        assert len(r["bits"].split()) == 4
    assert all(set(r["bits"].split()[1:3]) <= {"2", "4", "8"} for r in rows[:3])  # W{2,4,8}
    (iqp,) = results["iqp"]
    assert _finite(iqp["iqp_objective"], iqp["iqp_bound"], iqp["diag_plan_under_G"])
    assert iqp["iqp_bound"] <= iqp["iqp_objective"] + 1e-9
    assert iqp["iqp_objective"] <= iqp["diag_plan_under_G"] + 1e-9  # CLADO's optimum under its own G
    cost = results["cost"]
    assert cost["probes"] == 2 * 3 + 3 * 3  # both layers' singles, and their 9 pairs
    assert cost["sens_samples"] == 128 and _finite(cost["speedup_vs_naive"], cost["flop_floor_s"])
    assert 0 < cost["floor_fraction_of_naive_flops"] <= 1
    text = (clado_dir / "table.md").read_text()
    assert text.startswith("# CLADO on digits-cnn / digits") and "top-1 on the 500-image test split" in text
    assert "--model digits-cnn --data digits" in text  # the command that produced it


def test_clado_joint_measures_the_plans_beside_their_prediction(clado_dir):
    _script("clado_joint").main([*DIGITS, "--calib-size", "128", "--budgets", "3", "--out", str(clado_dir)])
    measured = {(r["budget"], r["method"]): r["top1_test"]
                for r in json.loads((clado_dir / "results.json").read_text())["rows"]}
    rows = _table_rows((clado_dir / "joint.md").read_text())
    assert [r[:2] for r in rows] == [["avg-bits=3", "clado"], ["avg-bits=3", "clado-diag"]]
    for budget, plan, raw, psd, joint, sens_top1, top1 in rows:
        assert float(joint) > 0 and _finite(float(raw), float(psd)) and 0 < float(sens_top1) <= 100
        assert float(top1) == pytest.approx(measured[(budget, plan)], abs=1e-3)  # from clado_resnet20's results.json


def test_core_resnet20_tables_uniform_and_eval_delta(tmp_path):
    out = tmp_path / "core"
    _script("core_resnet20").main([*DIGITS, "--budgets", "3", "--out", str(out)])
    rows = json.loads((out / "rows.json").read_text())
    assert [r["plan"] for r in rows] == ["fp32", *(f"uniform W{b}A8" for b in (8, 6, 4, 3, 2)), "eval-delta",
                                         "uniform (largest meeting avg-bits=3)"]
    assert [r["avg_w_bits"] for r in rows[1:6]] == [8, 6, 4, 3, 2]
    assert rows[6]["avg_w_bits"] <= 3 + 1e-9 and rows[6]["search_s"] > 0
    assert all(0 < r["top1_test"] <= 100 and r["top1_exact"] is None for r in rows)  # digits has no exact split
    assert abs(rows[1]["top1_test"] - rows[0]["top1_test"]) <= 1  # W8A8 is as good as fp32
    assert rows[0]["compression"] == 1 and all(r["compression"] > 1 for r in rows[1:])
    assert (out / "eval-delta-3" / "plan.json").is_file()
    text = (out / "table.md").read_text()
    assert text.startswith("# digits-cnn / digits: uniform vs eval-delta")
    assert "| top-1 test (500) | top-1 exact (none) |" in text and len(_table_rows(text)) == 8


def test_hawq_resnet20_compares_the_traces_of_two_seeds(tmp_path):
    out = tmp_path / "hawq"
    _script("hawq_resnet20").main([*DIGITS, "--out", str(out)])
    d = json.loads((out / "traces.json").read_text())
    assert [r["layer"] for r in d["rows"]] == SEARCHED
    for r in d["rows"]:
        assert r["trace_seed0"] > 0 and r["trace_seed1"] > 0 and _finite(r["trace_seed0"], r["trace_seed1"])
        assert r["rel_spread"] == pytest.approx(abs(r["trace_seed0"] - r["trace_seed1"])
                                                / ((r["trace_seed0"] + r["trace_seed1"]) / 2))
        assert 1 <= r["iters_seed0"] <= 200 and 1 <= r["iters_seed1"] <= 200
    s = d["summary"]
    assert s["max_rel_spread"] == max(r["rel_spread"] for r in d["rows"])
    assert s["same_plan"] == (s["bits_seed0"] == s["bits_seed1"])
    assert s["bits_seed0"][0] == s["bits_seed0"][-1] == 8 and len(s["bits_seed0"]) == 4
    text = (out / "table.md").read_text()
    assert text.startswith("# HAWQ Hessian traces on digits-cnn, two seeds") and len(_table_rows(text)) == 2


def test_infoq_resnet20_tables_accuracy_proxy_quality_and_cost(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the cold search child process
    out = tmp_path / "infoq"
    _script("infoq_resnet20").main([*DIGITS, "--projections", "16", "--w-budgets", "avg-bits=3",
                                    "--wa-budgets", "bitops=0.006G", "--out", str(out)])
    d = json.loads((out / "results.json").read_text())
    assert [(r["search"], r["method"]) for r in d["rows"]] == [
        (mode, m) for mode in ("w", "wa") for m in ("infoq", "eval-delta", "uniform")]
    for r in d["rows"]:
        assert 0 < r["top1_test"] <= 100
        if r["search"] == "w":
            assert r["avg_w_bits"] <= 3 + 1e-9 and r["bits"].count("/8") == 4  # activations at 8
        else:
            assert r["gbitops"] <= 0.006 + 1e-12
    assert [p["score"] for p in d["proxy"]][-1] == "eval-delta ΔL (calibration set)" and len(d["proxy"]) == 5
    assert all(-1 <= p["spearman"] <= 1 and -1 <= p["spearman_without_8bit"] <= 1 for p in d["proxy"])
    c = d["cost"]
    assert c["L_times_B"] == 2 * 6 and c["peak_rss_mb"] > 50 and c["infoq_search_wall_s"] > 0
    assert _finite(c["wall_over_LB_forwards"], c["forward_1024_s"])
    text = (out / "table.md").read_text()
    assert text.startswith("# InfoQ on digits-cnn / digits")
    assert "(test split, 2 layers × 6 bits)" in text and "| score | ρ (all 12) |" in text


def test_smpq_resnet20_plans_every_selection_from_one_supernet(tmp_path):
    out = tmp_path / "smpq"
    _script("smpq_resnet20").main([*DIGITS, "--budgets", "3", "--out", str(out)])
    d = json.loads((out / "rows.json").read_text())
    assert [r["plan"] for r in d["rows"]] == ["uniform", "eval-delta", "smpq (argmax)", "smpq (ilp, fills budget)",
                                              "dmpq (argmax)", "dmpq (ilp, fills budget)"]
    for r in d["rows"]:
        assert r["avg_w_bits"] <= 3 + 1e-9 and 0 < r["top1_test"] <= 100 and r["bits"][0] == r["bits"][-1] == 8
    assert len(d["history"]) == d["config"]["epochs"] == 5  # the quick preset
    assert all(0 <= h["val_top1"] <= 1 for h in d["history"]) and d["supernet_s"] > 0
    text = (out / "table.md").read_text()
    assert text.startswith("# SMPQ vs DMPQ on digits-cnn / digits") and len(_table_rows(text)) == 6


def test_brecq_resnet20_measures_every_ptq_backend_and_resumes(tmp_path):
    out = tmp_path / "brecq"
    argv = [*DIGITS, "--budgets", "3", "--iters", "5", "--sweep-iters", "2,5", "--out", str(out)]
    mod = _script("brecq_resnet20")
    mod.main(argv)
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    plans = ["uniform W4A8", "uniform W3A8", "uniform W2A8", "mixquant avg-bits=3", "mixquant-ilp avg-bits=3"]
    assert {(r["plan"], r["ptq"]) for r in rows} == {(p, q) for p in plans for q in ("minmax", "mse", "brecq")} | {
        ("uniform W3A8", q) for q in ("adaround", "qdrop")}
    assert sorted(r["iters"] for r in rows if r["plan"] == "uniform W3A8" and r["ptq"] == "brecq") == [2, 5]
    for r in rows:
        assert 0 < r["top1_test"] <= 100 and r["ptq_s"] >= 0 and r["peak_rss_mb"] > 0
        assert r["avg_w_bits"] <= 4 + 1e-9 and r["bits"][0] == r["bits"][-1] == 8
    by = {(r["plan"], r["ptq"], r["iters"]): r for r in rows}
    assert [by[(f"uniform W{b}A8", "mse", None)]["avg_w_bits"] for b in (4, 3, 2)] == [4, 3, 2]
    for r in rows:  # a plan that equals an earlier one is measured once and recorded as the same
        if "same_plan_as" in r:
            assert r["top1_test"] == by[(r["same_plan_as"], r["ptq"], r["iters"])]["top1_test"]
    table = (out / "table.md").read_text()
    assert table.startswith("# MixQuant × PTQ on digits-cnn / digits") and "500-image test split" in table
    assert len(_table_rows(table)) == 5 + 2 + 2  # plans, the BRECQ sweep, adaround and qdrop
    mod.main(argv)  # resumes: nothing measured again
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_export_resnet20_exports_onnx_and_packed_files_that_match_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its exported files (mkdtemp, left behind)
    out = tmp_path / "export"
    _script("export_resnet20").main([*DIGITS, "--out", str(out)])
    d = json.loads((out / "results.json").read_text())
    assert [r["plan"] for r in d["rows"]] == ["eval-delta avg-bits=4", "eval-delta avg-bits=3"]
    for r in d["rows"]:
        assert 0 < r["top1_torch"] <= 100 and abs(r["top1_onnx"] - r["top1_torch"]) <= 0.5
        assert r["onnx_max_logit_diff"] < 0.5 and r["onnx_bytes"] > 0
        assert r["packed_exact_max_logit_diff"] <= 1e-5  # unfolded: bit-exact
        assert abs(r["packed_folded_top1"] - r["top1_torch"]) <= 1
        assert 0 < r["ledger_bytes"] < r["packed_folded_bytes"] <= r["packed_exact_bytes"]
    assert d["rows"][1]["ledger_bytes"] < d["rows"][0]["ledger_bytes"]  # 3 bits are smaller than 4
    mbv2 = d["mobilenet_v2"]
    assert mbv2["layers"] == 53 and mbv2["onnx_bytes"] > 10**6 and mbv2["max_abs_logit_diff"] < 1e-3
    text = (out / "table.md").read_text()
    assert text.startswith("# Export of digits-cnn plans (500-image test split)") and len(_table_rows(text)) == 2
    assert sys.modules.get("onnxruntime") is not None  # the ONNX files were run, not only written


def test_hawq_hvp_cost_times_both_passes(tmp_path):
    mod = _script("hawq_hvp_cost")
    rec = mod.main(["--model", "digits-cnn", "--images", "4", "--repeats", "1", "--out", str(tmp_path / "c.json")])
    assert rec["layers"] >= 2 and not rec["grouped_conv"]
    assert rec["hutchinson_step_s"][0] > 0 and rec["forward_backward_s"][0] > 0
    assert rec["median_ratio"] == rec["hutchinson_step_s"][0] / rec["forward_backward_s"][0]
    assert (tmp_path / "c.json").exists()


def test_calib_memory_measures_each_mode_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    mod = _script("calib_memory")
    recs = mod.main(["--model", "digits-cnn", "--data", "digits", "--calib-size", "64", "--chunks", "0,16",
                     "--out", str(tmp_path / "m.jsonl")])
    assert [(r["chunk"], r["mode"]) for r in recs] == [(256, "asis"), (256, "whole"), (256, "noobs"),
                                                      (16, "asis"), (16, "whole"), (16, "noobs")]
    assert all(r["peak_mb"] >= r["before_mb"] > 50 and r["seconds"] >= 0 for r in recs)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 6


def test_recheck_rows_reproduces_the_rows_of_the_picked_plans(bench_dirs, tmp_path):
    """Re-applying a plan with its PTQ today gives its row's top-1 (the digits bench just measured it)."""
    plain, _ = bench_dirs
    out = tmp_path / "recheck.jsonl"
    recs = _script("recheck_rows").main(["--dir", str(plain), "--model", "digits-cnn", "--data", "digits",
                                         "--pick", "eval-delta,avg-bits=3,1", "--pick", "uniform,avg-bits=3,0",
                                         "--out", str(out)])
    assert [(r["method"], r["draw"]) for r in recs] == [("eval-delta", 1), ("uniform", 0)]
    assert all(r["diff"] == 0 and abs(r["now_top1"] - r["row_top1"]) < 1e-3 for r in recs)
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="no measured row"):
        _script("recheck_rows").main(["--dir", str(plain), "--model", "digits-cnn", "--pick", "greedy,avg-bits=3,0"])


def test_claims_give_no_verdict_when_the_side_ahead_is_the_larger_model(tmp_path):
    """A mixed plan at avg-bits 2.5 far ahead of uniform W2 is a larger model ahead of a smaller one:
    "not at equal size", not "holds"; the same gap at equal size holds."""
    def rows(bits_a: float, bits_b: float) -> Path:
        d = tmp_path / f"{bits_a}-{bits_b}"
        d.mkdir()
        lines = []
        for seed in range(3):
            lines.append({"method": "mixed", "budget": "avg-bits=2.5", "draw": seed, "seed": seed,
                          "top1_test": 80.0 + 0.1 * seed, "avg_w_bits": bits_a})
            lines.append({"method": "uniform", "budget": "avg-bits=2.5", "draw": seed, "seed": seed,
                          "top1_test": 60.0 - 0.2 * seed, "avg_w_bits": bits_b})
        (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        return d

    claims = _script("claims")
    unequal, equal = rows(2.5, 2.0), rows(2.5, 2.5)
    (row_unequal,) = claims.claim_rows("mixed > uniform", str(unequal), "mixed", str(unequal), "uniform")
    (row_equal,) = claims.claim_rows("mixed > uniform", str(equal), "mixed", str(equal), "uniform")
    assert row_unequal.endswith("| not at equal size (the side ahead has 2.50 vs 2.00 avg w-bits) |")
    assert row_equal.endswith("| **holds** |")


def test_clado_pair_replay_drops_pairs_by_tolerance_and_compares_plans(tmp_path, monkeypatch):
    """benchmarks/clado_pair_replay.py on a 2-draw digits CLADO bench: the measured table reproduces its own
    plan; a tolerance above every bound keeps no pair; larger tolerances keep fewer pairs."""
    from mpqkit.cli import main

    out = tmp_path / "clado"
    monkeypatch.setenv("MPQKIT_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "-q", *DIGITS, "--methods", "clado", "--budgets", "avg-bits=3", "--draws", "2",
                 "--calib-size", "256", "--ptq", "default", "--splits", "test", "--out", str(out)]) == 0
    _script("clado_pair_replay").main(["--dir", str(out), "--model", "digits-cnn", "--tols", "0.5,1000",
                                       "--budgets", "3,4", "--time-limit", "5"])
    rows = json.loads((out / "pair_replay.json").read_text())
    assert {r["draw"] for r in rows} == {0, 1} and {r["budget"] for r in rows} == {"avg-bits=3", "avg-bits=4"}
    by = {(r["draw"], r["budget"], r["pair_tol"]): r for r in rows}
    for (draw, budget, tol), r in by.items():
        if tol == "measured":
            assert r["same_plan"] and r["layers_changed"] == 0 and r["pairs"] > 0
            assert by[draw, budget, 1000.0]["pairs"] == 0 <= by[draw, budget, 0.5]["pairs"] <= r["pairs"]
    assert "| measured | 4 | 4 |" in (out / "pair_replay.md").read_text()
