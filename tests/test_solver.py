"""The ILP is exact (checked against brute force), honours every budget and the tie groups."""
from __future__ import annotations

import itertools
import random

import pytest

from mpqkit.budget import Ledger, parse_budget
from mpqkit.errors import InfeasibleBudgetError
from mpqkit.graph import discover
from mpqkit.solve import Allocation, solve_ilp, solve_uniform

from conftest import make_tiny

SEARCHED = ["conv2", "conv3", "conv4"]
FIXED = {"conv1": (8, 8), "fc": (8, 8)}


@pytest.fixture(scope="module")
def ledger():
    return Ledger(discover(make_tiny(), (3, 8, 8)), SEARCHED)


def _scores(seed, bits):
    rnd = random.Random(seed)
    # decreasing in bits, like real sensitivities, plus noise (and some negatives)
    return {f: {b: rnd.uniform(0, 1) / b - 0.02 for b in bits} for f in SEARCHED}


def _brute(prob, w, a, alpha=1.0):
    best = None
    for combo in itertools.product(prob.choices(), repeat=len(prob.layers)):
        asg = dict(zip(prob.layers, combo))
        if prob.violations(asg):
            continue
        if len(prob.a_bits) > 1 and any(
                len({asg[f][1] for f in g if f in asg}) > 1 for g in prob.tie_groups):
            continue
        obj = sum(w[f][wb] + (alpha * a[f][ab] if a else 0.0) for f, (wb, ab) in asg.items())
        if best is None or obj < best[0] - 1e-12:
            best = (obj, asg)
    return best


def _between(ledger, metric, frac, w_bits, a_bits):
    """A budget value a fraction of the way from the cheapest to the dearest assignment."""
    lo = ledger.value(metric, {**FIXED, **{f: (min(w_bits), min(a_bits)) for f in SEARCHED}})
    hi = ledger.value(metric, {**FIXED, **{f: (max(w_bits), max(a_bits)) for f in SEARCHED}})
    return lo + frac * (hi - lo)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", ["avg-bits=3", "avg-bits=4.5,bitops@0.5", "size@0.3", "bitops@0.2", "size@0.0"])
def test_ilp_matches_brute_force_weights(ledger, seed, budget):
    terms = []
    for term in budget.split(","):
        if "@" in term:
            metric, frac = term.split("@")
            v = _between(ledger, metric, float(frac), [2, 3, 4, 8], [8])
            term = f"size={v}B" if metric == "size" else f"bitops={v}"
        terms.append(term)
    prob = Allocation(ledger, SEARCHED, [2, 3, 4, 8], [8], FIXED, ledger.resolve(parse_budget(",".join(terms))))
    w = _scores(seed, [2, 3, 4, 8])
    try:
        sol = solve_ilp(prob, w)
    except InfeasibleBudgetError:
        assert _brute(prob, w, None) is None
        return
    obj, _ = _brute(prob, w, None)
    assert sol.objective == pytest.approx(obj, abs=1e-9)
    assert not prob.violations(sol.assignment)
    assert sol.status == "optimal"


@pytest.mark.parametrize("seed", range(3))
def test_ilp_joint_weights_and_activations_with_ties(ledger, seed):
    bitops = _between(ledger, "bitops", 0.35, [2, 4, 8], [4, 8])
    prob = Allocation(ledger, SEARCHED, [2, 4, 8], [4, 8], FIXED,
                      ledger.resolve(parse_budget(f"bitops={bitops}")), tie_groups=[("conv2", "conv3")])
    w, a = _scores(seed, [2, 4, 8]), _scores(seed + 10, [4, 8])
    sol = solve_ilp(prob, w, a, alpha=0.7)
    obj, _ = _brute(prob, w, a, alpha=0.7)
    assert sol.objective == pytest.approx(obj, abs=1e-9)
    assert sol.assignment["conv2"][1] == sol.assignment["conv3"][1]


def test_ilp_act_mem_is_a_per_layer_max(ledger):
    limit = ledger.graph["conv4"].in_numel * 6 / 8  # conv2/3/4 all read 8x8x8 inputs
    prob = Allocation(ledger, SEARCHED, [4], [4, 6, 8], FIXED, ledger.resolve(parse_budget(f"act-mem={limit}B")))
    sol = solve_ilp(prob, {f: {4: 0.0} for f in SEARCHED}, {f: {4: 3.0, 6: 1.0, 8: 0.0} for f in SEARCHED})
    assert all(ab == 6 for _, ab in sol.assignment.values())


def test_uniform_picks_largest_feasible(ledger):
    prob = Allocation(ledger, SEARCHED, [2, 3, 4, 5, 6, 8], [8], FIXED, ledger.resolve(parse_budget("avg-bits=4.5")))
    assert set(solve_uniform(prob).assignment.values()) == {(4, 8)}
    with pytest.raises(InfeasibleBudgetError):
        solve_uniform(prob, w_bits=5, a_bits=8)


@pytest.mark.parametrize("seed", range(3))
def test_ilp_min_fill_spends_the_budget_and_is_the_best_such_plan(ledger, seed):
    """Scores that favour few bits leave the budget unspent; min_fill f gives the best plan spending at
    least f of it (brute force over all plans), and no floor when no plan can."""
    prob = Allocation(ledger, SEARCHED, [2, 3, 4, 8], [8], FIXED, ledger.resolve(parse_budget("avg-bits=5")))
    rnd = random.Random(seed)
    w = {f: {b: rnd.uniform(0, 1) + 0.1 * b for b in (2, 3, 4, 8)} for f in SEARCHED}  # more bits cost more
    limit = prob.constraints[0].limit
    plain = solve_ilp(prob, w)
    assert ledger.value("avg-bits", prob.full(plain.assignment)) < 0.9 * limit
    fill = solve_ilp(prob, w, min_fill=0.9)
    spent = ledger.value("avg-bits", prob.full(fill.assignment))
    assert 0.9 * limit - 1e-9 <= spent <= limit + 1e-9 and fill.info["min_fill"] == 0.9
    best = min(sum(w[f][c[0]] for f, c in zip(prob.layers, combo))
               for combo in itertools.product(prob.choices(), repeat=len(prob.layers))
               if not prob.violations(dict(zip(prob.layers, combo)))
               and ledger.value("avg-bits", prob.full(dict(zip(prob.layers, combo)))) >= 0.9 * limit - 1e-9)
    assert fill.objective == pytest.approx(best)
    impossible = solve_ilp(prob, w, min_fill=1.5)  # no plan spends 150 % of a budget it must meet
    assert impossible.info["min_fill"] is None and impossible.assignment == plain.assignment
