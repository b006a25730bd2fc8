"""Sliced mutual information: K random 1-D projections, a 1-D MI estimate for each, averaged.

Estimators (all vectorised over the K projections, natural log / nats):
- ``mi_knn_discrete``: the k-NN estimator for a continuous variable and a discrete one (Ross 2014,
  the one behind scikit-learn's ``mutual_info_classif``), exact in 1-D via sorting;
- ``mi_binned_discrete``: plug-in estimate on equal-mass (quantile) bins vs the labels;
- ``mi_binned_continuous``: plug-in estimate on a 2-D grid of equal-mass bins (for an embedding).
Projections are seeded, so every probe of a search sees the same directions.
"""
from __future__ import annotations

import torch
from torch import Tensor


def projections(dim: int, k: int, seed: int) -> Tensor:
    """K random unit directions in R^dim (columns), fixed by (dim, seed)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + dim)
    theta = torch.randn(dim, k, generator=g, dtype=torch.float64)
    return theta / theta.norm(dim=0, keepdim=True)


def project(z: Tensor, k: int, seed: int) -> Tensor:
    """N×D features → N×K projections onto the seeded directions (features standardised first, so
    no single large-variance channel dominates every direction)."""
    z = z.double()
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-12)
    return z @ projections(z.shape[1], k, seed)


def _jitter(x: Tensor, seed: int) -> Tensor:
    """Tiny seeded noise that breaks ties (as scikit-learn does), far below any real difference."""
    g = torch.Generator().manual_seed(seed)
    scale = x.abs().mean(0, keepdim=True).clamp_min(1e-12)
    return x + 1e-10 * scale * torch.randn(x.shape, generator=g, dtype=x.dtype)


def mi_knn_discrete(x: Tensor, y: Tensor, k: int = 3, seed: int = 0) -> Tensor:
    """I(x_col; y) for every column of x (N×K), y integer labels (N). Returns K estimates (nats).

    ψ(N) + ψ(k) − ⟨ψ(N_y)⟩ − ⟨ψ(m)⟩, where the k-th nearest same-class neighbour is at distance d
    and m counts all points (any class, self included) closer than d. Classes with ≤ k samples
    are left out, as in scikit-learn.
    """
    x = _jitter(x.double().reshape(len(x), -1), seed)
    n_all, kk = x.shape
    y = y.reshape(-1)
    dist = torch.full_like(x, float("inf"))
    keep = torch.zeros(n_all, dtype=torch.bool)
    counts = torch.zeros(n_all, dtype=torch.float64)
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        n_c = len(idx)
        if n_c <= k:
            continue
        xs, order = x[idx].sort(dim=0)
        inf = torch.full((k, kk), float("inf"), dtype=x.dtype)
        padded = torch.cat([-inf, xs, inf])  # below: -inf, above: +inf → out-of-range windows are infinite
        best = torch.full_like(xs, float("inf"))
        for left in range(k + 1):  # k nearest in 1-D = `left` points below and k-left above
            lo = xs - padded[k - left:k - left + n_c]
            hi = padded[k + (k - left):k + (k - left) + n_c] - xs
            best = torch.minimum(best, torch.maximum(lo, hi))
        d = torch.empty_like(best)
        d.scatter_(0, order, best)  # back to the original order within the class
        dist[idx] = d
        keep[idx] = True
        counts[idx] = n_c
    if not keep.any():
        return torch.zeros(kk, dtype=torch.float64)
    xk, dk = x[keep], dist[keep]
    n = len(xk)
    srt = xk.T.contiguous().sort(dim=1).values  # K×n
    q = xk.T.contiguous()
    r = dk.T.contiguous()
    r = r * (1 - 1e-9)  # the neighbour *at* distance d must not count, whatever the rounding of q ± d
    m = torch.searchsorted(srt, q + r, side="left") - torch.searchsorted(srt, q - r, side="right")  # |x-xi| < d
    dg = torch.special.digamma
    return (dg(torch.tensor(float(n), dtype=torch.float64)) + dg(torch.tensor(float(k), dtype=torch.float64))
            - dg(counts[keep]).mean() - dg(m.T.double().clamp_min(1)).mean(0))


def _quantile_bins(x: Tensor, bins: int) -> Tensor:
    """Equal-mass bin index (0..bins-1) of every entry, per column (rank-based, ties split)."""
    n = x.shape[0]
    ranks = x.argsort(dim=0).argsort(dim=0)
    return (ranks * bins // n).clamp_max(bins - 1)


def _plugin_mi(a: Tensor, b: Tensor, na: int, nb: int) -> Tensor:
    """Plug-in MI of two integer-coded variables per column (a, b: N×K codes), with the
    Miller–Madow bias correction (the plug-in estimate is biased upwards by ≈ cells / 2N)."""
    n, kk = a.shape
    joint = torch.zeros(kk, na * nb, dtype=torch.float64)
    joint.scatter_add_(1, (a * nb + b).T.contiguous(), torch.ones(kk, n, dtype=torch.float64))
    p = (joint / n).reshape(kk, na, nb)
    pa, pb = p.sum(2, keepdim=True), p.sum(1, keepdim=True)
    ratio = torch.where(p > 0, p / (pa * pb).clamp_min(1e-300), torch.ones_like(p))
    cells = (p > 0).sum((1, 2)) - (pa > 0).sum((1, 2)) - (pb > 0).sum((1, 2)) + 1
    return (p * ratio.log()).sum((1, 2)) - cells.double() / (2 * n)


def mi_binned_discrete(x: Tensor, y: Tensor, bins: int = 16) -> Tensor:
    x = x.double().reshape(len(x), -1)
    labels, codes = torch.unique(y.reshape(-1), return_inverse=True)
    return _plugin_mi(_quantile_bins(x, bins), codes[:, None].expand(-1, x.shape[1]), bins, len(labels))


def mi_binned_continuous(x: Tensor, e: Tensor, bins: int = 16) -> Tensor:
    """I(x_col; e_col) for paired columns of x and e (both N×K)."""
    return _plugin_mi(_quantile_bins(x.double(), bins), _quantile_bins(e.double(), bins), bins, bins)


def sliced_mi(z: Tensor, target: Tensor, k: int = 128, seed: int = 0, estimator: str = "knn",
              knn_k: int = 3, bins: int = 16) -> float:
    """SMI(z; target): mean over K seeded projections of the 1-D MI.

    ``target`` is a label vector (N, integer) or an embedding (N×E, projected with its own seeded
    directions, paired one-to-one with z's)."""
    if len(z) != len(target):
        raise ValueError(f"{len(z)} feature rows but {len(target)} targets")
    pz = project(z.reshape(len(z), -1), k, seed)
    if target.ndim == 1 and not target.is_floating_point():
        if estimator == "knn":
            return float(mi_knn_discrete(pz, target, knn_k, seed).mean())
        if estimator == "binned":
            return float(mi_binned_discrete(pz, target, bins).mean())
        raise ValueError(f"unknown MI estimator '{estimator}' (knn | binned)")
    pe = project(target.reshape(len(target), -1), k, seed + 7919)
    return float(mi_binned_continuous(pz, pe, bins).mean())
