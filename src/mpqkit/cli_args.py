"""The shared argument groups of the ``mpqkit`` commands.

``add_settings`` generates the ``RunSettings`` / ``QuantConfig`` flags from the fields' declarations
(``flagspec``; a command gets the groups it honours); ``settings_from_args`` builds the settings from
whichever of them the command has. Method flags
come from the registry's typed options dataclasses (``add_method_options``), so a new method's
options appear on the command line without touching this file.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NoReturn

from .errors import MpqkitError
from .flagspec import DATA, MODEL, OUTPUT, SEARCH_GROUPS, FlagSpec, flag_of
from .quant.config import QuantConfig
from .quant.ptq import parse_ptq
from .sensitivity import METHODS
from .sensitivity.options import field_flag, field_type
from .settings import RunSettings

OPT_PREFIX = "opt__"


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line (``mpqkit: error: … (see mpqkit search --help)``), exit 2,
    not the whole usage text before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mpqkit: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def bits_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


#: the argparse type of each value kind (flagspec.KINDS)
_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "positive_int": positive_int, "bits": bits_list,
                          "names": lambda text: [n for n in text.split(",") if n]}


def setting_fields() -> list[tuple[dataclasses.Field, FlagSpec, bool]]:
    """Every settings field that has a flag: (field, its flag, whether it is a QuantConfig field)."""
    out = [(f, flag_of(f), False) for f in dataclasses.fields(RunSettings)]
    out += [(f, flag_of(f), True) for f in dataclasses.fields(QuantConfig)]
    return [(f, spec, q) for f, spec, q in out if spec is not None]


def _add_flag(g: argparse._ArgumentGroup, f: dataclasses.Field, spec: FlagSpec) -> None:
    kw: dict[str, Any] = {"dest": spec.dest or f.name, "help": spec.help}
    if spec.kind == "true":
        kw.update(action="store_true")
    elif spec.kind == "false":
        kw.update(action="store_false")
    elif spec.kind == "toggle":
        kw.update(action=argparse.BooleanOptionalAction, default=f.default)
    else:
        kw.update(type=_TYPES[spec.kind], default=list(f.default) if isinstance(f.default, tuple) else f.default,
                  metavar=f.name.upper())
        if spec.choices:
            kw.update(choices=list(spec.choices))
            del kw["metavar"]
    g.add_argument(*spec.names, **kw)


def add_settings(p: argparse.ArgumentParser, *, data: bool = True, search: bool = False,
                 device: bool = True) -> None:
    """Model source, data, device and output flags; with ``search``: candidates, calibration,
    quantizer, solver and probe-cache flags too. A command gets only the groups it honours. The
    settings' flags are generated from their declarations (``RunSettings``/``QuantConfig`` fields)."""
    groups = {name: p.add_argument_group(name) for name in (MODEL, *((DATA,) if data else ()), OUTPUT,
                                                            *(SEARCH_GROUPS if search else ()))}
    groups[MODEL].add_argument("--model", default="resnet20", help="resnet20/32/44/56 (JPEG fine-tuned), "
                               "resnet20/32/44/56-orig, convmixer, mobilenetv2, efficientnet-lite0, digits-cnn, or a "
                               "torchvision name (default resnet20)")
    if data:
        groups[DATA].add_argument("--data", default=None, help="cifar10, imagenet-subset, sst2, digits, or an "
                                  "ImageFolder directory (default: the zoo model's own data, e.g. imagenet-subset "
                                  "for mobilenetv2; else cifar10)")
    groups[OUTPUT].add_argument("--json", action="store_true", help="print machine-readable JSON")
    for f, spec, _ in setting_fields():
        if spec.group in groups and (device or spec.group != OUTPUT):
            _add_flag(groups[spec.group], f, spec)


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """RunSettings from the flags this command has (a setting whose flag it lacks keeps its default;
    a command's own flag with a setting's destination, e.g. finetune's ``--seed``, sets it)."""
    kw: dict[str, Any] = {}
    qkw: dict[str, Any] = {}
    for f, spec, in_qconfig in setting_fields():
        value = getattr(args, spec.dest or f.name, None)
        if value is None:  # the command has no such flag, or it was not given and its default is None
            continue
        if spec.kind in ("bits", "names"):
            value = tuple(value)
        (qkw if in_qconfig else kw)[f.name] = value
    if qkw:
        try:
            kw["qconfig"] = QuantConfig(**qkw)
        except ValueError as e:
            raise MpqkitError(str(e)) from None
    return RunSettings(**kw)


def add_method_options(p: argparse.ArgumentParser) -> None:
    """One flag per method option declared in the registry (shared flags declared once)."""

    seen: dict[str, tuple[str, str]] = {}  # flag -> (field name, help)
    users: dict[str, list[str]] = {}
    for m in METHODS:
        for f in m.options.option_fields():
            flag = field_flag(f)
            if flag is None:
                continue
            if flag in seen and seen[flag][0] != f.name:
                raise RuntimeError(f"flag {flag} names two different options ({seen[flag][0]}, {f.name})")
            seen.setdefault(flag, (f.name, f.metadata.get("help", "")))
            users.setdefault(flag, []).append(m.name)
    g = p.add_argument_group("method options (each applies to the methods named in its help; a flag that the "
                             "chosen method does not have is an error)")
    for m in METHODS:
        for f in m.options.option_fields():
            flag = field_flag(f)
            if flag is None or flag not in seen:
                continue
            name, help_ = seen.pop(flag)
            t = field_type(f)
            kw: dict[str, Any] = {"dest": OPT_PREFIX + name, "default": None, "metavar": name.upper(),
                                  "help": f"{help_} [{', '.join(users[flag])}]"}
            if f.metadata.get("choices"):
                kw["choices"] = list(f.metadata["choices"])
                del kw["metavar"]
            if t in (int, float, str):
                kw["type"] = t
            g.add_argument(flag, **kw)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line (by field name)."""
    return {k[len(OPT_PREFIX):]: v for k, v in vars(args).items() if k.startswith(OPT_PREFIX) and v is not None}


def add_ptq(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("post-training quantizer")
    g.add_argument("--ptq", help="PTQ recipe, steps joined by +: cle (cross-layer equalization), minmax|mse (ranges), "
                        "nearest|gptq (rounding) or adaround|brecq|qdrop (reconstruction), bc (bias correction); "
                        "e.g. gptq+bc, brecq, brecq+bc, mse. A step not named is off. Default: the quantizer the "
                        "plan was searched under (its qconfig)")
    g.add_argument("--recon-iters", type=int, help="reconstruction iterations per block/layer (default 500)")
    g.add_argument("--recon-batch", type=int, help="reconstruction batch size (default 32)")
    g.add_argument("--qdrop", type=float, help="QDrop probability of keeping an activation fp (qdrop: 0.5)")


def ptq_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"iters": args.recon_iters, "batch_size": args.recon_batch, "drop": args.qdrop}
    opts = {k: v for k, v in opts.items() if v is not None}
    recipe = parse_ptq(args.ptq) if args.ptq not in (None, "default") else None
    if opts and (recipe is None or recipe.recon is None):
        raise MpqkitError("--recon-iters/--recon-batch/--qdrop need --ptq with a reconstruction step "
                          "(adaround, brecq or qdrop)")
    return {"ptq": args.ptq, "recon_options": opts or None}
