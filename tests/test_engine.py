"""The probe engine: prefix caching gives the same numbers as a full forward, the fallback and the
applied plan; the on-disk cache makes a rerun compute nothing; corrupt entries are recomputed."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mpqkit.engine.probe import ProbeEngine
from mpqkit.evaluation import evaluate_model
from mpqkit.graph import discover
from mpqkit.plan import LayerQuant, Plan
from mpqkit.quant.apply import apply_plan

from conftest import UntraceableNet, make_tiny, tiny_data

PROBES = [
    {},
    {"conv2": (2, None)},
    {"conv3": (3, None), "conv4": (2, 4)},
    {"conv1": (None, 3)},
    {"fc": (2, 2)},
    {"conv4": (None, 2)},
    {"conv2": (4, 4), "fc": (3, None)},
]


def _engine(model, data, **kw):
    graph = discover(model, (3, 8, 8))
    return ProbeEngine(model, graph, data.images, data.labels, batch_size=32, progress=False, **kw)


def _close(a, b):
    assert a.n == b.n
    assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-6)
    assert a.top1 == pytest.approx(b.top1)


def test_prefix_equals_full_forward_and_fallback(tmp_path):
    model = make_tiny()
    data = tiny_data(model)
    fast = _engine(model, data, use_cache=False)
    slow = _engine(model, data, use_cache=False, prefix=False)
    fallback = _engine(make_tiny(cls=UntraceableNet), data, use_cache=False)
    assert fast.program is not None and fallback.program is None
    for a, b, c in zip(fast.run(PROBES), slow.run(PROBES), fallback.run(PROBES)):
        _close(a, b)
        _close(a, c)
    # the in-place `+=` and ReLU(inplace=True) must not have corrupted the cached prefix tensors:
    _close(fast.run([{"conv4": (2, None)}])[0], slow.run([{"conv4": (2, None)}])[0])


def test_probe_matches_applied_plan():
    """A probe is exactly 'apply this partial plan and evaluate on the calibration set'."""
    model = make_tiny()
    data = tiny_data(model)
    engine = _engine(model, data, use_cache=False)
    probe = {"conv2": (3, 4), "conv4": (2, None), "fc": (None, 6)}
    got = engine.run([probe])[0]
    plan = Plan(layers={f: LayerQuant(w, a) for f, (w, a) in probe.items()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = apply_plan(model, plan, data.images)
    ref = evaluate_model(qmodel, data, batch_size=32)
    assert got.loss == pytest.approx(ref["loss"], rel=1e-5)
    assert got.top1 == pytest.approx(ref["top1"])
    assert abs(got.loss - engine.fp.loss) > 1e-4  # the probe really quantized something
    # the fp model is never changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.conv2).__name__ == "Conv2d"


def test_cache_resumes_and_detects_corruption(tmp_path):
    model = make_tiny()
    data = tiny_data(model)
    first = _engine(model, data, cache_dir=str(tmp_path))
    r1 = first.run(PROBES)
    assert first.stats["probes_run"] == len(PROBES)  # {} is the fp reference: run once, at init
    second = _engine(model, data, cache_dir=str(tmp_path))
    r2 = second.run(PROBES)
    assert second.stats["probes_run"] == 0, "a rerun must recompute no cached probe"
    assert r1 == r2
    # corrupt one entry and truncate another: both detected, recomputed, identical again
    files = sorted(tmp_path.rglob("*.json"))
    files[0].write_text(files[0].read_text().replace('"loss": ', '"loss": 1'))
    files[1].write_text(files[1].read_text()[:10])
    third = _engine(model, data, cache_dir=str(tmp_path))
    r3 = third.run(PROBES)
    assert third.cache.corrupt == 2
    assert third.stats["probes_run"] == 2
    assert r3 == r1


def test_cache_key_depends_on_the_observer_version(tmp_path, monkeypatch):
    """Activation ranges feed every probe with quantized inputs: entries cached under another
    observer/calibration version are not read."""
    from mpqkit.engine import probe

    model = make_tiny()
    data = tiny_data(model)
    _engine(model, data, cache_dir=str(tmp_path)).run(PROBES)
    again = _engine(model, data, cache_dir=str(tmp_path))
    again.run(PROBES)
    assert again.stats["probes_run"] == 0
    monkeypatch.setattr(probe, "OBSERVER_VERSION", probe.OBSERVER_VERSION + 1)
    other = _engine(model, data, cache_dir=str(tmp_path))
    other.run(PROBES)
    assert other.stats["probes_run"] == len(PROBES)


def test_cache_key_depends_on_data_and_weights(tmp_path):
    model = make_tiny()
    data = tiny_data(model)
    _engine(model, data, cache_dir=str(tmp_path)).run(PROBES)
    other = make_tiny(seed=5)
    e = _engine(other, data, cache_dir=str(tmp_path))
    e.run(PROBES)
    # nothing is shared with the other model's entries; the only hit is its own fp reference from init
    assert e.stats["probes_run"] == len(PROBES) and e.stats["cache_hits"] == 1


def test_prefix_runs_less_work(tmp_path):
    """Probes on late layers start late: counting executed nodes shows the prefix is skipped."""
    model = make_tiny()
    data = tiny_data(model)
    engine = _engine(model, data, use_cache=False)
    prog = engine.program
    assert prog.cut["fc"] > prog.cut["conv4"] > prog.cut["conv2"] > prog.cut["conv1"]
    assert engine._start({"fc": (2, None), "conv4": (2, None)}) == prog.cut["conv4"]
    engine.run(PROBES)
    # the fp tensors live at every start point visited are kept for later calls
    assert {cut for _, cut in engine._snapshots} == {engine._start(p) for p in PROBES}  # {} starts at 0
    late = {"fc": (3, None)}
    calls = []
    orig = prog.run
    prog.run = lambda env, start, stop, *rest: calls.append((start, stop)) or orig(env, start, stop, *rest)
    engine.run([late])
    assert all(start >= prog.cut["fc"] for start, _ in calls), "a later probe must not re-run the prefix"


def test_empty_data_is_an_error():
    from mpqkit.errors import DataError

    model = make_tiny()
    with pytest.raises(DataError, match="empty"):
        ProbeEngine(model, discover(model, (3, 8, 8)), torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long))


def test_base_configuration_and_recording():
    """Probes on top of a reference configuration start late from the reference's own cached tensors,
    give the same numbers as the full configuration run from scratch, and record later layers."""
    model = make_tiny()
    data = tiny_data(model)
    base = {f: (8, 8) for f in ["conv1", "conv2", "conv3", "conv4", "fc"]}
    fast = _engine(model, data, use_cache=False)
    slow = _engine(model, data, use_cache=False, prefix=False)
    probe = {"conv4": (2, 8)}
    got = fast.run([probe], base=base, record=["conv4", "fc"])[0]
    ref = slow.run([{**base, **probe}], record=["conv4", "fc"])[0]
    _close(got, ref)
    assert fast._start({**base, **probe}, base) == fast.program.cut["conv4"]
    assert set(got.features) == {"conv4", "fc"}
    assert got.features["conv4"].shape == (len(data), 8) and got.features["fc"].shape == (len(data), 4)
    assert torch.allclose(got.features["fc"], ref.features["fc"], atol=1e-5)
    fb = _engine(make_tiny(cls=UntraceableNet), data, use_cache=False).run([probe], base=base, record=["fc"])[0]
    assert torch.allclose(got.features["fc"], fb.features["fc"], atol=1e-5)
    # a fp entry in the probe removes the base's quantization of that layer
    _close(fast.run([{"conv2": (None, None)}], base=base)[0],
           slow.run([{f: b for f, b in base.items() if f != "conv2"}])[0])


def test_kl_objective_is_divergence_from_the_fp_outputs(tmp_path):
    """objective="kl": each probe's loss is the mean over images of KL(p_fp ‖ p_probe), computed
    by hand from the applied plan; 0 for the fp model, ≥ 0 always, label-free, equal on the
    prefix, full-forward and fallback paths, and cached apart from the cross-entropy results."""
    import torch.nn.functional as F

    from mpqkit.quant.config import QuantConfig

    RTN = QuantConfig(rounding="nearest")  # a damage large enough to compare KLs to 1e-4 (GPTQ's is 10x smaller)

    model = make_tiny()
    data = tiny_data(model)
    kl = _engine(model, data, objective="kl", cache_dir=str(tmp_path), qconfig=RTN)
    assert kl.fp.loss == pytest.approx(0.0, abs=1e-9)
    probe = {"conv2": (2, 4), "fc": (3, None)}
    got = kl.run([probe])[0]
    qmodel = apply_plan(model, Plan(layers={f: LayerQuant(w, a) for f, (w, a) in probe.items()}), data.images, RTN)
    with torch.no_grad():
        p_fp = F.log_softmax(model(data.images), 1)
        p_q = F.log_softmax(qmodel(data.images), 1)
    expected = float((p_fp.exp() * (p_fp - p_q)).sum(1).mean())
    assert expected > 1e-4 and got.loss == pytest.approx(expected, rel=1e-4)
    # shuffled labels: same KL (label-free); the top-1 still counts against the labels
    shuffled = dataclasses.replace(data, labels=data.labels[torch.randperm(len(data.labels))])
    other = _engine(model, shuffled, objective="kl", use_cache=False, qconfig=RTN)
    assert other.run([probe])[0].loss == pytest.approx(got.loss, rel=1e-6)
    slow = _engine(model, data, objective="kl", use_cache=False, prefix=False, qconfig=RTN)
    fallback = _engine(make_tiny(cls=UntraceableNet), data, objective="kl", use_cache=False, qconfig=RTN)
    for a, b, c in zip(kl.run(PROBES), slow.run(PROBES), fallback.run(PROBES)):
        assert a.loss >= 0
        _close(a, b)
        _close(a, c)
    ce = _engine(model, data, cache_dir=str(tmp_path), qconfig=RTN)  # same cache directory, other objective: no shared entry
    ce.run(PROBES)
    assert ce.stats["probes_run"] == len(PROBES)
    with pytest.raises(ValueError, match="objective"):
        _engine(model, data, objective="mse")


def test_prefix_cache_cap_bounds_kept_tensors_and_never_changes_a_result():
    """``prefix_cache_mb`` (``--prefix-cache-mb``) bounds the kept layer-cut tensors; with no room at
    all every probe starts from the input, with the same numbers."""
    model = make_tiny()
    data = tiny_data(model)
    roomy = _engine(model, data, use_cache=False)
    probes = [{f: (2, None)} for f in ("conv2", "conv3", "conv4", "fc")] + PROBES
    ref = roomy.run(probes)
    assert roomy._snapshots  # the default keeps the cut tensors
    one = max(roomy._snapshot_bytes.values())
    for cap_mb in (0.0, 1.5 * one / 2**20):
        tight = _engine(model, data, use_cache=False, prefix_cache_mb=cap_mb)
        for a, b in zip(ref, tight.run(probes)):
            _close(a, b)
        assert sum(tight._snapshot_bytes.values()) <= cap_mb * 2**20
        assert (len(tight._snapshots) == 0) if cap_mb == 0 else (0 < len(tight._snapshots) < len(roomy._snapshots))


def test_prefix_cache_setting_reaches_the_engine_kwargs():
    from mpqkit import api
    from mpqkit.errors import MpqkitError

    with pytest.raises(MpqkitError, match="prefix-cache-mb"):
        api.RunSettings(prefix_cache_mb=-1)
    s = api.RunSettings(prefix_cache_mb=3.0, progress=False, use_cache=False, calib_size=64)
    assert s.engine_kwargs()["prefix_cache_mb"] == 3.0


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_stacked_probes_give_the_single_probes_losses(objective):
    """``stack``: probes that start at the same layer and differ only in it run as one forward of the
    stacked batch (the fused conv → BN included); each loss, top-1 and chunk loss equals the probe's
    own forward to float tolerance, on the fp model and on top of a base, and the on-disk cache
    holds the same values."""
    model = make_tiny()
    data = tiny_data(model)
    base = {f: (None, 8) for f in ["conv1", "conv2", "conv3", "conv4", "fc"]}
    probes = [{f: (b, a)} for f in ["conv1", "conv2", "conv4", "fc"] for b in (2, 3, 4, 8) for a in (8, 4)]
    probes += [{"conv3": (2, None), "fc": (3, None)}, {"conv3": (4, None), "fc": (3, None)}]
    for b in (None, base):
        single = _engine(model, data, use_cache=False, objective=objective).run(probes, base=b)
        stacked_engine = _engine(model, data, use_cache=False, objective=objective, stack=4)
        stacked = stacked_engine.run(probes, base=b)
        assert stacked_engine.stats["probes_stacked"] >= len(probes) - 4  # nearly all ran stacked
        for x, y in zip(single, stacked):
            _close(x, y)
            assert x.batch_losses == pytest.approx(y.batch_losses, rel=1e-5, abs=1e-6)


def test_stacked_probes_fill_the_cache_and_refuse_a_bad_stack(tmp_path):
    from mpqkit.errors import DataError

    model = make_tiny()
    data = tiny_data(model)
    probes = [{"conv2": (b, None)} for b in (2, 3, 4, 5, 6)]
    first = _engine(model, data, cache_dir=str(tmp_path), stack=3).run(probes)
    again = _engine(model, data, cache_dir=str(tmp_path))
    for x, y in zip(first, again.run(probes)):
        _close(x, y)
    assert again.stats["probes_run"] == 0 and again.stats["cache_hits"] == len(probes) + 1
    with pytest.raises(DataError, match="stack"):
        _engine(model, data, stack=0)
    from mpqkit import api
    from mpqkit.errors import MpqkitError

    for bad in (0, 2.5, True):
        with pytest.raises(MpqkitError, match="--stack-probes"):
            api.RunSettings(stack_probes=bad)
    assert api.RunSettings(stack_probes=4).engine_kwargs()["stack"] == 4


def _kept_storage_bytes(engine) -> tuple[list, int]:
    """The kept snapshot tensors, and the bytes of their distinct storages."""
    kept = [t for envs in engine._snapshots.values() for env in envs for t in env.values() if isinstance(t, torch.Tensor)]
    return kept, sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.values())


def test_kept_layer_cuts_live_off_the_heap_and_give_the_same_results(monkeypatch):
    """The prefix cache moves what it keeps into pages of its own (``memory.off_heap``; here every
    tensor, however small): each kept tensor is its own mapping, no probe's result changes, and a
    tensor two snapshots (or two names of one snapshot) share is still stored once."""
    from test_memory import own_mapping

    model = make_tiny()
    data = tiny_data(model)
    monkeypatch.setattr("mpqkit.memory.OFF_HEAP_MIN_BYTES", 1 << 62)
    plain = _engine(model, data, use_cache=False)
    plain.run(PROBES)
    monkeypatch.setattr("mpqkit.memory.OFF_HEAP_MIN_BYTES", 0)
    fast = _engine(model, data, use_cache=False)
    slow = _engine(model, data, use_cache=False, prefix=False)
    for a, b in zip(fast.run(PROBES), slow.run(PROBES)):
        _close(a, b)
    kept, stored = _kept_storage_bytes(fast)
    assert kept and all(own_mapping(t) for t in kept if t.numel())
    assert stored == _kept_storage_bytes(plain)[1]
    _close(fast.run([{"conv4": (2, None)}])[0], slow.run([{"conv4": (2, None)}])[0])
