"""Sensitivity methods; importing this package registers every built-in method."""
from . import evalbased  # noqa: F401  (registers eval-delta)
from .base import METHODS, Method, SearchContext, SensitivityTable

__all__ = ["METHODS", "Method", "SearchContext", "SensitivityTable"]
