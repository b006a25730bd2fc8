"""Proxy quality (``mpqkit proxies``): how well each method's sensitivity ranks the true damage.

Truth: the measured top-1 drop on the test split when only layer ℓ's weights go to b bits (all
else fp32), for every searched (ℓ, b), through the shared probe engine (cached, resumable). Each
method's score table is measured on the usual calibration subset of the train split, and its rank
correlation with the truth is reported: pooled over all (ℓ, b), and the mean of the per-bit-width
correlations (ranking layers at equal bits, which is what an allocation has to get right).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from scipy import stats

from ..plan import atomic_write_text

log = logging.getLogger("mpqkit")

#: methods whose table has one score per (layer, weight bits) worth comparing (clado's singles are
#: eval-delta's; greedy's phase 1 is eval-delta; uniform has no table)
DEFAULT_METHODS = ("eval-delta", "hawq", "mpqco", "mixquant", "mixquant-ilp", "infoq")


def true_drops(bundle, data: str, searched: Sequence[str], bits: Sequence[int], split: str = "test",
               data_root: str | None = None, progress: bool = False) -> dict[str, dict[int, dict[str, float]]]:
    """{layer: {bits: {"drop_pct", "dloss"}}} measured on ``split`` (weights of one layer quantized)."""
    from .. import api
    from ..engine.probe import ProbeEngine
    from ..graph import discover

    ds = api.load_split(data, split, data_root)
    graph = discover(bundle.model, bundle.input_shape)
    engine = ProbeEngine(bundle.model, graph, ds.images, ds.labels, progress=progress)
    probes = [{f: (b, None)} for f in searched for b in bits]
    res = engine.run(probes, desc=f"true Δtop-1 on {split}")
    out: dict[str, dict[int, dict[str, float]]] = {}
    for p, r in zip(probes, res):
        (f, (b, _)), = p.items()
        out.setdefault(f, {})[b] = {"drop_pct": 100 * (engine.fp.top1 - r.top1), "dloss": r.loss - engine.fp.loss}
    return out


def correlations(scores: dict[str, dict[int, float]], truth: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any]:
    keys = [(f, b) for f in truth for b in truth[f] if f in scores and b in scores[f]]
    x = [scores[f][b] for f, b in keys]
    y = [truth[f][b]["drop_pct"] for f, b in keys]
    per_bits = []
    for b in sorted({b for _, b in keys}):
        xs = [scores[f][bb] for f, bb in keys if bb == b]
        ys = [truth[f][bb]["drop_pct"] for f, bb in keys if bb == b]
        if len(set(xs)) > 1 and len(set(ys)) > 1:
            per_bits.append(float(stats.spearmanr(xs, ys).statistic))
    sp = stats.spearmanr(x, y).statistic
    kt = stats.kendalltau(x, y).statistic
    return {"n": len(keys), "spearman": None if math.isnan(sp) else float(sp),
            "kendall": None if math.isnan(kt) else float(kt),
            "spearman_per_bits": float(sum(per_bits) / len(per_bits)) if per_bits else None}


def proxy_report(model: str, data: str, out: Path, methods: Sequence[str] = DEFAULT_METHODS,
                 w_candidates: Sequence[int] = (2, 3, 4, 5, 6, 8), calib_size: int = 1024,
                 data_root: str | None = None, progress: bool = False) -> dict[str, Any]:
    from .. import api
    from ..graph import discover
    from .plots import plt

    bundle = api.load_model(model)
    graph = discover(bundle.model, bundle.input_shape)
    searched = [n for n in graph.names if n not in graph.default_fixed()]
    truth = true_drops(bundle, data, searched, w_candidates, data_root=data_root, progress=progress)
    tables, corr, seconds = {}, {}, {}
    for m in methods:
        res = api.search(bundle, data, "avg-bits=8", m, w_candidates=w_candidates, calib_size=calib_size,
                         data_root=data_root, progress=progress)
        tables[m] = res.table.w
        seconds[m] = res.seconds["sensitivity"]
        corr[m] = {**correlations(res.table.w, truth), "sensitivity_s": seconds[m]}
        log.info("proxies: %s %s", m, corr[m])
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": bundle.name, "data": data, "split": "test", "w_candidates": list(w_candidates),
              "correlations": corr, "truth": truth, "scores": tables}
    atomic_write_text(out / "proxies.json", json.dumps(result, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "bits", "true_drop_pct", "true_dloss", *methods])
    for f in searched:
        for b in w_candidates:
            w.writerow([f, b, truth[f][b]["drop_pct"], truth[f][b]["dloss"], *(tables[m][f][b] for m in methods)])
    atomic_write_text(out / "proxies.csv", buf.getvalue())
    lines = [f"### Proxy quality: {bundle.name} / {data}, rank correlation with the true single-layer top-1 drop "
             f"on the test split ({len(searched)} layers × bits {list(w_candidates)})", "",
             "| method | Spearman (all) | Kendall (all) | mean Spearman per bit-width | sensitivity s |",
             "|---|---:|---:|---:|---:|"]
    for m in methods:
        c = corr[m]
        lines.append(f"| {m} | {_f(c['spearman'])} | {_f(c['kendall'])} | {_f(c['spearman_per_bits'])} | "
                     f"{c['sensitivity_s']:.1f} |")
    atomic_write_text(out / "proxies.md", "\n".join(lines) + "\n")
    cols = min(3, len(methods))
    rows_n = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, m in zip(axes.flat, methods):
        for b in w_candidates:
            xs = [max(tables[m][f][b], 1e-12) for f in searched]
            ys = [truth[f][b]["drop_pct"] for f in searched]
            ax.scatter(xs, ys, s=9, label=f"{b} bits")
        ax.set_xscale("log")
        ax.set_title(f"{m}: ρ={_f(corr[m]['spearman'])}", fontsize=9)
        ax.set_xlabel("score", fontsize=8)
        ax.set_ylabel("true top-1 drop (pt)", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "proxies.png", dpi=110)
    plt.close(fig)
    return result


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"
