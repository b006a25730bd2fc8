"""Sensitivity methods; importing this package registers every built-in method."""
from . import evalbased, infoflow, roundoff  # noqa: F401  (register eval-delta, infoq, mixquant)
from .base import METHODS, Method, SearchContext, SensitivityTable

__all__ = ["METHODS", "Method", "SearchContext", "SensitivityTable"]
