"""RunSettings: the one object that says how a run loads its model and data, where it computes,
which candidates and calibration set it uses, how it quantizes and where it caches.

Every API entry point (``search``, ``apply_plan``, ``evaluate``, ``sweep``, ``bench``, ``proxies``,
``layers``) takes one, and the CLI builds it from one shared argument group, so a flag means the
same thing, with the same default, on every command that accepts it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import MpqkitError, UnknownNameError
from .flagspec import CALIB, DATA, MODEL, OUTPUT, SOLVER, SPACE, flag
from .engine.probe import OBJECTIVES
from .plan import MAX_SEED
from .quant.config import QuantConfig
from .solve.problem import TIME_LIMIT

DEFAULT_W_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_A_BITS = (4, 6, 8)
FIXED_BITS = (8, 8)
CALIB_SIZE = 1024
MIN_BITS, MAX_BITS = 1, 16


@dataclass(frozen=True)
class RunSettings:
    """How a run loads its model and data, where it computes, what it searches and how it quantizes.
    Each field with a command-line flag declares it here (``metadata=flag(...)``); the CLI generates
    the flags from these declarations (``cli_args.add_settings``)."""

    # -- model source
    checkpoint: str | None = field(default=None, metadata=flag(
        "--checkpoint", group=MODEL, help="weights file (overrides the models directory)"))
    models_dir: str | None = field(default=None, metadata=flag(
        "--models-dir", group=MODEL, help="models directory (default $MPQKIT_MODELS, else ../shared/models)"))
    random_init: bool = field(default=False, metadata=flag(
        "--random-init", group=MODEL, kind="true",
        help="use random weights (explicit opt-in; needed for torchvision models without --checkpoint)"))
    input_shape: tuple[int, ...] | None = None  #: (C, H, W) for a bare nn.Module (API only: the CLI loads named models)
    # -- data
    data_root: str | None = field(default=None, metadata=flag(
        "--data-root", group=DATA, help="data root (default $MPQKIT_DATA, else ../shared/data)"))
    # -- execution (never changes a result)
    device: str | None = field(default="auto", metadata=flag(
        "--device", group=OUTPUT, help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N"))
    progress: bool = field(default=True, metadata=flag("-q", "--quiet", group=OUTPUT, kind="false",
                                                       help="no progress bars"))
    cache_dir: str | None = field(default=None, metadata=flag(
        "--cache-dir", group=SOLVER, help="probe cache (default $MPQKIT_CACHE, else ~/.cache/mpqkit)"))
    use_cache: bool = field(default=True, metadata=flag(
        "--no-cache", group=SOLVER, kind="false", help="do not read or write the probe cache"))
    #: skip the (layer, bits) candidates and configurations a bound shows the budget's plan cannot
    #: choose (eval-delta under the KL objective, greedy's Pareto list): the same plan, fewer probes
    prune: bool = field(default=True, metadata=flag(
        "--no-prune", group=SOLVER, kind="false",
        help="measure every candidate, also those a bound shows the budget's plan cannot choose (default: skip "
             "them; the plan is the same)"))
    #: probe batch size (its flag's destination is not ``batch_size``: export and finetune have their own)
    batch_size: int | None = field(default=None, metadata=flag(
        "--batch-size", group=SOLVER, kind="int", dest="probe_batch_size",
        help="probe batch size (default: ~16 MB for the largest layer input)"))
    #: probes that start at the same layer and differ only in it, run as one forward of the batch stacked
    #: this many times (the same losses to float tolerance)
    stack_probes: int = field(default=1, metadata=flag(
        "--stack-probes", group=SOLVER, kind="positive_int",
        help="run up to N probes that differ only in their first layer as one forward of N stacked batches "
             "(the same losses; more memory; default 1: one forward per probe, the faster on a CPU)"))
    eval_batch_size: int | None = field(default=None, metadata=flag(
        "--eval-batch-size", group=OUTPUT, kind="positive_int",
        help="images per evaluation batch (default: sized by the input, 32 MB of it: 500 CIFAR images, 55 at "
             "224 x 224)"))
    #: memory limit (MB) of a search: refused before the long work when the estimate of what it holds
    #: before any cache exceeds it (``mpqkit.memory``); the prefix cache gets what the estimate leaves
    max_memory_mb: float | None = field(default=None, metadata=flag(
        "--max-memory", group=SOLVER, kind="float",
        help="memory limit of a search, in MB: a search whose estimated need exceeds it stops before it starts, "
             "naming the smallest limit it fits; the prefix cache is sized within it (default: no limit)"))
    #: memory (MB) for the live tensors the probe engine keeps at layer cuts so later probes start there
    #: instead of at the input (None: 1/8 of the memory available at start, at most 2048 MB)
    prefix_cache_mb: float | None = field(default=None, metadata=flag(
        "--prefix-cache-mb", group=SOLVER, kind="float",
        help="memory for the probe engine's kept layer-cut tensors, in MB (default: 1/8 of the memory available "
             "at start, at most 2048; lower it on a small machine: slower probes, same results)"))
    # -- what is searched
    search: str = field(default="w", metadata=flag(
        "--search", group=SPACE, choices=("w", "a", "wa"),
        help="what to search: weights (default), activations, or both"))
    w_candidates: tuple[int, ...] = field(default=DEFAULT_W_BITS, metadata=flag(
        "--w-candidates", group=SPACE, kind="bits",
        help=f"candidate weight bits (default {','.join(map(str, DEFAULT_W_BITS))})"))
    a_candidates: tuple[int, ...] = field(default=DEFAULT_A_BITS, metadata=flag(
        "--a-candidates", group=SPACE, kind="bits",
        help=f"candidate activation bits when searched (default {','.join(map(str, DEFAULT_A_BITS))})"))
    w_bits: int | None = field(default=None, metadata=flag(
        "--w-bits", group=SPACE, kind="int", help="uniform: weight bits; --search a: the fixed weight bits"))
    a_bits: int | None = field(default=None, metadata=flag(
        "--a-bits", group=SPACE, kind="int", help="activation bits when activations are not searched (default 8)"))
    fixed: tuple[str, ...] | None = field(default=None, metadata=flag(
        "--fixed", group=SPACE, kind="names",
        help="comma-separated layers kept at --fixed-bits (default: first and last)"))
    fixed_bits: tuple[int, int] = field(default=FIXED_BITS, metadata=flag(
        "--fixed-bits", group=SPACE, kind="bits", help="w,a bits of fixed layers (default 8,8)"))
    # -- calibration / sensitivity set
    calib_size: int = field(default=CALIB_SIZE, metadata=flag(
        "--calib-size", "--sens-samples", group=CALIB, kind="int",
        help=f"train images in the calibration / sensitivity set (default {CALIB_SIZE})"))
    seed: int = field(default=0, metadata=flag(
        "--seed", group=CALIB, kind="int",
        help="seed of the calibration draw, projections and permutations (default 0)"))
    #: what a probe measures: "kl" (KL divergence of the probed model's softmax from the fp model's,
    #: per image: label-free, never below the fp model) or "ce" (cross-entropy to the labels)
    objective: str = field(default="kl", metadata=flag(
        "--objective", group=CALIB, choices=OBJECTIVES,
        help="what every probe measures on the sensitivity set: ce = cross-entropy to the labels, kl = KL "
             "divergence from the fp model's outputs (label-free) (default kl)"))
    # -- quantizer (its flags are QuantConfig's fields') and solver
    qconfig: QuantConfig = field(default_factory=QuantConfig)
    time_limit: float = field(default=TIME_LIMIT, metadata=flag(
        "--time-limit", group=SOLVER, kind="float", help=f"solver time limit, seconds (default {TIME_LIMIT:g})"))
    alpha: float = field(default=1.0, metadata=flag(
        "--alpha", group=SOLVER, kind="float", help="weight of activation scores in the ILP (default 1)"))
    #: measured refinement of the method's plan: at most this many probes (0 = off)
    refine: int = field(default=0, metadata=flag(
        "--refine", group=SOLVER, kind="int",
        help="measured refinement of the method's plan: budget-keeping weight-bit moves ordered by the method's "
             "table, each plan measured by the probe engine, kept only when it lowers the loss on both halves of "
             "the calibration set; at most N probes (default 0: off)"))

    def __post_init__(self) -> None:
        # normalise sequences to tuples, so settings are hashable and compare by value
        for name in ("w_candidates", "a_candidates", "fixed_bits", "fixed", "input_shape"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                if isinstance(v, str):
                    raise MpqkitError(f"setting '{name}' must be a sequence, got the string {v!r}")
                object.__setattr__(self, name, tuple(v))
        if self.objective not in OBJECTIVES:
            raise MpqkitError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.search not in ("w", "a", "wa"):
            raise MpqkitError(f"search must be 'w', 'a' or 'wa', got {self.search!r}")
        for name in ("w_candidates", "a_candidates"):
            if not getattr(self, name):
                raise MpqkitError(f"--{name.replace('_', '-')} is empty: give at least one bit-width")
        bits = [*self.w_candidates, *self.a_candidates, *(b for b in (self.w_bits, self.a_bits) if b is not None),
                *self.fixed_bits]
        for b in bits:
            if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise MpqkitError(f"bits must be integers in {MIN_BITS}..{MAX_BITS}, got {b!r}")
        if len(self.fixed_bits) != 2:
            raise MpqkitError(f"fixed_bits takes two integers (w, a), got {self.fixed_bits!r}")
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size < 1:
            raise MpqkitError(f"--calib-size must be a positive integer, got {self.calib_size!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise MpqkitError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if isinstance(self.stack_probes, bool) or not isinstance(self.stack_probes, int) or self.stack_probes < 1:
            raise MpqkitError(f"--stack-probes must be a positive integer, got {self.stack_probes!r}")
        if self.eval_batch_size is not None and (isinstance(self.eval_batch_size, bool) or
                                                 not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1):
            raise MpqkitError(f"--eval-batch-size must be a positive integer, got {self.eval_batch_size!r}")
        if self.prefix_cache_mb is not None and (isinstance(self.prefix_cache_mb, bool) or not isinstance(
                self.prefix_cache_mb, (int, float)) or not self.prefix_cache_mb >= 0):
            raise MpqkitError(f"--prefix-cache-mb must be a number of megabytes ≥ 0, got {self.prefix_cache_mb!r}")
        if self.max_memory_mb is not None and (isinstance(self.max_memory_mb, bool) or not isinstance(
                self.max_memory_mb, (int, float)) or not 0 < self.max_memory_mb < math.inf):
            raise MpqkitError(f"--max-memory must be a finite number of megabytes > 0, got {self.max_memory_mb!r}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise MpqkitError(f"--refine takes a number of probes ≥ 0, got {self.refine!r}")
        if not 0 < self.time_limit < math.inf:
            raise MpqkitError(f"--time-limit must be a finite number of seconds > 0, got {self.time_limit}")
        if not math.isfinite(self.alpha):
            raise MpqkitError(f"--alpha must be a finite number, got {self.alpha}")
        if self.prefix_cache_mb is not None and math.isinf(self.prefix_cache_mb):
            raise MpqkitError("--prefix-cache-mb must be a finite number of megabytes")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed <= MAX_SEED:
            raise MpqkitError(f"--seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # a numpy integer becomes a plain int (JSON, torch)
        if not isinstance(self.qconfig, QuantConfig):
            raise MpqkitError(f"qconfig must be a QuantConfig, got {type(self.qconfig).__name__}")

    def replace(self, **changes: Any) -> "RunSettings":
        """A copy with some settings changed; an unknown name is an error (no silent typo)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UnknownNameError(f"unknown setting(s) {', '.join(unknown)}; settings: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def engine_kwargs(self) -> dict[str, Any]:
        """Probe-engine keyword arguments these settings imply."""
        return {"cache_dir": self.cache_dir, "use_cache": self.use_cache, "batch_size": self.batch_size,
                "progress": self.progress, "objective": self.objective, "prefix_cache_mb": self.prefix_cache_mb,
                "stack": self.stack_probes}

    def model_kwargs(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "models_dir": self.models_dir, "random_init": self.random_init,
                "input_shape": self.input_shape}


def resolve_settings(settings: RunSettings | None, overrides: dict[str, Any]) -> RunSettings:
    """``settings`` (default: all defaults) with keyword overrides applied."""
    base = settings if settings is not None else RunSettings()
    return base.replace(**overrides) if overrides else base


def bits_tuple(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)
