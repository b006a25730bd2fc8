"""Where a search's time goes: named stages timed wherever they run, collected per search.

``api.search`` opens a :class:`Profile` for the run (:func:`profiling`); code anywhere below it marks
its work with ``with stage("probes"):`` and, for probes, :func:`probe_done` (seconds per probe keyed
by the layer it starts at). Without an open profile every call is a no-op, so library users who
drive the engine directly pay nothing. Nested stages are attributed to the innermost one only, so the
stage seconds add up to at most the wall time; the rest is reported as ``other``.
"""
from __future__ import annotations

import contextlib
import contextvars
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

_CURRENT: contextvars.ContextVar["Profile | None"] = contextvars.ContextVar("mpqkit_profile", default=None)


@dataclass
class Profile:
    """Seconds and calls per stage, probe seconds per start layer, and the wall time."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    probe_layers: dict[str, list[float]] = field(default_factory=dict)  # layer -> [probes, seconds]
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stages by seconds (with ``other``), probes by start layer, peak resident memory."""
        wall = self.wall or (time.perf_counter() - self._t0)
        stages = {k: {"seconds": round(v, 3), "calls": self.calls[k]}
                  for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
        stages["other"] = {"seconds": round(max(0.0, wall - sum(self.seconds.values())), 3), "calls": 0}
        layers = {f: {"probes": int(n), "mean_ms": round(1000 * s / max(n, 1), 2)} for f, (n, s) in
                  sorted(self.probe_layers.items(), key=lambda kv: -kv[1][1])}
        return {"wall_seconds": round(wall, 3), "stages": stages, "probes_by_start_layer": layers,
                "peak_rss_mb": round(peak_rss_mb(), 1)}


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
    lines = [f"profile: {d['wall_seconds']:.1f} s wall, peak resident {d['peak_rss_mb']:.0f} MB"]
    for name, v in d["stages"].items():
        if v["seconds"] >= 0.05 or name == "other":
            calls = f" ({v['calls']} call{'s' * (v['calls'] != 1)})" if v["calls"] else ""
            lines.append(f"  {name:<22} {v['seconds']:8.1f} s  {100 * v['seconds'] / wall:5.1f} %{calls}")
    layers = list(d["probes_by_start_layer"].items())[:top]
    if layers:
        lines.append("  probes by start layer (costliest first): " + ", ".join(
            f"{f} {v['probes']} × {v['mean_ms']:.0f} ms" for f, v in layers))
    return "\n".join(lines)
