"""The IQP solver on random instances (issue-9 figures): L layers × 6 bit choices, avg-bits=4 budget.

    .venv/bin/python benchmarks/iqp_random.py [--sizes 20,50,200] [--time-limit 60] [--heuristic-s 10]

Per size: layer sizes drawn log-uniformly; G = diagonal (convex in bits, like measured ΔL) plus
random symmetric cross terms scaled to a fraction of the diagonal, then PSD-projected as CLADO does.
Compared, all under the same objective ½xᵀGx: MILP alone (time limit), local search alone
(--heuristic-s), the combined solver (time limit), the diagonal-only ILP's plan, and uniform 4-bit.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mpqkit.budget import Ledger, parse_budget
from mpqkit.graph import LayerInfo, ModelGraph
from mpqkit.plan import atomic_write_text
from mpqkit.sensitivity.crosslayer import make_psd
from mpqkit.solve import Allocation, solve_ilp
from mpqkit.solve.iqp import QuadraticObjective, solve_iqp

BITS = [2, 3, 4, 5, 6, 8]
MAX_MILP_Y = 400_000  # beyond this many linearised products the MILP is not even built (memory, minutes)


def instance(n_layers: int, seed: int):
    rng = np.random.default_rng(seed)
    numel = np.exp(rng.uniform(np.log(2e3), np.log(6e5), n_layers)).astype(int)
    layers = [LayerInfo(f"l{i}", "conv", i, (int(n),), int(n), 0, (1,), (1,), int(n) * 10) for i, n in enumerate(numel)]
    graph = ModelGraph(layers, [], int(numel.sum()), (1,))
    names = [l.fqn for l in layers]
    ledger = Ledger(graph, names)
    prob = Allocation(ledger, names, BITS, [8], {}, ledger.resolve(parse_budget("avg-bits=4")))
    k = len(BITS)
    sens = rng.uniform(0.2, 2.0, n_layers)
    diag = np.array([[s * 4.0 ** -(b - 2) for b in BITS] for s in sens]).reshape(-1)  # ΔL ~ 4^-bits
    a = rng.normal(size=(n_layers * k, n_layers * k)) * np.sqrt(np.outer(diag, diag)) * 0.3
    g = (a + a.T) / 2 + np.diag(2 * diag)
    g, lin, _ = make_psd(g, "project")
    return prob, g, lin, diag


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20,50,200")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--heuristic-s", type=float, default=10.0)
    ap.add_argument("--out", default="benchmarks/results/iqp_random")
    args = ap.parse_args(argv)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        prob, g, lin, diag = instance(n, seed=n)
        obj = QuadraticObjective(g, lin, n, len(BITS))
        row: dict = {"layers": n, "bits": len(BITS)}
        y = n * (n - 1) // 2 * len(BITS) ** 2
        row["linearised_products"] = y
        if y <= MAX_MILP_Y:
            t = time.perf_counter()
            milp = solve_iqp(prob, g, lin, time_limit=args.time_limit, heuristic_share=0.0, seed=0)
            row.update(milp_objective=milp.info.get("milp_objective"), milp_bound=milp.bound,
                       milp_status=milp.info.get("milp_status"), milp_s=time.perf_counter() - t)
        t = time.perf_counter()
        heur = solve_iqp(prob, g, lin, time_limit=args.heuristic_s, exact=False, seed=0)
        row.update(heuristic_objective=heur.objective, heuristic_s=time.perf_counter() - t)
        if y <= MAX_MILP_Y:
            t = time.perf_counter()
            both = solve_iqp(prob, g, lin, time_limit=args.time_limit, seed=0)
            row.update(combined_objective=both.objective, combined_gap=both.gap, combined_status=both.status,
                       combined_s=time.perf_counter() - t)
        diag_scores = {f: {b: diag[i * len(BITS) + k] for k, b in enumerate(BITS)} for i, f in enumerate(prob.layers)}
        dplan = solve_ilp(prob, diag_scores, time_limit=args.time_limit)
        row["diag_ilp_plan_under_G"] = obj.value(np.array([BITS.index(dplan.assignment[f][0]) for f in prob.layers]))
        row["uniform4_under_G"] = obj.value(np.full(n, BITS.index(4)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["layers", "linearised_products", "milp_objective", "milp_bound", "milp_status", "milp_s",
            "heuristic_objective", "heuristic_s", "combined_objective", "combined_gap", "combined_s",
            "diag_ilp_plan_under_G", "uniform4_under_G"]
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# IQP on random instances (6 bit choices, avg-bits=4; objective ½xᵀGx, lower is better)", "",
             f"Produced by `.venv/bin/python benchmarks/iqp_random.py --time-limit {args.time_limit:g} "
             f"--heuristic-s {args.heuristic_s:g}`.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    atomic_write_text(Path(args.out) / "table.md", "\n".join(lines) + "\n")
    atomic_write_text(Path(args.out) / "results.json", json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
