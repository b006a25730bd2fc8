"""Run probe batches in parallel worker processes that share the engine's on-disk cache.

Each worker rebuilds the same engine from ``ProbeEngine.spec`` (so its cache keys are identical),
runs its share of the jobs and writes every result to the cache; the calling process then reads
them like any cached probe. Processes are spawned (not forked: forking after torch has started
its thread pools can hang), and torch threads are split between the workers.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import MpqkitError
from .probe import Override, ProbeEngine


@dataclass
class ProbeJob:
    """Probes on top of one base configuration; ``warm`` names a layer whose reference tensors
    (under ``warm_base``) should be kept before the run (CLADO: the tree's own layer)."""

    probes: list[dict[str, Override]]
    base: dict[str, Override] = field(default_factory=dict)
    warm: str | None = None
    warm_base: dict[str, Override] = field(default_factory=dict)


def _worker(args: tuple[dict[str, Any], list[ProbeJob], int]) -> int:
    spec, jobs, threads = args
    import torch

    torch.set_num_threads(threads)
    engine = ProbeEngine(**{**spec, "progress": False})
    for job in jobs:
        if job.warm is not None:
            engine.warm(job.warm_base, job.warm)
        engine.run(job.probes, base=job.base, remember=False, show=False)
    return engine.stats["probes_run"]


def run_in_workers(engine: ProbeEngine, jobs: Sequence[ProbeJob], workers: int) -> int:
    """Compute the jobs' probes in ``workers`` processes into ``engine``'s disk cache; returns how
    many probes the workers ran. Jobs are dealt round-robin, so early (long) ones spread out."""
    if engine.cache is None:
        raise MpqkitError("--workers needs the probe cache (drop --no-cache): workers hand results over through it")
    if workers < 2 or not jobs:
        return 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    chunks = [list(jobs[i::workers]) for i in range(workers)]
    pool = mp.get_context("spawn").Pool(workers)
    try:
        done = sum(pool.map(_worker, [(engine.spec, c, threads) for c in chunks if c]))
        pool.close()  # a graceful exit lets the workers release their locks (terminate() leaks them)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return done
