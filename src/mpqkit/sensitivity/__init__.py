"""Sensitivity methods; importing this package registers every built-in method."""
from . import crosslayer, evalbased, greedy, hessian, infoflow, mpqco, roundoff, shapley  # noqa: F401  (registers every built-in method)
from .base import METHODS, Method, SearchContext, SensitivityTable

__all__ = ["METHODS", "Method", "SearchContext", "SensitivityTable"]
