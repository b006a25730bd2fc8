"""The shared argument groups of the ``mpqkit`` commands.

``add_settings`` declares every ``RunSettings`` flag once (a command gets the groups it honours);
``settings_from_args`` builds the settings from whichever of them the command has. Method flags
come from the registry's typed options dataclasses (``add_method_options``), so a new method's
options appear on the command line without touching this file.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NoReturn

from .errors import MpqkitError
from .quant.config import ROUNDINGS, QuantConfig
from .settings import CALIB_SIZE, DEFAULT_A_BITS, DEFAULT_W_BITS, OBJECTIVES, RunSettings
from .solve.problem import TIME_LIMIT

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


def add_settings(p: argparse.ArgumentParser, *, data: bool = True, search: bool = False,
                 device: bool = True) -> None:
    """Model source, data, device and output flags; with ``search``: candidates, calibration,
    quantizer, solver and probe-cache flags too. A command gets only the groups it honours."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet20", help="resnet20/32/44/56 (JPEG fine-tuned), resnet20/32/44/56-orig, "
                   "convmixer, mobilenetv2, efficientnet-lite0, digits-cnn, or a torchvision name (default resnet20)")
    g.add_argument("--checkpoint", help="weights file (overrides the models directory)")
    g.add_argument("--random-init", action="store_true", help="use random weights (explicit opt-in; needed for "
                   "torchvision models without --checkpoint)")
    g.add_argument("--models-dir", help="models directory (default $MPQKIT_MODELS, else ../shared/models)")
    if data:
        g = p.add_argument_group("data")
        g.add_argument("--data", default=None, help="cifar10, imagenet-subset, sst2, digits, or an ImageFolder "
                       "directory (default: the zoo model's own data, e.g. imagenet-subset for mobilenetv2; "
                       "else cifar10)")
        g.add_argument("--data-root", help="data root (default $MPQKIT_DATA, else ../shared/data)")
    g = p.add_argument_group("output")
    if device:
        g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON")
    if device:
        g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        g.add_argument("--eval-batch-size", type=positive_int, help="images per evaluation batch (default: sized by the input, "
                       "32 MB of it: 500 CIFAR images, 55 at 224 x 224)")
    if not search:
        return
    g = p.add_argument_group("search space")
    g.add_argument("--search", choices=["w", "a", "wa"], default="w",
                   help="what to search: weights (default), activations, or both")
    g.add_argument("--w-candidates", type=bits_list, default=list(DEFAULT_W_BITS),
                   help=f"candidate weight bits (default {','.join(map(str, DEFAULT_W_BITS))})")
    g.add_argument("--a-candidates", type=bits_list, default=list(DEFAULT_A_BITS),
                   help=f"candidate activation bits when searched (default {','.join(map(str, DEFAULT_A_BITS))})")
    g.add_argument("--w-bits", type=int, help="uniform: weight bits; --search a: the fixed weight bits")
    g.add_argument("--a-bits", type=int, help="activation bits when activations are not searched (default 8)")
    g.add_argument("--fixed", help="comma-separated layers kept at --fixed-bits (default: first and last)")
    g.add_argument("--fixed-bits", type=bits_list, default=[8, 8], help="w,a bits of fixed layers (default 8,8)")
    g = p.add_argument_group("calibration / sensitivity set")
    g.add_argument("--calib-size", "--sens-samples", dest="calib_size", type=int, default=CALIB_SIZE,
                   help=f"train images in the calibration / sensitivity set (default {CALIB_SIZE})")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration draw, projections and permutations "
                   "(default 0)")
    g.add_argument("--objective", choices=list(OBJECTIVES), default=RunSettings.objective,
                   help="what every probe measures on the sensitivity set: ce = cross-entropy to the labels, kl = KL "
                   f"divergence from the fp model's outputs (label-free) (default {RunSettings.objective})")
    g = p.add_argument_group("quantizer")
    g.add_argument("--w-per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    g.add_argument("--w-symmetric", action="store_true", help="symmetric weights (default asymmetric)")
    g.add_argument("--w-range", choices=["mse", "minmax", "percentile"], default="mse",
                   help="weight range estimator (default mse)")
    g.add_argument("--a-symmetric", action="store_true", help="symmetric activations (default asymmetric)")
    g.add_argument("--a-range", choices=["mse", "minmax", "percentile"], default="mse",
                   help="activation range estimator (default mse)")
    dq = QuantConfig()
    g.add_argument("--rounding", choices=list(ROUNDINGS), default=dq.rounding,
                   help="how weights are rounded on their grid, in the search's probes and in the plan's default "
                        f"PTQ: nearest, or gptq (second-order, on the calibration set) (default {dq.rounding})")
    g.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=dq.bias_correction,
                   help="remove each quantized layer's mean output shift on the calibration set "
                        f"(default {'on' if dq.bias_correction else 'off'})")
    g.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=dq.equalize,
                   help="cross-layer equalization of consecutive convs before quantizing (same fp outputs) "
                        f"(default {'on' if dq.equalize else 'off'})")
    g.add_argument("--matmul-a-bits", type=int, default=None,
                   help="bits of the attention matmul inputs (Q, K, V, probabilities) of transformer models; "
                        "default fp32. Recorded in the plan; not searched, not in the cost ledger")
    g = p.add_argument_group("solver and probe engine")
    g.add_argument("--time-limit", type=float, default=TIME_LIMIT,
                   help=f"solver time limit, seconds (default {TIME_LIMIT:g})")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of activation scores in the ILP (default 1)")
    g.add_argument("--refine", type=int, default=0, help="measured refinement of the method's plan: budget-keeping "
                   "weight-bit moves ordered by the method's table, each plan measured by the probe engine, kept "
                   "only when it lowers the loss on both halves of the calibration set; at most N probes "
                   "(default 0: off)")
    g.add_argument("--cache-dir", help="probe cache (default $MPQKIT_CACHE, else ~/.cache/mpqkit)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the probe cache")
    g.add_argument("--batch-size", dest="probe_batch_size", type=int,
                   help="probe batch size (default: ~16 MB for the largest layer input)")
    g.add_argument("--prefix-cache-mb", type=float,
                   help="memory for the probe engine's kept layer-cut tensors, in MB (default: 1/8 of the memory "
                        "available at start, at most 2048; lower it on a small machine: slower probes, same results)")


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """RunSettings from the flags this command declares (absent groups keep their defaults)."""
    kw: dict[str, Any] = {}
    # a flag whose dest is a setting's name sets it; the settings below are read from flags of other names
    # or types (the probe batch size is --batch-size's dest probe_batch_size: export's --batch-size is its own)
    special = {"batch_size", "prefix_cache_mb", "progress", "use_cache", "w_candidates", "a_candidates", "fixed_bits",
               "fixed", "qconfig", "input_shape"}
    for f in dataclasses.fields(RunSettings):
        if f.name not in special and hasattr(args, f.name):
            kw[f.name] = getattr(args, f.name)
    if hasattr(args, "probe_batch_size"):
        kw["batch_size"] = args.probe_batch_size
    if getattr(args, "prefix_cache_mb", None) is not None:
        kw["prefix_cache_mb"] = args.prefix_cache_mb
    if hasattr(args, "quiet"):
        kw["progress"] = not args.quiet
    if hasattr(args, "no_cache"):
        kw["use_cache"] = not args.no_cache
    for name in ("w_candidates", "a_candidates", "fixed_bits"):
        if hasattr(args, name):
            kw[name] = tuple(getattr(args, name))
    if getattr(args, "fixed", None) is not None:
        kw["fixed"] = tuple(f for f in args.fixed.split(",") if f)
    if hasattr(args, "w_range"):
        try:
            kw["qconfig"] = QuantConfig(w_per_channel=not args.w_per_tensor, w_symmetric=args.w_symmetric,
                                        w_range=args.w_range, a_symmetric=args.a_symmetric, a_range=args.a_range,
                                        matmul_a_bits=args.matmul_a_bits, rounding=args.rounding,
                                        bias_correction=args.bias_correction, equalize=args.equalize)
        except ValueError as e:
            raise MpqkitError(str(e)) from None
    return RunSettings(**kw)


def add_method_options(p: argparse.ArgumentParser) -> None:
    """One flag per method option declared in the registry (shared flags declared once)."""
    from .sensitivity import METHODS
    from .sensitivity.options import field_flag, field_type

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
    from .quant.ptq import parse_ptq

    opts = {"iters": args.recon_iters, "batch_size": args.recon_batch, "drop": args.qdrop}
    opts = {k: v for k, v in opts.items() if v is not None}
    recipe = parse_ptq(args.ptq) if args.ptq not in (None, "default") else None
    if opts and (recipe is None or recipe.recon is None):
        raise MpqkitError("--recon-iters/--recon-batch/--qdrop need --ptq with a reconstruction step "
                          "(adaround, brecq or qdrop)")
    return {"ptq": args.ptq, "recon_options": opts or None}
