"""The sliced-MI estimators against cases with known mutual information."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from mpqkit.sensitivity.mi import mi_binned_continuous, mi_binned_discrete, mi_knn_discrete, sliced_mi


def _labels(n, c, seed=0):
    return torch.arange(n) % c


@pytest.mark.parametrize("est", ["knn", "binned"])
def test_independent_is_near_zero(est):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 16, generator=g)
    y = torch.randint(0, 10, (2000,), generator=g)
    assert abs(sliced_mi(z, y, k=32, estimator=est)) < 0.03


@pytest.mark.parametrize("est,tol", [("knn", 0.05), ("binned", 0.12)])
def test_deterministic_function_of_balanced_label_is_log_c(est, tol):
    c = 8
    y = _labels(2400, c)
    x = (y.double() * 3.0 + 0.01 * torch.randn(len(y), generator=torch.Generator().manual_seed(1)))[:, None]
    got = float((mi_knn_discrete(x, y) if est == "knn" else mi_binned_discrete(x, y, bins=c)).mean())
    assert got == pytest.approx(math.log(c), abs=tol)


def test_known_gaussian_mi_continuous_binned():
    # bivariate normal with correlation rho: I = -½ log(1 - rho²)
    g = torch.Generator().manual_seed(2)
    rho = 0.8
    a = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    b = rho * a + math.sqrt(1 - rho ** 2) * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    got = float(mi_binned_continuous(a, b, bins=20)[0])
    assert got == pytest.approx(-0.5 * math.log(1 - rho ** 2), rel=0.1)


def test_knn_matches_a_brute_force_reference():
    """The sorted-window k-NN in 1-D equals a direct O(N²) computation of the same estimator."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (300,), generator=g)
    x[:, 1] += y * 0.7
    got = mi_knn_discrete(x, y, k=3, seed=0)
    from mpqkit.sensitivity.mi import _jitter

    xj = _jitter(x, 0)
    dg = torch.special.digamma
    for col in range(2):
        v = xj[:, col]
        ms, ns = [], []
        for i in range(len(v)):
            same = (y == y[i]).nonzero().flatten()
            d = (v[same] - v[i]).abs().sort().values[3]  # [0] is the point itself
            ms.append(int(((v - v[i]).abs() < d).sum()))
            ns.append(len(same))
        ref = (dg(torch.tensor(300.0)) + dg(torch.tensor(3.0)) - dg(torch.tensor(ns, dtype=torch.float64)).mean()
               - dg(torch.tensor(ms, dtype=torch.float64)).mean())
        assert float(got[col]) == pytest.approx(float(ref), abs=1e-5)  # boundary ties may differ by one count


def test_more_samples_lower_variance():
    def spread(n):
        vals = []
        for s in range(12):
            g = torch.Generator().manual_seed(100 + s)
            y = torch.randint(0, 4, (n,), generator=g)
            z = torch.randn(n, 8, generator=g) + y[:, None].float() * 0.5
            vals.append(sliced_mi(z, y, k=16, seed=0))
        return statistics.pstdev(vals)

    assert spread(2000) < spread(200)
