"""CLADO's IQP on the measured ResNet-56 G (issue 16, part 2): the gap before and after the convex bound.

    PYTHONPATH=src .venv/bin/python benchmarks/iqp_resnet56.py [--table PATH] [--time-limit 60]

Reads the CLADO table that `mpqkit bench` stored with a ResNet-56 plan (singles and 12,879 pair probes,
W{2,4,8}, 256 sensitivity images; default: benchmarks/results/bench_resnet56_clado), builds the same
problem as `mpqkit search --method clado` (first/last layer 8/8, A8) and solves it at each budget twice
with the same time limit: without the convex bound (the solver before this change: RLT MILP bound only)
and with it (the default). Objective ½xᵀGx on the PSD-projected G; lower is better. Writes
results.json and table.md to --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mpqkit.api import load_model
from mpqkit.budget import Ledger, parse_budget
from mpqkit.graph import discover
from mpqkit.plan import atomic_write_text
from mpqkit.sensitivity.base import SensitivityTable
from mpqkit.sensitivity.crosslayer import quadratic_objective
from mpqkit.solve import Allocation
from mpqkit.solve.iqp import solve_iqp

BITS = [2, 4, 8]


def load_table(path: Path) -> SensitivityTable:
    d = json.loads(path.read_text())
    w = {f: {int(b): float(v) for b, v in row.items()} for f, row in d["w"].items()}
    pairs = {}
    for key, v in d["pairs"].items():
        left, right = key.split("|")
        (f, b), (g, c) = left.rsplit("@", 1), right.rsplit("@", 1)
        pairs[(f, int(b), g, int(c))] = float(v)
    return SensitivityTable(w=w, pairs=pairs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="benchmarks/results/bench_resnet56_clado/plans/clado/avg-bits=3/sensitivity.json")
    ap.add_argument("--model", default="resnet56-orig")
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--out", default="benchmarks/results/iqp_resnet56")
    args = ap.parse_args(argv)
    table = load_table(Path(args.table))
    bundle = load_model(args.model)
    graph = discover(bundle.model, bundle.input_shape)
    searched = [f for f in graph.names if f in table.w]
    ledger = Ledger(graph, searched)
    fixed = {f: (8, 8) for f in graph.names if f not in searched}
    rows = []
    for b in args.budgets.split(","):
        budget = f"avg-bits={b}"
        prob = Allocation(ledger, searched, BITS, [8], fixed, ledger.resolve(parse_budget(budget)))
        g, lin, _ = quadratic_objective(table, prob)
        for mode, convex in (("RLT MILP bound only (before)", False), ("+ convex bound (default)", True)):
            sol = solve_iqp(prob, g, lin, time_limit=args.time_limit, convex=convex)
            row = {"budget": budget, "solver_config": mode, "objective": sol.objective, "bound": sol.bound,
                   "gap": sol.gap, "status": sol.status, "solve_s": sol.seconds,
                   "milp_bound": sol.info.get("milp_bound"), "convex_bound": sol.info.get("convex_bound"),
                   "convex_bound_steps": sol.info.get("convex_bound_steps"),
                   "heuristic_objective": sol.info.get("heuristic_objective"),
                   "milp_objective": sol.info.get("milp_objective")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps({"table": args.table, "model": args.model,
                                                         "time_limit": args.time_limit, "rows": rows}, indent=1))

    def fmt(v, nd=4):
        return "-" if v is None else f"{v:.{nd}g}"

    lines = [f"# CLADO's IQP on the measured ResNet-56 G ({len(searched)} layers × W{{2,4,8}}, {len(table.pairs)} pairs)",
             "", f"Produced by `PYTHONPATH=src .venv/bin/python benchmarks/iqp_resnet56.py --time-limit "
             f"{args.time_limit:g}` from `{args.table}`. Objective ½xᵀGx on the PSD-projected G (lower is better); "
             "gap = (objective − best lower bound) / objective; both configurations get the same time.", "",
             "| budget | solver | objective | MILP (RLT) bound | convex bound | gap | status | s |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['solver_config']} | {fmt(r['objective'], 5)} | {fmt(r['milp_bound'])} | "
                     f"{fmt(r['convex_bound'])} | {fmt(r['gap'], 3)} | {r['status']} | {r['solve_s']:.1f} |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
