"""A search's results directory: plan.json, per-layer table (CSV + Markdown), sensitivity, plot, summary."""
from __future__ import annotations

import csv
import datetime as _dt
import io
from pathlib import Path
from typing import TYPE_CHECKING

from ..fileutil import atomic_write_text, json_text
from ..sensitivity.crosslayer import build_g
from .plots import plot_bits, plot_matrix

if TYPE_CHECKING:
    from ..result import SearchResult


def layer_rows(result: "SearchResult") -> list[dict]:
    """One row per layer: bits, the ledger's costs, and the chosen sensitivity score."""
    plan, ledger, table = result.plan, result.ledger, result.table
    rows = []
    for layer in result.graph.layers:
        lq = plan.layers[layer.fqn]
        w_score = table.w.get(layer.fqn, {}).get(lq.w_bits) if table else None
        a_score = table.a.get(layer.fqn, {}).get(lq.a_bits) if table else None
        rows.append({
            "layer": layer.fqn, "kind": layer.kind, "searched": layer.fqn in ledger.searched,
            "w_bits": lq.w_bits, "a_bits": lq.a_bits, "weight_numel": layer.weight_numel, "macs": layer.macs,
            "weight_bytes": ledger.layer_cost("size", layer.fqn, lq.w_bits, lq.a_bits),
            "bitops": ledger.layer_cost("bitops", layer.fqn, lq.w_bits, lq.a_bits),
            "w_sensitivity": w_score, "a_sensitivity": a_score,
        })
    return rows


def rows_to_markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


SEARCH_FILES = ("plan.json", "layers.csv", "layers.md", "sensitivity.json", "pareto.csv", "summary.json", "bits.png",
                "clado_G.png")  #: every file a search writes into its results directory


def write_results(out: Path, result: "SearchResult") -> Path:
    """The search's results directory: plan, per-layer table, sensitivity table (and greedy's Pareto
    list, CLADO's G), summary. It describes this search only: result files an earlier search left
    there and this one does not write (e.g. another method's ``sensitivity.json``) are removed, and
    ``summary.json`` lists the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = _write_result_files(out, result)
    for name in SEARCH_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return out


def _write_result_files(out: Path, result: "SearchResult") -> list[str]:
    """Write the search's files into ``out``; returns their names (the summary, written last, lists them)."""
    written = []

    def text(name: str, content: str) -> None:
        atomic_write_text(out / name, content)
        written.append(name)

    result.plan.save(out / "plan.json")
    written.append("plan.json")
    rows = layer_rows(result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    text("layers.csv", buf.getvalue())
    text("layers.md", rows_to_markdown(rows))
    if result.table is not None:
        result.table.save(out / "sensitivity.json")
        written.append("sensitivity.json")
        pareto = result.table.decision.pareto if result.table.decision is not None else None
        if pareto:  # greedy: the whole measured list, one row per step
            buf = io.StringIO()
            cols = ["step", "moved", "avg_w_bits", "searched_bytes", "top1", "drop_pct", "loss", "bits"]
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for p in pareto:
                w.writerow({**p, "bits": " ".join(f"{f}={b}" for f, b in p["bits"].items())})
            text("pareto.csv", buf.getvalue())
    plot_bits(result.plan, out / "bits.png", set(result.ledger.searched))
    written.append("bits.png")
    if result.table is not None and result.table.pairs:  # CLADO: the measured G, before any PSD step

        bits = sorted({b for (_, b, _, _) in result.table.pairs})
        g, index = build_g(result.table, list(result.ledger.searched), bits)
        plot_matrix(g, [f"{f}@{b}" for f, b in index], out / "clado_G.png",
                    f"{result.plan.model_name}: CLADO G (measured, before PSD)")
        written.append("clado_G.png")
    summary = {"model": result.plan.model_name, "method": result.plan.method, "budget": result.plan.budget,
               "files": [*written, "summary.json"],
               "costs": result.plan.costs, "solver": result.solution.to_dict(), "seconds": result.seconds,
               "engine": result.engine_stats, "profile": result.profile, "tie_groups": result.graph.tie_groups,
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    text("summary.json", json_text(summary, "summary.json", indent=2) + "\n")
    return written
