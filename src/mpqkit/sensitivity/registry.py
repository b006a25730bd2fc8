"""The method registry: name → ``Method`` (sensitivity function, solver, options class).

Methods register themselves with ``@METHODS.register(...)`` on their sensitivity function; the
default solver is the shared ILP (``solvers.ilp``). Kept apart from ``base`` (the types) so that
``solvers`` can use those types without an import cycle.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import UnknownNameError
from .base import Method, SearchContext, SensitivityTable, SolveRequest
from .options import MethodOptions
from .solvers import ilp


class Registry:
    """Name → Method. ``register`` is used as a decorator on sensitivity functions."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def add(self, method: Method) -> None:
        if method.name in self._methods:
            raise ValueError(f"method '{method.name}' is already registered")
        self._methods[method.name] = method

    def register(self, name: str, description: str, solver: Callable[[SolveRequest], Any] | None = None,
                 options: type[MethodOptions] = MethodOptions, memory: Callable[..., float] | None = None,
                 decides: bool = False):
        """Decorator on a sensitivity function; ``solver`` defaults to the shared ILP; ``memory``: the
        method's own memory beyond the probe engine (``Method.memory``); ``decides``: the method returns
        a ``Decision`` (its own plan, bit choice or Pareto list) for its solver, not only scores."""
        def deco(fn: Callable[[SearchContext], SensitivityTable]):
            self.add(Method(name, description, fn, solver or ilp, options, memory, decides))
            return fn

        return deco

    def get(self, name: str) -> Method:
        if name not in self._methods:
            raise UnknownNameError(f"unknown method '{name}'. Available: {', '.join(self.names())}")
        return self._methods[name]

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __iter__(self):
        return iter(self._methods[n] for n in self.names())


METHODS = Registry()
