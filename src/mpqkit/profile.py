"""Where a search's time goes: named stages timed wherever they run, collected per search.

``api.search`` opens a :class:`Profile` for the run (:func:`profiling`); code anywhere below it marks
its work with ``with stage("probes"):`` and, for probes, :func:`probe_done` (seconds per probe keyed
by the layer it starts at). Without an open profile every call is a no-op, so library users who
drive the engine directly pay nothing. Nested stages are attributed to the innermost one only, so the
stage seconds add up to at most the wall time; the rest is reported as ``other``.

Memory: while a profile is open, :class:`RssSampler` reads the resident memory every
``SAMPLE_S`` seconds on a thread of its own and charges each reading to the innermost open stage, so
each stage gets the peak seen while it ran (``peak_mb``) and the profile the search's own peak
(``search_peak_mb``), where ``peak_rss_mb`` (``ru_maxrss``) is the process's peak so far, earlier
searches of the process included. Readings are samples: a spike shorter than ``SAMPLE_S`` can be
missed.
"""
from __future__ import annotations

import contextlib
import contextvars
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

_CURRENT: contextvars.ContextVar["Profile | None"] = contextvars.ContextVar("mpqkit_profile", default=None)
#: seconds between two resident-memory readings of an open profile
SAMPLE_S = 0.05


def resident_mb() -> float:
    """The process's resident memory now (``VmRSS``), in MB; 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class RssSampler:
    """Reads the resident memory every ``interval`` seconds on a daemon thread while open (a context
    manager); ``peak`` is the largest reading (MB, 0 where ``/proc`` cannot be read), and each reading is
    also passed to ``on_sample`` when given. Measures without disturbing the process's ``ru_maxrss``."""

    def __init__(self, interval: float = SAMPLE_S, on_sample: "Callable[[float], None] | None" = None):
        self.interval, self.on_sample, self.peak = interval, on_sample, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mpqkit-rss", daemon=True)

    def _read(self) -> None:
        mb = resident_mb()
        self.peak = max(self.peak, mb)
        if self.on_sample is not None:
            self.on_sample(mb)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> "RssSampler":
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


@dataclass
class Profile:
    """Seconds and calls per stage, probe seconds per start layer, and the wall time."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    probe_layers: dict[str, list[float]] = field(default_factory=dict)  # layer -> [probes, seconds]
    peak_mb: dict[str, float] = field(default_factory=dict)  # stage ("other" outside any) -> sampled peak
    _stack: list[list[Any]] = field(default_factory=list)  # [name, start, child seconds]
    _t0: float = field(default_factory=time.perf_counter)
    wall: float = 0.0

    def push(self, name: str) -> None:
        self._stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        name, start, child = self._stack.pop()
        spent = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + spent - child
        self.calls[name] = self.calls.get(name, 0) + 1
        if self._stack:
            self._stack[-1][2] += spent

    def sample(self, mb: float) -> None:
        """Charge a resident-memory reading to the innermost open stage (``other`` outside any); called
        from the sampler's thread, so it reads the stack without changing it."""
        try:
            name = self._stack[-1][0]
        except IndexError:  # no stage open (or the last one closed meanwhile)
            name = "other"
        if mb > self.peak_mb.get(name, 0.0):
            self.peak_mb[name] = mb

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stages by seconds (with ``other``), probes by start layer, peak resident memory."""
        wall = self.wall or (time.perf_counter() - self._t0)
        stages = {k: {"seconds": round(v, 3), "calls": self.calls[k]}
                  for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
        stages["other"] = {"seconds": round(max(0.0, wall - sum(self.seconds.values())), 3), "calls": 0}
        for k, v in stages.items():
            if k in self.peak_mb:
                v["peak_mb"] = round(self.peak_mb[k], 1)
        layers = {f: {"probes": int(n), "mean_ms": round(1000 * s / max(n, 1), 2)} for f, (n, s) in
                  sorted(self.probe_layers.items(), key=lambda kv: -kv[1][1])}
        return {"wall_seconds": round(wall, 3), "stages": stages, "probes_by_start_layer": layers,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "search_peak_mb": round(max(self.peak_mb.values(), default=0.0), 1)}


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def profiling() -> Iterator[Profile]:
    """Open a profile for the code inside (one search); stages below it are recorded into it."""
    prof = Profile()
    token = _CURRENT.set(prof)
    try:
        with RssSampler(on_sample=prof.sample):
            yield prof
    finally:
        prof.wall = time.perf_counter() - prof._t0
        _CURRENT.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the code inside as stage ``name`` of the open profile (no-op without one)."""
    prof = _CURRENT.get()
    if prof is None:
        yield
        return
    prof.push(name)
    try:
        yield
    finally:
        prof.pop()


def probe_done(layer: str, seconds: float) -> None:
    """Count one probe that started at ``layer`` and took ``seconds`` (no-op without a profile)."""
    prof = _CURRENT.get()
    if prof is not None:
        n, s = prof.probe_layers.get(layer, (0, 0.0))
        prof.probe_layers[layer] = [n + 1, s + seconds]


def format_profile(d: dict[str, Any], top: int = 8) -> str:
    """The profile as text lines: stages with seconds and share of the wall time, the costliest layers."""
    wall = d["wall_seconds"] or 1e-9
    own = f" (this search {d['search_peak_mb']:.0f} MB)" if d.get("search_peak_mb") else ""
    lines = [f"profile: {d['wall_seconds']:.1f} s wall, peak resident {d['peak_rss_mb']:.0f} MB{own}"]
    for name, v in d["stages"].items():
        if v["seconds"] >= 0.05 or name == "other":
            calls = f" ({v['calls']} call{'s' * (v['calls'] != 1)})" if v["calls"] else ""
            peak = f"  peak {v['peak_mb']:6.0f} MB" if v.get("peak_mb") else ""
            lines.append(f"  {name:<22} {v['seconds']:8.1f} s  {100 * v['seconds'] / wall:5.1f} %{peak}{calls}")
    layers = list(d["probes_by_start_layer"].items())[:top]
    if layers:
        lines.append("  probes by start layer (costliest first): " + ", ".join(
            f"{f} {v['probes']} × {v['mean_ms']:.0f} ms" for f, v in layers))
    return "\n".join(lines)
