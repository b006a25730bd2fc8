"""The command line: the documented flows work, and every bad input is one clear message, exit 2,
nothing written."""
from __future__ import annotations

import json

import pytest

from mpqkit.cli import main
from mpqkit.quant.config import QuantConfig
from mpqkit.zoo.paths import data_root

from conftest import requires_shared


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_apply_eval_digits(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    code, out, _ = run(capsys, "search", "--model", "digits-cnn", "--data", "digits", "--method", "eval-delta",
                       "--budget", "avg-bits=4", "--out", str(plan), "--calib-size", "256", "-q", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["costs"]["avg_w_bits_searched"] <= 4
    assert plan.is_file() and (tmp_path / "plan-results" / "bits.png").is_file()
    code, out, _ = run(capsys, "apply", "--model", "digits-cnn", "--data", "digits", "--plan", str(plan),
                       "--out", str(tmp_path / "q.pt"))
    assert code == 0 and (tmp_path / "q.pt").stat().st_size > 0
    # the saved file rebuilds the same quantized model without calibration data
    import torch

    import mpqkit
    from mpqkit.api import load_quantized
    from mpqkit.zoo import load_data

    x = load_data("digits", "test", limit=64).images
    ref = mpqkit.apply_plan("digits-cnn", str(plan), "digits")
    again = load_quantized("digits-cnn", tmp_path / "q.pt")
    with torch.no_grad():
        assert torch.equal(ref(x), again(x))
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(Exception, match="not an mpqkit quantized model file|not a readable"):
        load_quantized("digits-cnn", tmp_path / "bad.pt")
    code, out, _ = run(capsys, "eval", "--model", "digits-cnn", "--data", "digits", "--plan", str(plan), "--json", "-q")
    assert code == 0 and 0.5 < json.loads(out)["top1"] <= 1.0


def test_eval_and_apply_with_a_ptq_backend(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert run(capsys, "search", "--model", "digits-cnn", "--data", "digits", "--method", "uniform", "--w-bits", "2",
               "--out", str(plan), "-q")[0] == 0
    base = ["--model", "digits-cnn", "--data", "digits", "--plan", str(plan), "-q", "--json"]
    code, out, _ = run(capsys, "eval", *base, "--ptq", "nearest")
    plain = json.loads(out)
    code, out, _ = run(capsys, "eval", *base, "--ptq", "brecq", "--recon-iters", "150")
    rec = json.loads(out)
    assert code == 0 and rec["ptq"] == "brecq"
    # reconstruction at 2 bits repairs what round-to-nearest broke: a lower loss on unseen images
    assert rec["loss"] < plain["loss"] - 0.05, (rec, plain)
    assert run(capsys, "apply", *base[:-1], "--ptq", "adaround", "--recon-iters", "20", "--out", str(tmp_path / "q.pt"))[0] == 0
    from mpqkit.quant.brecq import PTQ_BACKENDS
    from mpqkit.quant.ptq import parse_ptq

    assert all(parse_ptq(p).name == p for p in PTQ_BACKENDS)  # every backend name is a one-step recipe
    code, _, err = run(capsys, "eval", *base, "--ptq", "gptq+foo")
    assert code == 2 and "unknown PTQ step 'foo'" in err


@pytest.mark.parametrize("argv,match", [
    (["eval", "--model", "digits-cnn", "--data", "digits", "--ptq", "brecq"], "--ptq needs --plan"),
    (["search", "--model", "digits-cnn", "--data", "digits", "--method", "uniform", "--w-bits", "4", "--ptq", "brecq"],
     "add --eval"),
    (["search", "--model", "digits-cnn", "--data", "digits", "--method", "uniform", "--w-bits", "4", "--eval", "test",
      "--recon-iters", "5"], "need --ptq"),
    (["eval", "--model", "resnet99"], "unknown model 'resnet99'"),
    (["eval", "--model", "digits-cnn", "--data", "mnist"], "mnist"),
    (["eval", "--model", "digits-cnn", "--data", "digits", "--split", "exact"], "exact"),
    (["search", "--model", "digits-cnn", "--data", "digits", "--budget", "avg-bits=1"], "smallest feasible value"),
    (["search", "--model", "digits-cnn", "--data", "digits", "--budget", "avg-bits=lots"], "malformed budget"),
    (["search", "--model", "digits-cnn", "--data", "digits", "--budget", "avg-bits=3", "--method", "magic"],
     "unknown method"),
    (["search", "--model", "digits-cnn", "--data", "digits", "--method", "uniform", "--w-bits", "17"], "1..16"),
    (["layers", "--model", "mobilenet_v2"], "--random-init"),
    (["eval", "--model", "resnet20", "--data", "digits"], "shape"),
])
def test_bad_input_one_clear_message(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    if argv[2] == "resnet20":
        try:
            data_root()
        except Exception:
            pytest.skip("needs ../shared models")
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "o")) if argv[0] == "search" else run(capsys, *argv)
    assert code == 2
    assert err.startswith("mpqkit: error:") and match in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_data_path(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--model", "digits-cnn", "--data", "cifar10", "--data-root", str(tmp_path / "nope"))
    assert code == 2 and "--data-root" in err and "MPQKIT_DATA" in err


def test_corrupt_plan_and_checkpoint(capsys, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"mpqkit_plan": 1, "layers": {"conv2": {"w_bits": 4')
    code, _, err = run(capsys, "eval", "--model", "digits-cnn", "--data", "digits", "--plan", str(bad))
    assert code == 2 and "not valid JSON" in err
    ck = tmp_path / "w.pt"
    ck.write_bytes(b"\x00garbage" * 100)
    code, _, err = run(capsys, "eval", "--model", "digits-cnn", "--data", "digits", "--checkpoint", str(ck))
    assert code == 2 and "not a readable PyTorch checkpoint" in err


def test_plan_for_another_model_is_refused(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    assert run(capsys, "search", "--model", "digits-cnn", "--data", "digits", "--method", "uniform", "--w-bits", "4",
               "--out", str(plan), "-q")[0] == 0
    d = json.loads(plan.read_text())
    d["model"]["sha256"] = "0" * 64
    plan.write_text(json.dumps(d))
    code, _, err = run(capsys, "eval", "--model", "digits-cnn", "--data", "digits", "--plan", str(plan))
    assert code == 2 and "made for model" in err


@requires_shared
def test_resnet20_cli_flow(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    code, out, _ = run(capsys, "search", "--model", "resnet20", "--data", "cifar10", "--method", "uniform",
                       "--w-bits", "4", "--a-bits", "8", "--out", str(plan), "--calib-size", "256", "-q")
    assert code == 0
    code, out, _ = run(capsys, "eval", "--model", "resnet20", "--plan", str(plan), "--split", "exact", "--json", "-q")
    assert code == 0 and json.loads(out)["top1"] > 0.85


def test_infoq_flags(tmp_path, capsys):
    code, out, _ = run(capsys, "search", "--model", "digits-cnn", "--data", "digits", "--method", "infoq",
                       "--budget", "avg-bits=3", "--infoq-target", "input", "--observers", "last-1",
                       "--projections", "8", "--calib-size", "128", "--out", str(tmp_path / "r"), "-q")
    assert code == 0
    sens = json.loads((tmp_path / "r" / "sensitivity.json").read_text())
    assert sens["meta"]["target"] == "input" and sens["meta"]["observers"] == "last-1"
    assert sens["meta"]["projections"] == 8
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert plan["method"]["params"]["projections"] == 8


SETTINGS_ARGV = ["--checkpoint", "w.pt", "--models-dir", "m", "--random-init", "--data-root", "d", "--device", "cpu",
                 "-q", "--search", "wa", "--w-candidates", "3,5", "--a-candidates", "6", "--w-bits", "5",
                 "--a-bits", "6", "--fixed", "conv1", "--fixed-bits", "6,6", "--calib-size", "77", "--seed", "9",
                 "--w-per-tensor", "--w-symmetric", "--w-range", "minmax", "--a-symmetric", "--a-range", "percentile",
                 "--time-limit", "7", "--alpha", "0.5", "--cache-dir", "c", "--no-cache", "--batch-size", "33",
                 "--refine", "12", "--objective", "ce", "--matmul-a-bits", "6",
                 "--prefix-cache-mb", "64", "--eval-batch-size", "17", "--no-prune", "--max-memory", "3000",
                 "--stack-probes", "3"]
_QC = QuantConfig()  # the quantizer's PTQ flags, each set to what its default is not
SETTINGS_ARGV += ["--rounding", "nearest" if _QC.rounding == "gptq" else "gptq",
                  "--no-bias-correction" if _QC.bias_correction else "--bias-correction",
                  "--no-equalize" if _QC.equalize else "--equalize"]


@pytest.mark.parametrize("command", ["search", "sweep", "bench", "proxies"])
def test_every_settings_flag_reaches_the_settings(command):
    """Each flag of the shared group changes its RunSettings field (none is accepted and dropped)."""
    import dataclasses

    from mpqkit.cli import build_parser
    from mpqkit.cli_args import settings_from_args
    from mpqkit.settings import RunSettings

    extra = {"search": [], "sweep": ["--method", "hawq", "--budgets", "avg-bits=3", "--out", "o"],
             "bench": ["--budgets", "avg-bits=3", "--out", "o"], "proxies": []}[command]
    s = settings_from_args(build_parser().parse_args([command, *SETTINGS_ARGV, *extra]))
    default = RunSettings()
    unchanged = [f.name for f in dataclasses.fields(RunSettings) if getattr(s, f.name) == getattr(default, f.name)]
    assert unchanged == ["input_shape"]  # Python-only (a bare nn.Module's input shape)
    assert s.qconfig.to_dict() == {"w_per_channel": False, "w_symmetric": True, "w_range": "minmax",
                                   "a_symmetric": True, "a_range": "percentile", "matmul_a_bits": 6,
                                   "rounding": "nearest" if _QC.rounding == "gptq" else "gptq",
                                   "bias_correction": not _QC.bias_correction, "equalize": not _QC.equalize}


def test_random_init_is_honoured(capsys):
    code, out, _ = run(capsys, "eval", "--model", "digits-cnn", "--data", "digits", "--json", "-q")
    trained = json.loads(out)
    code, out, _ = run(capsys, "eval", "--model", "digits-cnn", "--data", "digits", "--random-init", "--json", "-q")
    assert code == 0 and json.loads(out)["top1"] < trained["top1"] - 0.5  # random weights: near chance


@requires_shared
def test_bench_honours_data_root_and_seed(tmp_path, capsys):
    """--data-root reaches every load of bench (a wrong one is an error, not the default root), and
    --seed reaches the plans it writes."""
    code, _, err = run(capsys, "bench", "--model", "resnet20", "--data", "cifar10", "--data-root",
                       str(tmp_path / "nope"), "--methods", "uniform", "--budgets", "avg-bits=4", "--ptq", "default",
                       "--out", str(tmp_path / "b0"), "-q")
    assert code == 2 and str(tmp_path / "nope") in err
    code, _, _ = run(capsys, "sweep", "--model", "digits-cnn", "--data", "digits", "--method", "mixquant-ilp",
                     "--budgets", "avg-bits=4", "--seed", "5", "--calib-size", "64", "--splits", "test",
                     "--out", str(tmp_path / "b1"), "-q")
    assert code == 0
    plan = json.loads(next((tmp_path / "b1" / "plans").rglob("plan.json")).read_text())
    assert plan["provenance"]["seed"] == 5 and plan["provenance"]["calib"]["n"] == 64


def test_data_defaults_to_the_zoo_models_own(capsys):
    code, out, _ = run(capsys, "eval", "--model", "digits-cnn", "--json", "-q")  # no --data: digits, not cifar10
    assert code == 0 and json.loads(out)["n"] == 500


def test_bench_title_names_a_non_default_reconstruction(tmp_path, capsys):
    """Rows reconstructed with --recon-iters N are not the default's: the section title (docs/RESULTS.md) says so."""
    out = tmp_path / "b"
    code, _, _ = run(capsys, "bench", "--model", "digits-cnn", "--data", "digits", "--methods", "uniform",
                     "--budgets", "avg-bits=4", "--ptq", "adaround", "--recon-iters", "4", "--calib-size", "64",
                     "--splits", "test", "--out", str(out), "-q")
    assert code == 0
    assert (out / "title.txt").read_text().startswith("digits-cnn / digits (--recon-iters 4): uniform")
    code, _, _ = run(capsys, "bench", "--model", "digits-cnn", "--data", "digits", "--methods", "uniform",
                     "--budgets", "avg-bits=4", "--ptq", "default,mse", "--recon-iters", "4", "--calib-size", "64",
                     "--splits", "test", "--out", str(tmp_path / "c"), "-q")
    assert code == 0 and "recon" not in (tmp_path / "c" / "title.txt").read_text()  # no reconstruction ran


def test_flag_defaults_are_the_settings_defaults():
    """Every command's flags, left at their defaults, give RunSettings() exactly: a default is declared once."""
    import dataclasses

    from mpqkit.cli import build_parser
    from mpqkit.cli_args import settings_from_args
    from mpqkit.settings import RunSettings

    p = build_parser()
    for argv in (["search", "--model", "m", "--method", "uniform", "--budget", "avg-bits=4"],
                 ["bench", "--model", "m", "--methods", "uniform", "--budgets", "avg-bits=4", "--out", "o"],
                 ["eval", "--model", "m"], ["export", "--model", "m", "--plan", "p", "--out", "o"]):
        s = settings_from_args(p.parse_args(argv))
        differ = {f.name: (getattr(s, f.name), getattr(RunSettings(), f.name)) for f in dataclasses.fields(s)
                  if getattr(s, f.name) != getattr(RunSettings(), f.name)}
        assert differ == {}, (argv[0], differ)


def test_every_setting_has_exactly_one_generated_flag():
    """Settings are declared once: each RunSettings / QuantConfig field (but the API-only input shape and
    the nested qconfig) declares one flag, and the searching commands' parser holds exactly one action
    for it, generated from that declaration (its help is the field's)."""
    import argparse
    import dataclasses

    from mpqkit.cli import build_parser
    from mpqkit.cli_args import setting_fields
    from mpqkit.flagspec import flag_of
    from mpqkit.settings import RunSettings

    declared = {f.name for f, _, _ in setting_fields()}
    everything = {f.name for f in dataclasses.fields(RunSettings)} | {f.name for f in dataclasses.fields(QuantConfig)}
    assert everything - declared == {"input_shape", "qconfig"}
    assert flag_of(dataclasses.fields(RunSettings)[0]) is not None
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("search", "sweep", "bench", "proxies"):
        actions = sub.choices[command]._actions
        for f, spec, _ in setting_fields():
            mine = [a for a in actions if a.dest == (spec.dest or f.name)]
            assert len(mine) == 1, (command, f.name, [a.option_strings for a in mine])
            assert list(mine[0].option_strings[:len(spec.names)]) == list(spec.names)
            assert mine[0].help == spec.help
