"""mpqkit: mixed-precision quantization — search a per-layer bit plan, apply it, evaluate it."""
from __future__ import annotations

from ._version import __version__
from .api import apply_plan, evaluate, search
from .plan import LayerQuant, Plan

__all__ = ["search", "apply_plan", "evaluate", "Plan", "LayerQuant", "__version__"]
