"""The method contract: every registered method (parametrised on the registry, so a new method is
covered by default) on the embedded digits model must

- measure a table that covers every searched layer × bit-width with finite values;
- return a plan that meets the budget by the ledger;
- give the same plan bytes for the same seed;
- resume a killed search to the same plan, without measuring again what was cached;
- record its options in the plan so that they round-trip to the same typed options;

and a searched plan must evaluate the way it was searched (one calibration path)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

import mpqkit
from mpqkit import api
from mpqkit.budget import Ledger, parse_budget
from mpqkit.engine.probe import ProbeEngine
from mpqkit.errors import MpqkitError, UnknownNameError
from mpqkit.evaluation import evaluate_model
from mpqkit.graph import discover
from mpqkit.sensitivity import METHODS

BUDGET = "avg-bits=4"
#: options that keep the slow methods within seconds on the digits model
FAST = {"infoq": {"projections": 16}, "smpq": {"train_size": 400, "epochs": 2, "warmup": 1, "permutations": 2},
        "dmpq": {"train_size": 400, "epochs": 2, "warmup": 1, "permutations": 2}, "hawq": {"max_iter": 20},
        "auto": {"methods": "uniform,eval-delta,mixquant-ilp,mpqco", "heldout": 256, "refine": 10}}
SETTINGS = dict(calib_size=192, progress=False, time_limit=10)
#: CLADO's pair probes grow with the square of the candidates: three keep it within seconds
FAST_SETTINGS = {"clado": {"w_candidates": (2, 4, 8)}}


def _search(method, tmp_path, tag="a", **kw):
    return mpqkit.search("digits-cnn", "digits", BUDGET, method, options=FAST.get(method),
                         cache_dir=str(tmp_path / f"cache-{tag}"), **{**SETTINGS, **FAST_SETTINGS.get(method, {}), **kw})


@pytest.fixture(scope="module")
def graph():
    bundle = api.load_model("digits-cnn")
    return discover(bundle.model, bundle.input_shape)


@pytest.mark.parametrize("method", METHODS.names())
def test_table_plan_budget_and_determinism(method, tmp_path, graph):
    res = _search(method, tmp_path)
    searched = [n for n in graph.names if n not in graph.default_fixed()]
    if METHODS.get(method).sensitivity is not None:
        assert res.table is not None
        assert set(res.table.w) == set(searched), "the table covers every searched layer"
        for f in searched:  # measured, or pruned with a bound (never both)
            assert not set(res.table.w[f]) & set(res.table.pruned.get(f, {})), f"{f}: measured and pruned"
            assert set(res.table.w_bounded[f]) == set(res.plan.method_params["w_candidates"]), f"{f}: every candidate"
            assert all(math.isfinite(v) for v in res.table.w_bounded[f].values()), f"{f}: finite scores"
    # the plan covers every layer and meets the budget by the ledger
    assert set(res.plan.layers) == set(graph.names)
    ledger = Ledger(graph, searched)
    for c in ledger.resolve(parse_budget(BUDGET)):
        assert ledger.value(c.metric, res.plan.assignment()) <= c.limit * (1 + 1e-9)
    # same seed → same plan bytes (fresh cache: measured again, not read back)
    again = _search(method, tmp_path, tag="b", out=tmp_path / "results")
    assert json.dumps(again.plan.to_dict()) == json.dumps(res.plan.to_dict())
    # every JSON file the search wrote (results directory, probe cache) parses strictly: no NaN / Infinity
    written = [*(tmp_path / "results").rglob("*.json"), *(tmp_path / "cache-b").rglob("*.json")]
    assert any(p.name == "summary.json" for p in written)
    for p in written:
        json.loads(p.read_text(), parse_constant=lambda c, p=p: pytest.fail(f"{p.name} holds {c}"))
    # options round-trip through the plan
    m = METHODS.get(method)
    opts = m.make_options(FAST.get(method))
    names = {f.name for f in m.options.option_fields() if not f.metadata.get("execution")
             and not f.metadata.get("python_only")}
    recorded = {k: v for k, v in res.plan.method_params.items() if k in names}
    assert set(recorded) == names
    assert m.make_options(recorded).to_params() == opts.to_params()


@pytest.mark.parametrize("method", [m for m in METHODS.names() if METHODS.get(m).sensitivity is not None])
def test_killed_search_resumes_to_the_same_plan(method, tmp_path, monkeypatch):
    full = _search(method, tmp_path, tag="ref")
    calls = {"n": 0}
    real_run = ProbeEngine.run

    def dying_run(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # after the fp reference and a first batch of measurements
            raise KeyboardInterrupt
        return real_run(self, *a, **k)

    monkeypatch.setattr(ProbeEngine, "run", dying_run)
    killed = False
    try:
        _search(method, tmp_path, tag="kill")
    except KeyboardInterrupt:
        killed = True
    monkeypatch.setattr(ProbeEngine, "run", real_run)
    resumed = _search(method, tmp_path, tag="kill")
    assert json.dumps(resumed.plan.to_dict()) == json.dumps(full.plan.to_dict())
    if killed:  # the method ran probes in more than two calls: the resumed run read what was measured
        assert resumed.engine_stats["probes_run"] <= full.engine_stats["probes_run"]
        assert resumed.engine_stats["cache_hits"] > full.engine_stats["cache_hits"]


def test_unknown_or_mistyped_option_is_an_error():
    with pytest.raises(UnknownNameError, match="has no option 'projection'.*projections"):
        mpqkit.search("digits-cnn", "digits", BUDGET, "infoq", options={"projection": 8}, **SETTINGS)
    with pytest.raises(MpqkitError, match="must be int"):
        METHODS.get("infoq").make_options({"projections": "many"})
    with pytest.raises(MpqkitError, match="'all' or 'last-K'"):
        METHODS.get("infoq").make_options({"observers": "last-x"})
    with pytest.raises(UnknownNameError, match="unknown setting"):
        mpqkit.search("digits-cnn", "digits", BUDGET, "uniform", calib_sise=10)
    with pytest.raises(MpqkitError, match="calib-size"):
        mpqkit.search("digits-cnn", "digits", BUDGET, "mixquant", calib_size=0)


def test_every_cli_flag_maps_to_a_method_option():
    """The CLI's method flags are built from the registry: each flag has a field, each field a flag."""
    from mpqkit.cli import build_parser
    from mpqkit.cli_args import OPT_PREFIX

    commands = build_parser()._subparsers._group_actions[0].choices
    search = commands["search"]
    dests = {a.dest[len(OPT_PREFIX):] for a in search._actions if a.dest.startswith(OPT_PREFIX)}
    fields = {f.name for m in METHODS for f in m.options.option_fields() if not f.metadata.get("python_only")}
    assert dests == fields
    for name, sub in commands.items():  # every option of every command says what it does
        for a in sub._actions:
            assert a.help, f"mpqkit {name} {'/'.join(a.option_strings) or a.dest} has no help text"
    method = next(a for a in search._actions if a.dest == "method")
    assert all(m in method.help for m in METHODS.names())  # --method lists the methods


def test_searched_plan_evaluates_as_measured(tmp_path):
    """One calibration path: the engine's loss for the searched plan (measured on the calibration
    set during search) equals the loss of ``apply_plan`` + evaluation on that same set to 1e-5."""
    s = api.RunSettings(calib_size=300, seed=3, progress=False, batch_size=64, use_cache=False)
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", settings=s)
    assert all(lq.a_bits == 8 for lq in res.plan.layers.values())  # activations are quantized too
    bundle = api.load_model("digits-cnn")
    calib = api.calibration_set("digits", s.calib_size, s.seed)
    assert res.plan.provenance["calib"] == {"n": 300, "sha256": calib.sha256(), "seed": 3, "data": "digits",
                                            "split": "train", "chunk": 256}
    engine = ProbeEngine(bundle.model, discover(bundle.model, bundle.input_shape), calib.images, calib.labels,
                         qconfig=s.qconfig, seed=s.seed, batch_size=s.batch_size, use_cache=False, progress=False)
    measured = engine.run([res.plan.assignment()])[0]
    q = api.apply_plan(bundle, res.plan, "digits", settings=dataclasses.replace(s, batch_size=None))
    ev = evaluate_model(q, calib, batch_size=100)
    assert abs(measured.loss - ev["loss"]) < 1e-5
    assert measured.top1 == pytest.approx(ev["top1"])
    assert abs(measured.loss - engine.fp.loss) > 1e-3  # the plan really quantizes something


def test_engine_and_apply_plan_calibrate_identically_whatever_the_batch_size():
    """Bit-identical activation scales from the engine (at two batch sizes) and from apply_plan,
    on a set large enough that the observers sample (so the draw, i.e. seed and chunks, matters)."""
    import torch

    from conftest import make_tiny, tiny_data
    from mpqkit.plan import LayerQuant, Plan
    from mpqkit.quant.apply import apply_plan
    from mpqkit.quant.calibration import calibrate
    from mpqkit.quant.config import QuantConfig

    model = make_tiny()
    data = tiny_data(model, n=700)  # conv2's input: 700 × 512 values > the observers' 262,144 sample
    qc = QuantConfig(a_range="percentile")
    graph = discover(model, (3, 8, 8))
    scales = []
    for bs in (32, 200):
        engine = ProbeEngine(model, graph, data.images, data.labels, qconfig=qc, seed=5, batch_size=bs,
                             use_cache=False, progress=False)
        scales.append(engine.quant_layer("conv2", None, 4).a_scale)
    plan = Plan(layers={f: LayerQuant(None, 4 if f == "conv2" else None) for f in graph.names},
                provenance={"seed": 5})
    q = apply_plan(model, plan, data.images, qc)
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], q.get_submodule("conv2").a_scale)
    # the test can fail: another draw of the sample gives another scale
    other = calibrate(model, ["conv2"], data.images, seed=6)["conv2"].qparams(qc.a_spec(4))[0]
    assert not torch.equal(other, scales[0])


def test_calibration_forwards_are_sized_by_the_input():
    """Calibration walks 256 samples per forward for small inputs (32 x 32 images, token ids) and fewer
    for large ones, so its live activations stay bounded; every pass sees the same chunks."""
    import torch
    from torch import nn

    from mpqkit.quant.calibration import CALIB_CHUNK, CALIB_CHUNK_ELEMS, calib_chunk, calibrate

    assert calib_chunk(torch.zeros(1024, 3, 32, 32)) == CALIB_CHUNK == 256
    assert calib_chunk(torch.zeros(300, 64, dtype=torch.long)) == 256
    assert calib_chunk(torch.zeros(128, 3, 224, 224)) == CALIB_CHUNK_ELEMS // (3 * 224 * 224) == 27
    assert calib_chunk(torch.zeros(4, 3, 4000, 4000)) == 1
    sizes = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    obs = calibrate(model, ["0"], torch.randn(70, 3, 224, 224))
    assert sizes == [27, 27, 16] and obs["0"].num_seen == 70 * 3 * 224 * 224
    # evaluation batches follow the same bound (a CIFAR test set at its cap of 500)
    from mpqkit.evaluation import eval_batch_size
    from mpqkit.zoo.data import LabeledData

    def data(*shape):
        return LabeledData(torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long), "x", "test", 10)

    assert eval_batch_size(data(3, 32, 32)) == 500 and eval_batch_size(data(3, 224, 224)) == 27


def test_a_method_either_measures_or_decides_and_its_table_says_which():
    """A method registered as deciding (auto, greedy, smpq, dmpq) hands its solver a ``Decision``; a
    measuring one only scores. A table that contradicts its method's kind is an error, not a silent plan."""
    from mpqkit.sensitivity import METHODS
    from mpqkit.sensitivity.base import Decision, Method, SensitivityTable
    from mpqkit.sensitivity.solvers import chosen, ilp

    def scores(ctx):
        return SensitivityTable(w={"conv": {2: 1.0, 4: 0.1}})

    def decided(ctx):
        return SensitivityTable(w={}, decision=Decision(assignment={"conv": (4, 8)}))

    assert Method("m", "", scores, ilp).measure(None).decision is None
    assert Method("d", "", decided, chosen, decides=True).measure(None).decision.assignment == {"conv": (4, 8)}
    with pytest.raises(RuntimeError, match="registered as deciding but its table lacks a Decision"):
        Method("d", "", scores, chosen, decides=True).measure(None)
    with pytest.raises(RuntimeError, match="registered as measuring but its table carries a Decision"):
        Method("m", "", decided, ilp).measure(None)
    assert {m.name for m in METHODS if m.decides} == {"auto", "greedy", "smpq", "dmpq"}
