"""Sweep / bench / report / proxies on the embedded digits CNN: outputs exist, are measured, resume."""
from __future__ import annotations

import json
import os

import pytest

from mpqkit.budget import expand_budgets
from mpqkit.cli import main
from mpqkit.errors import BudgetError


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_expand_budgets():
    assert expand_budgets("avg-bits=2.5:4:0.5") == ["avg-bits=2.5", "avg-bits=3", "avg-bits=3.5", "avg-bits=4"]
    assert expand_budgets("size=0.1MB;avg-bits=3,bitops=1G") == ["size=0.1MB", "avg-bits=3,bitops=1G"]
    for bad in ("avg-bits=4:2:0.5", "avg-bits=a:b:c", "avg-bits=2:4:0", "weird=3", ""):
        with pytest.raises(BudgetError):
            expand_budgets(bad)


def test_sweep_writes_frontier_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "digits-cnn", "--data", "digits", "--method", "eval-delta", "--budgets",
            "avg-bits=2.5:3.5:0.5", "--splits", "test", "--calib-size", "256", "--out", str(out), "-q", "--json"]
    code, text, _ = run(capsys, *argv)
    assert code == 0
    rows = json.loads(text)["rows"]
    assert [r["budget"] for r in rows] == ["-", "avg-bits=2.5", "avg-bits=3", "avg-bits=3.5"]
    sizes = [r["size_mb"] for r in rows[1:]]
    assert sizes == sorted(sizes) and all(0 < r["top1_test"] <= 100 for r in rows)
    for f in ("results.csv", "pareto.png", "report.html", "results.md", "bits_eval-delta.png"):
        assert (out / f).stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "Budget ledger" in html and "http" not in html
    before = (out / "rows.jsonl").read_text()
    code, text, _ = run(capsys, *argv)  # a rerun measures nothing again
    assert code == 0 and (out / "rows.jsonl").read_text() == before
    # a cut last line (killed mid-write) is measured again, not trusted
    lines = before.splitlines()
    (out / "rows.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    code, text, _ = run(capsys, *argv)
    assert code == 0 and len(json.loads(text)["rows"]) == 4
    again = (out / "rows.jsonl").read_text().splitlines()  # the re-measured row is on a line of its own
    assert again[:-1] == lines[:-1] and json.loads(again[-1])["budget"] == "avg-bits=3.5"
    code, text, _ = run(capsys, "report", str(out), "--markdown", str(tmp_path / "RESULTS.md"))
    assert code == 0 and "| eval-delta | avg-bits=3 |" in (tmp_path / "RESULTS.md").read_text()
    # a run stopped before writing title.txt: the report names the model and data from the plans
    (out / "title.txt").unlink()
    code, text, _ = run(capsys, "report", str(out), "--markdown", str(tmp_path / "RESULTS.md"))
    assert code == 0 and "### digits-cnn / digits: eval-delta at 3 budget(s)" in (tmp_path / "RESULTS.md").read_text()


def test_bench_records_failures_instead_of_figures(tmp_path, capsys):
    out = tmp_path / "bench"
    code, text, _ = run(capsys, "bench", "--model", "digits-cnn", "--data", "digits", "--methods", "mixquant,uniform",
                        "--budgets", "avg-bits=1.5;avg-bits=2.2", "--w-candidates", "2,4,8", "--ptq", "default",
                        "--splits", "test", "--calib-size", "256", "--out", str(out), "-q", "--json")
    assert code == 0
    rows = {(r["method"], r["budget"]): r for r in json.loads(text)["rows"]}
    for m in ("mixquant", "uniform"):
        assert "smallest feasible value" in rows[(m, "avg-bits=1.5")]["error"]
        assert "top1_test" not in rows[(m, "avg-bits=1.5")]
        assert rows[(m, "avg-bits=2.2")]["avg_w_bits"] <= 2.2 and "error" not in rows[(m, "avg-bits=2.2")]
    assert "failed:" in (out / "report.html").read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_results_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = run(capsys, "sweep", "--model", "digits-cnn", "--data", "digits", "--method", "uniform",
                       "--budgets", "avg-bits=3", "--out", str(ro / "x"))
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_unwritable_results_dir_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "sweep", "--model", "digits-cnn", "--data", "digits", "--method", "uniform",
                       "--budgets", "avg-bits=3", "--out", str(blocker / "x"))
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_proxies_truth_is_the_measured_test_drop(tmp_path, capsys):
    import torch

    from mpqkit.api import calibration_set, load_model, load_split
    from mpqkit.evaluation import evaluate_model
    from mpqkit.plan import LayerQuant, Plan
    from mpqkit.quant.apply import apply_plan

    out = tmp_path / "px"
    code, text, _ = run(capsys, "proxies", "--model", "digits-cnn", "--data", "digits", "--methods",
                        "eval-delta,mixquant-ilp", "--calib-size", "256", "--out", str(out), "-q", "--json")
    assert code == 0
    corr = json.loads(text)["correlations"]
    assert set(corr) == {"eval-delta", "mixquant-ilp"} and -1 <= corr["eval-delta"]["spearman"] <= 1
    res = json.loads((out / "proxies.json").read_text())
    bundle = load_model("digits-cnn")
    test = load_split("digits", "test")
    fp = evaluate_model(bundle.model, test)["top1"]
    # the layer as it ships: GPTQ fitted on the calibration set (never on the test images it is judged on)
    q = apply_plan(bundle.model, Plan(layers={"conv2": LayerQuant(2, None)}), calibration_set("digits", 256, 0).images)
    with torch.no_grad():
        drop = 100 * (fp - evaluate_model(q, test)["top1"])
    assert res["truth"]["conv2"]["2"]["drop_pct"] == pytest.approx(drop, abs=0.3)
    assert (out / "proxies.png").stat().st_size > 0


def test_bench_title_covers_every_row_not_the_last_command():
    from mpqkit.report.bench import bench_title

    rows = [{"method": "fp32", "budget": "-"}, {"method": "uniform", "budget": "avg-bits=3"},
            {"method": "hawq", "budget": "avg-bits=3"}, {"method": "hawq", "budget": "avg-bits=4"},
            {"method": "uniform", "budget": "avg-bits=3", "ptq": "brecq"}]  # a later run, one method
    assert bench_title("resnet20 / cifar10", rows) == "resnet20 / cifar10: uniform, hawq at 2 budget(s)"


def test_pareto_plot_uses_the_split_that_was_measured():
    from mpqkit.report.bench import pareto_lines

    rows = [{"method": "fp32", "budget": "-", "ptq": None, "top1_exact": 90.0},
            {"method": "hawq", "budget": "avg-bits=3", "ptq": None, "size_mb": 0.1, "top1_exact": 80.0},
            {"method": "hawq", "budget": "avg-bits=4", "ptq": None, "size_mb": 0.2, "top1_exact": 85.0}]
    col, lines = pareto_lines(rows)
    assert col == "top1_exact" and lines == {("hawq", None): [(0.1, 80.0), (0.2, 85.0)]}
    col, lines = pareto_lines([{**r, "top1_test": 1.0} for r in rows])
    assert col == "top1_test" and len(lines[("hawq", None)]) == 2


def test_results_page_opens_with_what_to_run(tmp_path):
    """The best (method + PTQ) per budget, and the cheapest one the paired draws do not separate from it."""
    from mpqkit.report.bench import write_markdown_index

    def row(method, ptq, draw, top1, secs, bits=3.0):
        return {"method": method, "budget": "avg-bits=3", "ptq": ptq, "draw": draw, "seed": draw, "top1_test": top1,
                "avg_w_bits": bits, "search_s": secs, "ptq_s": 1.0, "plan": None}

    rows = [{"method": "fp32", "budget": "-", "ptq": None, "avg_w_bits": 32.0, "top1_test": 88.0}]
    rows += [row("slow", None, k, 87.0 + 0.1 * k, 100.0) for k in range(3)]
    rows += [row("fast", None, k, 87.2 - 0.2 * k, 4.0) for k in range(3)]   # tied with slow over the draws
    rows += [row("bad", None, k, 80.0 + 0.1 * k, 0.5) for k in range(3)]    # clearly worse, cheapest
    rows += [row("big", "brecq", k, 86.9 + 0.2 * k, 2.0, bits=3.4) for k in range(3)]  # tied but larger: not chosen
    d = tmp_path / "r"
    d.mkdir()
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = tmp_path / "one"  # a single draw recommends nothing
    one.mkdir()
    (one / "rows.jsonl").write_text(json.dumps(row("x", None, 0, 99.0, 1.0)) + "\n")
    worse = tmp_path / "worse"  # another directory measuring the same budget, with a lower best mean: not shown
    worse.mkdir()
    (worse / "rows.jsonl").write_text("".join(json.dumps(row("y", None, k, 86.0, 1.0)) + "\n" for k in range(3)))
    for folder in (d, worse):  # the same model and data
        (folder / "title.txt").write_text("toy / data: methods")
    page = tmp_path / "RESULTS.md"
    write_markdown_index([d, one, worse], str(page), "mpqkit report r one worse")
    text = page.read_text()
    table = text[text.index("## What to run"):text.index("## Contents")]
    lines = [x for x in table.splitlines() if x.startswith("| ") and "avg-bits=3" in x]
    assert len(lines) == 1
    # the best mean, and the cheapest of those tied with it at equal size (not "bad": separated; not "big": larger)
    assert "| slow + default | 87.10 ± 0.10 (3) | 101 | `r` (2) | fast + default | 87.00 | 5 | +0.10 [" in lines[0]
    assert "| x " not in table and "| y " not in table
    toc = text[text.index("## Contents"):text.index("### ")]
    titles = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert toc.count("\n- [") == len(titles) == 3  # every section listed, in order
    assert text.rstrip().endswith("This page:\n\n```\nmpqkit report r one worse\n```")
    opening = text.split("| model | budget |")[0]
    assert max(map(len, opening.splitlines())) <= 110  # the page's own prose is wrapped


def test_what_to_run_does_not_call_a_much_worse_method_a_tie():
    """Two noisy draws apart by 5 points are 'not separated', but the cheaper one is no substitute."""
    from mpqkit.report.recommend import recommend

    def row(method, draw, top1, secs):
        return {"method": method, "budget": "avg-bits=3", "ptq": None, "draw": draw, "top1_test": top1,
                "avg_w_bits": 3.0, "search_s": secs, "ptq_s": 0.0}

    rows = [row("good", k, v, 100.0) for k, v in enumerate((80.0, 77.0, 75.0))]
    rows += [row("noisy", k, v, 1.0) for k, v in enumerate((70.0, 76.0, 71.0))]  # -5 on the mean, wide interval
    (_, best, cheap, _), = recommend(rows)
    assert best.method == "good" and cheap is None
