"""Which CLADO pairs can be skipped without changing the plan: measured tables replayed at larger ``--pair-tol``.

    PYTHONPATH=src .venv/bin/python benchmarks/clado_pair_replay.py --dir benchmarks/results/cost_resnet20_clado \
        --model resnet20 --tols 0.05,0.1,0.2,0.5 --budgets 2.5,3,3.5,4

For every draw's CLADO table in ``--dir`` (``plans/clado/<budget>/[drawN/]sensitivity.json``, measured at the
default ``--pair-tol``), and each larger tolerance: drop the pairs ``crosslayer.select_pairs`` would not have
measured at that tolerance (their cross term becomes 0, as for any skipped pair), solve CLADO's IQP at each
budget exactly as ``mpqkit search --method clado`` does (PSD projection, first/last layer 8/8, A8), and
compare the plan with the plan of the whole table. The probe seconds a tolerance would save are estimated
from the draw's profile (mean seconds of the probes that start at each layer: a pair (l, b; m, c) starts at
m). Writes ``pair_replay.json`` and ``pair_replay.md`` into ``--dir``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mpqkit.api import load_model
from mpqkit.budget import Ledger, parse_budget
from mpqkit.fileutil import atomic_write_text
from mpqkit.graph import discover
from mpqkit.sensitivity.base import SensitivityTable
from mpqkit.sensitivity.crosslayer import quadratic_objective, select_pairs
from mpqkit.solve import Allocation
from mpqkit.solve.iqp import solve_iqp


def load_table(path: Path) -> SensitivityTable:
    d = json.loads(path.read_text())
    w = {f: {int(b): float(v) for b, v in row.items()} for f, row in d["w"].items()}
    pairs = {}
    for key, v in d.get("pairs", {}).items():
        left, right = key.split("|")
        (f, b), (g, c) = left.rsplit("@", 1), right.rsplit("@", 1)
        pairs[(f, int(b), g, int(c))] = float(v)
    return SensitivityTable(w=w, pairs=pairs, meta=d.get("meta", {}))


def draw_dirs(root: Path, budget_dir: str) -> list[tuple[int, Path]]:
    base = root / "plans" / "clado" / budget_dir
    out = [(0, base)] if (base / "sensitivity.json").is_file() else []
    for d in sorted(base.glob("draw*")):
        if (d / "sensitivity.json").is_file():
            out.append((int(d.name[4:]), d))
    return out


def kept_table(table: SensitivityTable, layers: list[str], bits: list[int], tol: float) -> SensitivityTable:
    chosen, _ = select_pairs(table.w, layers, bits, tol)
    keep = {(f, b, g, c) for (f, b), later in chosen.items() for g, c in later}
    return SensitivityTable(w=table.w, pairs={k: v for k, v in table.pairs.items() if k in keep})


def probe_seconds(table: SensitivityTable, summary: dict) -> float:
    """Estimated seconds of the table's pair probes from the profile's mean per start layer."""
    by_start = summary.get("profile", {}).get("probes_by_start_layer", {})
    ms = {k: v["mean_ms"] for k, v in by_start.items()}
    fallback = statistics.median(ms.values()) if ms else 0.0
    return sum(ms.get(g, fallback) for (_, _, g, _) in table.pairs) / 1000


def replay(args: argparse.Namespace) -> list[dict]:
    bundle = load_model(args.model)
    graph = discover(bundle.model, bundle.input_shape)
    rows = []
    for draw, d in draw_dirs(Path(args.dir), args.table_budget):
        table = load_table(d / "sensitivity.json")
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
        plan = json.loads((d / "plan.json").read_text())
        params, seed = plan["method"]["params"], int(plan["provenance"]["seed"])
        bits = sorted(params["w_candidates"])
        layers = [f for f in graph.names if f in table.w]
        ledger = Ledger(graph, layers)
        fixed = {f: (8, 8) for f in graph.names if f not in layers}
        for b in args.budgets.split(","):
            budget = f"avg-bits={b}"
            prob = Allocation(ledger, layers, bits, [8], fixed, ledger.resolve(parse_budget(budget)))
            plans = {}
            for tol in [0.0] + [float(t) for t in args.tols.split(",")]:
                sub = table if tol == 0.0 else kept_table(table, layers, bits, tol)
                g, lin, _ = quadratic_objective(sub, prob)
                sol = solve_iqp(prob, g, lin, time_limit=args.time_limit, seed=seed)
                plans[tol] = {f: sol.assignment[f][0] for f in layers}
                rows.append({"draw": draw, "budget": budget, "pair_tol": tol if tol else "measured",
                             "pairs": len(sub.pairs), "pair_probe_s": round(probe_seconds(sub, summary), 1),
                             "status": sol.status, "same_plan": plans[tol] == plans[0.0],
                             "layers_changed": sum(plans[tol][f] != plans[0.0][f] for f in layers)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="a bench directory with CLADO plans (and their sensitivity.json)")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--table-budget", default="avg-bits=3", help="the budget directory whose tables are read")
    ap.add_argument("--tols", default="0.1,0.2,0.5", help="larger --pair-tol values to replay")
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--time-limit", type=float, default=60.0)
    args = ap.parse_args(argv)
    rows = replay(args)
    out = Path(args.dir)
    atomic_write_text(out / "pair_replay.json", json.dumps(rows, indent=1) + "\n")
    lines = ["#### CLADO pairs replayed at larger --pair-tol (`benchmarks/clado_pair_replay.py`)", "",
             "Per draw and budget: the pairs a tolerance keeps of those measured, their estimated probe seconds (the "
             "profile's mean per start layer), and whether the IQP plan equals the whole table's.", "",
             "| pair tol | draws × budgets | same plan | pairs (median) | est. pair-probe s (median) |",
             "|---|---:|---:|---:|---:|"]
    for tol in dict.fromkeys(r["pair_tol"] for r in rows):
        rs = [r for r in rows if r["pair_tol"] == tol]
        lines.append(f"| {tol} | {len(rs)} | {sum(r['same_plan'] for r in rs)} | "
                     f"{statistics.median(r['pairs'] for r in rs):.0f} | "
                     f"{statistics.median(r['pair_probe_s'] for r in rs):.0f} |")
    atomic_write_text(out / "pair_replay.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
