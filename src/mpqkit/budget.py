"""Budgets and the one cost ledger shared by solvers, plans and reports.

Grammar (several terms joined by commas must all hold):
  ``size=1.2MB`` (also B/KB/GB; 2^10 multiples) · ``size=0.09x`` (fraction of the fp32 size) ·
  ``cr=10.7`` (compression ratio vs fp32) · ``avg-bits=3`` (weight size of uniform 3-bit on the
  searched layers) · ``bitops=0.35G`` (K/M/G/T, powers of 10) · ``act-mem=64KB`` (largest
  single-layer input activation) · ``act-mem-sum=1MB`` (sum over layers).

Costs (docs/METHODS.md "Shared definitions"): weight bits = Σ numel·w_bits + 32 per other parameter;
BitOps = Σ MACs·w_bits·a_bits; activation memory = input numel·a_bits. An unquantized side
(bits ``None``) counts as 32 bits.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from .errors import BudgetError, InfeasibleBudgetError
from .graph import ModelGraph

FP_BITS = 32
METRICS = ("size", "bitops", "act-mem", "act-mem-sum", "avg-bits")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TERM = re.compile(r"^\s*([a-z][a-z-]*)\s*=\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)

Assignment = Mapping[str, tuple[int | None, int | None]]  # fqn -> (w_bits, a_bits); None = fp32


@dataclass(frozen=True)
class Term:
    """One parsed budget term, before it is resolved against a model."""

    key: str  # size | size-frac | cr | avg-bits | bitops | act-mem | act-mem-sum
    value: float
    text: str


@dataclass(frozen=True)
class Constraint:
    """A resolved constraint: ``metric(plan) <= limit`` in the metric's base unit (bytes, BitOps, bits)."""

    metric: str
    limit: float
    text: str

    def describe(self, value: float) -> str:
        return f"{self.text}: {format_metric(self.metric, value)} (limit {format_metric(self.metric, self.limit)})"


def parse_budget(text: str | None) -> list[Term]:
    """Parse a budget string into terms; raises BudgetError with the grammar on malformed input."""
    if text is None or not str(text).strip():
        return []
    terms = []
    for raw in str(text).split(","):
        m = _TERM.match(raw)
        if not m:
            raise BudgetError(f"malformed budget term '{raw.strip()}'. " + GRAMMAR_HELP)
        key, num, unit = m.group(1).lower(), float(m.group(2)), m.group(3).lower()
        if not math.isfinite(num) or num <= 0:
            raise BudgetError(f"budget term '{raw.strip()}' must be a positive number")
        if key == "size":
            if unit == "x":
                key = "size-frac"
            elif unit in _SIZE_UNITS:
                num *= _SIZE_UNITS[unit]
            else:
                raise BudgetError(f"unknown size unit '{unit}' in '{raw.strip()}' (use B, KB, MB, GB or x)")
        elif key in ("act-mem", "act-mem-sum"):
            if unit not in _SIZE_UNITS:
                raise BudgetError(f"unknown memory unit '{unit}' in '{raw.strip()}' (use B, KB, MB, GB)")
            num *= _SIZE_UNITS[unit]
        elif key == "bitops":
            if unit not in _COUNT_UNITS:
                raise BudgetError(f"unknown BitOps unit '{unit}' in '{raw.strip()}' (use K, M, G, T)")
            num *= _COUNT_UNITS[unit]
        elif key in ("cr", "avg-bits"):
            if unit:
                raise BudgetError(f"'{key}' takes a plain number, got '{raw.strip()}'")
            if key == "avg-bits" and num > 32:
                raise BudgetError(f"avg-bits must be at most 32, got {num:g}")
        else:
            raise BudgetError(f"unknown budget key '{key}'. " + GRAMMAR_HELP)
        terms.append(Term(key, num, raw.strip()))
    return terms


GRAMMAR_HELP = (
    "Budget grammar: size=1.2MB | size=0.09x | cr=10.7 | avg-bits=3 | bitops=0.35G | act-mem=64KB | "
    "act-mem-sum=1MB, several joined by commas."
)


class Ledger:
    """Cost of any assignment of bits to layers; the solver, plan and report all use this class.

    ``searched`` names the layers whose bits are chosen (``avg-bits`` is measured over them).
    """

    def __init__(self, graph: ModelGraph, searched: list[str] | None = None):
        self.graph = graph
        self.searched = list(searched) if searched is not None else graph.names

    # ---- per-layer contributions (linear in the choice of (w_bits, a_bits) for one layer) ----
    def layer_cost(self, metric: str, fqn: str, w_bits: int | None, a_bits: int | None) -> float:
        layer = self.graph[fqn]
        wb = w_bits or FP_BITS
        ab = a_bits or FP_BITS
        if metric == "size":
            return layer.weight_numel * wb / 8
        if metric == "bitops":
            return float(layer.macs * wb * ab)
        if metric in ("act-mem", "act-mem-sum"):
            return layer.in_numel * ab / 8
        if metric == "avg-bits":
            return layer.weight_numel * wb / self.searched_numel if fqn in self.searched else 0.0
        raise ValueError(metric)

    def constant(self, metric: str) -> float:
        """Cost that no bit choice changes (fp32 parameters outside quantizable weights)."""
        return self.graph.other_params * FP_BITS / 8 if metric == "size" else 0.0

    @property
    def searched_numel(self) -> int:
        return sum(self.graph[n].weight_numel for n in self.searched) or 1

    @property
    def fp32_bytes(self) -> float:
        return self.graph.total_params * FP_BITS / 8

    def value(self, metric: str, assignment: Assignment) -> float:
        """Total of a metric for a full assignment (layers absent from it count as fp32)."""
        costs = [
            self.layer_cost(metric, layer.fqn, *assignment.get(layer.fqn, (None, None)))
            for layer in self.graph.layers
        ]
        if metric == "act-mem":
            return max(costs, default=0.0)
        return self.constant(metric) + sum(costs)

    def summary(self, assignment: Assignment) -> dict[str, float]:
        """Every reported cost of a plan: the numbers the solver constrained."""
        size = self.value("size", assignment)
        return {
            "weight_bytes": size,
            "weight_mb": size / 2**20,
            "fp32_bytes": self.fp32_bytes,
            "compression": self.fp32_bytes / size,
            "avg_w_bits_searched": self.value("avg-bits", assignment),
            "bitops": self.value("bitops", assignment),
            "act_mem_max_bytes": self.value("act-mem", assignment),
            "act_mem_sum_bytes": self.value("act-mem-sum", assignment),
        }

    # ---- budget resolution ----
    def resolve(self, terms: list[Term]) -> list[Constraint]:
        out = []
        for t in terms:
            if t.key == "size":
                out.append(Constraint("size", t.value, t.text))
            elif t.key == "size-frac":
                out.append(Constraint("size", t.value * self.fp32_bytes, t.text))
            elif t.key == "cr":
                out.append(Constraint("size", self.fp32_bytes / t.value, t.text))
            elif t.key == "avg-bits":
                out.append(Constraint("avg-bits", t.value, t.text))
            else:
                out.append(Constraint(t.key, t.value, t.text))
        return out

    def extreme(self, metric: str, choices: Mapping[str, list[tuple[int | None, int | None]]],
                fixed: Assignment) -> float:
        """Smallest achievable value of one metric given per-layer choices (others fixed)."""
        full: dict[str, tuple[int | None, int | None]] = dict(fixed)
        for fqn, opts in choices.items():
            full[fqn] = min(opts, key=lambda o: self.layer_cost(metric, fqn, *o))
        return self.value(metric, full)

    def check_feasible(self, constraints: list[Constraint],
                       choices: Mapping[str, list[tuple[int | None, int | None]]],
                       fixed: Assignment) -> None:
        """Raise InfeasibleBudgetError naming the smallest feasible value of each violated constraint."""
        bad = []
        for c in constraints:
            lo = self.extreme(c.metric, choices, fixed)
            if lo > c.limit * (1 + 1e-9):
                bad.append(f"'{c.text}' cannot be met: the smallest feasible value is "
                           f"{format_budget_value(c, lo, self)}")
        if bad:
            raise InfeasibleBudgetError("infeasible budget: " + "; ".join(bad))


def format_metric(metric: str, value: float) -> str:
    if metric in ("size", "act-mem", "act-mem-sum"):
        return f"{value / 2**20:.4f} MB" if value >= 2**20 else f"{value / 2**10:.2f} KB"
    if metric == "bitops":
        return f"{value / 1e9:.4f} G"
    return f"{value:.4f}"


def format_budget_value(c: Constraint, smallest: float, ledger: Ledger) -> str:
    """The smallest feasible value, written in the same form the user wrote the term."""
    key = c.text.split("=")[0].strip().lower()
    if key == "cr":
        return f"cr={ledger.fp32_bytes / smallest:.4f} (largest feasible compression)"
    if key == "size" and c.text.lower().rstrip().endswith("x"):
        return f"size={smallest / ledger.fp32_bytes:.5f}x"
    if c.metric == "size":
        return f"size={smallest / 2**20:.5f}MB"
    if c.metric == "bitops":
        return f"bitops={smallest / 1e9:.5f}G"
    if c.metric in ("act-mem", "act-mem-sum"):
        return f"{c.metric}={smallest / 2**10:.3f}KB"
    return f"{c.metric}={smallest:.4f}"


#: most budgets one sweep may expand to (each is a full solve, often a PTQ run and an evaluation)
MAX_SWEEP_BUDGETS = 200


def expand_budgets(spec: str | list[str], limit: int = MAX_SWEEP_BUDGETS) -> list[str]:
    """Budgets of a sweep: ``key=start:stop:step`` (inclusive; e.g. ``avg-bits=2.5:4:0.25``), or
    budgets separated by ``;`` (each may combine terms with ``,``), or a list of either.

    Raises BudgetError on a malformed range, a step <= 0, stop < start, or more than ``limit``
    budgets in all (``avg-bits=2:4:0.0001`` would queue 20,001 searches).
    """
    items = spec if isinstance(spec, list) else [t for t in spec.split(";") if t.strip()]
    out: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and value.count(":") == 2 and "," not in value:
            try:
                start, stop, step = (float(v) for v in value.split(":"))
            except ValueError:
                raise BudgetError(f"malformed budget range '{item.strip()}': expected key=start:stop:step") from None
            if not all(math.isfinite(v) for v in (start, stop, step)):
                raise BudgetError(f"budget range '{item.strip()}' must use finite numbers")
            if step <= 0:
                raise BudgetError(f"budget range '{item.strip()}': step must be > 0, got {step:g}")
            if stop < start:
                raise BudgetError(f"budget range '{item.strip()}': stop {stop:g} is below start {start:g} "
                                  f"(write key=start:stop:step with start <= stop)")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            if len(out) + n > limit:
                raise BudgetError(f"budget range '{item.strip()}' expands to {n} budgets"
                                  + (f" ({len(out) + n} in the sweep)" if out else "")
                                  + f"; the limit is {limit}: use a larger step")
            for i in range(n):
                out.append(f"{key.strip()}={round(start + i * step, 12):.12g}")
                parse_budget(out[-1])
        else:
            parse_budget(item)  # validated now, not after an hour of measurements
            out.append(item.strip())
            if len(out) > limit:
                raise BudgetError(f"the sweep has more than {limit} budgets (the limit): give fewer")
    if not out:
        raise BudgetError("no budget given")
    return out
