"""CLADO: tree-reused pair probes are exact, the quadratic model reproduces joint losses, cross terms
change the plan's quality, G treatments behave as documented, and a killed search resumes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import mpqkit
from mpqkit.engine.probe import ProbeEngine
from mpqkit.graph import discover
from mpqkit.sensitivity.crosslayer import build_g, importance_draw, make_psd
from mpqkit.solve.iqp import QuadraticObjective
from mpqkit.zoo import get_model, load_data

BITS = (2, 4, 8)


@pytest.fixture(scope="module")
def digits_clado(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", w_candidates=BITS, calib_size=256,
                        progress=False, cache_dir=str(cache), options={"psd": "none", "pair_tol": 0},
                        time_limit=10, out=cache / "results")
    assert (cache / "results" / "clado_G.png").stat().st_size > 0  # the heatmap of G
    return res, cache


def _direct(config):
    """The same probe without the tree: a full forward from the input, on the same data."""
    bundle = get_model("digits-cnn")
    calib = mpqkit.api.calibration_set("digits", 256, 0)
    eng = ProbeEngine(bundle.model, discover(bundle.model, bundle.input_shape), calib.images, calib.labels,
                      prefix=False, use_cache=False, progress=False, objective=mpqkit.api.RunSettings().objective)
    base = {f: (None, 8) for f in ["conv1", "conv2", "conv3", "fc"]}
    return eng.run([{}, config], base=base)


def test_tree_pairs_equal_direct_probes(digits_clado):
    res, _ = digits_clado
    ref, joint = _direct({"conv2": (2, 8), "conv3": (4, 8)})
    assert res.table.pairs[("conv2", 2, "conv3", 4)] == pytest.approx(joint.loss - ref.loss, abs=1e-6)
    ref, single = _direct({"conv3": (2, 8)})
    assert res.table.w["conv3"][2] == pytest.approx(single.loss - ref.loss, abs=1e-6)
    assert len(res.table.pairs) == 9 and res.table.meta["singles_measured"] == 6


def test_quadratic_model_reproduces_joint_loss_and_picks_the_best_plan(digits_clado):
    """With two searched layers, ½xᵀGx of any plan is its measured joint ΔL, so CLADO's plan is the
    feasible plan with the smallest measured loss: the cross terms carry the interaction."""
    res, _ = digits_clado
    layers = ["conv2", "conv3"]
    g, index = build_g(res.table, layers, list(BITS))
    obj = QuadraticObjective(g, None, 2, 3)
    feasible = {}
    for a in itertools.product(range(3), repeat=2):
        joint = res.table.pairs[("conv2", BITS[a[0]], "conv3", BITS[a[1]])]
        assert obj.value(np.array(a)) == pytest.approx(joint, abs=1e-9)
        plan = {"conv2": (BITS[a[0]], 8), "conv3": (BITS[a[1]], 8)}
        if res.plan.costs and not _violates(res, plan):
            feasible[a] = joint
    chosen = (BITS.index(res.plan.layers["conv2"].w_bits), BITS.index(res.plan.layers["conv3"].w_bits))
    assert feasible[chosen] == pytest.approx(min(feasible.values()))
    assert np.abs(g[np.triu_indices(6, 1)]).max() > 0  # real cross-layer terms were measured


def _violates(res, plan):
    from mpqkit.budget import parse_budget

    full = {**{f: (8, 8) for f in ["conv1", "fc"]}, **plan}
    return any(res.ledger.value(c.metric, full) > c.limit * (1 + 1e-9)
               for c in res.ledger.resolve(parse_budget(res.plan.budget)))


def test_psd_treatments():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    g = (a + a.T) / 2
    proj, lin, info = make_psd(g, "project")
    assert np.linalg.eigvalsh(proj).min() > -1e-9 and info["lambda_min_before"] < 0 and not lin.any()
    shifted, lin, _ = make_psd(g, "shift")
    assert np.linalg.eigvalsh(shifted).min() > -1e-9
    raw = QuadraticObjective(g, None, 2, 3)
    sh = QuadraticObjective(shifted, lin, 2, 3)
    for a in itertools.product(range(3), repeat=2):  # the shift is exact on one-hot plans
        assert sh.value(np.array(a)) == pytest.approx(raw.value(np.array(a)))


def test_killed_search_resumes_without_recomputing(tmp_path, monkeypatch):
    kw = dict(w_candidates=BITS, calib_size=128, progress=False, cache_dir=str(tmp_path),
              time_limit=5, options={"pair_tol": 0})  # all pairs: the counts below are exact
    calls = {"n": 0}
    real_run = ProbeEngine.run

    def dying_run(self, probes, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # the fp reference, the A8 reference, two trees done: then the "kill"
            raise KeyboardInterrupt
        return real_run(self, probes, *a, **k)

    monkeypatch.setattr(ProbeEngine, "run", dying_run)
    with pytest.raises(KeyboardInterrupt):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", **kw)
    monkeypatch.setattr(ProbeEngine, "run", real_run)
    cached = len(list(tmp_path.rglob("*.json")))
    assert cached > 0
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", **kw)
    total = 1 + 1 + 6 + 9  # fp reference, A8 reference, singles, pairs
    assert res.engine_stats["probes_run"] == total - cached  # nothing that was cached ran again
    full = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", **{**kw, "use_cache": False, "cache_dir": None})
    assert res.table.pairs == full.table.pairs and res.table.w == full.table.w


def test_workers_compute_the_same_tables(tmp_path):
    """--workers 2: the trees run in two spawned processes into the shared cache; the tables equal
    the serial ones and the main process ran only the two reference probes itself."""
    kw = dict(w_candidates=BITS, calib_size=128, progress=False, time_limit=5)
    serial = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado",
                           cache_dir=str(tmp_path / "a"), **kw)
    par = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", options={"workers": 2},
                        cache_dir=str(tmp_path / "b"), **kw)
    assert par.table.pairs == serial.table.pairs and par.table.w == serial.table.w
    assert par.engine_stats["probes_run"] == 2  # fp and A8 references; every tree came from the workers
    with pytest.raises(mpqkit.errors.MpqkitError, match="needs the probe cache"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", options={"workers": 2},
                      use_cache=False, **kw)


def test_clado_diag_measures_no_pairs_and_minimises_the_sum_of_singles(digits_clado, tmp_path):
    """The paper's ablation: the same singles (read from CLADO's cache), no pair probe, and a plan
    that minimises Σ ΔL(ℓ, b) under the budget — which CLADO's cross terms can overrule."""
    res, cache = digits_clado
    diag = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado-diag", w_candidates=BITS, calib_size=256,
                         progress=False, cache_dir=str(cache), time_limit=10)
    assert diag.table.pairs == {} and diag.table.meta["pairs_measured"] == 0
    assert diag.table.w == res.table.w  # the same single probes
    assert diag.engine_stats["probes_run"] == 0  # all read from the cache CLADO filled
    assert diag.solution.info["cross_terms"] is False and res.solution.info["cross_terms"] is True
    feasible = {}
    for a in itertools.product(BITS, repeat=2):
        plan = {"conv2": (a[0], 8), "conv3": (a[1], 8)}
        if not _violates(diag, plan):
            feasible[a] = diag.table.w["conv2"][a[0]] + diag.table.w["conv3"][a[1]]
    chosen = (diag.plan.layers["conv2"].w_bits, diag.plan.layers["conv3"].w_bits)
    assert feasible[chosen] == pytest.approx(min(feasible.values()))


def test_pair_selection_skips_only_pairs_whose_cross_term_bound_is_small(tmp_path):
    """--pair-tol: singles first, then only the pairs whose second-order bound 2·sqrt(ΔL_a·ΔL_b)
    reaches the threshold; those equal the all-pairs measurement (same probes, same cache), every
    skipped one is under the threshold, and so is its measured cross term."""
    from mpqkit.sensitivity.crosslayer import pair_bound

    kw = dict(w_candidates=BITS, calib_size=256, progress=False, cache_dir=str(tmp_path), fixed=[], time_limit=10)
    full = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", options={"pair_tol": 0}, **kw)
    sel = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", options={"pair_tol": 0.3}, **kw)
    meta, w = sel.table.meta, full.table.w
    assert len(full.table.pairs) == 6 * 9  # 4 searched layers, 3 bit-widths
    assert meta["pairs_skipped"] > 0 and len(sel.table.pairs) + meta["pairs_skipped"] == len(full.table.pairs)
    assert sel.engine_stats["probes_run"] == 0  # every probe it needed was measured by the all-pairs run
    assert sel.table.w == w and all(full.table.pairs[k] == v for k, v in sel.table.pairs.items())
    for f, b, g, c in full.table.pairs.keys() - sel.table.pairs.keys():
        assert pair_bound(w[f][b], w[g][c]) < meta["pair_threshold"]
    for (f, b, g, c), v in sel.table.pairs.items():
        assert pair_bound(w[f][b], w[g][c]) >= meta["pair_threshold"]
    # the bound is second-order (measured cross/bound reaches ~2.4 for 2-bit pairs here), but what
    # is skipped really is small: the measured cross terms of the skipped pairs stay under the threshold
    cross = {k: abs(v - w[k[0]][k[1]] - w[k[2]][k[3]]) for k, v in full.table.pairs.items()}
    skipped = full.table.pairs.keys() - sel.table.pairs.keys()
    assert max(cross[k] for k in skipped) < meta["pair_threshold"] < max(cross.values())


def test_pair_samples_measure_cross_terms_on_an_importance_draw(digits_clado, tmp_path):
    """--pair-samples N: G's diagonal is the whole set's singles; each cross term is the one measured
    on N samples drawn by importance (fragility: how much the objective moves with every searched layer at the
    smallest bits), weighted, pair and singles on the same draw with the whole set's quantized
    layers; the tables agree with the all-samples ones up to that draw's noise."""
    res, _ = digits_clado  # the default pair_samples 0: every pair on all 256 samples
    sub = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", w_candidates=BITS, calib_size=256,
                        progress=False, cache_dir=str(tmp_path), options={"psd": "none", "pair_tol": 0,
                                                                         "pair_samples": 64}, time_limit=10)
    assert sub.table.w == res.table.w and sub.table.pairs.keys() == res.table.pairs.keys()
    assert sub.table.meta["pair_samples"] == 64 and res.table.meta["pair_samples"] == 256
    bundle = get_model("digits-cnn")
    calib = mpqkit.api.calibration_set("digits", 256, 0)
    kw = dict(use_cache=False, progress=False, objective=mpqkit.api.RunSettings().objective)
    graph = discover(bundle.model, bundle.input_shape)
    whole = ProbeEngine(bundle.model, graph, calib.images, calib.labels, **kw)
    base = {f: (None, 8) for f in ["conv1", "conv2", "conv3", "fc"]}
    fragility = (whole.sample_losses({**base, "conv2": (2, 8), "conv3": (2, 8)}) - whole.sample_losses(base)).abs()
    idx, weights = importance_draw(fragility, 64, 0)
    assert fragility[idx].mean() > 1.5 * fragility.mean()  # the draw favours the samples the bits move
    drawn = ProbeEngine(bundle.model, graph, calib.images[idx], calib.labels[idx], layers_from=whole,
                        sample_weights=weights, **kw)
    ref, a, b, ab = drawn.run([{}, {"conv2": (2, 8)}, {"conv3": (4, 8)}, {"conv2": (2, 8), "conv3": (4, 8)}],
                              base=base)
    cross = (ab.loss - ref.loss) - (a.loss - ref.loss) - (b.loss - ref.loss)
    g, index = build_g(sub.table, ["conv2", "conv3"], list(BITS))
    assert g[index.index(("conv2", 2)), index.index(("conv3", 4))] == pytest.approx(cross, abs=1e-6)
    g_all, _ = build_g(res.table, ["conv2", "conv3"], list(BITS))
    assert not np.allclose(g, g_all)  # another sample, another estimate
    assert np.abs(g - g_all).max() < 0.5 * np.abs(g_all).max()  # … of the same cross terms
    # --pair-draw first: the draw's first N samples, unweighted
    head = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", w_candidates=BITS, calib_size=256,
                         progress=False, cache_dir=str(tmp_path), time_limit=10,
                         options={"psd": "none", "pair_tol": 0, "pair_samples": 64, "pair_draw": "first"})
    first = ProbeEngine(bundle.model, graph, calib.images[:64], calib.labels[:64], layers_from=whole, **kw)
    ref, a, b, ab = first.run([{}, {"conv2": (2, 8)}, {"conv3": (4, 8)}, {"conv2": (2, 8), "conv3": (4, 8)}],
                              base=base)
    g, index = build_g(head.table, ["conv2", "conv3"], list(BITS))
    assert g[index.index(("conv2", 2)), index.index(("conv3", 4))] == pytest.approx(
        ab.loss - a.loss - b.loss + ref.loss, abs=1e-6)
    with pytest.raises(mpqkit.errors.MpqkitError, match="pair_samples"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", options={"pair_samples": -1},
                      calib_size=64, progress=False, use_cache=False)


def test_importance_draw_is_unbiased_and_weighted_engines_average_weight_times_loss():
    """The weighted mean over a draw estimates the mean over all samples without bias (averaged over
    many draws), with a smaller spread than a uniform draw when the values are heavy-tailed; an
    engine's loss with sample weights is the mean of weight × objective."""
    gen = torch.Generator().manual_seed(0)
    values = torch.distributions.Exponential(1.0).sample((1000,)) ** 3  # heavy-tailed, like per-sample KL
    est = torch.stack([(values[i] * w).mean() for i, w in (importance_draw(values, 50, s) for s in range(2000))])
    uniform = torch.stack([values[torch.randint(0, 1000, (50,), generator=gen)].mean() for _ in range(2000)])
    assert abs(float(est.mean()) - float(values.mean())) < 3 * float(est.std()) / 2000 ** 0.5
    assert float(est.std()) < 0.6 * float(uniform.std())
    bundle = get_model("digits-cnn")
    calib = mpqkit.api.calibration_set("digits", 64, 0)
    graph = discover(bundle.model, bundle.input_shape)
    kw = dict(use_cache=False, progress=False, objective="kl")
    plain = ProbeEngine(bundle.model, graph, calib.images, calib.labels, **kw)
    w = torch.linspace(0.0, 2.0, 64)
    weighted = ProbeEngine(bundle.model, graph, calib.images, calib.labels, sample_weights=w, **kw)
    probe = {"conv2": (2, 8)}
    per_sample = plain.sample_losses(probe)
    assert plain.run([probe])[0].loss == pytest.approx(float(per_sample.mean()), rel=1e-6)
    assert weighted.run([probe])[0].loss == pytest.approx(float((per_sample * w.double()).mean()), rel=1e-6)
    with pytest.raises(mpqkit.errors.DataError, match="sample_weights"):
        ProbeEngine(bundle.model, graph, calib.images, calib.labels, sample_weights=-w, **kw)


def test_workers_measure_subset_pairs_into_the_cache(tmp_path, monkeypatch):
    """With --pair-samples below the set, the workers rebuild the subset engine (with the whole
    set's layers and the draw's weights) from its spec: the tables equal the serial ones, and the
    main process's subset engine ran only its two references."""
    from mpqkit.sensitivity import crosslayer

    built = []
    real = crosslayer.pair_engine
    monkeypatch.setattr(crosslayer, "pair_engine", lambda *a: built.append(real(*a)) or built[-1])
    kw = dict(w_candidates=BITS, calib_size=128, progress=False, time_limit=5)
    opts = {"pair_samples": 32, "pair_tol": 0}
    serial = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", options=opts,
                           cache_dir=str(tmp_path / "a"), **kw)
    par = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "clado", options={**opts, "workers": 2},
                        cache_dir=str(tmp_path / "b"), **kw)
    assert par.table.pairs == serial.table.pairs and par.table.w == serial.table.w
    assert built[1] is not built[0] and built[1].fp.n == 32 and built[1].sample_weights is not None
    assert built[1].stats["probes_run"] == 2  # fp and A8 references; every pair tree came from the workers
