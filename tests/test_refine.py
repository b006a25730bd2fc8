"""``--refine``: measured moves never break the budget, respect the probe limit, are kept only when
both calibration halves improve, and lift a weak plan on the digits model."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny
from mpqkit.budget import Ledger, parse_budget
from mpqkit.graph import discover
from mpqkit.solve import Allocation
from mpqkit.solve.refine import refine

BITS = [2, 3, 4, 6, 8]
_GRAPH = discover(make_tiny(), (3, 8, 8))
LAYERS = [n for n in _GRAPH.names if n not in _GRAPH.default_fixed()]


def _noise(config, salt: str) -> float:
    h = hashlib.sha256((salt + repr(sorted(config.items()))).encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(avg=st.floats(2.2, 7.5), max_probes=st.integers(1, 40), seed=st.integers(0, 10**6),
       scores=st.lists(st.floats(0, 10), min_size=len(LAYERS) * len(BITS), max_size=len(LAYERS) * len(BITS)))
def test_refinement_never_breaks_the_budget(avg, max_probes, seed, scores):
    ledger = Ledger(_GRAPH, LAYERS)
    problem = Allocation(ledger=ledger, layers=LAYERS, w_bits=BITS, a_bits=[8],
                         fixed={f: (8, 8) for f in _GRAPH.default_fixed()},
                         constraints=ledger.resolve(parse_budget(f"avg-bits={avg:.3f}")))
    start = {f: (2, 8) for f in LAYERS}  # the smallest plan always fits (avg ≥ 2.2)
    table = {f: {b: scores[i * len(BITS) + j] for j, b in enumerate(BITS)} for i, f in enumerate(LAYERS)}
    calls = []

    def measure(configs):  # a made-up loss: more bits help, plus deterministic noise
        calls.append(len(configs))
        out = []
        for c in configs:
            base = -sum(w for w, _ in c.values()) / 10
            out.append((base + _noise(c, f"a{seed}"), base + _noise(c, f"b{seed}")))
        return out

    res = refine(problem, start, measure, max_probes, table)
    assert not problem.violations(res.assignment), "the refined plan breaks the budget"
    assert res.probes == sum(calls) <= max_probes
    if res.moves:
        assert res.after[0] < res.before[0] and res.after[1] < res.before[1]
    else:
        assert res.assignment == start and res.after == res.before


def test_refinement_starts_from_a_feasible_plan_only():
    ledger = Ledger(_GRAPH, LAYERS)
    problem = Allocation(ledger=ledger, layers=LAYERS, w_bits=BITS, a_bits=[8],
                         constraints=ledger.resolve(parse_budget("avg-bits=3")))
    with pytest.raises(ValueError, match="meets the budget"):
        refine(problem, {f: (8, 8) for f in LAYERS}, lambda cs: [(0.0, 0.0)] * len(cs), 10)


def test_refine_lifts_a_weak_plan_on_digits():
    import mpqkit

    # nearest rounding leaves mixquant-ilp's data-free plan weak on digits (GPTQ repairs it alone)
    kw = dict(calib_size=1024, progress=False, qconfig=mpqkit.api.QuantConfig(rounding="nearest"))
    plain = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "mixquant-ilp", **kw)
    ref = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "mixquant-ilp", refine=40, **kw)
    r = ref.plan.provenance["refine"]
    assert r["moves"] and r["probes"] <= 40
    assert r["objective_after"]["half_a"] < r["objective_before"]["half_a"]
    assert r["objective_after"]["half_b"] < r["objective_before"]["half_b"]
    assert not ref.solution.info.get("violations")
    assert ref.plan.costs["avg_w_bits_searched"] <= 3 + 1e-9
    top = {k: mpqkit.evaluate("digits-cnn", "digits", "test", p)["top1"] for k, p in
           (("plain", plain.plan), ("refined", ref.plan))}
    assert top["refined"] > top["plain"]  # measured on unseen images
    with pytest.raises(mpqkit.errors.MpqkitError, match="more than 128"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=3", "uniform", refine=5, calib_size=100, progress=False)
