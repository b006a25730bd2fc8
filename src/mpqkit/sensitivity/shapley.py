"""SMPQ and DMPQ: a differentiable bit-width supernet, with the bits chosen by Monte-Carlo Shapley
values of each (layer, bits) candidate (SMPQ) or by the largest architecture parameter (DMPQ).

One supernet run serves both methods. Its records live in the probe cache (``ctx.engine.cache``:
checksummed JSON entries, key = the engine's context + this run's spec; nothing is kept when
caching is off): the finished run, so ``--method dmpq`` after ``--method smpq`` with the same
settings reuses it, and the full state after each epoch (weights, α, α_s, momentum, optimizer and
RNG states, history; tensors as raw bytes, no pickle), so a killed run resumes at its last finished
epoch with the same result as an uninterrupted run. A corrupt record is ignored and recomputed.

* supernet: every searched layer's weight is Σ_b softmax(α_ℓ)_b · Q_b(W_ℓ) (shared fp weights);
  Q_b is the run's weight quantizer, ``ctx.qconfig.w_spec(b)`` (granularity, symmetry, range
  method), through the shared ``weight_qparams``/``fake_quant`` with a straight-through estimator.
  Ranges (option ``ranges``): "step" (default) measures them on the current W at every forward, so
  the supernet trains against the quantizer the plan will apply; "epoch" measures them once at the
  start of each epoch and keeps them while W trains (cheaper; W may drift past them and be clipped).
  Activations stay fp during the search (the plan is applied with the usual activation bits afterwards).
* bi-level training on a train subset split in two halves: weights (SGD) on one half, α (Adam; lr
  0.05 in the quick preset, 0.01 in full) on the other with a cost penalty under softmax(α); the
  first ``warmup`` epochs train weights only. Penalty (option ``penalty``): "budget" (default)
  λ·|u − 1|, u = the largest E[cost_r]/limit_r over the run's budget rows (the shared ILP's rows, so
  any budget metric), which draws the expected cost to the budget; "bits" λ·E[avg weight bits]/max
  bits, blind to the budget. A budget-targeted run serves only its budget
  (``SensitivityTable.for_budget``). Per-epoch accuracies come from the shared
  ``evaluation.evaluate_model``; a coalition's value from one forward on the batch (``_coalition_value``).
* Shapley (after each post-warm-up epoch): players = (layer, bits) candidates; value of a coalition
  (option ``value``) = exp(−mean cross-entropy) of the supernet on a fixed batch of the α half
  ("soft", default: a continuous accuracy) or its top-1 ("top1", the paper's); for each of M
  permutations the players are removed one by one (their mixing weight zeroed, the layer's remaining
  weights renormalised — a layer with no candidate left outputs zero), marginal = value lost; a
  permutation is truncated once the value falls below ``truncate``× the full value. Estimate = mean −
  std over permutations. SMPQ's α_s ← α_s + η·m, m ← μ·m + (1 − μ)·v̂, v̂ = Shapley normalised per layer
  (η 0.1, μ 0.8). Each removal changes one layer's mixture, so each coalition is evaluated from that
  layer on (``_PrefixValue``: the probe engine's traced program, live tensors kept at every searched
  layer's input, at most ``PREFIX_LIMIT_BYTES``; values bitwise equal to full forwards, tested).
  The history records the estimate's noise per epoch (``shapley_snr``: median |mean| over its
  standard error; ``shapley_negative``: share of candidates with mean − std < 0).
  Option ``game`` "layer" (``--shapley-game layer``) plays a smaller game exactly instead: per layer,
  the players are that layer's bit candidates and every other layer keeps its full mixture; all 2^n
  coalitions of each layer are evaluated (from that layer on, through the same prefix runner), so the
  values carry no sampling noise (``shapley_layer_exact``; 18 × 64 coalitions on ResNet-20).
* selection: per layer argmax of α + α_s (SMPQ) or of α (DMPQ); when that plan breaks the budget the
  shared ILP picks the most probable plan within it, cost −log softmax of the same parameters. SMPQ's
  option ``score`` "shapley" (``--smpq-score shapley``) chooses by the Shapley values themselves,
  averaged over the post-warm-up epochs: the plan maximising their sum within the budget
  (``solve/supernet.py``).

Measurements behind these defaults: ``docs/METHODS.md`` (smpq and dmpq).
"""
from __future__ import annotations

import base64
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..engine.cache import ProbeCache
from ..errors import MpqkitError
from ..evaluation import eval_batch_size, evaluate_model
from ..profile import stage
from ..quant.config import QuantConfig
from ..quant.observers import QuantSpec, weight_qparams
from ..quant.primitives import fake_quant
from ..solve import Solution, solve_supernet
from ..solve.ilp import MilpModel
from ..tracing import Program, trace_model
from ..zoo.data import LabeledData
from .base import Decision, SearchContext, SensitivityTable, SolveRequest
from .gradients import chunk_size, grad_pass_mb, require_weight_search
from .options import MethodOptions, option, positive
from .registry import METHODS
from .solvers import need_decision

log = logging.getLogger("mpqkit")
SUPERNET_VERSION = 5  # bump when a change alters supernet results (part of the records' key)
PENALTIES = ("budget", "bits")
PREFIX_LIMIT_BYTES = 2 * 2**30  # Shapley prefix runs keep at most this much; beyond, full forwards
#: input elements per backward pass of a training step: a larger step is split into chunks whose
#: gradients add up (all 128 CIFAR images in one pass; 8 images at 224 x 224)
TRAIN_CHUNK_ELEMENTS = 8 * 3 * 224 * 224
VALUES = ("soft", "top1")
GAMES = ("global", "layer")
SHAPLEY_WEIGHTS = ("supernet", "pretrained")
LAYER_GAME_MAX_BITS = 10  # the layer game evaluates 2^n coalitions per layer


@dataclass(frozen=True)
class SupernetConfig:
    train_size: int = 10_000  # train-split images; half for weights, half for α
    epochs: int = 5
    warmup: int = 2
    batch_size: int = 128
    lr_w: float = 0.01
    lr_alpha: float = 0.01  # the quick preset uses 0.05 (few α steps; see the module docstring)
    lam: float = 0.5
    permutations: int = 6
    val_size: int = 250
    truncate: float = 0.5
    eta: float = 0.1
    value: str = "soft"  # Shapley game value: exp(-mean CE) of the supernet on the batch, or its top-1
    momentum: float = 0.8
    seed: int = 0
    ranges: str = "step"  # quantizer ranges measured every training step, or once per epoch ("epoch")
    penalty: str = "budget"  # |E[cost]/budget - 1| (the run's budget), or E[avg bits]/max bits ("bits")
    game: str = "global"  # Shapley game: all (layer, bits) players by Monte Carlo, or exact per layer ("layer")
    shapley_weights: str = "supernet"  # the game's weights: the supernet's trained ones, or the pretrained ones

    def __post_init__(self) -> None:
        if self.ranges not in ("step", "epoch"):
            raise MpqkitError(f"supernet ranges must be 'step' or 'epoch', got {self.ranges!r}")
        if self.value not in VALUES:
            raise MpqkitError(f"Shapley value must be one of {', '.join(VALUES)}, got {self.value!r}")
        if self.penalty not in PENALTIES:
            raise MpqkitError(f"supernet penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        if self.game not in GAMES:
            raise MpqkitError(f"Shapley game must be one of {', '.join(GAMES)}, got {self.game!r}")
        if self.shapley_weights not in SHAPLEY_WEIGHTS:
            raise MpqkitError(f"Shapley weights must be one of {', '.join(SHAPLEY_WEIGHTS)}, got "
                              f"{self.shapley_weights!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "SupernetConfig":
        """quick: sized for 2 CPU cores (M = 6 permutations on 250 images; the ``draws_resnet20_smpq``
        rows record its search seconds); full: docs/METHODS.md's M = 10, for a GPU."""
        presets = {"quick": {"lr_alpha": 0.05}, "full": {"train_size": 50_000, "epochs": 30, "warmup": 10, "permutations": 10,
                                         "val_size": 1000}}
        if name not in presets:
            raise MpqkitError(f"unknown SMPQ preset '{name}': use quick or full")
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class SupernetOptions(MethodOptions):
    """SMPQ/DMPQ options; unset fields take the preset's value (``SupernetConfig.preset``)."""

    preset: str = option("quick", choices=("quick", "full"),
                         help="quick (CPU: 10k train images, 5 epochs, default) or full (GPU: 50k images, 30 epochs)")
    train_size: int | None = option(None, type=int, help="train images for the supernet (half weights, half α)")
    epochs: int | None = option(None, type=int, help="supernet epochs (the first --warmup train weights only)")
    warmup: int | None = option(None, type=int, help="warm-up epochs (weights only)")
    permutations: int | None = option(None, type=int, help="Monte-Carlo Shapley permutations per epoch "
                                      "(quick preset 6, full 10)")
    lam: float | None = option(None, type=float,
                               help="weight of the expected-bits penalty in the α loss (default 0.5)")
    ranges: str = option("step", choices=("step", "epoch"), flag="--supernet-ranges",
                         help="weight quantizer ranges of the supernet measured at every training step (default) "
                              "or once per epoch (faster with MSE/percentile ranges; see the module docstring)")
    penalty: str = option("budget", choices=PENALTIES, flag="--supernet-penalty",
                          help="cost penalty of the α loss: budget = λ·|E[cost]/budget − 1| under softmax(α), "
                               "drawing the expected cost to the run's budget (default); bits = λ·E[avg bits]/max "
                               "bits, blind to the budget (the earlier rule)")
    value: str = option("soft", choices=VALUES, flag="--shapley-value",
                        help="value of a Shapley coalition: soft = exp(−mean cross-entropy) of the supernet on the "
                             "batch, a continuous accuracy (default); top1 = its top-1 (the paper's)")
    game: str = option("global", choices=GAMES, flag="--shapley-game",
                       help="Shapley game: global = every (layer, bits) candidate a player, Monte-Carlo "
                            "permutations (Shapley-NAS; default); layer = per layer its bit candidates the players, "
                            "the other layers at their full mixtures, computed exactly (2^n coalitions per layer: "
                            "no sampling noise)")
    shapley_weights: str = option("supernet", choices=SHAPLEY_WEIGHTS, flag="--shapley-weights",
                                  help="weights the Shapley game quantizes: the supernet's trained ones (default; "
                                       "co-trained with α's mixture) or the pretrained ones the plan is applied "
                                       "to (mixed by the trained α)")
    score: str = option("alpha", choices=("alpha", "shapley"), flag="--smpq-score",
                        help="smpq: choose by α + α_s (the Shapley-updated α; default) or by the Shapley values "
                             "themselves, averaged over the post-warm-up epochs: argmax per layer, and over budget "
                             "the ILP maximising their sum")
    select: str = option("argmax", choices=("argmax", "ilp"),
                         help="argmax α per layer (default; the ILP only when over budget) or always the ILP on "
                              "−log softmax(α) with the plan spending ≥ 98 %% of the budget: the most probable plan "
                              "of the budget's size (comparisons at equal size)")

    def __post_init__(self) -> None:
        for name in ("train_size", "epochs", "permutations"):
            positive(name, getattr(self, name), "smpq")
        positive("warmup", self.warmup, "smpq", allow_zero=True)
        positive("lam", self.lam, "smpq", allow_zero=True)

    def config(self, seed: int) -> SupernetConfig:
        return SupernetConfig.preset(self.preset, train_size=self.train_size, epochs=self.epochs,
                                     warmup=self.warmup, permutations=self.permutations, lam=self.lam, seed=seed,
                                     ranges=self.ranges, penalty=self.penalty, value=self.value, game=self.game,
                                     shapley_weights=self.shapley_weights)


# ------------------------------------------------------------------ Monte-Carlo Shapley
def shapley_mc(players: Sequence, value: Callable[[frozenset], float], permutations: int, truncate: float = 0.5,
               seed: int = 0) -> tuple[dict, dict, dict]:
    """Monte-Carlo Shapley values by removal: for each random permutation, players are removed one
    by one from the full coalition; a player's marginal is the value lost when it leaves. Once the
    value falls below ``truncate``× the full value the rest of the permutation counts as 0 (their
    marginals are then small by assumption). Returns (mean, std, mean − std) per player."""
    rng = np.random.default_rng(seed)
    players = list(players)
    full = value(frozenset(players))
    samples: dict = {p: [] for p in players}
    for _ in range(permutations):
        order = rng.permutation(len(players))
        present = set(players)
        current = full
        truncated = False
        for i in order:
            p = players[i]
            if truncated:
                samples[p].append(0.0)
                continue
            present.discard(p)
            nxt = value(frozenset(present))
            samples[p].append(current - nxt)
            current = nxt
            if truncate > 0 and current < truncate * full:
                truncated = True
    mean = {p: float(np.mean(v)) for p, v in samples.items()}
    std = {p: float(np.std(v)) for p, v in samples.items()}
    return mean, std, {p: mean[p] - std[p] for p in players}


def shapley_layer_exact(n_layers: int, n_bits: int, value: Callable[[frozenset], float]) -> dict:
    """Exact Shapley values of the per-layer games: for layer i the players are its ``n_bits``
    candidates, every other layer keeps all of its candidates (players ``(layer, bits index)`` as in
    ``shapley_mc``). Each layer's 2^n coalitions are evaluated once, in layer order (so a prefix
    runner starts every evaluation at that layer), and φ_j = Σ_{S ∌ j} |S|!(n−|S|−1)!/n! ·
    (v(S ∪ {j}) − v(S)). Deterministic: no permutations, no sampling noise."""
    if n_bits > LAYER_GAME_MAX_BITS:
        raise MpqkitError(f"the layer Shapley game evaluates 2^n coalitions per layer; {n_bits} bit candidates are "
                          f"too many (at most {LAYER_GAME_MAX_BITS}): use --shapley-game global")
    weight = [math.factorial(k) * math.factorial(n_bits - k - 1) / math.factorial(n_bits) for k in range(n_bits)]
    everyone = frozenset((i, j) for i in range(n_layers) for j in range(n_bits))
    out = {}
    for i in range(n_layers):
        others = everyone - {(i, j) for j in range(n_bits)}
        v = [value(others | {(i, j) for j in range(n_bits) if mask >> j & 1}) for mask in range(2 ** n_bits)]
        for j in range(n_bits):
            out[(i, j)] = float(sum(weight[bin(mask).count("1")] * (v[mask | 1 << j] - v[mask])
                                    for mask in range(2 ** n_bits) if not mask >> j & 1))
    return out


# ------------------------------------------------------------------ supernet
class _MixedWeight(nn.Module):
    """Σ_b w_b · Q_b(W): Q_b is the run's weight quantizer at b bits (``QuantConfig.w_spec``) through
    the shared ``weight_qparams``/``fake_quant`` (straight-through estimator). The quantization
    parameters are those fixed by ``fix_ranges`` (once per epoch), else measured on the current W."""

    def __init__(self, layer: nn.Module, specs: Sequence[QuantSpec]) -> None:
        super().__init__()
        self.layer, self.specs = layer, list(specs)
        self.bits = [s.bits for s in self.specs]
        self.mask = torch.ones(len(self.bits))  # 0 = player removed (Shapley)
        self.frozen: list[Tensor] | None = None  # Q_b(W) kept while W does not change (Shapley)
        self.qparams: list[tuple] | None = None  # (scale, zero point, qmin, qmax) per candidate, when fixed

    def fix_ranges(self, on: bool) -> None:
        """Measure the quantization parameters of the current W now and keep them (``on``), or not."""
        with torch.no_grad():
            self.qparams = [weight_qparams(self.layer.weight, s) for s in self.specs] if on else None

    def quantized(self) -> list[Tensor]:
        if self.frozen is not None:
            return self.frozen
        w = self.layer.weight
        qps = self.qparams if self.qparams is not None else [weight_qparams(w, s) for s in self.specs]
        return [fake_quant(w, *qp) for qp in qps]

    def freeze(self, on: bool) -> None:
        with torch.no_grad():
            self.frozen = None
            self.frozen = [q.detach() for q in self.quantized()] if on else None

    def forward(self, alpha: Tensor) -> Tensor:
        probs = F.softmax(alpha, 0) * self.mask.to(alpha)
        total = probs.sum()
        probs = probs / total if float(total.detach()) > 0 else probs
        out = torch.zeros_like(self.layer.weight)
        for p, q in zip(probs, self.quantized()):
            if float(p.detach()) != 0.0:
                out = out + p * q
        return out


class Supernet(nn.Module):
    """The model with each searched layer's weight replaced, per call, by its α-mixture of
    quantized versions (``torch.func.functional_call``: the fp weights stay the trained parameters).
    ``qconfig``: the run's quantizer settings (default ``QuantConfig()``)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], bits: Sequence[int],
                 qconfig: QuantConfig | None = None) -> None:
        super().__init__()
        qconfig = qconfig or QuantConfig()
        self.net = copy.deepcopy(model)
        self.layers, self.bits = list(layers), list(bits)
        self.alpha = nn.Parameter(torch.zeros(len(self.layers), len(self.bits)))
        self.mixers = [_MixedWeight(self.net.get_submodule(f), [qconfig.w_spec(b) for b in bits])
                       for f in self.layers]

    def mixed(self) -> dict[str, Tensor]:
        """Each searched layer's α-mixed weight, by parameter name."""
        return {f"{f}.weight": m(self.alpha[i]) for i, (f, m) in enumerate(zip(self.layers, self.mixers))}

    def forward(self, x: Tensor, mixed: dict[str, Tensor] | None = None) -> Tensor:
        return functional_call(self.net, self.mixed() if mixed is None else mixed, (x,), strict=False)

    def weight_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "alpha"]

    def fix_ranges(self, on: bool) -> None:
        for m in self.mixers:
            m.fix_ranges(on)

    def expected_bits(self, numel: Tensor) -> Tensor:
        probs = F.softmax(self.alpha, 1)
        b = torch.tensor(self.bits, dtype=probs.dtype, device=probs.device)
        return ((probs * b).sum(1) * numel).sum() / numel.sum()


def _top1(net: nn.Module, data: LabeledData) -> float:
    return float(evaluate_model(net, data)["top1"])  # batches sized by the input: all 250 CIFAR images at once


def train_chunk(images: Tensor, batch_size: int) -> int:
    """Images per backward pass of a ``batch_size``-image training step (``TRAIN_CHUNK_ELEMENTS``)."""
    return chunk_size(images, TRAIN_CHUNK_ELEMENTS, batch_size)


def step_backward(sup: Supernet, x: Tensor, y: Tensor, chunk: int, extra: Tensor | None = None) -> None:
    """Backpropagate the mean cross-entropy of the batch (plus ``extra``, e.g. the α penalty) into the
    supernet's parameters, ``chunk`` images per pass: the mixed weights are computed once and their
    gradients summed over the chunks, so a chunked step gives the whole batch's gradients (up to float
    rounding), except that train-mode BatchNorm normalises each chunk by its own statistics. A batch
    within one chunk runs as a single pass."""
    if len(x) <= chunk:
        loss = F.cross_entropy(sup(x), y)
        (loss if extra is None else loss + extra).backward()
        return
    mixed = sup.mixed()
    leaves = {k: v.detach().requires_grad_() for k, v in mixed.items()}
    for s in range(0, len(x), chunk):
        (F.cross_entropy(sup(x[s:s + chunk], leaves), y[s:s + chunk], reduction="sum") / len(x)).backward()
    tensors = list(mixed.values()) + ([extra] if extra is not None else [])
    grads = [leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(v) for k, v in mixed.items()]
    torch.autograd.backward(tensors, grads + ([torch.ones_like(extra)] if extra is not None else []))


def supernet_memory(ctx: SearchContext) -> float:
    """MB smpq / dmpq hold beside the probe engine (``Method.memory``): the backward pass of one
    training chunk, and the train images (loaded here; the search reads the same cached set)."""
    cfg = ctx.options.config(ctx.seed)  # type: ignore[attr-defined]
    assert ctx.load_train is not None
    data = ctx.load_train(cfg.train_size, cfg.seed)
    return grad_pass_mb(ctx.graph, train_chunk(data.images, cfg.batch_size)) + \
        data.images.numel() * data.images.element_size() / 2 ** 20


# ------------------------------------------------------------------ records in the probe cache
def _encode(obj: Any) -> Any:
    """A JSON value for a tree of tensors, dicts (any keys), lists, tuples and scalars: tensors as
    their raw bytes in base64 (exact), no pickle."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": [str(t.dtype).removeprefix("torch."), list(t.shape), base64.b64encode(raw).decode()]}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a supernet record cannot hold a {type(obj).__name__}")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, dict):
        ((tag, val),) = obj.items()
        if tag == "__tensor__":
            name, shape, b64 = val
            dtype = getattr(torch, name)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"not a dtype: {name}")
            raw = base64.b64decode(b64, validate=True)
            if not raw:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        if tag == "__dict__":
            return {_decode(k): _decode(v) for k, v in val}
        if tag == "__tuple__":
            return tuple(_decode(v) for v in val)
        raise ValueError(f"unknown record tag {tag!r}")
    return obj


class _Records:
    """The run's records in the probe cache (checksummed JSON; a corrupt entry reads as missing and
    is recomputed): the finished result, and the full state after each epoch (the last two are
    kept, so a damaged latest one falls back to the one before; all are dropped once finished)."""

    def __init__(self, cache: ProbeCache | None, spec: dict[str, Any], stats: dict[str, Any] | None = None) -> None:
        self.cache, self.spec, self.stats = cache, spec, stats

    def _key(self, record: str, epoch: int | None = None) -> str:
        assert self.cache is not None
        return self.cache.key({"supernet": self.spec, "record": record, "epoch": epoch})

    def _get(self, key: str, kind: str) -> dict[str, Any] | None:
        assert self.cache is not None
        hit = self.cache.get(key)
        if hit is not None and hit.get("kind") != kind:
            return None
        if hit is not None and self.stats is not None:
            self.stats["cache_hits"] = self.stats.get("cache_hits", 0) + 1
        return hit

    def result(self) -> dict[str, Any] | None:
        if self.cache is None:
            return None
        hit = self._get(self._key("result"), "smpq-supernet-result")
        return None if hit is None else {k: v for k, v in hit.items() if k != "kind"}

    def put_result(self, result: dict[str, Any], epochs: int) -> None:
        if self.cache is None:
            return
        self.cache.put(self._key("result"), {**result, "kind": "smpq-supernet-result"})
        for e in range(1, epochs + 1):
            self.cache.discard(self._key("state", e))

    def latest_state(self, epochs: int) -> dict[str, Any] | None:
        """The state after the last finished epoch that reads back intact (None: start afresh)."""
        if self.cache is None:
            return None
        for e in range(epochs, 0, -1):
            hit = self._get(self._key("state", e), "smpq-supernet-state")
            if hit is not None and hit.get("epoch") == e:
                return hit
        return None

    def put_state(self, epoch: int, payload: dict[str, Any]) -> None:
        if self.cache is None:
            return
        self.cache.put(self._key("state", epoch), {**payload, "epoch": epoch, "kind": "smpq-supernet-state"})
        if epoch > 2:
            self.cache.discard(self._key("state", epoch - 2))


class _BudgetPenalty:
    """u(α) = max_r E_softmax(α)[cost_r] / limit_r over the run's network-wide budget rows (the
    shared ILP's rows, ``MilpModel.budget_arrays``); the penalty is |u − 1|. ``usage`` is u."""

    def __init__(self, ctx: SearchContext) -> None:
        model = MilpModel(ctx.problem)
        costs, limits, _ = model.budget_arrays()
        a = ctx.problem.a_bits[0]
        cols = [model.choices.index((b, a)) for b in ctx.w_bits]
        self.costs = torch.tensor(costs[:, :, cols] / limits[:, None, None], dtype=torch.float32)  # (R, L, K)

    def usage(self, alpha: Tensor) -> Tensor:
        probs = F.softmax(alpha, 1)
        return (probs[None] * self.costs.to(probs)).sum((1, 2)).max()

    def __call__(self, alpha: Tensor) -> Tensor:
        return (self.usage(alpha) - 1).abs()

    def spec(self) -> list:
        return np.round(self.costs.numpy().astype(np.float64), 12).tolist()


def _budget_penalty(ctx: SearchContext, cfg: SupernetConfig) -> _BudgetPenalty | None:
    """The budget-targeted penalty, or None for the bits penalty (option, or no budget row to target)."""
    if cfg.penalty != "budget":
        return None
    if ctx.problem is None or not ctx.problem.constraints:
        log.warning("smpq: no budget to target, the α penalty is λ·E[avg bits]/max bits")
        return None
    pen = _BudgetPenalty(ctx)
    if not len(pen.costs):
        log.warning("smpq: only per-layer budget rows, the α penalty is λ·E[avg bits]/max bits")
        return None
    return pen


def _run_spec(ctx: SearchContext, cfg: SupernetConfig, data_sha: str,
              budget: _BudgetPenalty | None, chunk: int) -> dict[str, Any]:
    """What, besides the engine's cache context (model weights, calibration data, quantizer config,
    seed, engine version), decides the run's result (with a budget-targeted penalty: the budget;
    with steps split into chunks, the chunk: train-mode BatchNorm sees each chunk's statistics)."""
    config = asdict(cfg)
    if cfg.shapley_weights == "supernet":  # the default: runs recorded before the option keep their key
        del config["shapley_weights"]
    return {"version": SUPERNET_VERSION, "layers": list(ctx.searched), "bits": list(ctx.w_bits),
            "config": config, "train_data": data_sha, "qconfig": ctx.qconfig.to_dict(),
            "device": torch.device(ctx.device).type, "budget_costs": None if budget is None else budget.spec(),
            **({"train_chunk": chunk} if chunk < cfg.batch_size else {})}  # whole steps keep their earlier key


def _grid(est: dict, n_layers: int, n_bits: int) -> list[list[float]]:
    return [[float(est[(i, j)]) for j in range(n_bits)] for i in range(n_layers)]


def train_supernet(ctx: SearchContext, cfg: SupernetConfig) -> dict:
    """Run (or resume, or read) the supernet search; returns α, α_s and the Shapley estimates."""
    assert ctx.load_train is not None, "the supernet needs ctx.load_train"
    dev = torch.device(ctx.device)
    data = ctx.load_train(cfg.train_size, cfg.seed)
    half = len(data) // 2
    val = data.subset(torch.arange(half, min(len(data), half + cfg.val_size)))
    val = LabeledData(val.images.to(dev), val.labels.to(dev), val.name, val.split, val.classes)
    budget = _budget_penalty(ctx, cfg)
    chunk = train_chunk(data.images, cfg.batch_size)
    records = _Records(ctx.engine.cache, _run_spec(ctx, cfg, data.sha256(), budget, chunk), ctx.engine.stats)
    done = records.result()
    if done is not None:
        return done
    run = _SupernetRun(ctx, cfg, dev, budget)
    run.resume(records.latest_state(cfg.epochs))
    for epoch in range(run.start, cfg.epochs):
        t0 = time.perf_counter()
        run.train_epoch(epoch, data.images[:half], data.labels[:half], data.images[half:], data.labels[half:])
        row = run.evaluate(epoch, val, time.perf_counter() - t0)
        if epoch >= cfg.warmup:
            run.shapley_step(epoch, val, row)
        run.history.append(row)
        log.info("smpq: epoch %d %s", epoch, row)
        records.put_state(epoch + 1, run.state())
    result = run.result(val)
    result["train_images"] = len(data)
    records.put_result(result, cfg.epochs)
    return result


class _SupernetRun:
    """The state of one supernet search (weights, α, optimizers, Shapley-updated α_s and its momentum,
    the permutation generator, the per-epoch history), and its steps."""

    def __init__(self, ctx: SearchContext, cfg: SupernetConfig, dev: torch.device, budget: Any) -> None:
        self.ctx, self.cfg, self.dev, self.budget = ctx, cfg, dev, budget
        self.numel = torch.tensor([float(ctx.model.get_submodule(f).weight.numel()) for f in ctx.searched], device=dev)
        self._pretrained: Supernet | None = None
        # the Shapley game's kept tensors share the memory the search gave the probe engine's prefix cache
        self.limit = min(PREFIX_LIMIT_BYTES, ctx.engine.prefix_cache_bytes)
        self.fresh()

    def fresh(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        torch.manual_seed(cfg.seed)
        self.sup = Supernet(ctx.model, ctx.searched, ctx.w_bits, ctx.qconfig).to(self.dev)
        self.opt_w = torch.optim.SGD(self.sup.weight_params(), lr=cfg.lr_w, momentum=0.9, weight_decay=5e-4)
        self.opt_a = torch.optim.Adam([self.sup.alpha], lr=cfg.lr_alpha)
        self.alpha_s = torch.zeros_like(self.sup.alpha)
        self.mom = torch.zeros_like(self.sup.alpha)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.history: list[dict] = []
        self.shap: list[list[float]] | None = None
        self.start = 0

    def resume(self, saved: dict | None) -> None:
        """Continue from a saved epoch record; one that does not fit is ignored (start over), never trusted."""
        if saved is None:
            return
        try:
            st = _decode(saved["state"])
            self.sup.load_state_dict(st["supernet"])
            self.opt_w.load_state_dict(st["opt_w"])
            self.opt_a.load_state_dict(st["opt_a"])
            self.alpha_s, self.mom = st["alpha_s"].to(self.dev), st["mom"].to(self.dev)
            self.gen.set_state(st["gen"])
            self.history, self.shap, self.start = list(saved["history"]), saved["shapley"], int(saved["epoch"])
            log.info("smpq: resuming the supernet run at epoch %d", self.start)
        except Exception as e:  # noqa: BLE001 - a record that does not fit is recomputed, never trusted
            log.warning("smpq: ignoring a supernet record that does not fit (%s: %s)", type(e).__name__,
                        str(e)[:100])
            self.fresh()

    def train_epoch(self, epoch: int, xw: Tensor, yw: Tensor, xa: Tensor, ya: Tensor) -> None:
        """One epoch: weight steps on the first half; after warm-up, an α step on the second half
        after each (cross-entropy plus λ × the budget penalty or the expected bits)."""
        cfg, sup, dev = self.cfg, self.sup, self.dev
        sup.train()
        sup.fix_ranges(cfg.ranges == "epoch")
        perm_w = torch.randperm(len(xw), generator=self.gen)
        perm_a = torch.randperm(len(xa), generator=self.gen)
        chunk = train_chunk(xw, cfg.batch_size)
        for s in range(len(xw) // cfg.batch_size):
            iw = perm_w[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            self.opt_w.zero_grad(set_to_none=True)
            step_backward(sup, xw[iw].to(dev), yw[iw].to(dev), chunk)
            sup.alpha.grad = None
            self.opt_w.step()
            if epoch >= cfg.warmup:
                ia = perm_a[(s * cfg.batch_size) % len(xa):][:cfg.batch_size]
                self.opt_a.zero_grad(set_to_none=True)
                for p in sup.weight_params():
                    p.grad = None
                penalty = self.budget(sup.alpha) if self.budget is not None else \
                    sup.expected_bits(self.numel) / max(self.ctx.w_bits)
                step_backward(sup, xa[ia].to(dev), ya[ia].to(dev), chunk, cfg.lam * penalty)
                self.opt_a.step()
        sup.fix_ranges(False)
        sup.eval()

    def evaluate(self, epoch: int, val: LabeledData, train_s: float) -> dict:
        row = {"epoch": epoch, "val_top1": _top1(self.sup, val), "train_s": train_s,
               "expected_avg_bits": float(self.sup.expected_bits(self.numel).detach())}
        if self.budget is not None:
            row["budget_usage"] = float(self.budget.usage(self.sup.alpha.detach()))
        return row

    def game_net(self) -> Supernet:
        """The supernet the Shapley game plays on: the trained one, or the pretrained weights mixed by its α."""
        if self.cfg.shapley_weights == "supernet":
            return self.sup
        if self._pretrained is None:
            self._pretrained = Supernet(self.ctx.model, self.ctx.searched, self.ctx.w_bits,
                                        self.ctx.qconfig).to(self.dev).eval()
        with torch.no_grad():
            self._pretrained.alpha.copy_(self.sup.alpha)
        return self._pretrained

    def shapley_step(self, epoch: int, val: LabeledData, row: dict) -> None:
        """Estimate the Shapley values, move α_s by their momentum, and record the estimate's noise."""
        cfg = self.cfg
        t1 = time.perf_counter()
        with stage("shapley"):
            est, mean_, std_ = _shapley(self.game_net(), val, cfg, seed=cfg.seed * 1000 + epoch, limit=self.limit)
        self.shap = _grid(est, len(self.sup.layers), len(self.sup.bits))
        v = torch.tensor(self.shap, device=self.dev)
        vhat = v / (v.abs().sum(1, keepdim=True) + 1e-12)
        self.mom = cfg.momentum * self.mom + (1 - cfg.momentum) * vhat
        self.alpha_s = self.alpha_s + cfg.eta * self.mom
        row["shapley_s"] = time.perf_counter() - t1
        # noise of the estimate: |mean| over its standard error (median over candidates), and the
        # share of candidates whose mean − std is negative (std larger than the mean itself)
        if cfg.game == "global":  # the layer game is exact: no sampling noise to report
            m_, s_ = np.array(list(mean_.values())), np.array(list(std_.values()))
            row["shapley_snr"] = float(np.median(np.abs(m_) / (s_ / math.sqrt(cfg.permutations) + 1e-12)))
            row["shapley_negative"] = float(np.mean(m_ - s_ < 0))
        row["shapley_grid"] = self.shap  # raw values: SMPQ's --smpq-score shapley averages them
        # how far Shapley moved the choice: layers whose argmax of α + α_s differs from argmax α
        alpha = self.sup.alpha.detach()
        row["shapley_moved_layers"] = int(((alpha + self.alpha_s).argmax(1) != alpha.argmax(1)).sum())

    def state(self) -> dict:
        """What an epoch record holds, so that a killed run resumes after this epoch."""
        return {"history": self.history, "shapley": self.shap, "state": _encode(
            {"supernet": self.sup.state_dict(), "opt_w": self.opt_w.state_dict(), "opt_a": self.opt_a.state_dict(),
             "alpha_s": self.alpha_s, "mom": self.mom, "gen": self.gen.get_state()})}

    def result(self, val: LabeledData) -> dict:
        cfg, sup = self.cfg, self.sup
        alpha = sup.alpha.detach().cpu()
        shap = self.shap
        if shap is None:  # no post-warm-up epoch: one estimate now so SMPQ has values to rank
            with stage("shapley"):
                est, _, _ = _shapley(self.game_net(), val, cfg, seed=cfg.seed * 1000 + cfg.epochs, limit=self.limit)
            shap = _grid(est, len(sup.layers), len(sup.bits))
        grids = [r["shapley_grid"] for r in self.history if "shapley_grid" in r] or [shap]
        return {"alpha": alpha.tolist(), "alpha_s": (alpha + self.alpha_s.cpu()).tolist(), "shapley": shap,
                "shapley_mean": np.mean(np.asarray(grids, dtype=float), axis=0).tolist(),
                "history": self.history, "layers": list(sup.layers), "bits": list(sup.bits), "config": asdict(cfg),
                "budget_targeted": self.budget is not None, "quantizer": self.ctx.qconfig.to_dict()}


def _coalition_value(logits: Tensor, labels: Tensor, kind: str) -> float:
    """The game's value of one forward: top-1, or exp(−mean cross-entropy) (as ``evaluate_model``)."""
    if kind == "top1":
        return int((logits.argmax(1) == labels).sum()) / len(labels)
    return math.exp(-F.cross_entropy(logits.float(), labels, reduction="sum").item() / len(labels))


class _PrefixValue:
    """Coalition values of the supernet, each forward starting at the earliest layer whose mixture
    differs from the last coalition evaluated (or from the full one), from the live tensors kept at
    every searched layer's input: the probe engine's traced program (``tracing.Program``) on a
    copy of the supernet's network whose searched weights are set to the coalition's mixtures. A
    Shapley permutation removes one player at a time, so each value runs from that layer on."""

    def __init__(self, sup: Supernet, val: LabeledData, kind: str, limit: int = PREFIX_LIMIT_BYTES) -> None:
        self.sup, self.kind = sup, kind
        self.y = val.labels
        net = copy.deepcopy(sup.net).eval()
        gm = trace_model(net)
        if gm is None:
            raise ValueError("not traceable")
        self.prog = Program(gm, sup.layers, fold_bn=False)  # weights change between calls: nothing fused
        if any(f not in self.prog.cut for f in sup.layers):
            raise ValueError("a searched layer is not a traced module call")
        self.order = sorted(range(len(sup.layers)), key=lambda i: self.prog.cut[sup.layers[i]])
        self.cuts = [self.prog.cut[sup.layers[i]] for i in self.order]  # node index of each kept input
        self.weights = [self.prog.modules[f].weight for f in sup.layers]
        n = len(sup.bits)
        self.full_masks = tuple((1.0,) * n for _ in sup.layers)
        self.set_masks: list[tuple] = [()] * len(sup.layers)  # the masks the copy's weights now hold
        # two sets of kept tensors (full coalition, last one): measured on one image, bounded
        self.x = val.images[:1]
        one, _ = self._run(self.full_masks, [None] * len(self.order), 0)
        per_image = sum({id(t): t.numel() * t.element_size() for env in one for t in env.values()
                         if isinstance(t, Tensor)}.values())
        if 2 * per_image * len(val) > limit:
            raise ValueError(f"kept tensors would take {2 * per_image * len(val) / 2**20:.0f} MiB")
        self.x = val.images
        self.full_env, self.full_value = self._run(self.full_masks, [None] * len(self.order), 0)
        self.cur_env, self.cur_masks, self.cur_value = list(self.full_env), self.full_masks, self.full_value
        self.layer_runs = 0  # layers run, for the speed-up against full forwards

    def _run(self, masks: tuple, env_at: list, k: int) -> tuple[list, float]:
        with torch.no_grad():
            for pos in range(k, len(self.order)):
                i = self.order[pos]
                if self.set_masks[i] != masks[i]:
                    m = self.sup.mixers[i]
                    m.mask = torch.tensor(masks[i])
                    self.weights[i].copy_(m(self.sup.alpha[i]))
                    m.mask = torch.ones(len(self.sup.bits))
                    self.set_masks[i] = masks[i]
            env_at = list(env_at)
            cut = self.cuts
            env = env_at[k] if k > 0 else self.prog.run(self.prog.initial_env(self.x), 0, cut[0], {})
            for pos in range(k, len(cut)):
                env_at[pos] = env
                stop = cut[pos + 1] if pos + 1 < len(cut) else None
                env = self.prog.run(env, cut[pos], stop, {})
            return env_at, _coalition_value(env, self.y[:len(self.x)], self.kind)

    def __call__(self, present: frozenset) -> float:
        n = len(self.sup.bits)
        masks = tuple(tuple(1.0 if (i, j) in present else 0.0 for j in range(n)) for i in range(len(self.sup.layers)))

        def first_change(ref: tuple) -> int:
            return next((pos for pos, i in enumerate(self.order) if masks[i] != ref[i]), len(self.order))

        k_cur, k_full = first_change(self.cur_masks), first_change(self.full_masks)
        if max(k_cur, k_full) == len(self.order):
            return self.cur_value if k_cur == len(self.order) else self.full_value
        base = self.cur_env if k_cur >= k_full else self.full_env
        k = max(k_cur, k_full)
        self.layer_runs += len(self.order) - k
        self.cur_env, self.cur_value = self._run(masks, base, k)
        self.cur_masks = masks
        return self.cur_value


def _shapley(sup: Supernet, val: LabeledData, cfg: SupernetConfig, seed: int, limit: int = PREFIX_LIMIT_BYTES):
    """Shapley estimates of every (layer, bits) player; ``limit``: bytes the prefix runs may keep
    (beyond it, a full forward per coalition, in batches sized by the input)."""
    players = [(i, j) for i in range(len(sup.layers)) for j in range(len(sup.bits))]
    batch = eval_batch_size(val)

    def full_forward(present: frozenset) -> float:
        for i, m in enumerate(sup.mixers):
            m.mask = torch.tensor([1.0 if (i, j) in present else 0.0 for j in range(len(sup.bits))])
        try:
            logits = torch.cat([sup(val.images[s:s + batch]) for s in range(0, len(val), batch)])
            return _coalition_value(logits, val.labels, cfg.value)
        finally:
            for m in sup.mixers:
                m.mask = torch.ones(len(sup.bits))

    for m in sup.mixers:  # weights are fixed during the estimate: quantize each once
        m.freeze(True)
    was_training = sup.training
    sup.eval()
    try:
        with torch.no_grad():  # not inference_mode: the masks set here are used in training later
            try:
                value: Callable[[frozenset], float] = _PrefixValue(sup, val, cfg.value, limit)
            except ValueError as e:  # untraceable, or too large to keep: a full forward per coalition (same values)
                log.info("smpq: Shapley values by full forwards (%s)", e)
                value = full_forward
            if cfg.game == "layer":
                est = shapley_layer_exact(len(sup.layers), len(sup.bits), value)
                mean, std = est, {p: 0.0 for p in est}
            else:
                mean, std, est = shapley_mc(players, value, cfg.permutations, cfg.truncate, seed)
    finally:
        for m in sup.mixers:
            m.freeze(False)
        sup.train(was_training)
    return est, mean, std


def _run(ctx: SearchContext) -> dict:
    require_weight_search(ctx, "smpq/dmpq")
    with stage("supernet training"):
        return train_supernet(ctx, ctx.options.config(ctx.seed))  # type: ignore[attr-defined]


def _table(ctx: SearchContext, run: dict, which: str) -> SensitivityTable:
    """The method's choice per layer (argmax of α + α_s for SMPQ, of α for DMPQ) and, for plans over
    budget, the ILP cost −log softmax of the same parameters: the plan the method's own distribution
    rates most probable among those within the budget (the argmax plan when it fits). SMPQ with
    ``score="shapley"``: the mean Shapley values instead, cost max − value (the ILP maximises their sum)."""
    layers, bits = run["layers"], run["bits"]
    opts = ctx.options
    assert isinstance(opts, SupernetOptions)
    by_shapley = which == "smpq" and opts.score == "shapley"
    if by_shapley:  # the Shapley values themselves: the plan maximising their sum within the budget
        choice = np.asarray(run.get("shapley_mean", run["shapley"]), dtype=float)
        cost = choice.max(1, keepdims=True) - choice
        score = "max Shapley - Shapley (mean over the post-warm-up epochs)"
    else:
        choice = np.asarray(run["alpha_s"] if which == "smpq" else run["alpha"], dtype=float)
        z = choice - choice.max(1, keepdims=True)
        cost = -(z - np.log(np.exp(z).sum(1, keepdims=True)))
        score = "-log softmax(alpha + alpha_s)" if which == "smpq" else "-log softmax(alpha)"
    w = {f: {b: float(cost[i, j]) for j, b in enumerate(bits)} for i, f in enumerate(layers)}
    argmax = {f: bits[int(np.argmax(choice[i]))] for i, f in enumerate(layers)}
    meta = {"score": score, "shapley_mean": run.get("shapley_mean"),
            "alpha": run["alpha"], "alpha_s": run["alpha_s"], "shapley": run["shapley"], "history": run["history"],
            "supernet_config": run["config"], "supernet_quantizer": run["quantizer"],
            "train_images": run["train_images"], "budget_targeted": run.get("budget_targeted", False)}
    return SensitivityTable(w=w, decision=Decision(argmax_bits=argmax), meta=meta,
                            for_budget=bool(run.get("budget_targeted")))


def supernet_solver(req: SolveRequest) -> Solution:
    """Argmax of the method's α when it fits, else the ILP on its costs (``--select``)."""
    dec, table = need_decision(req), req.table
    opts = req.options
    assert isinstance(opts, SupernetOptions) and table is not None
    if dec.argmax_bits is None:
        raise RuntimeError("a supernet method must give its per-layer bits (Decision.argmax_bits)")
    return solve_supernet(req.problem, dec.argmax_bits, table.w, req.time_limit, select=opts.select)


@METHODS.register("smpq", "supernet + Monte-Carlo Shapley value of each (layer, bits); argmax of Shapley-updated α "
                  "(ILP on −Shapley when over budget)", solver=supernet_solver, options=SupernetOptions,
                  memory=supernet_memory, decides=True)
def smpq(ctx: SearchContext) -> SensitivityTable:
    return _table(ctx, _run(ctx), "smpq")


@METHODS.register("dmpq", "the same supernet, argmax of the trained α (the baseline SMPQ improves on)",
                  solver=supernet_solver, options=SupernetOptions, memory=supernet_memory, decides=True)
def dmpq(ctx: SearchContext) -> SensitivityTable:
    return _table(ctx, _run(ctx), "dmpq")
