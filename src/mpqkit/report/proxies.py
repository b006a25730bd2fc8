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
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from scipy import stats

from ..engine.probe import ProbeEngine
from ..fileutil import atomic_write_text, json_text
from ..quant.ptq import prepare_fp

log = logging.getLogger("mpqkit")

#: methods whose table has one score per (layer, weight bits) worth comparing (clado's singles are
#: eval-delta's; greedy's phase 1 is eval-delta; uniform has no table)
DEFAULT_METHODS = ("eval-delta", "hawq", "mpqco", "mixquant", "mixquant-ilp", "infoq")


def true_drops(bundle, graph, ds, searched: Sequence[str], bits: Sequence[int],
               settings, calib=None) -> dict[str, dict[int, dict[str, float]]]:
    """{layer: {bits: {"drop_pct", "dloss"}}} measured on ``ds`` (weights of one layer quantized). The
    quantized layers are the ones a plan ships with: built on ``calib`` (the calibration set: GPTQ,
    bias correction), never fitted on ``ds``."""

    model = prepare_fp(bundle.model, settings.qconfig)
    kw = dict(qconfig=settings.qconfig, seed=settings.seed, device=settings.device, **settings.engine_kwargs())
    source = ProbeEngine(model, graph, calib.images, calib.labels, **kw) \
        if calib is not None and settings.qconfig.layer_ptq else None
    engine = ProbeEngine(model, graph, ds.images, ds.labels, layers_from=source, **kw)
    probes = [{f: (b, None)} for f in searched for b in bits]
    res = engine.run(probes, desc=f"true Δtop-1 on {ds.split}")
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


def write_proxies(result: dict[str, Any], out: Path, searched: Sequence[str]) -> None:
    """proxies.json, proxies.csv, proxies.md and the scatter proxies.png of a measured proxy study."""
    # lazy: matplotlib takes a second to import
    from .plots import plt

    corr, truth, tables = result["correlations"], result["truth"], result["scores"]
    methods, w_candidates = list(corr), result["w_candidates"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "proxies.json", json_text(result, "proxies.json", indent=1) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "bits", "true_drop_pct", "true_dloss", *methods])
    for f in searched:
        for b in w_candidates:
            w.writerow([f, b, truth[f][b]["drop_pct"], truth[f][b]["dloss"], *(tables[m][f][b] for m in methods)])
    atomic_write_text(out / "proxies.csv", buf.getvalue())
    lines = [f"### Proxy quality: {result['model']} / {result['data']}, rank correlation with the true single-layer top-1 drop "
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


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"
