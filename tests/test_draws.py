"""The multi-draw protocol: statistics against hand-computed values, and a bench whose methods see
the same calibration draws, with mean ± std, paired differences and plan stability in its tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mpqkit.report.stats import bits_agreement, paired_difference, summarize


def test_paired_difference_matches_a_hand_computed_example():
    # A − B per draw: 1, 2, 3, 4, 5 → mean 3, sample std √2.5 = 1.5811; t(0.975, 4) = 2.7764;
    # half-width 2.7764 · 1.5811 / √5 = 1.9632 → [1.0368, 4.9632]
    a = {0: 81.0, 1: 82.0, 2: 83.0, 3: 84.0, 4: 85.0}
    b = {0: 80.0, 1: 80.0, 2: 80.0, 3: 80.0, 4: 80.0, 9: 10.0}  # draw 9 is not shared: not paired
    d = paired_difference(a, b)
    assert d.n == 5 and d.mean == pytest.approx(3.0)
    assert d.lo == pytest.approx(1.0368, abs=1e-4) and d.hi == pytest.approx(4.9632, abs=1e-4)
    assert d.significant
    # differences −1, 1, −1, 1: mean 0, the interval straddles 0
    e = paired_difference({0: 1.0, 1: 3.0, 2: 1.0, 3: 3.0}, {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0})
    assert e.mean == pytest.approx(0.0) and e.lo < 0 < e.hi and not e.significant
    # one shared draw: no interval, never significant
    one = paired_difference({0: 5.0}, {0: 1.0})
    assert one.n == 1 and math.isinf(one.lo) and not one.significant
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_verdicts_need_three_draws_and_equal_size():
    from mpqkit.report.bench import draws_markdown

    # two draws whose differences agree: a zero-width interval, yet no verdict (fewer than 3 draws)
    two = paired_difference({0: 81.0, 1: 82.0}, {0: 79.5, 1: 80.5})
    assert two.lo == two.hi == pytest.approx(1.5) and not two.significant
    assert two.verdict("holds", "reversed", "open") == "too few draws (2 < 3)"
    three = paired_difference({0: 81.0, 1: 82.0, 2: 83.0}, {0: 79.5, 1: 80.5, 2: 81.5})
    assert three.significant and three.verdict("holds", "reversed", "open") == "holds"

    def row(method, budget, draw, top1, bits):
        return {"method": method, "budget": budget, "ptq": None, "draw": draw, "seed": draw, "top1_test": top1,
                "avg_w_bits": bits, "plan": None}

    rows = [row("mixed", "avg-bits=2.5", k, 80.0 + k, 2.49) for k in range(3)]
    rows += [row("uniform", "avg-bits=2.5", k, 70.0 + k + 0.1 * k * k, 2.0) for k in range(3)]
    rows += [row("mixed", "avg-bits=3", k, 85.0 + 0.1 * k, 2.98) for k in range(3)]
    rows += [row("uniform", "avg-bits=3", k, 84.0 + 0.2 * k, 3.0) for k in range(3)]
    md = draws_markdown(rows, "t")
    line25 = next(x for x in md.splitlines() if x.startswith("| avg-bits=2.5 | default | mixed | uniform"))
    line3 = next(x for x in md.splitlines() if x.startswith("| avg-bits=3 | default | mixed | uniform"))
    assert "not at equal size (the side ahead has 2.49 vs 2.00 avg w-bits)" in line25  # a larger model won
    assert "**A > B**" in line3  # the mixed plan is the smaller one: a fair win


def test_summary_and_bits_agreement():
    s = summarize([2.0, 4.0, 6.0])
    assert (s.n, s.mean, s.std) == (3, 4.0, 2.0)
    assert summarize([7.0]).std == 0.0
    p = [{"a": (4, 8), "b": (2, 8)}, {"a": (4, 8), "b": (3, 8)}, {"a": (4, 8), "b": (2, 8)}]
    # pairs: (0,1) 1/2, (0,2) 1, (1,2) 1/2 → mean 2/3
    assert bits_agreement(p) == pytest.approx(2 / 3)
    assert bits_agreement(p[:1]) is None


def test_bench_with_draws_pairs_methods_on_the_same_draws(tmp_path, capsys):
    from mpqkit.cli import main

    out = tmp_path / "b"
    argv = ["bench", "--model", "digits-cnn", "--data", "digits", "--methods", "uniform,eval-delta,mixquant-ilp",
            "--budgets", "avg-bits=3", "--ptq", "default", "--splits", "test", "--draws", "3", "--seed", "10",
            "--calib-size", "128", "--out", str(out), "-q"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["method"] != "fp32"]
    assert sorted((r["method"], r["draw"], r["seed"]) for r in measured) == sorted(
        (m, k, 10 + k) for m in ("uniform", "eval-delta", "mixquant-ilp") for k in range(3))
    for r in measured:  # each draw's plan was searched on its own calibration draw
        plan = json.loads(open(r["plan"]).read())
        assert plan["provenance"]["seed"] == r["seed"] and plan["provenance"]["calib"]["n"] == 128
    calib = {json.loads(open(r["plan"]).read())["provenance"]["calib"]["sha256"] for r in measured
             if r["method"] == "eval-delta"}
    assert len(calib) == 3  # three different draws
    md = (out / "results.md").read_text()
    assert "3 calibration draws (seeds 10, 11, 12)" in md and "| eval-delta | uniform | 3 |" in md
    assert "bits agreement" in md
    # rerun: nothing measured again (resumed from rows.jsonl)
    capsys.readouterr()
    assert main(argv) == 0
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)
    # `mpqkit report --markdown`: a directory's note.md heads its table, paired_*.md files follow it
    (out / "note.md").write_text("Rows from an older protocol.\n")
    (out / "paired_x.md").write_text("### paired table\n")
    page = tmp_path / "RESULTS.md"
    assert main(["report", str(out), "--markdown", str(page)]) == 0
    text = page.read_text()
    assert text.index("### ") < text.index("Rows from an older protocol.") < text.index("| method |") \
        < text.index("### paired table")


def test_bench_refuses_to_resume_another_protocol(tmp_path, capsys):
    """Rows measured with another seed or objective, and plans searched with other calibration images or
    another quantizer, are not resumed into (they would be mixed in every mean)."""
    from mpqkit.cli import main

    out = tmp_path / "b"
    argv = ["bench", "--model", "digits-cnn", "--data", "digits", "--methods", "uniform", "--budgets", "avg-bits=4",
            "--ptq", "default", "--splits", "test", "--calib-size", "64", "--out", str(out), "-q"]
    assert main(argv + ["--seed", "3"]) == 0
    rows = (out / "rows.jsonl").read_text()
    assert '"objective": "kl"' in rows and '"seed": 3' in rows
    capsys.readouterr()
    assert main(argv + ["--seed", "4"]) == 2  # one "mpqkit: error:" line naming the clash
    assert "measured with --seed 3 (this run: --seed 4)" in capsys.readouterr().err
    assert main(argv + ["--seed", "3", "--objective", "ce"]) == 2
    assert "--objective kl (this run: --objective ce)" in capsys.readouterr().err
    assert (out / "rows.jsonl").read_text() == rows  # nothing appended, nothing lost
    assert main(argv + ["--seed", "3"]) == 0  # the same protocol resumes
    assert (out / "rows.jsonl").read_text() == rows
    # a new PTQ onto the measured plan: refused where the plan says it was searched otherwise
    argv_new_ptq = [a if a != "default" else "nearest" for a in argv] + ["--seed", "3"]
    assert main([a if a != "64" else "48" for a in argv_new_ptq]) == 2
    assert "other calibration images (64 drawn with seed 3; this run: 48 with seed 3)" in capsys.readouterr().err
    assert main(argv_new_ptq + ["--rounding", "nearest"]) == 2
    assert "qconfig" in capsys.readouterr().err
    assert (out / "rows.jsonl").read_text() == rows
    assert main(argv_new_ptq) == 0  # the same protocol adds the new PTQ's rows
    assert '"ptq": "nearest"' in (out / "rows.jsonl").read_text()


def test_bench_resume_with_another_ptq_quantizes_the_measured_plan(tmp_path, monkeypatch):
    """A PTQ added to a results directory quantizes the plan its earlier rows measured (read from the
    plan file, with the earlier search seconds), not a new search that could give other bits."""
    from mpqkit import api, benching

    out = tmp_path / "b"
    kw = dict(splits=["test"], calib_size=64, progress=False)
    first = api.bench("digits-cnn", "digits", ["eval-delta"], ["avg-bits=3"], out, ptqs=["nearest"], **kw)
    plan_file = next(r["plan"] for r in first if r["method"] == "eval-delta")

    def no_search(*a, **k):
        raise AssertionError("a plan with rows was searched again")

    monkeypatch.setattr(benching, "search", no_search)
    rows = api.bench("digits-cnn", "digits", ["eval-delta"], ["avg-bits=3"], out, ptqs=["nearest", "gptq"], **kw)
    ours = {r["ptq"]: r for r in rows if r["method"] == "eval-delta"}
    assert set(ours) == {"nearest", "gptq"}
    assert ours["gptq"]["plan"] == plan_file and ours["gptq"]["search_s"] == ours["nearest"]["search_s"]
    assert ours["gptq"]["size_mb"] == ours["nearest"]["size_mb"]
    # each row carries the resident peak of its own PTQ and evaluation (sampled; 0 only without /proc)
    assert all(r["ptq_eval_peak_mb"] > 50 for r in ours.values()) or not Path("/proc/self/status").exists()
    # a (method, budget, draw) with no rows is still searched
    with pytest.raises(AssertionError, match="searched again"):
        api.bench("digits-cnn", "digits", ["eval-delta"], ["avg-bits=4"], out, ptqs=["nearest"], **kw)
