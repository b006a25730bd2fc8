"""What every method shares: the search context, the sensitivity table, and the method registry.

A method = a registered name → (sensitivity function, solver). Sensitivity functions receive a
``SearchContext`` and must take all their measurements through ``ctx.engine`` (the one probe
engine), never re-implementing quantization, layer discovery or evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..engine.probe import ProbeEngine
from ..fileutil import atomic_write_text, json_text
from ..graph import ModelGraph
from ..quant.config import QuantConfig
from ..solve.problem import TIME_LIMIT, Allocation
from ..zoo.data import LabeledData
from .options import MethodOptions

if TYPE_CHECKING:  # annotations only: settings sits above the methods
    from ..settings import RunSettings


@dataclass
class SearchContext:
    model: nn.Module
    graph: ModelGraph
    calib_images: torch.Tensor
    calib_labels: torch.Tensor
    searched: list[str]
    w_bits: list[int]
    a_bits: list[int | None]
    search_w: bool = True
    search_a: bool = False
    qconfig: QuantConfig = field(default_factory=QuantConfig)
    seed: int = 0
    #: the method's typed options (``Method.options``), already validated
    options: MethodOptions = field(default_factory=MethodOptions)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: (n, seed) → a labelled subset of the training split (methods that train, e.g. SMPQ's supernet)
    load_train: Callable[[int, int], LabeledData] | None = None
    #: n → up to n training images disjoint from the calibration draw (methods that select on held-out data)
    load_heldout: Callable[[int], LabeledData] | None = None
    #: the allocation the plan will solve (budget, candidates, fixed layers): for methods that solve inside
    problem: Allocation | None = None
    #: the run's settings (solver time limit, alpha, pruning, …); None for a context built by hand
    settings: "RunSettings | None" = None
    _engine: ProbeEngine | None = None

    @property
    def engine(self) -> ProbeEngine:
        """The probe engine on the calibration set, built on first use (uniform never builds it)."""
        if self._engine is None:
            self._engine = ProbeEngine(self.model, self.graph, self.calib_images, self.calib_labels,
                                       qconfig=self.qconfig, seed=self.seed, **self.engine_kwargs)
        return self._engine

    def engine_stats(self) -> dict[str, Any]:
        """What the probe engine did (empty when the method needed none, e.g. data-free ones)."""
        if self._engine is None:
            return {}
        return {**self._engine.stats, "fp_calib_loss": self._engine.fp.loss, "fp_calib_top1": self._engine.fp.top1}


@dataclass
class Decision:
    """What a method that decides its plan itself gives its solver (beside or instead of scores):
    ``argmax_bits`` (supernet methods: the per-layer bits of the method's own rule), ``pareto``
    (greedy: the measured configurations its solver picks from), ``assignment`` (auto: the plan it
    chose) with ``trials`` (what it tried). A method registered with ``decides=True`` returns one."""

    argmax_bits: dict[str, int] | None = None
    pareto: list[dict[str, Any]] | None = None
    assignment: dict[str, tuple[int, int | None]] | None = None
    trials: list[dict[str, Any]] | None = None


@dataclass
class SensitivityTable:
    """Scores to minimise per (layer, bits): ``w`` for weight bits, ``a`` for activation bits;
    ``pairs`` (CLADO) holds the joint score of two layers' weight choices, keyed (ℓ, b, m, c).
    ``pruned``: weight candidates the method skipped because a bound showed the budget's plan cannot
    choose them, each with that lower bound of its score (never a measurement; ``w`` holds only
    measured scores). ``for_budget``: the measurement depends on the run's budget (auto, a
    budget-targeted supernet, a pruned table), so a sweep must not reuse it for another budget.
    ``decision``: what a deciding method chose (``Decision``; None for a method that only measures).
    ``meta`` is descriptive only (written to the results directory); no solver reads it."""

    w: dict[str, dict[int, float]]
    a: dict[str, dict[int, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    pairs: dict[tuple[str, int, str, int], float] = field(default_factory=dict)
    pruned: dict[str, dict[int, float]] = field(default_factory=dict)
    for_budget: bool = False
    decision: Decision | None = None

    @property
    def w_bounded(self) -> dict[str, dict[int, float]]:
        """Every weight candidate's score: the measured one, else its pruning bound."""
        if not self.pruned:
            return self.w
        return {f: {**self.pruned.get(f, {}), **self.w.get(f, {})} for f in {**self.w, **self.pruned}}

    @property
    def reusable(self) -> bool:
        """Whether a search for another budget may solve from this table instead of measuring again."""
        return (self.decision is None or self.decision.assignment is None) and not self.for_budget

    @property
    def flat(self) -> bool:
        """Whether every score (weights, activations, pairs) is the same number: a measurement with no
        signal, from which any allocation within the budget would be 'optimal'. Tables that carry a
        decision of their own (assignment, argmax bits, Pareto list) are never flat."""
        values = [v for part in (self.w, self.a) for scores in part.values() for v in scores.values()]
        values += list(self.pairs.values())
        if self.decision is not None or not values:
            return False
        return max(values) - min(values) <= 1e-12 * max(1.0, abs(max(values)))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"w": self.w, "a": self.a, "meta": self.meta}
        if self.pairs:
            d["pairs"] = {f"{f}@{b}|{g}@{c}": v for (f, b, g, c), v in self.pairs.items()}
        dec = self.decision or Decision()
        if dec.argmax_bits is not None:
            d["argmax_bits"] = dec.argmax_bits
        if dec.pareto is not None:
            d["pareto"] = dec.pareto
        if dec.assignment is not None:
            d["assignment"] = {f: list(c) for f, c in dec.assignment.items()}
        if dec.trials is not None:
            d["trials"] = dec.trials
        if self.pruned:
            d["pruned_lower_bounds"] = self.pruned
        return d

    def save(self, path) -> None:
        atomic_write_text(path, json_text(self.to_dict(), "the sensitivity table", indent=1) + "\n")


@dataclass(frozen=True)
class SolveRequest:
    """Everything a method's solver needs besides the table: the allocation problem, the method's
    options and the run's solver settings."""

    problem: Allocation
    table: SensitivityTable | None
    options: MethodOptions
    has_budget: bool
    method: str = "this method"  #: the method's name, for messages
    search: str = "w"
    w_bits: int | None = None
    a_bits: int | None = None
    alpha: float = 1.0
    time_limit: float = TIME_LIMIT
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """A registry entry: the sensitivity measurement, the solver that turns its table into bits,
    and the typed options class (defaults included)."""

    name: str
    description: str
    sensitivity: Callable[[SearchContext], SensitivityTable] | None
    solver: Callable[[SolveRequest], Any]
    options: type[MethodOptions] = MethodOptions
    #: the search's context (its options the method's own) → MB the method holds beside the probe engine
    #: (e.g. a gradient pass on a chunk), for ``--max-memory``'s estimate (``mpqkit.memory``); None: nothing
    memory: "Callable[[SearchContext], float] | None" = None
    #: the method decides its plan itself (its table carries a ``Decision``) rather than only measuring
    decides: bool = False

    def measure(self, ctx: SearchContext) -> SensitivityTable:
        """The method's table for ``ctx``, checked to be what its kind promises: a ``Decision`` from a
        deciding method, none from a measuring one."""
        if self.sensitivity is None:
            raise RuntimeError(f"method '{self.name}' measures nothing")
        table = self.sensitivity(ctx)
        if self.decides != (table.decision is not None):
            raise RuntimeError(f"method '{self.name}' is registered as {'deciding' if self.decides else 'measuring'} "
                               f"but its table {'lacks' if self.decides else 'carries'} a Decision")
        return table

    def make_options(self, values: "MethodOptions | dict[str, Any] | None") -> MethodOptions:
        return self.options.from_mapping(values, self.name)
