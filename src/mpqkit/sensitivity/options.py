"""Typed method options: each method declares a frozen dataclass of its options and their defaults.

The dataclass is the one place an option is declared: ``mpqkit search`` builds its flags from the
fields' metadata (``option(..., flag="--psd")``), ``MethodOptions.from_mapping`` turns a dict from
Python (or a plan) into the typed object and refuses names the method does not have, and
``to_params`` is what a plan records (execution-only fields, e.g. the number of workers, are left out
so the same inputs give the same plan bytes on any runner).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..errors import MpqkitError, UnknownNameError

T = TypeVar("T", bound="MethodOptions")


def option(default: Any, *, help: str, flag: str | None = None, type: Callable[[str], Any] | None = None,
           choices: Sequence[Any] | None = None, execution: bool = False, python_only: bool = False) -> Any:
    """A dataclass field with the metadata the CLI and validation need.

    ``flag``: the command-line flag (default ``--`` + the field name with dashes); ``type``: how a
    value is parsed and checked (default: the type of ``default``); ``execution``: changes where
    the work runs, never its result (not recorded in plans); ``python_only``: no flag (e.g. a
    callable)."""
    return field(default=default, metadata={"help": help, "flag": flag, "type": type, "choices": choices,
                                            "execution": execution, "python_only": python_only})


def field_type(f: dataclasses.Field) -> Callable[[str], Any] | None:
    t = f.metadata.get("type")
    if t is None and f.default is not None and f.default is not dataclasses.MISSING:
        t = type(f.default)
    return t


def field_flag(f: dataclasses.Field) -> str | None:
    if f.metadata.get("python_only"):
        return None
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class MethodOptions:
    """Base class: a method without options uses it as is."""

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls: type[T], values: "Mapping[str, Any] | MethodOptions | None", method: str = "") -> T:
        """The typed options from a mapping; unknown names and wrongly typed values are errors."""
        if isinstance(values, cls):
            return values
        if isinstance(values, MethodOptions):
            raise MpqkitError(f"method '{method}' takes {cls.__name__}, got {type(values).__name__}")
        values = dict(values or {})
        known = {f.name: f for f in cls.option_fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            have = ", ".join(sorted(known)) or "none"
            raise UnknownNameError(f"method '{method}' has no option {', '.join(repr(u) for u in unknown)}; "
                                   f"its options: {have}")
        typed = {k: _coerce(known[k], v, method) for k, v in values.items()}
        return cls(**typed)

    def to_params(self) -> dict[str, Any]:
        """Result-affecting options as JSON values (what a plan records; Python-only ones, e.g. a
        callable, cannot be recorded and are left out)."""
        out = {}
        for f in self.option_fields():
            if f.metadata.get("execution") or f.metadata.get("python_only"):
                continue
            v = getattr(self, f.name)
            out[f.name] = v if isinstance(v, (str, int, float, bool, list, type(None))) else f"<{type(v).__name__}>"
        return out

    def replace(self: T, **changes: Any) -> T:
        return type(self).from_mapping({**{f.name: getattr(self, f.name) for f in self.option_fields()}, **changes})


def _coerce(f: dataclasses.Field, v: Any, method: str) -> Any:
    if v is None:
        return None
    t = field_type(f)
    choices = f.metadata.get("choices")
    if t in (int, float) and isinstance(v, bool):
        raise MpqkitError(f"option '{f.name}' of method '{method}' must be a number, got {v!r}")
    if t is float and isinstance(v, int):
        v = float(v)
    elif t is str and isinstance(v, int) and not isinstance(v, bool):
        v = str(v)  # e.g. CLADO's act_bits=8 from Python
    elif t is not None and t in (int, float, str, bool) and not isinstance(v, t):
        if isinstance(v, str) and t is not bool:
            try:
                v = t(v)
            except ValueError:
                raise MpqkitError(f"option '{f.name}' of method '{method}' must be {t.__name__}, got {v!r}") from None
        else:
            raise MpqkitError(f"option '{f.name}' of method '{method}' must be {t.__name__}, got {v!r}")
    if t is float and not math.isfinite(v):
        raise MpqkitError(f"option '{f.name}' of method '{method}' must be a finite number, got {v!r}")
    if choices is not None and v not in choices:
        raise MpqkitError(f"option '{f.name}' of method '{method}' must be one of {', '.join(map(str, choices))}, "
                          f"got {v!r}")
    return v


def positive(name: str, value: int | float | None, method: str, allow_zero: bool = False) -> None:
    """A shared check for counts and sizes in ``__post_init__``."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        of = f" of method '{method}'" if method else ""
        raise MpqkitError(f"option '{name}'{of} must be {'≥ 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class RunnerOptions(MethodOptions):
    """Where probes run (execution only: the plan is the same on every runner)."""

    workers: int = option(1, help="run probes in N parallel workers that share the probe cache", execution=True)
    runner: str = option("local", help="where --workers run: local processes or a Ray cluster",
                         choices=("local", "ray"), execution=True)
    address: str | None = option(None, type=str, help="Ray cluster address (e.g. auto, ray://head:10001); "
                                 "default: a local Ray", execution=True)

    def __post_init__(self) -> None:
        positive("workers", self.workers, "")
