"""The allocation problem every solver answers, and its solution record."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from ..budget import Constraint, Ledger

Choice = tuple[int, int | None]  # (w_bits, a_bits)
TIME_LIMIT = 60.0  #: default seconds a solver may take (``RunSettings.time_limit``, ``--time-limit``)


@dataclass
class Allocation:
    """Pick one (w_bits, a_bits) per searched layer; fixed layers keep theirs.

    ``a_bits`` with a single entry means activations are not searched. ``tie_groups`` are
    layers that read the same tensor: when activations are searched they get equal a_bits.
    """

    ledger: Ledger
    layers: list[str]
    w_bits: list[int]
    a_bits: list[int | None]
    fixed: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    constraints: list[Constraint] = field(default_factory=list)
    tie_groups: list[tuple[str, ...]] = field(default_factory=list)

    def choices(self) -> list[Choice]:
        return list(product(sorted(self.w_bits), sorted(self.a_bits, key=lambda b: b or 99)))

    def choice_map(self) -> dict[str, list[Choice]]:
        return {f: self.choices() for f in self.layers}

    def check_feasible(self) -> None:
        self.ledger.check_feasible(self.constraints, self.choice_map(), self.fixed)

    def full(self, assignment: dict[str, Choice]) -> dict[str, tuple[int | None, int | None]]:
        return {**self.fixed, **assignment}

    def violations(self, assignment: dict[str, Choice]) -> list[str]:
        full = self.full(assignment)
        return [c.describe(v) for c in self.constraints
                if (v := self.ledger.value(c.metric, full)) > c.limit * (1 + 1e-9)]


@dataclass
class Solution:
    assignment: dict[str, Choice]
    objective: float | None  # None: the plan was chosen, not optimised (no objective value)
    solver: str
    status: str
    seconds: float
    gap: float | None = None
    bound: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a number that is not finite (no objective, an unbounded gap) is null."""
        def finite(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {k: finite(v) for k, v in {"solver": self.solver, "status": self.status, "objective": self.objective,
                                           "gap": self.gap, "bound": self.bound, "seconds": self.seconds,
                                           **self.info}.items()}

    #: fields that depend on the machine's speed, not on the inputs
    VOLATILE = ("seconds", "heuristic_restarts")

    def record(self) -> dict[str, Any]:
        """What the plan file keeps: everything but timings, so a rerun writes the same bytes; at an
        optimal status also no dual bound (it is the objective, up to last digits that depend on the
        solver's path, e.g. with or without pruned candidates)."""
        drop = (*self.VOLATILE, "bound") if self.status == "optimal" else self.VOLATILE
        return {k: v for k, v in self.to_dict().items() if k not in drop}
