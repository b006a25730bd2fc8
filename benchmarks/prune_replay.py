"""Replay eval-delta's lazy (pruned) measurement on saved full tables: probes needed, same plan?

    PYTHONPATH=src .venv/bin/python benchmarks/prune_replay.py --dir benchmarks/results/draws_resnet20_gptq \
        --model resnet20 [--budgets "avg-bits=2.5;avg-bits=3;avg-bits=4"]

For every ``plans/eval-delta/<budget>/**/sensitivity.json`` of ``--dir`` measured without pruning (every
candidate), the rounds of ``mpqkit.sensitivity.evalbased`` are replayed on the saved ΔL values: the two
lowest bits first, then what the ILP on (measured, 0 for the rest) picks, until its plan uses measured
candidates only. Prints per table the candidates the lazy rule measures, of all, its rounds, and whether
its plan equals the ILP's plan on the full table. No probe is run (the ILP only). The tables are the
``sensitivity.json`` files the bench run wrote (not committed: run the bench first).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mpqkit.api import load_model
from mpqkit.budget import Ledger, parse_budget
from mpqkit.graph import discover
from mpqkit.solve import Allocation, solve_ilp

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)


def replay(problem: Allocation, w: dict[str, dict[int, float]]) -> tuple[int, int, bool]:
    """(candidates measured, rounds, same plan as the full table's ILP) for one full table ``w``."""
    full = solve_ilp(problem, w).assignment
    measured = {(f, b) for f in problem.layers for b in sorted(problem.w_bits)[:2]}
    rounds = 0
    while True:
        rounds += 1
        scores = {f: {b: (w[f][b] if (f, b) in measured else 0.0) for b in problem.w_bits} for f in problem.layers}
        plan = solve_ilp(problem, scores).assignment
        new = {(f, plan[f][0]) for f in problem.layers} - measured
        if not new:
            return len(measured), rounds, plan == full
        measured |= new


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="bench directory with eval-delta plans")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budgets", default="avg-bits=2.5;avg-bits=3;avg-bits=4")
    args = ap.parse_args(argv)
    bundle = load_model(args.model)
    graph = discover(bundle.model, bundle.input_shape)
    searched = [n for n in graph.names if n not in graph.default_fixed()]
    for budget in args.budgets.split(";"):
        ledger = Ledger(graph, searched)
        problem = Allocation(ledger=ledger, layers=searched, w_bits=list(DEFAULT_BITS), a_bits=[8],
                             fixed={f: (8, 8) for f in graph.default_fixed()},
                             constraints=ledger.resolve(parse_budget(budget)), tie_groups=graph.tie_groups)
        for path in sorted((args.dir / "plans" / "eval-delta" / budget).rglob("sensitivity.json")):
            table = json.loads(path.read_text())
            if table.get("pruned_lower_bounds"):
                continue  # measured with pruning: not a full table
            w = {f: {int(b): v for b, v in s.items()} for f, s in table["w"].items()}
            n, rounds, same = replay(problem, w)
            draw = path.parent.name if path.parent.name.startswith("draw") else "draw0"
            print(f"{budget} {draw}: {n} of {len(searched) * len(DEFAULT_BITS)} candidates, "
                  f"{rounds} rounds, same plan: {same}")


if __name__ == "__main__":
    main()
