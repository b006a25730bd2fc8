"""Try every kind of bad input on the CLI and print what each one answers (a Markdown table).

    .venv/bin/python scripts/bad_inputs.py [--out benchmarks/results/bad_inputs.md]

Each case must exit 2 with one line "mpqkit: error: ..." and write nothing; the table says whether
it did. Uses the digits CNN (no ../shared needed) except where a case is about CIFAR files.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from mpqkit.cli import main
from mpqkit.fileutil import atomic_write_text

D = ["--model", "digits-cnn", "--data", "digits"]


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    good = tmp / "good.json"
    main(["search", *D, "--method", "uniform", "--w-bits", "4", "--out", str(good), "-q"])
    other = json.loads(good.read_text())
    other["model"]["sha256"] = "0" * 64
    (tmp / "other.json").write_text(json.dumps(other))
    (tmp / "trunc.json").write_text(good.read_text()[:60])
    bits = json.loads(good.read_text())
    bits["layers"]["conv2"]["w_bits"] = 17
    (tmp / "bits.json").write_text(json.dumps(bits))
    unknown = json.loads(good.read_text())
    unknown["layers"]["conv9"] = unknown["layers"]["conv2"]
    (tmp / "unknown_layer.json").write_text(json.dumps(unknown))
    from mpqkit.zoo.models import get_model

    sd = get_model("digits-cnn").model.state_dict()
    nan = {k: v.clone() for k, v in sd.items()}
    next(v for k, v in nan.items() if k.endswith("weight")).view(-1)[0] = math.nan
    torch.save(nan, tmp / "nan.pt")
    inf = {k: v.clone() for k, v in sd.items()}
    next(v for k, v in inf.items() if k.endswith("weight")).view(-1)[0] = math.inf
    torch.save(inf, tmp / "inf.pt")
    torch.save({k: v for k, v in list(sd.items())[:-1]}, tmp / "short.pt")
    (tmp / "garbage.pt").write_bytes(b"\x00garbage" * 64)
    (tmp / "empty_imgs").mkdir()
    (tmp / "ro_file").write_text("")
    (tmp / "existing_dir.pt").mkdir()
    (tmp / "existing_dir.json").mkdir()
    (tmp / "plan_dir").mkdir()
    missing = json.loads(good.read_text())
    del missing["layers"]["conv2"]
    (tmp / "missing_layer.json").write_text(json.dumps(missing))
    nohash = json.loads(good.read_text())
    nohash["model"]["sha256"] = ""
    (tmp / "nohash.json").write_text(json.dumps(nohash))
    (tmp / "imgs").mkdir()
    (tmp / "imgs" / "cls").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp / "imgs" / "cls" / "a.png")
    (tmp / "not_a_folder").write_text("")
    strseed = json.loads(good.read_text())
    strseed["provenance"]["seed"] = "zero"
    (tmp / "str_seed.json").write_text(json.dumps(strseed))
    negcalib = json.loads(good.read_text())
    negcalib["provenance"]["calib"]["n"] = -5
    (tmp / "neg_calib.json").write_text(json.dumps(negcalib))
    (tmp / "garbage_rows").mkdir()
    (tmp / "garbage_rows" / "rows.jsonl").write_text("\x00 not json\n{broken\n")
    return [
        ("unknown model name", ["eval", "--model", "resnet99"]),
        ("unknown dataset", ["eval", "--model", "digits-cnn", "--data", "mnist"]),
        ("unknown split", ["eval", *D, "--split", "exact"]),
        ("unknown method", ["search", *D, "--budget", "avg-bits=3", "--method", "magic"]),
        ("unknown layer in --fixed", ["search", *D, "--budget", "avg-bits=3", "--fixed", "conv9"]),
        ("bits above 16", ["search", *D, "--method", "uniform", "--w-bits", "17"]),
        ("bits 0 in candidates", ["search", *D, "--budget", "avg-bits=3", "--w-candidates", "0,4,8"]),
        ("malformed budget", ["search", *D, "--budget", "avg-bits=lots"]),
        ("unknown budget key", ["search", *D, "--budget", "speed=3"]),
        ("negative budget", ["search", *D, "--budget", "size=-1MB"]),
        ("infeasible budget", ["search", *D, "--budget", "avg-bits=1"]),
        ("infeasible BitOps budget", ["search", *D, "--budget", "bitops=1K"]),
        ("malformed sweep range", ["sweep", *D, "--method", "uniform", "--budgets", "avg-bits=4:2:1",
                                   "--out", str(tmp / "sweep")]),
        ("empty data (ImageFolder without images)", ["eval", "--model", "digits-cnn", "--data", str(tmp / "empty_imgs")]),
        ("wrong-shape data for the model", ["eval", "--model", "resnet20", "--data", "digits"]),
        ("missing data root", ["eval", "--model", "digits-cnn", "--data", "cifar10", "--data-root", str(tmp / "nope")]),
        ("NaN weights in a checkpoint", ["eval", *D, "--checkpoint", str(tmp / "nan.pt")]),
        ("Inf weights in a checkpoint", ["eval", *D, "--checkpoint", str(tmp / "inf.pt")]),
        ("checkpoint for another architecture", ["eval", *D, "--checkpoint", str(tmp / "short.pt")]),
        ("corrupt checkpoint file", ["eval", *D, "--checkpoint", str(tmp / "garbage.pt")]),
        ("truncated plan file", ["eval", *D, "--plan", str(tmp / "trunc.json")]),
        ("plan with bits out of range", ["eval", *D, "--plan", str(tmp / "bits.json")]),
        ("plan naming an unknown layer", ["eval", *D, "--plan", str(tmp / "unknown_layer.json")]),
        ("plan for a different model (hash)", ["eval", *D, "--plan", str(tmp / "other.json")]),
        ("export with a truncated plan", ["export", "--model", "digits-cnn", "--plan", str(tmp / "trunc.json"),
                                          "--format", "onnx", "--out", str(tmp / "m.onnx")]),
        ("unknown PTQ backend in bench", ["bench", *D, "--methods", "uniform", "--budgets", "avg-bits=3",
                                          "--ptq", "gptq+foo", "--out", str(tmp / "b")]),
        ("results directory not writable", ["sweep", *D, "--method", "uniform", "--budgets", "avg-bits=3",
                                            "--out", str(tmp / "ro_file" / "x")]),
        ("CUDA forced on a machine without it", ["eval", *D, "--device", "cuda"]),
        ("reconstruction flags without --ptq", ["eval", *D, "--plan", str(good), "--recon-iters", "5"]),
        ("apply --out naming an existing directory", ["apply", *D, "--plan", str(good),
                                                      "--out", str(tmp / "existing_dir.pt")]),
        ("search --out plan path that is a directory", ["search", *D, "--method", "uniform", "--w-bits", "4",
                                                        "--out", str(tmp / "existing_dir.json")]),
        ("search --out under a file (unwritable), before the search", ["search", *D, "--budget", "avg-bits=3",
                                                                       "--out", str(tmp / "ro_file" / "p.json")]),
        ("probe cache directory that is a file", ["search", *D, "--budget", "avg-bits=3",
                                                  "--cache-dir", str(tmp / "ro_file"), "--out", str(tmp / "s1")]),
        ("data folder that is a file", ["eval", "--model", "digits-cnn", "--data", str(tmp / "not_a_folder")]),
        ("--observers last-x", ["search", *D, "--budget", "avg-bits=3", "--method", "infoq", "--observers", "last-x",
                                "--out", str(tmp / "s2")]),
        ("method option the method does not have", ["search", *D, "--budget", "avg-bits=3", "--method", "hawq",
                                                    "--psd", "none", "--out", str(tmp / "s3")]),
        ("plan that lacks a layer", ["eval", *D, "--plan", str(tmp / "missing_layer.json")]),
        ("plan without its model hash", ["eval", *D, "--plan", str(tmp / "nohash.json")]),
        ("plan file that is a directory", ["eval", *D, "--plan", str(tmp / "plan_dir")]),
        ("--calib-size 0 with mixquant", ["search", *D, "--budget", "avg-bits=3", "--method", "mixquant",
                                          "--calib-size", "0", "--out", str(tmp / "s4")]),
        ("ImageFolder with --split bogus", ["eval", "--model", "digits-cnn", "--data", str(tmp / "imgs"),
                                            "--split", "bogus"]),
        ("sweep step that queues thousands of budgets", ["sweep", *D, "--method", "uniform",
                                                         "--budgets", "avg-bits=2:4:0.0001", "--out", str(tmp / "s5")]),
        ("--seed beyond 64 bits", ["search", *D, "--method", "uniform", "--w-bits", "4",
                                   "--seed", "18446744073709551616", "--out", str(tmp / "s6")]),
        ("negative --seed", ["search", *D, "--method", "uniform", "--w-bits", "4", "--seed", "-5",
                             "--out", str(tmp / "s7")]),
        ("--max-drop nan", ["search", *D, "--method", "greedy", "--max-drop", "nan", "--out", str(tmp / "s8")]),
        ("--max-drop nan through --auto-options", ["search", *D, "--method", "auto", "--budget", "avg-bits=4",
                                                   "--auto-options", '{"greedy": {"max_drop": NaN}}',
                                                   "--out", str(tmp / "s9")]),
        ("--time-limit inf", ["search", *D, "--budget", "avg-bits=4", "--time-limit", "inf", "--out", str(tmp / "s10")]),
        ("plan whose provenance.seed is a string", ["eval", *D, "--plan", str(tmp / "str_seed.json")]),
        ("plan whose provenance.calib.n is negative", ["eval", *D, "--plan", str(tmp / "neg_calib.json")]),
        ("eval --limit -3", ["eval", *D, "--limit", "-3"]),
        ("export --check --limit -1", ["export", "--model", "digits-cnn", "--data", "digits", "--plan", str(good),
                                       "--format", "onnx", "--out", str(tmp / "l.onnx"), "--check", "--limit", "-1"]),
        ("bench --draws 1000", ["bench", *D, "--methods", "uniform", "--budgets", "avg-bits=4", "--draws", "1000",
                                "--out", str(tmp / "b2")]),
        ("an argument of the wrong type (one line, not the usage)", ["search", *D, "--calib-size", "many"]),
        ("bench --out -", ["bench", *D, "--methods", "uniform", "--budgets", "avg-bits=4", "--out", "-"]),
        ("search --out NAME.json whose results folder name is too long",
         ["search", *D, "--method", "uniform", "--w-bits", "4", "--out", str(tmp / ("p" * 250 + ".json"))]),
        ("report --markdown naming an existing directory", ["report", str(tmp / "b0"), "--markdown",
                                                            str(tmp / "existing_dir.json")]),
        ("bench --splits exact on digits (a split the data does not have)",
         ["bench", *D, "--methods", "uniform", "--budgets", "avg-bits=4", "--splits", "exact", "--out", str(tmp / "b3")]),
        ("report of a garbage rows.jsonl", ["report", str(tmp / "garbage_rows")]),
        ("--random-init with a torchvision model is honoured (wrong data shape is the error)",
         ["eval", "--model", "mobilenet_v2", "--random-init", "--data", "digits"]),
    ]


def main_() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/bad_inputs.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.chdir(tmp)
        for name, argv in cases(tmp):
            before = {p for p in tmp.rglob("*")}
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse's own errors
                    code = e.code
            new = {p for p in tmp.rglob("*")} - before
            msg = err.getvalue().replace(str(tmp) + "/", "").strip().splitlines()  # paths relative to the temp dir
            rows.append((name, " ".join(argv[:1] + [a if not a.startswith(str(tmp)) else Path(a).name for a in argv[1:]]),
                         code, msg[-1] if msg else "", len(msg), sorted(str(p.relative_to(tmp)) for p in new)))
    os.chdir(Path(__file__).resolve().parents[1])
    lines = ["| bad input | command | exit | message | nothing written |", "|---|---|---:|---|---|"]
    for name, cmd, code, msg, n, new in rows:
        ok = "yes" if not new else f"NO: {new}"
        lines.append(f"| {name} | `{cmd}` | {code} | {msg.replace('|', '/')} | {ok} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(args.out), text)
    print(text)
    bad = [r for r in rows if r[2] != 2 or r[5] or not r[3].startswith("mpqkit: error:")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main_()
