"""The probe engine: loss/accuracy of the fp model with per-layer quantization overrides.

Every method's measurements go through ``ProbeEngine.run``. A *probe* maps layer names to
``(w_bits, a_bits)`` overrides (None = that side stays fp32); all other layers stay fp32.

Speed comes from three things:
- prefix caching: the model is traced once with torch.fx; a probe starts at the first overridden
  layer from the fp tensors that are live there (a residual block's skip branch included), not
  from the input. Probes are run grouped by their start point, walking the network once; the fp
  live tensors at each visited cut are kept in memory (``prefix_cache_mb``, LRU) so later calls
  start from the nearest kept cut instead of the input;
- quantized layers are built once per (layer, bits) and reused by every probe;
- results are cached on disk by content, so a killed search resumes.
Models that torch.fx cannot trace fall back to a full forward per probe (same results, slower).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import DataError
from ..graph import ModelGraph
from ..memory import off_heap, trim_heap
from ..profile import probe_done, stage
from ..quant.apply import set_submodule
from ..quant.calibration import calibrate
from ..quant.config import QuantConfig
from ..quant.layerwise import LOCAL_GPTQ, LocalLayerBuilder, install, layer_ptq_context
from ..quant.modules import quantize_module
from ..quant.observers import OBSERVER_VERSION, weight_qparams
from ..tracing import Program, Stacked, trace_model
from .cache import ProbeCache, default_cache_dir, module_sha256, tensor_sha256

log = logging.getLogger("mpqkit")
ENGINE_VERSION = 2
# what ProbeResult.loss measures; the engine's own default is plain cross-entropy, every run through
# RunSettings (CLI, API) uses RunSettings.objective (default "kl")
OBJECTIVES = ("ce", "kl")
STAT_CHUNK = 128  # samples per chunk of ProbeResult.batch_losses
Override = tuple[int | None, int | None]  # (w_bits, a_bits); None = fp32


@dataclass(frozen=True)
class ProbeResult:
    loss: float  # mean objective over the set: cross-entropy to the labels, or KL from the fp outputs
    top1: float  # fraction correct
    n: int
    batch_losses: tuple[float, ...]  # mean loss of each STAT_CHUNK samples, for variance estimates
    features: dict[str, Tensor] | None = field(default=None, compare=False, repr=False)  # recorded outputs

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "top1": self.top1, "n": self.n, "batch_losses": list(self.batch_losses)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProbeResult":
        return cls(float(d["loss"]), float(d["top1"]), int(d["n"]), tuple(float(x) for x in d["batch_losses"]))


def probe_spec(probe: Mapping[str, Override]) -> list[list[Any]]:
    """Canonical, hashable form of a probe."""
    return [[k, v[0], v[1]] for k, v in sorted(probe.items())]


def _check_inputs(images: Tensor, labels: Tensor, objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if len(images) == 0:
        raise DataError("the calibration/sensitivity set is empty")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")


class ProbeEngine:
    """Runs probes on a fixed labelled calibration set (images already normalized)."""

    def __init__(self, model: nn.Module, graph: ModelGraph, images: Tensor, labels: Tensor,
                 qconfig: QuantConfig | None = None, batch_size: int | None = None, cache_dir: str | None = None,
                 use_cache: bool = True, prefix: bool = True, device: str | torch.device | None = None,
                 progress: bool = True, seed: int = 0, prefix_cache_mb: float | None = None, fold_bn: bool = True,
                 channels_last: bool = True, objective: str = "ce", layers_from: "ProbeEngine | None" = None,
                 sample_weights: Tensor | None = None, stack: int = 1):
        """``layers_from``: another engine (same model and quantizer) whose quantized layers this one
        uses — e.g. plans measured on held-out images with the layers built, activation ranges
        calibrated and GPTQ fitted on the calibration set, as the shipped plan is.
        ``sample_weights``: one non-negative multiplier per image; a probe's loss is then the mean of
        weight × objective (an importance-sampled estimate of a larger set's mean; None: all 1).
        ``stack``: up to this many probes that start at the same layer and differ only in it run as one
        forward of the batch stacked that many times (``--stack-probes``; the same losses to float
        tolerance; 1: one forward per probe)."""
        _check_inputs(images, labels, objective)
        if not (isinstance(stack, int) and stack >= 1):
            raise DataError(f"stack must be a whole number ≥ 1 of probes per forward, got {stack!r}")
        self.stack = stack
        if sample_weights is not None and (sample_weights.shape != (len(images),) or bool((sample_weights < 0).any())):
            raise DataError(f"sample_weights must be {len(images)} non-negative numbers, one per image")
        self.sample_weights = None if sample_weights is None else sample_weights.detach().double().cpu()
        # everything needed to build the same engine in another process (engine/runners.py)
        self.spec: dict[str, Any] = dict(model=model, graph=graph, images=images, labels=labels, qconfig=qconfig,
                                         batch_size=batch_size, use_cache=use_cache, prefix=prefix, device=device,
                                         seed=seed, prefix_cache_mb=prefix_cache_mb, fold_bn=fold_bn,
                                         channels_last=channels_last, objective=objective,
                                         cache_dir=str(cache_dir or default_cache_dir()),
                                         layers_from=None if layers_from is None else layers_from.spec,
                                         sample_weights=sample_weights, stack=stack)
        self._place(model, graph, images, labels, qconfig, batch_size, device, fold_bn, channels_last)
        self.progress = progress
        self.prefix = prefix
        self.objective = objective
        self._fp_logp: list[Tensor] | None = None
        if objective == "kl":  # the reference every probe is compared with, per batch, through the probes' own path
            with torch.inference_mode():
                self._fp_logp = [F.log_softmax(out.float(), dim=1) for out, _ in self._outputs(0, None, {}, {})]
        self._snapshots: OrderedDict[tuple, list[dict]] = OrderedDict()  # (base, cut) -> live tensors per batch
        self._snapshot_bytes: dict[tuple, int] = {}
        self.prefix_cache_bytes = int((default_prefix_cache_mb() if prefix_cache_mb is None else prefix_cache_mb) * 2**20)
        self._observers = None
        self._seed = seed
        self._wq: dict[tuple[str, int], tuple] = {}
        self._layers: dict[tuple[str, int | None, int | None], nn.Module] = {}
        self._open_caches(model, images, labels, cache_dir, use_cache, seed,
                          {"fold_bn": fold_bn, "channels_last": channels_last, "batch_size": self.batch_size},
                          layers_from)
        self.stats = {"probes_run": 0, "probe_seconds": 0.0, "cache_hits": 0}
        if self._builder is not None:
            self.stats.update(ptq_built=0, ptq_cached=0, ptq_seconds=0.0)
        self.fp = self.run([{}], desc="fp reference", show=False, stage_name="fp reference")[0]

    def _place(self, model: nn.Module, graph: ModelGraph, images: Tensor, labels: Tensor,
               qconfig: QuantConfig | None, batch_size: int | None, device: str | torch.device | None,
               fold_bn: bool, channels_last: bool) -> None:
        """The engine's private copy of the model on its device, its batches (NHWC for convs when
        ``channels_last``) and the traced program the probes run (None: a full forward per probe)."""

        self.device = resolve_device(device)
        self.model = copy.deepcopy(model).eval().to(self.device)  # private copy: the user's model is never touched
        self.graph = graph
        self.qconfig = qconfig or QuantConfig()
        self.batch_size = batch_size = batch_size or auto_batch_size(graph)
        fmt = torch.channels_last if channels_last and images.ndim == 4 else torch.contiguous_format
        self._format = fmt
        if fmt is torch.channels_last:
            self.model.to(memory_format=fmt)  # conv kernels run faster on NHWC on CPU (oneDNN)
        self.batches = [(images[i:i + batch_size].to(self.device).contiguous(memory_format=fmt),
                         labels[i:i + batch_size].to(self.device)) for i in range(0, len(images), batch_size)]
        gm = trace_model(self.model)
        self.program = Program(gm, graph.names, fold_bn, fmt is torch.channels_last) if gm is not None else None
        if self.program is not None:
            missing = [n for n in graph.names if n not in self.program.cut]
            if missing:
                log.warning("layers not found as modules in the traced graph (%s): full forward per probe", missing[:3])
                self.program = None

    def _open_caches(self, model: nn.Module, images: Tensor, labels: Tensor, cache_dir: str | None, use_cache: bool,
                     seed: int, kernels: dict[str, Any], layers_from: "ProbeEngine | None") -> None:
        """The probe cache, keyed by everything that changes a probe's value (model, data, quantizer,
        objective, seed, GPTQ settings, kernels), and the per-(layer, bits) PTQ builder with its own cache."""
        gptq_context = {"gptq": LOCAL_GPTQ.to_dict()} if self.qconfig.rounding != "nearest" else {}
        self.data_sha256 = tensor_sha256(images, labels)
        model_sha256 = module_sha256(model)
        self._layers_from = layers_from
        if layers_from is not None:
            gptq_context["layers_from"] = layers_from.data_sha256
        if self.sample_weights is not None:
            gptq_context["sample_weights"] = tensor_sha256(self.sample_weights)
        context = {"engine": ENGINE_VERSION, "observer": OBSERVER_VERSION, "objective": self.objective, **gptq_context,
                   "model": model_sha256, "data": self.data_sha256,
                   "qconfig": self.qconfig.to_dict(), "seed": seed,  # kernels change the last float digits:
                   "kernels": kernels}
        self.cache = ProbeCache(cache_dir or default_cache_dir(), context) if use_cache else None
        self._builder = None
        if self.qconfig.layer_ptq and layers_from is None:  # GPTQ / bias correction per (layer, bits), cached
            store = ProbeCache(cache_dir or default_cache_dir(), layer_ptq_context(
                model_sha256, tensor_sha256(images), self.qconfig, seed)) if use_cache else None
            self._builder = LocalLayerBuilder(model, images, self.qconfig, seed, store, self.device)

    def _outputs(self, start: int, envs: list[dict] | None, swaps: Mapping[str, nn.Module],
                 taps: Mapping[str, Callable[[Tensor], None]]) -> list[tuple[Tensor, Tensor]]:
        """(logits, labels) per batch of a run from node ``start`` (``envs``: live tensors there;
        None: from the input)."""
        if self.program is None:
            return self._run_fallback(swaps, taps)
        if envs is None:
            envs = [self.program.initial_env(x) for x, _ in self.batches]
        return [(self.program.run(env, start, None, swaps, taps), y) for env, (_, y) in zip(envs, self.batches)]

    # ---- quantized layers, built once per (layer, bits) ----
    def observers(self):
        if self._observers is None:
            with stage("activation ranges"):
                self._observers = calibrate(self.model, self.graph.names, self.spec["images"], seed=self._seed,
                                            memory_format=self._format)
        return self._observers

    def quant_layer(self, fqn: str, w_bits: int | None, a_bits: int | None) -> nn.Module:
        if self._layers_from is not None:
            return self._layers_from.quant_layer(fqn, w_bits, a_bits)
        key = (fqn, w_bits, a_bits)
        if key not in self._layers:
            module = self.model.get_submodule(fqn)
            w_spec = self.qconfig.w_spec(w_bits) if w_bits is not None else None
            a_spec = self.qconfig.a_spec(a_bits) if a_bits is not None else None
            wq = None
            if w_spec is not None:
                if (fqn, w_bits) not in self._wq:
                    self._wq[(fqn, w_bits)] = weight_qparams(module.weight.detach(), w_spec)
                wq = self._wq[(fqn, w_bits)]
            aq = self.observers()[fqn].qparams(a_spec) if a_spec is not None else None
            q = quantize_module(module, w_spec, a_spec, w_qparams=wq, a_qparams=aq)
            if self._builder is not None:
                with stage("layer PTQ (GPTQ)"):
                    install(q, self._builder.build(fqn, q, w_bits, a_bits))
                b = self._builder
                self.stats.update(ptq_built=b.built, ptq_cached=b.cached, ptq_seconds=b.seconds)
            q.freeze_weight = True
            self._layers[key] = q
        return self._layers[key]

    # ---- derived measurements a method computes from probes (cached like probes) ----
    def memo(self, spec: Mapping[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A method's own measurement keyed by ``spec`` in this engine's cache context: read when
        cached, otherwise computed and stored (so a killed search resumes)."""
        if self.cache is None:
            return compute()
        key = self.cache.key({"memo": dict(spec)})
        hit = self.cache.get(key)
        if hit is not None:
            self.stats["cache_hits"] += 1
            return hit
        value = compute()
        self.cache.put(key, value)
        return value

    def is_memoized(self, spec: Mapping[str, Any]) -> bool:
        return self.cache is not None and self.cache.get(self.cache.key({"memo": dict(spec)})) is not None

    @torch.inference_mode()
    def fp_layer_input(self, fqn: str) -> Tensor:
        """The fp model's input to a layer on the calibration set, pooled to N×C (e.g. the
        penultimate features when ``fqn`` is the classifier)."""
        self.graph.check_names([fqn])
        chunks: list[Tensor] = []
        h = self.model.get_submodule(fqn).register_forward_pre_hook(lambda m, a: chunks.append(pool_features(a[0])))
        try:
            for x, _ in self.batches:
                self.model(x)
        finally:
            h.remove()
        return torch.cat(chunks)

    # ---- running probes ----
    def _start(self, probe: Mapping[str, Override], base: Mapping[str, Override] | None = None,
               record: Sequence[str] = ()) -> int:
        """First node whose computation differs from the base configuration (or is recorded). A
        probe identical to the base starts at the output node: it reads the base's own result."""
        if self.program is None or not self.prefix:
            return 0
        base = base or {}
        changed = [f for f in {*probe, *base} if _norm(probe.get(f, (None, None))) != _norm(base.get(f, (None, None)))]
        return min((self.program.cut[f] for f in (*changed, *record)), default=len(self.program.nodes) - 1)

    def _start_name(self, start: int) -> str:
        """The layer a probe starting at node ``start`` begins with (for the profile)."""
        if self.program is None or not self.prefix:
            return "(full forward)"
        node = self.program.nodes[start]
        return str(node.target) if node.op == "call_module" else "(output)"

    def _evaluate(self, outputs: Iterable[tuple[Tensor, Tensor]]) -> ProbeResult:
        """Mean objective and top-1, plus the mean objective of every ``STAT_CHUNK`` consecutive
        samples (so the spread of a measurement does not depend on the compute batch size).
        ``outputs`` come in the order of ``self.batches``. Objective "kl": Σ_c p_fp·(log p_fp − log p_q)
        per image (0 for the fp model itself)."""
        losses, correct = [], 0
        for j, (logits, y) in enumerate(outputs):
            losses.append(self._sample_objective(j, logits, y))
            correct += int((logits.argmax(1) == y).sum())
        per_sample = torch.cat(losses)
        if self.sample_weights is not None:
            per_sample = per_sample * self.sample_weights.to(per_sample.device)
        n = len(per_sample)
        loss = float(per_sample.sum()) / n
        if not math.isfinite(loss):
            log.warning("non-finite loss in a probe")
        chunks = tuple(float(c.mean()) for c in per_sample.split(STAT_CHUNK))
        return ProbeResult(loss, correct / n, n, chunks)

    def _sample_objective(self, j: int, logits: Tensor, y: Tensor) -> Tensor:
        """The objective of each sample of batch ``j`` (float64, unweighted)."""
        if self._fp_logp is None:
            return F.cross_entropy(logits.float(), y, reduction="none").double()
        return F.kl_div(F.log_softmax(logits.float(), dim=1), self._fp_logp[j], log_target=True,
                        reduction="none").sum(1).double()

    @torch.inference_mode()
    def sample_losses(self, probe: Mapping[str, Override]) -> Tensor:
        """The unweighted objective of every image under ``probe`` (a full configuration), run from
        the input and not cached: e.g. to find the images a perturbation moves most."""
        self.graph.check_names(probe)
        config = {f: ov for f, ov in probe.items() if _norm(ov) != (None, None)}
        return torch.cat([self._sample_objective(j, logits, y) for j, (logits, y)
                          in enumerate(self._outputs(0, None, self._swaps(config), {}))])

    def _swaps(self, config: Mapping[str, Override]) -> dict[str, nn.Module]:
        return {f: self.quant_layer(f, *ov) for f, ov in config.items() if _norm(ov) != (None, None)}

    def _prefix_key(self, config: Mapping[str, Override], cut: int) -> tuple:
        """Live tensors at ``cut`` depend only on the overrides of layers before it: configurations
        that agree there share snapshots (a pair probe's base starts from the single's)."""
        assert self.program is not None
        return (tuple(sorted((f, *_norm(ov)) for f, ov in config.items()
                             if self.program.cut[f] < cut and _norm(ov) != (None, None))), cut)

    def _base_envs(self, base: Mapping[str, Override], cut: int, remember: bool = True) -> list[dict]:
        """Live tensors of the *base* configuration at ``cut`` for every batch, walked from the
        nearest kept snapshot at or before it (the base is fp32 unless a method sets a reference)."""
        assert self.program is not None
        key = self._prefix_key(base, cut)
        if key in self._snapshots:
            self._snapshots.move_to_end(key)
            return self._snapshots[key]
        prev = max((c for k, c in self._snapshots if c <= cut and self._prefix_key(base, c) == (k, c)), default=None)
        if prev is not None:
            envs, frm = self._snapshots[self._prefix_key(base, prev)], prev
        else:
            envs, frm = [self.program.initial_env(x) for x, _ in self.batches], 0
        swaps = self._swaps(base)
        envs = [self.program.run(env, frm, cut, swaps) for env in envs]
        return self._keep(key, envs) if remember else envs

    def warm(self, base: Mapping[str, Override], fqn: str) -> None:
        """Make sure the base configuration's live tensors at layer ``fqn`` are kept in memory."""
        if self.program is not None and self.prefix:
            with torch.inference_mode():
                self._base_envs(dict(base), self.program.cut[fqn], remember=True)

    def release_snapshots(self) -> int:
        """Drop every kept live tensor (e.g. when another engine takes over the probes); returns the
        bytes released. Results are unchanged: a later probe walks from the input."""
        freed = sum(self._snapshot_bytes.values())
        self._snapshots.clear()
        self._snapshot_bytes.clear()
        return freed

    def forget_before(self, base: Mapping[str, Override], fqn: str) -> int:
        """Drop the kept live tensors of ``base`` at cuts before layer ``fqn`` except the last of them
        (the one a walk to ``fqn`` or later starts from): for a method that visits layers once, in
        network order, so the prefix cache holds one snapshot instead of filling its budget.
        Returns the bytes released. Results are unchanged: a later probe walks from what is kept."""
        if self.program is None:
            return 0
        cut = self.program.cut[fqn]
        mine = sorted(c for k, c in self._snapshots if c <= cut and self._prefix_key(base, c) == (k, c))
        freed = 0
        for c in mine[:-1]:
            key = self._prefix_key(base, c)
            del self._snapshots[key]
            freed += self._snapshot_bytes.pop(key)
        return freed

    def _keep(self, key: tuple, envs: list[dict]) -> list[dict]:
        """Keep ``envs`` under ``key`` when they fit the prefix cache (evicting the oldest), moved into
        pages of their own (:func:`~mpqkit.memory.off_heap`, then the heap trimmed); returns the envs
        to use from now on (the same dicts, their tensors moved; values and aliasing unchanged)."""
        size = sum(t.numel() * t.element_size() for env in envs for t in env.values() if isinstance(t, Tensor))
        if size > self.prefix_cache_bytes:
            return envs
        while self._snapshots and sum(self._snapshot_bytes.values()) + size > self.prefix_cache_bytes:
            old, _ = self._snapshots.popitem(last=False)
            del self._snapshot_bytes[old]
        kept = {id(t) for old in self._snapshots.values() for env in old for t in env.values()}
        if _move_off_heap(envs, kept):
            trim_heap()  # the originals' freed heap pages go back too, not kept beside their copies
        self._snapshots[key] = envs
        self._snapshot_bytes[key] = size
        return envs

    def _run_fallback(self, swaps: Mapping[str, nn.Module],
                      taps: Mapping[str, Callable[[Tensor], None]]) -> list[tuple[Tensor, Tensor]]:
        originals = {f: self.model.get_submodule(f) for f in swaps}
        handles = []
        try:
            for f, q in swaps.items():
                set_submodule(self.model, f, q)
            for f, tap in taps.items():
                handles.append(self.model.get_submodule(f).register_forward_hook(
                    lambda m, a, out, tap=tap: tap(out)))
            return [(self.model(x), y) for x, y in self.batches]
        finally:
            for h in handles:
                h.remove()
            for f, m in originals.items():
                set_submodule(self.model, f, m)

    def store(self, probes: Sequence[Mapping[str, Override]], base: Mapping[str, Override] | None,
              results: Sequence[ProbeResult]) -> None:
        """Put results computed elsewhere (another process or machine) under the keys ``run`` uses."""
        if self.cache is None:
            return
        base = dict(base or {})
        for p, r in zip(probes, results):
            cfg = {f: ov for f, ov in {**base, **p}.items() if _norm(ov) != (None, None)}
            self.cache.put(self.cache.key(probe_spec(cfg)), r.to_dict())

    def run(self, probes: Sequence[Mapping[str, Override]], desc: str = "probes", show: bool | None = None,
            base: Mapping[str, Override] | None = None, record: Sequence[str] = (),
            remember: bool = True, stage_name: str = "probes") -> list[ProbeResult]:
        """Results for the given probes, in order; cached ones are read, the rest computed.

        ``base``: a reference configuration every probe is applied on top of (a probe's entry
        replaces the base's for that layer; ``(None, None)`` means fp32). Probes start where they
        first differ from the base, from the base's cached live tensors.
        ``record``: layers whose outputs (globally average-pooled to N×C) are returned in
        ``ProbeResult.features``; such probes always run (features are not kept on disk).
        ``remember``: keep the base's live tensors at each start point for later calls (memory-bounded
        LRU); switch off for a transient base (e.g. CLADO's per-(layer, bits) pair runs).
        ``stage_name``: what the search's profile calls this time (``mpqkit.profile``).
        """
        base = dict(base or {})
        record = list(record)
        self.graph.check_names(base)
        self.graph.check_names(record)
        configs = []
        for p in probes:
            self.graph.check_names(p)
            configs.append({f: ov for f, ov in {**base, **p}.items() if _norm(ov) != (None, None)})
        results, keys, todo = self._cached(configs, bool(record))
        starts = {i: self._start(configs[i], base, record) for i in todo}
        todo.sort(key=starts.__getitem__)
        show = self.progress if show is None else show
        bar = tqdm(total=len(todo), desc=desc, disable=not show or not todo, unit="probe", leave=False)
        t0 = time.perf_counter()
        base_swaps = self._swaps(base)
        with torch.inference_mode(), stage(stage_name):
            envs, cut = None, -1
            for group in self._stack_groups(configs, todo, starts, record):
                t_probe = time.perf_counter()
                start = starts[group[0]]
                if self.program is not None:
                    if envs is None:
                        envs, cut = self._base_envs(base, start, remember), start
                    elif start > cut:  # probes are sorted by start: the base is walked once, forward
                        envs = [self.program.run(env, cut, start, base_swaps) for env in envs]
                        cut = start
                        if remember:
                            envs = self._keep(self._prefix_key(base, cut), envs)
                if len(group) == 1:
                    results[group[0]] = self._probe(configs[group[0]], start, envs, record, keys[group[0]])
                else:
                    assert envs is not None  # stacking needs the traced program, which walked the base here
                    for i, r in zip(group, self._probe_stacked([configs[i] for i in group], start, envs,
                                                               [keys[i] for i in group])):
                        results[i] = r
                bar.update(len(group))
                for _ in group:
                    probe_done(self._start_name(start), (time.perf_counter() - t_probe) / len(group))
        bar.close()
        self.stats["probes_run"] += len(todo)
        self.stats["probe_seconds"] += time.perf_counter() - t0
        return results  # type: ignore[return-value]

    def _cached(self, configs: list[dict], record: bool) -> tuple[list[ProbeResult | None], list[str | None], list[int]]:
        """The cached results of ``configs`` (None where not cached), their cache keys, and the indices
        still to run (all of them when features are recorded: features are not kept on disk)."""
        results: list[ProbeResult | None] = [None] * len(configs)
        keys: list[str | None] = [None] * len(configs)
        todo: list[int] = []
        for i, cfg in enumerate(configs):
            if self.cache is not None and not record:
                keys[i] = self.cache.key(probe_spec(cfg))
                hit = self.cache.get(keys[i])
                if hit is not None:
                    results[i] = ProbeResult.from_dict(hit)
                    self.stats["cache_hits"] += 1
                    continue
            todo.append(i)
        return results, keys, todo

    def _stack_groups(self, configs: list[dict], todo: list[int], starts: dict[int, int],
                      record: Sequence[str]) -> list[list[int]]:
        """``todo`` (sorted by start) cut into runs of probes that can share one stacked forward: the
        same start layer, the same configuration elsewhere, at most ``self.stack`` of them. Singletons
        when stacking is off, features are recorded, or the model runs as full forwards."""
        if self.stack == 1 or record or self.program is None:
            return [[i] for i in todo]
        groups: list[list[int]] = []
        prev = None
        for i in todo:
            node = self.program.nodes[starts[i]]
            layer = node.target if node.op == "call_module" else None
            rest = (starts[i], layer, tuple(sorted((f, _norm(ov)) for f, ov in configs[i].items() if f != layer)))
            if layer is not None and rest == prev and len(groups[-1]) < self.stack:
                groups[-1].append(i)
            else:
                groups.append([i])
            prev = rest if layer is not None else None
        return groups

    def _probe_stacked(self, configs: list[dict], start: int, envs: list[dict],
                       keys: list[str | None]) -> list[ProbeResult]:
        """Probes that differ only in the layer at ``start``, as one forward per batch: the live
        tensors there stacked ``len(configs)`` times along the batch, each copy through its own
        variant of the layer (``tracing.Stacked``), the rest of the network shared; each probe's
        result from its slice of the logits, and cached like a single probe's."""
        assert self.program is not None
        layer = str(self.program.nodes[start].target)
        k = len(configs)
        swaps = self._swaps({f: ov for f, ov in configs[0].items() if f != layer})
        swaps[layer] = Stacked([self.quant_layer(layer, *configs[j][layer]) if layer in configs[j]
                                else self.program.modules[layer] for j in range(k)])
        per_probe: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(k)]
        for env, (_, y) in zip(envs, self.batches):
            n = len(y)
            tiled = {node: torch.cat([v] * k) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
                     for node, v in env.items()}
            for j, logits in enumerate(self.program.run(tiled, start, None, swaps).split(n)):
                per_probe[j].append((logits, y))
        results = [self._evaluate(out) for out in per_probe]
        self.stats["probes_stacked"] = self.stats.get("probes_stacked", 0) + k
        if self.cache is not None:
            for key, res in zip(keys, results):
                self.cache.put(key, res.to_dict())
        return results

    def _probe(self, config: dict, start: int, envs: list[dict] | None, record: list[str],
               key: str | None) -> ProbeResult:
        """One probe from ``start`` (the base's live tensors ``envs`` there): its result, with the
        recorded layers' pooled features, or written to the cache."""
        feats: dict[str, list[Tensor]] = {f: [] for f in record}
        taps = {f: (lambda out, f=f: feats[f].append(pool_features(out))) for f in record}
        res = self._evaluate(self._outputs(start, envs, self._swaps(config), taps))
        if record:
            return dataclasses.replace(res, features={f: torch.cat(v) for f, v in feats.items()})
        if self.cache is not None:
            self.cache.put(key, res.to_dict())
        return res


def _move_off_heap(envs: list[dict], kept: set[int]) -> bool:
    """Replace, in place, each tensor of ``envs`` by its :func:`~mpqkit.memory.off_heap` copy, one at a
    time (its original is freed once no name holds it); tensors whose ``id`` is in ``kept`` (moved
    with an earlier snapshot) stay, and the names of one tensor (a folded BN's output) keep sharing
    one copy. Returns whether any tensor was copied."""
    any_moved = False
    for env in envs:
        moved: dict[int, Tensor] = {}
        for name, t in env.items():
            if isinstance(t, Tensor) and id(t) not in kept:
                if id(t) not in moved:
                    moved[id(t)] = off_heap(t)
                    any_moved |= moved[id(t)] is not t
                env[name] = moved[id(t)]
    return any_moved


def default_prefix_cache_mb(cap: float = 2048.0, share: float = 0.125) -> float:
    """The prefix cache's default size: ``share`` of the memory available now (``MemAvailable`` on Linux),
    at most ``cap`` MB; ``cap`` where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(min(cap, share * int(line.split()[1]) / 1024))
    except (OSError, ValueError, IndexError):
        pass
    return cap


def auto_batch_size(graph: ModelGraph, target_bytes: int = 16 * 2**20, lo: int = 8, hi: int = 1024) -> int:
    """Images per batch such that the largest layer input is about ``target_bytes`` (fp32), within
    ``lo``..``hi``: big batches do not run faster per image on a CPU (tensors of tens of MB are
    mapped and faulted in anew), and an ImageNet-size network gets batches that fit in memory."""
    per_sample = 4 * graph.widest_in_numel
    return int(min(hi, max(lo, target_bytes // per_sample)))


def _norm(ov: Override) -> Override:
    return (ov[0], ov[1])


def pool_features(t: Tensor) -> Tensor:
    """Per-sample vector of a layer output: global average pool of conv maps, token mean of sequences."""
    if t.ndim == 4:
        return t.mean(dim=(2, 3)).float()
    if t.ndim == 3:
        return t.mean(dim=1).float()
    return t.flatten(1).float()
