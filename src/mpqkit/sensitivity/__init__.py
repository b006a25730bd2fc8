"""Sensitivity methods; importing this package registers every built-in method."""
from . import evalbased, infoflow  # noqa: F401  (register eval-delta, infoq)
from .base import METHODS, Method, SearchContext, SensitivityTable

__all__ = ["METHODS", "Method", "SearchContext", "SensitivityTable"]
