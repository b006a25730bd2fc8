"""What a search returns (kept in a low module so ``report`` can describe it without importing ``api``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import Ledger
from .graph import ModelGraph
from .plan import Plan
from .sensitivity.base import SensitivityTable
from .solve import Solution


@dataclass
class SearchResult:
    plan: Plan
    solution: Solution
    table: SensitivityTable | None
    graph: ModelGraph
    ledger: Ledger
    seconds: dict[str, float]
    engine_stats: dict[str, Any] = field(default_factory=dict)
    results_dir: Path | None = None
    #: where the search's time went (``mpqkit.profile``): stages, probes by start layer, peak memory
    profile: dict[str, Any] = field(default_factory=dict)
