"""Run probe jobs in parallel: local worker processes, or Ray tasks on a cluster.

Either way the hand-over is the engine's on-disk cache: the caller dispatches jobs, the results
land in its cache under the same keys its own ``engine.run`` would use, and the method then reads
them like any cached probe (so the results, and the plan, are those of the local loop).

* local (``run_in_workers``): each spawned process rebuilds the same engine from
  ``ProbeEngine.spec``, runs its share of the jobs and writes the cache itself (shared disk).
  Spawned, not forked (forking after torch started its thread pools can hang); torch threads are
  split between the workers.
* Ray (``run_in_ray``): one actor per worker holds the model and data once (from the object
  store), runs jobs handed out dynamically and returns the results; the driver writes them into its
  cache, so workers need no shared disk. Actors get a (fractional) GPU when the cluster has GPUs.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import MissingResourceError, MpqkitError
from .probe import Override, ProbeEngine, ProbeResult


@dataclass
class ProbeJob:
    """Probes on top of one base configuration; ``warm`` names a layer whose reference tensors
    (under ``warm_base``) should be kept before the run (CLADO: the tree's own layer)."""

    probes: list[dict[str, Override]]
    base: dict[str, Override] = field(default_factory=dict)
    warm: str | None = None
    warm_base: dict[str, Override] = field(default_factory=dict)


def engine_from_spec(spec: dict[str, Any], **overrides: Any) -> ProbeEngine:
    """The engine ``ProbeEngine.spec`` describes, in this process; an engine that uses another's
    quantized layers (``layers_from``) gets that one rebuilt from its own spec first, with the same
    overrides."""
    spec = dict(spec)
    source = spec.pop("layers_from", None)
    layers_from = None if source is None else engine_from_spec(source, **overrides)
    return ProbeEngine(**{**spec, **overrides}, layers_from=layers_from)


def _worker(args: tuple[dict[str, Any], list[ProbeJob], int]) -> int:
    spec, jobs, threads = args

    torch.set_num_threads(threads)
    engine = engine_from_spec(spec, progress=False)
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


def _portable(spec: dict[str, Any]) -> dict[str, Any]:
    """An engine spec without this machine's cache and device (Ray actors choose their own)."""
    out = {k: v for k, v in spec.items() if k not in ("cache_dir", "use_cache", "device", "progress")}
    if out.get("layers_from") is not None:
        out["layers_from"] = _portable(out["layers_from"])
    return out


def _job_results(engine: ProbeEngine, job: ProbeJob) -> list[dict]:
    if job.warm is not None:
        engine.warm(job.warm_base, job.warm)
    return [r.to_dict() for r in engine.run(job.probes, base=job.base, remember=False, show=False)]


def run_in_ray(engine: ProbeEngine, jobs: Sequence[ProbeJob], workers: int, address: str | None = None,
               gpus_per_worker: float | None = None) -> int:
    """Compute the jobs on Ray actors (``address``: an existing cluster, e.g. "ray://head:10001" or
    "auto"; None starts a local instance) and store their results in ``engine``'s cache."""
    if engine.cache is None:
        raise MpqkitError("--runner ray needs the probe cache (drop --no-cache): results are handed over through it")
    if not jobs:
        return 0
    try:
        # optional extra [ray]
        import ray
    except ImportError:
        raise MissingResourceError("--runner ray needs Ray: pip install 'mpqkit[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 **({"num_cpus": max(workers, 1)} if address is None else {}))
    try:
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = gpus_per_worker if gpus_per_worker is not None else (min(1.0, cluster_gpus / workers) if cluster_gpus else 0)
        spec = _portable(engine.spec)
        spec_ref = ray.put(spec)

        @ray.remote(num_cpus=1, num_gpus=gpus)
        class ProbeWorker:
            def __init__(self, spec):
                torch.set_num_threads(1)
                self.engine = engine_from_spec(spec, use_cache=False, progress=False,
                                               device="cuda" if gpus else "cpu")

            def run(self, job):
                return _job_results(self.engine, job)

        actors = [ProbeWorker.remote(spec_ref) for _ in range(max(1, workers))]
        pool = ray.util.ActorPool(actors)
        done = 0
        for job, results in zip(jobs, pool.map(lambda a, j: a.run.remote(j), list(jobs))):
            engine.store(job.probes, job.base, [ProbeResult.from_dict(r) for r in results])
            done += len(results)
        for a in actors:
            ray.kill(a)
        return done
    finally:
        if started:
            ray.shutdown()


def dispatch(engine: ProbeEngine, jobs: Sequence[ProbeJob], workers: int, runner: str = "local",
             address: str | None = None) -> int:
    """Run jobs ahead of the method's own loop (which then reads them from the cache)."""
    if runner == "ray":
        return run_in_ray(engine, jobs, workers, address)
    if runner != "local":
        raise MpqkitError(f"unknown runner '{runner}': expected local or ray")
    return run_in_workers(engine, jobs, workers)


def dispatch_options(engine: ProbeEngine, options: Any, jobs: Callable[[], Sequence[ProbeJob]]) -> int:
    """The one runner dispatch every method uses: when ``options`` (a ``RunnerOptions``) asks for
    parallel workers or Ray, build the jobs and run them into the cache; otherwise do nothing and
    the method's own loop computes the probes in-process."""
    workers, runner = int(options.workers or 1), options.runner
    if workers > 1 or runner == "ray":
        return dispatch(engine, jobs(), workers, runner, options.address)
    return 0
