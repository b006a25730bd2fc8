"""A self-contained HTML report (images inlined as base64; no network, no scripts)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Sequence

from ..plan import Plan, atomic_write_text

CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{white-space:nowrap}td.n{text-align:right}h2{margin-top:28px}img{max-width:100%}.err{color:#a00}
.small{color:#666;font-size:12px}"""


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _cell(v, fmt: str | None = None) -> str:
    if v is None or v == "":
        return "<td></td>"
    if isinstance(v, (int, float)) and fmt:
        return f'<td class="n">{format(v, fmt)}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def write_html(rows: Sequence[dict], out: Path, title: str, pareto: Path, grids: dict[str, Path]) -> Path:
    cols = [("method", None), ("budget", None), ("ptq", None), ("size_mb", ".4f"), ("compression", ".2f"),
            ("gbitops", ".4f"), ("avg_w_bits", ".3f"), ("top1_test", ".2f"), ("top1_exact", ".2f"),
            ("search_s", ".1f"), ("ptq_s", ".1f")]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p class='small'>Every figure below was measured by <code>mpqkit bench</code>; rows are in "
             "<code>results.csv</code>. Top-1 in %, weight size in MB (2<sup>20</sup> bytes).</p>",
             "<h2>Accuracy vs size</h2>", _img(pareto), "<h2>Results</h2><table><tr>"
             + "".join(f"<th>{c}</th>" for c, _ in cols) + "</tr>"]
    for r in rows:
        if r.get("error"):
            parts.append("<tr>" + "".join(_cell(r.get(c)) for c, _ in cols[:3])
                         + f"<td colspan='{len(cols) - 3}' class='err'>failed: {html.escape(r['error'])}</td></tr>")
        else:
            parts.append("<tr>" + "".join(_cell(r.get(c) if c != "ptq" else (r.get(c) or "default"), f)
                                          for c, f in cols) + "</tr>")
    parts.append("</table>")
    if grids:
        parts.append("<h2>Bits per layer of each plan</h2>")
        for method, path in grids.items():
            parts.append(f"<h3>{html.escape(method)}</h3>{_img(path)}")
    ledgers = [r for r in rows if r.get("plan") and not r.get("error") and Path(r["plan"]).exists()]
    seen = set()
    if ledgers:
        parts.append("<h2>Budget ledger</h2><p class='small'>The costs each solver constrained, as recorded in the "
                     "plan.</p><table><tr><th>method</th><th>budget</th><th>weight bytes</th><th>compression</th>"
                     "<th>avg w-bits (searched)</th><th>BitOps</th><th>act-mem max (bytes)</th>"
                     "<th>act-mem sum (bytes)</th><th>solver</th></tr>")
        for r in ledgers:
            if (r["method"], r["budget"]) in seen:
                continue
            seen.add((r["method"], r["budget"]))
            p = Plan.load(r["plan"])
            c = p.costs
            solver = (p.provenance or {}).get("solver", {})
            parts.append("<tr>" + _cell(r["method"]) + _cell(r["budget"]) + _cell(c.get("weight_bytes"), ".0f")
                         + _cell(c.get("compression"), ".2f") + _cell(c.get("avg_w_bits_searched"), ".3f")
                         + _cell(c.get("bitops"), ".4g") + _cell(c.get("act_mem_max_bytes"), ".0f")
                         + _cell(c.get("act_mem_sum_bytes"), ".0f")
                         + _cell(f"{solver.get('solver', '')}: {solver.get('status', '')}") + "</tr>")
        parts.append("</table>")
    proxies = out / "proxies.json"
    if proxies.exists():
        data = json.loads(proxies.read_text())
        parts.append("<h2>Proxy quality</h2><table><tr><th>method</th><th>Spearman</th><th>Kendall</th>"
                     "<th>mean per-bits Spearman</th></tr>")
        for m, v in data.get("correlations", {}).items():
            parts.append("<tr>" + _cell(m) + _cell(v.get("spearman"), ".3f") + _cell(v.get("kendall"), ".3f")
                         + _cell(v.get("spearman_per_bits"), ".3f") + "</tr>")
        parts.append("</table>")
        if (out / "proxies.png").exists():
            parts.append(_img(out / "proxies.png"))
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
