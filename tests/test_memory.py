"""--max-memory: a search whose estimated need exceeds the limit stops before any probe, naming the
smallest limit it fits; under a limit the prefix cache gets what the estimate leaves."""
from __future__ import annotations

import re
import sys

import pytest

import mpqkit
from mpqkit.engine.probe import ProbeEngine
from mpqkit.errors import MpqkitError
from mpqkit.memory import HEADROOM_MB, MemoryLimitError, peak_mb, plan_prefix_cache, search_parts
from mpqkit.sensitivity.registry import METHODS

KW = dict(calib_size=128, progress=False, use_cache=False)


def _engines(monkeypatch) -> list[dict]:
    """The keyword arguments of every probe engine built from now on."""
    seen: list[dict] = []
    init = ProbeEngine.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ProbeEngine, "__init__", spy)
    return seen


def test_a_search_over_the_limit_stops_before_any_probe_and_names_the_smallest_limit(monkeypatch):
    seen = _engines(monkeypatch)
    with pytest.raises(MemoryLimitError, match=r"--max-memory 10 MB .* smallest limit it can run under is about") as e:
        mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", max_memory_mb=10, **KW)
    assert seen == []  # refused before the engine (and any probe) existed
    smallest = int(re.search(r"run under is about ([\d,]+) MB", str(e.value)).group(1).replace(",", ""))
    res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", max_memory_mb=smallest + 300, **KW)
    cache = seen[0]["prefix_cache_mb"]
    assert 0 < cache <= 300 + 1  # what the estimate leaves goes to the prefix cache
    plain = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", **KW)
    assert res.plan.layers == plain.plan.layers  # the limit sizes caches only: the same plan


def test_plan_prefix_cache_keeps_the_smaller_of_room_and_request():
    parts = {"process": 500.0, "probe working set": 100.0}
    assert plan_prefix_cache(None, parts, 64.0, 2048.0) == 64.0  # no limit: as requested
    # the room below the limit, less the headroom for the temporaries the estimate does not model
    assert plan_prefix_cache(1000, parts, None, 2048.0) == 400.0 - HEADROOM_MB
    assert plan_prefix_cache(1000, parts, 64.0, 2048.0) == 64.0
    assert plan_prefix_cache(650, parts, None, 2048.0) == 0.0  # fits, but within the headroom: no kept cuts
    with pytest.raises(MemoryLimitError, match="about 600 MB"):
        plan_prefix_cache(599, parts, None, 2048.0)
    # a method's own pass and the probe working set come one after the other: the peak counts the larger
    both = {**parts, "method": 300.0}
    assert plan_prefix_cache(800, both, None, 2048.0) == 0.0  # fits; nothing left for kept cuts
    # the cache lives beside the peak, not the sum
    assert plan_prefix_cache(1000 + HEADROOM_MB, both, None, 2048.0) == 200.0
    with pytest.raises(MemoryLimitError, match="about 800 MB"):
        plan_prefix_cache(799, both, None, 2048.0)


def test_without_a_limit_the_prefix_cache_aims_at_the_default_target_and_never_refuses():
    from mpqkit.memory import DEFAULT_TARGET_MB

    small = {"process": 500.0, "probe working set": 100.0}
    assert plan_prefix_cache(None, small, None, 2048.0) == 2048.0  # room enough: the default size
    big = {"process": DEFAULT_TARGET_MB - 900.0, "probe working set": 700.0, "method": 400.0}
    assert plan_prefix_cache(None, big, None, 2048.0) == pytest.approx(200.0)  # what the peak leaves
    over = {"process": DEFAULT_TARGET_MB, "probe working set": 700.0}
    assert plan_prefix_cache(None, over, None, 2048.0) == 0.0  # over the target: runs, with no kept cuts
    assert plan_prefix_cache(None, over, 64.0, 2048.0) == 64.0  # an explicit --prefix-cache-mb is kept


def test_the_estimate_grows_with_the_calibration_set_and_gradient_methods_add_their_pass():
    import dataclasses

    import torch

    from mpqkit.graph import discover
    from mpqkit.loading import load_model
    from mpqkit.sensitivity.base import SearchContext
    from mpqkit.settings import RunSettings

    bundle = load_model("digits-cnn", RunSettings())
    graph = discover(bundle.model, bundle.input_shape)
    small, large = (search_parts(graph, torch.zeros(n, 1, 8, 8), 6) for n in (100, 10_000))
    assert large["probe working set"] == pytest.approx(100 * small["probe working set"])
    assert large["calibration copies"] == pytest.approx(100 * small["calibration copies"])
    # the calibration pass walks one chunk at a time: it stops growing at CALIB_CHUNK images
    from mpqkit.quant.calibration import CALIB_CHUNK

    chunk = search_parts(graph, torch.zeros(CALIB_CHUNK, 1, 8, 8), 6)["calibration pass"]
    assert small["calibration pass"] < chunk == pytest.approx(large["calibration pass"])
    # it runs before the probes and any gradient pass: the peak counts only the largest of the three
    parts = {"process": 10.0, "probe working set": 5.0, "method": 7.0, "calibration pass": 9.0}
    assert peak_mb(parts) == 19.0
    images = torch.zeros(256, 1, 8, 8)
    ctx = SearchContext(model=bundle.model, graph=graph, calib_images=images, calib_labels=torch.zeros(256).long(),
                        searched=graph.names, w_bits=[2, 4, 8], a_bits=[8])
    for name in ("hawq", "mpqco"):  # each method reads its own options from the context
        assert METHODS.get(name).memory(dataclasses.replace(ctx, options=METHODS.get(name).make_options(None))) > 0
    auto = METHODS.get("auto")

    def auto_mb(heldout: int, available: int) -> float:
        held = lambda n: torch.zeros(min(n, available), 1, 8, 8)  # noqa: E731  (the data has `available` left)
        return auto.memory(dataclasses.replace(ctx, options=auto.make_options({"heldout": heldout}), load_heldout=held))

    assert auto_mb(1000, 10_000) > auto_mb(10, 10_000) > METHODS.get("mpqco").memory(ctx)  # held-out, mpqco's pass
    assert auto_mb(1000, 300) == auto_mb(300, 10_000)  # counts the held-out images the data has, not the option
    assert METHODS.get("eval-delta").memory is None  # the engine's own parts cover it


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), True, "4G"])
def test_a_malformed_limit_is_refused(bad):
    with pytest.raises(MpqkitError, match="--max-memory"):
        mpqkit.search("digits-cnn", "digits", "avg-bits=3", "eval-delta", max_memory_mb=bad, **KW)


def test_the_cli_refuses_with_the_message_and_writes_nothing(tmp_path, capsys):
    from mpqkit.cli import main

    out = tmp_path / "run"
    code = main(["search", "--model", "digits-cnn", "--data", "digits", "--method", "eval-delta", "--budget",
                 "avg-bits=3", "--calib-size", "64", "--no-cache", "-q", "--max-memory", "10", "--out", str(out)])
    assert code != 0 and "smallest limit it can run under" in capsys.readouterr().err
    assert not out.exists()


def test_mpqco_chunks_are_bounded_by_their_per_sample_gradients_and_give_the_same_scores(monkeypatch):
    """A chunk holds at most GRAD_BYTES of per-sample gradients (a transformer's weights, not its inputs,
    bound it), the memory estimate counts them, and the chunking does not change the scores."""
    import torch

    from mpqkit.graph import discover
    from mpqkit.loading import load_model
    from mpqkit.sensitivity import mpqco as m
    from mpqkit.sensitivity.base import SearchContext
    from mpqkit.settings import RunSettings

    bundle = load_model("digits-cnn", RunSettings())
    graph = discover(bundle.model, bundle.input_shape)
    ctx = SearchContext(model=bundle.model, graph=graph, calib_images=torch.zeros(256, 1, 8, 8),
                        calib_labels=torch.zeros(256).long(), searched=graph.names, w_bits=[2, 4, 8], a_bits=[8])
    per_sample = m.searched_weight_bytes(ctx)
    assert per_sample == 4 * sum(layer.weight_numel for layer in graph.layers)
    assert m.mpqco_chunk(ctx) == 32  # small weights: the input bound (capped at 32) as before
    wide = m.mpqco_memory(ctx)
    monkeypatch.setattr(m, "GRAD_BYTES", 3 * per_sample)
    assert m.mpqco_chunk(ctx) == 3 and m.mpqco_memory(ctx) < wide
    narrow = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "mpqco", **KW).table.w
    monkeypatch.undo()
    full = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "mpqco", **KW).table.w
    for f, row in full.items():
        for b, v in row.items():
            assert narrow[f][b] == pytest.approx(v, rel=1e-5)


def test_a_search_leaves_no_probe_engine_alive():
    """The engines sit in reference cycles: search collects them before returning, so a bench's next draw
    does not run beside the last one's kept layer cuts (automatic collection disabled here)."""
    import gc

    from mpqkit.engine.probe import ProbeEngine
    from mpqkit.quant.layerwise import LocalLayerBuilder

    gc.disable()
    try:
        res = mpqkit.search("digits-cnn", "digits", "avg-bits=3", "auto", **{**KW, "calib_size": 512})
        assert res.plan.layers
        del res
        assert not [o for o in gc.get_objects() if isinstance(o, (ProbeEngine, LocalLayerBuilder))]
    finally:
        gc.enable()


def test_trim_heap_hands_the_freed_heap_back():
    """Freed tensors stay resident in the C heap until it is trimmed: a search's estimate would count them."""
    import gc
    import sys

    import torch

    from mpqkit.memory import trim_heap
    from mpqkit.profile import resident_mb
    if not sys.platform.startswith("linux") or not trim_heap():
        pytest.skip("needs glibc's malloc_trim")
    kept, freed = [], []
    for i in range(3000):  # 100 KB each (heap, not mmap); every tenth kept, so the heap cannot shrink from its top
        (kept if i % 10 == 0 else freed).append(torch.ones(25_000))
    del freed
    gc.collect()
    before = resident_mb()
    assert trim_heap()
    assert before - resident_mb() > 150  # of the 270 MB freed
    assert len(kept) == 300


def own_mapping(t) -> bool:
    """Whether ``t``'s storage starts a page of an anonymous mapping outside the C heap's ``[heap]``
    (Linux's /proc/self/maps; the kernel may merge neighbouring mappings, so not an exact match)."""
    ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return ptr % 4096 == 0 and ptr + size <= hi and len(fields) == 5  # no path: anonymous
    return False


def mapped(ptr: int) -> bool:
    return any(lo <= ptr < hi for lo, hi in ((int(x, 16) for x in line.split()[0].split("-"))
                                             for line in open("/proc/self/maps")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_off_heap_keeps_values_and_layout_in_pages_that_go_back_when_freed():
    import gc

    import torch

    from mpqkit.memory import OFF_HEAP_MIN_BYTES, off_heap
    x = torch.randn(16, 32, 32, 32).to(memory_format=torch.channels_last)  # 2 MB, the engine's layout
    y = off_heap(x)
    assert torch.equal(x, y) and y.stride() == x.stride() and y.dtype == x.dtype
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert own_mapping(y) and not own_mapping(torch.randn(3))
    ptr = y.untyped_storage().data_ptr()
    half = torch.randn(OFF_HEAP_MIN_BYTES, dtype=torch.bfloat16)
    assert own_mapping(off_heap(half)) and torch.equal(off_heap(half), half)
    del y
    gc.collect()
    assert not mapped(ptr)  # unmapped with the tensor
    small, strided = torch.randn(100), torch.randn(1024, 1024).t()[::2]
    assert off_heap(small) is small and off_heap(strided) is strided  # small, or not dense: left as is
    assert off_heap(torch.randn(OFF_HEAP_MIN_BYTES, requires_grad=True)).requires_grad
