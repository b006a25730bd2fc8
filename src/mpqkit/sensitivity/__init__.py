"""Sensitivity methods; importing this package registers every built-in method."""
from . import (auto, crosslayer, evalbased, greedy, hessian, infoflow,  # noqa: F401  (registers every built-in method)
               mpqco, roundoff, shapley, solvers)
from .base import Method, SearchContext, SensitivityTable
from .registry import METHODS

METHODS.add(Method("uniform", "every searched layer at the same bits (largest meeting the budget)", None,
                   solvers.uniform))

__all__ = ["METHODS", "Method", "SearchContext", "SensitivityTable"]
