"""The IQP solver: exact against brute force on tiny instances; heuristic finds good plans; budgets hold."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpqkit.budget import Ledger, parse_budget
from mpqkit.graph import discover
from mpqkit.solve import Allocation
from mpqkit.solve.iqp import QuadraticObjective, solve_iqp

from conftest import make_tiny

SEARCHED = ["conv2", "conv3", "conv4"]
FIXED = {"conv1": (8, 8), "fc": (8, 8)}


@pytest.fixture(scope="module")
def ledger():
    return Ledger(discover(make_tiny(), (3, 8, 8)), SEARCHED)


def _random_g(n, seed, psd=False):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    g = (a + a.T) / 2
    if psd:
        g = a @ a.T / n
    return g


def _brute(problem, g, lin=None):
    obj = QuadraticObjective(g, lin, len(problem.layers), len(problem.choices()))
    best = None
    for combo in itertools.product(range(len(problem.choices())), repeat=len(problem.layers)):
        asg = {f: problem.choices()[k] for f, k in zip(problem.layers, combo)}
        if problem.violations(asg):
            continue
        v = obj.value(np.array(combo))
        if best is None or v < best:
            best = v
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("psd", [False, True])
def test_exact_matches_brute_force(ledger, seed, psd):
    prob = Allocation(ledger, SEARCHED, [2, 4, 8], [8], FIXED, ledger.resolve(parse_budget("avg-bits=4.5")))
    g = _random_g(9, seed, psd)
    sol = solve_iqp(prob, g, time_limit=20, heuristic_share=0.05)
    assert sol.objective == pytest.approx(_brute(prob, g), abs=1e-7)
    assert sol.status.startswith("optimal") and sol.gap is not None and sol.gap <= 1e-4
    assert not prob.violations(sol.assignment)


@pytest.mark.parametrize("seed", range(6))
def test_convex_bound_is_a_valid_lower_bound(ledger, seed):
    """PSD G: the relaxation's certified bound never exceeds the brute-force optimum; non-PSD: no bound."""
    from mpqkit.solve.ilp import MilpModel
    from mpqkit.solve.iqp import convex_bound

    prob = Allocation(ledger, SEARCHED, [2, 3, 4, 8], [8], FIXED, ledger.resolve(parse_budget("avg-bits=3.5")))
    costs, limits, allowed = MilpModel(prob).budget_arrays()
    g = _random_g(12, seed, psd=True)
    lin = np.random.default_rng(seed).normal(size=12)
    opt = _brute(prob, g, lin)
    bound, steps = convex_bound(g, lin, costs, limits, allowed, deadline=float("inf"))
    assert steps > 0 and bound <= opt + 1e-9
    sol = solve_iqp(prob, g, lin, time_limit=10)
    assert sol.bound is not None and sol.bound >= bound - 1e-9 and sol.bound <= opt + 1e-7  # the tighter bound
    assert convex_bound(-g, lin, costs, limits, allowed, float("inf")) == (None, 0)  # concave: no bound


def test_convex_bound_certifies_without_the_milp(ledger):
    """Diagonal G: with the diagonal moved into the linear term the relaxation is exact, the bound
    proves the heuristic's plan optimal and no MILP is built."""
    prob = Allocation(ledger, SEARCHED, [2, 4, 8], [8], FIXED, ledger.resolve(parse_budget("avg-bits=8")))
    d = np.array([3.0, 2.0, 1.0] * 3)  # more bits, lower loss; avg-bits=8 allows all 8-bit
    sol = solve_iqp(prob, np.diag(2 * d), time_limit=10)
    assert sol.status == "optimal (convex bound)" and "milp_status" not in sol.info
    assert all(ch[0] == 8 for ch in sol.assignment.values()) and sol.gap <= 1e-4


@pytest.mark.parametrize("seed", range(3))
def test_heuristic_alone_is_feasible_and_near_optimal(ledger, seed):
    prob = Allocation(ledger, SEARCHED, [2, 3, 4, 8], [8], FIXED, ledger.resolve(parse_budget("avg-bits=3.5")))
    g = _random_g(12, seed)
    sol = solve_iqp(prob, g, time_limit=0.5, exact=False)
    assert not prob.violations(sol.assignment)
    assert sol.objective == pytest.approx(_brute(prob, g), abs=1e-7)  # 4^3 plans: local search finds the optimum


def test_linear_term_and_diagonal_only_equals_ilp(ledger):
    """With G diagonal, the IQP is the ILP: both give the same optimum."""
    from mpqkit.solve import solve_ilp

    prob = Allocation(ledger, SEARCHED, [2, 4, 8], [8], FIXED, ledger.resolve(parse_budget("avg-bits=4")))
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 1, size=9)
    scores = {f: {b: d[i * 3 + k] for k, b in enumerate([2, 4, 8])} for i, f in enumerate(SEARCHED)}
    ilp = solve_ilp(prob, scores)
    iqp = solve_iqp(prob, np.diag(2 * d), time_limit=10)
    assert iqp.objective == pytest.approx(ilp.objective)
