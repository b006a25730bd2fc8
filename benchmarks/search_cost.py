"""What a search costs: seconds and peak resident memory per method, cold, one process per method.

    PYTHONPATH=src .venv/bin/python benchmarks/search_cost.py --model resnet20 \
        --methods auto,eval-delta,clado,hawq --budgets avg-bits=3 --draws 3 \
        --out benchmarks/results/cost_resnet20 [--calib-size 128] [--timeout 1800] [-- --other-mpqkit-flags]

Each method runs as ``mpqkit bench --methods <m>`` in its own process with an empty probe cache (a
cold search, as a new user's first run), into ``--out`` (so its rows are bench rows: top-1, search and
PTQ seconds, plans). Per method, ``cost.jsonl`` gets one record: the process's peak resident memory
(``wait4``, evaluation and PTQ included), its wall time, whether it ran out of ``--timeout``, and per
draw the search's profile (stage seconds from the plan's ``summary.json``). ``cost.md`` — the table
``mpqkit report`` puts beside the directory's rows — gives per method the median search seconds over
the draws, the median search + PTQ seconds, the peak resident memory and the stages that took the most
time. Resumable: a method with a record is not run again (delete its line to measure it again).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from mpqkit.fileutil import atomic_write_text
from mpqkit.report.bench import load_rows


def run_method(args: argparse.Namespace, method: str, extra: list[str]) -> dict:
    """One cold bench process for ``method``: its record for ``cost.jsonl``."""
    cache = tempfile.mkdtemp(prefix="mpqkit-cost-")
    cmd = [sys.executable, "-m", "mpqkit.cli", "bench", "-q", "--model", args.model, "--methods", method,
           "--budgets", args.budgets, "--ptq", args.ptq, "--splits", "test", "--draws", str(args.draws),
           "--out", str(args.out), "--cache-dir", cache, *(["--calib-size", str(args.calib_size)]
                                                            if args.calib_size else []), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "MPQKIT_CACHE": cache})
    timed_out = False
    deadline = t0 + args.timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
            break
        time.sleep(0.5)
    shutil.rmtree(cache, ignore_errors=True)
    return {"model": args.model, "method": method, "budgets": args.budgets, "draws": args.draws,
            "calib_size": args.calib_size, "process_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "timed_out": timed_out,
            "exit": os.waitstatus_to_exitcode(status), "command": " ".join(cmd[3:])}


def _profiles(out: Path, rows: list[dict], method: str) -> list[dict]:
    """The search profiles of ``method``'s plans (one per draw and budget), from their summary.json."""
    found = []
    for r in rows:
        if r.get("method") == method and r.get("plan"):
            summary = Path(r["plan"]).parent / "summary.json"
            if summary.exists():
                prof = json.loads(summary.read_text()).get("profile")
                if prof:
                    found.append(prof)
    return found


def _top_stages(profiles: list[dict], n: int = 3) -> str:
    """The ``n`` stages with the largest median share of the search's wall time."""
    shares: dict[str, list[float]] = {}
    for p in profiles:
        for name, v in p["stages"].items():
            shares.setdefault(name, []).append(v["seconds"] / max(p["wall_seconds"], 1e-9))
    top = sorted(shares.items(), key=lambda kv: -statistics.median(kv[1]))[:n]
    return ", ".join(f"{k} {100 * statistics.median(v):.0f} %" for k, v in top)


def _per_draw(values: list[float | None]) -> str:
    """Per-draw figures in draw order, "–" for a draw recorded before they were measured; blank for none."""
    return " / ".join(f"{v:.0f}" if v else "–" for v in values) if any(values) else ""


def _limit(command: str) -> str:
    """The ``--max-memory`` a record's command passed to mpqkit (blank: none)."""
    words = command.split()
    return words[words.index("--max-memory") + 1] if "--max-memory" in words[:-1] else ""


def cost_markdown(out: Path) -> str:
    """The table of ``cost.md`` from ``cost.jsonl`` and the directory's rows."""
    records = [json.loads(line) for line in (out / "cost.jsonl").read_text().splitlines() if line.strip()]
    rows = load_rows(out / "rows.jsonl") if (out / "rows.jsonl").exists() else []
    text = ("Per method: median over its draws of the search seconds (`search_s`, the first budget's run: it "
            "measures; later budgets reuse) and of search + PTQ; the peak resident memory of the whole process "
            "(fp32 and plan evaluation, PTQ included); per draw, the peak sampled during its search alone and "
            "during its plan's PTQ and evaluation alone (– for a draw measured before these were sampled); the "
            "stages with the largest median share of a search (`mpqkit search --profile`). Written by "
            "`benchmarks/search_cost.py`.")
    lines = [f"#### What the searches cost (`{out.name}`: cold, one process per method)", "",
             *textwrap.wrap(text, 110), "",
             "| model | method | draws | search s | search + PTQ s | peak resident MB | --max-memory | search peaks MB "
             "| PTQ + eval peaks MB | largest stages |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rec in records:
        mine = [r for r in rows if r.get("method") == rec["method"] and "search_s" in r and not r.get("error")]
        first = {}
        for r in mine:  # the first budget of each draw: the search that measured
            first.setdefault(r.get("draw", 0), r)
        s = [r["search_s"] for r in first.values()]
        sp = [r["search_s"] + (r.get("ptq_s") or 0.0) for r in first.values()]
        med = (lambda v: f"{statistics.median(v):.0f}" if v else "")
        status = " (timed out)" if rec["timed_out"] else (f" (exit {rec['exit']})" if rec["exit"] else "")
        own = _per_draw([next(iter(_profiles(out, [r], rec["method"])), {}).get("search_peak_mb")
                         for r in first.values()])
        ptq = _per_draw([r.get("ptq_eval_peak_mb") for r in first.values()])
        lines.append(f"| {rec['model']} | {rec['method']}{status} | {len(first)} | {med(s)} | {med(sp)} | "
                     f"{rec['peak_rss_mb']:.0f} | {_limit(rec['command'])} | {own} | {ptq} | "
                     f"{_top_stages(_profiles(out, mine, rec['method']))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", required=True, help="comma-separated methods, each in its own process")
    ap.add_argument("--budgets", default="avg-bits=3")
    ap.add_argument("--ptq", default="default")
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--calib-size", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per method's process (default 3600)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cost = args.out / "cost.jsonl"
    done = {json.loads(line)["method"] for line in cost.read_text().splitlines() if line.strip()} \
        if cost.exists() else set()
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method in done:
            continue
        rec = run_method(args, method, extra)
        with cost.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    table = cost_markdown(args.out)
    atomic_write_text(args.out / "cost.md", table)
    print(table)


if __name__ == "__main__":
    main()
