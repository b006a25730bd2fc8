"""mpqkit: mixed-precision quantization — search a per-layer bit plan, apply it, evaluate it."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import apply_plan, evaluate, search  # noqa: E402
from .plan import LayerQuant, Plan  # noqa: E402

__all__ = ["search", "apply_plan", "evaluate", "Plan", "LayerQuant", "__version__"]
