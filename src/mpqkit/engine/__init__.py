"""The one evaluation engine every method's probes go through."""
from .probe import ProbeEngine, ProbeResult

__all__ = ["ProbeEngine", "ProbeResult"]
