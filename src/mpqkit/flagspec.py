"""How a settings field appears on the command line, declared beside the field.

``RunSettings`` and ``QuantConfig`` give each field ``metadata=flag(...)``; ``cli_args.add_settings``
generates the flags from those declarations and ``cli_args.settings_from_args`` reads them back, so a
setting is declared once (its name, type, default and help live with the dataclass field).
Pure data: no argparse here, so the core does not depend on the command line.
"""
from __future__ import annotations

from dataclasses import Field, dataclass
from typing import Any

#: the command-line groups, in the order ``--help`` shows them
MODEL, DATA, OUTPUT = "model", "data", "output"
SPACE, CALIB, QUANT, SOLVER = "search space", "calibration / sensitivity set", "quantizer", "solver and probe engine"
#: groups every command with a model has / groups only the searching commands have
BASE_GROUPS, SEARCH_GROUPS = (MODEL, DATA, OUTPUT), (SPACE, CALIB, QUANT, SOLVER)
#: how a flag's text becomes the field's value: "str", "int", "float", "positive_int" (≥ 1),
#: "bits" (comma-separated integers → tuple), "names" (comma-separated names → tuple)
KINDS = ("str", "int", "float", "positive_int", "bits", "names")


@dataclass(frozen=True)
class FlagSpec:
    """One field's flag. ``kind``: a KINDS entry, or "true" (store_true), "false" (store_false: the
    flag turns the field off, e.g. ``--quiet`` for ``progress``), "toggle" (``--x`` / ``--no-x``).
    ``dest``: the argparse destination when it must differ from the field name (a command's own flag
    of that name means something else)."""

    names: tuple[str, ...]
    group: str
    help: str
    kind: str = "str"
    choices: tuple[str, ...] | None = None
    dest: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, "true", "false", "toggle"):
            raise ValueError(f"unknown flag kind {self.kind!r}")


def flag(*names: str, group: str, help: str, kind: str = "str", choices: Any = None,
         dest: str | None = None) -> dict[str, FlagSpec]:
    """The ``metadata`` of a dataclass field that has a command-line flag."""
    return {"flag": FlagSpec(tuple(names), group, help, kind, tuple(choices) if choices else None, dest)}


def flag_of(f: Field) -> FlagSpec | None:
    """The field's flag declaration, or None for a setting with no flag (API only)."""
    return f.metadata.get("flag")
