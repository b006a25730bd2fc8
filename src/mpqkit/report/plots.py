"""Plots written into results directories (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np

from ..plan import Plan  # noqa: E402


def plot_bits(plan: Plan, path: Path, searched: set[str] | None = None, title: str | None = None) -> Path:
    """Bar chart of weight bits (and activation bits, as markers) per layer, in execution order."""
    names = list(plan.layers)
    wb = [plan.layers[n].w_bits or 32 for n in names]
    ab = [plan.layers[n].a_bits or 32 for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6))
    colors = ["#4c72b0" if (searched is None or n in searched) else "#999999" for n in names]
    ax.bar(range(len(names)), wb, color=colors, label="weight bits")
    ax.plot(range(len(names)), ab, "o", color="#dd8452", markersize=4, label="activation bits")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(max(wb), max(ab)) * 1.3 + 1)  # headroom for the legend
    ax.set_title(title or f"{plan.model_name} · {plan.method} · {plan.budget or ''}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrix(g, labels: list[str], path: Path, title: str = "") -> Path:
    """Heatmap of a square matrix (CLADO's G over (layer, bits)), symmetric colour scale around 0."""

    g = np.asarray(g)
    lim = float(np.abs(g).max()) or 1.0
    size = max(5.0, 0.12 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(g, cmap="RdBu_r", vmin=-lim, vmax=lim)
    step = max(1, len(labels) // 40)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_yticks(range(0, len(labels), step))
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=5)
    ax.set_yticklabels(labels[::step], fontsize=5)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
