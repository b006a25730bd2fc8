"""The post-training quantizer a plan ships with: a recipe (``--ptq``) and the stages that run it.

A recipe joins steps with ``+``, e.g. ``gptq+bc``, ``cle+gptq+bc``, ``brecq+bc``, ``mse``:

* ``cle``: cross-layer equalization of the fp model before anything is quantized (``equalize.py``);
* ``minmax`` / ``mse``: the range estimator of weights and activations (otherwise the plan's);
* ``nearest`` (alias ``rtn``), ``gptq`` or ``gptq-seq``: how weights are rounded on their grid
  (``gptq.py``): GPTQ on the fp model's inputs, each layer on its own (the layers the search's
  probes measured, read from the same cache), or on the already-quantized network's (sequential);
* ``adaround`` / ``brecq`` / ``qdrop``: learned rounding by reconstruction (``brecq.py``), from
  nearest rounding;
* ``bc``: empirical bias correction of every quantized layer (``layerwise.py``), after the rounding.

A step not named is off: ``--ptq gptq`` is GPTQ without bias correction. ``default`` (or no
``--ptq``) is the quantizer recorded in the plan's ``qconfig`` — the one it was searched under.
Stages, in order: equalize → grids and activation ranges (``apply.apply_plan``) → GPTQ and bias
correction, walked layer by layer (``layerwise.sequential_ptq``) → reconstruction → bias correction
after it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from ..errors import MpqkitError
from .brecq import reconstruct
from .config import QuantConfig
from .equalize import equalize
from .gptq import GptqConfig
from .layerwise import LocalLayerBuilder, sequential_ptq, set_weight
from .modules import QuantMixin

RANGES = ("minmax", "mse")
ROUNDING = {"nearest": "nearest", "rtn": "nearest", "gptq": "gptq", "gptq-seq": "gptq-seq"}
RECON = ("adaround", "brecq", "qdrop")


@dataclass(frozen=True)
class PtqRecipe:
    """A parsed ``--ptq``: every step is explicit (None / False = off)."""

    range: str | None = None
    rounding: str = "nearest"
    recon: str | None = None
    bias_correction: bool = False
    equalize: bool = False

    @property
    def name(self) -> str:
        """Canonical spelling, e.g. ``cle+mse+gptq+bc`` (``nearest`` is implied)."""
        parts = (["cle"] if self.equalize else []) + ([self.range] if self.range else [])
        parts += [self.recon] if self.recon else ([self.rounding] if self.rounding != "nearest" else [])
        parts += ["bc"] if self.bias_correction else []
        return "+".join(parts) or "nearest"

    def qconfig(self, base: QuantConfig) -> QuantConfig:
        """The plan's quantizer config with this recipe's steps (ranges only where the recipe names one)."""
        out = replace(base, rounding=self.rounding, bias_correction=self.bias_correction, equalize=self.equalize)
        return replace(out, w_range=self.range, a_range=self.range) if self.range else out


def parse_ptq(spec: str) -> PtqRecipe:
    """A recipe from ``spec`` (``+``-joined steps, see the module doc); a clear error on an unknown or
    repeated step, or two that exclude each other."""
    if not isinstance(spec, str) or not spec.strip():
        raise MpqkitError("--ptq is empty: give a recipe such as gptq+bc, brecq or mse")
    steps = [t.strip().lower() for t in spec.split("+")]
    known = sorted({*RANGES, *ROUNDING, *RECON, "bc", "cle"})
    kw: dict = {}
    for t in steps:
        if t in RANGES:
            key, value = "range", t
        elif t in ROUNDING or t in RECON:
            key, value = "rounding", t
        elif t in ("bc", "cle"):
            key, value = ("bias_correction" if t == "bc" else "equalize"), True
        else:
            raise MpqkitError(f"unknown PTQ step '{t}' in --ptq {spec!r}; steps: {', '.join(known)} "
                              f"(joined with +, e.g. gptq+bc)")
        if key in kw:
            raise MpqkitError(f"--ptq {spec!r} names two {key.replace('_', ' ')} steps; give one")
        kw[key] = value
    rounding = kw.pop("rounding", "nearest")
    if rounding in RECON:
        return PtqRecipe(recon=rounding, **kw)
    return PtqRecipe(rounding=ROUNDING[rounding], **kw)


def recipe_of(qconfig: QuantConfig) -> PtqRecipe:
    """The recipe a quantizer config describes (no range: the config's own ranges apply)."""
    return PtqRecipe(rounding=qconfig.rounding, bias_correction=qconfig.bias_correction, equalize=qconfig.equalize)


def prepare_fp(model: nn.Module, qconfig: QuantConfig) -> nn.Module:
    """The fp model the quantizer starts from: ``model`` itself, or an equalized copy (same outputs)."""
    if not qconfig.equalize:
        return model

    eq = copy.deepcopy(model)
    equalize(eq)
    return eq


def layer_steps(qmodel: nn.Module, fp_model: nn.Module, batches: Sequence[torch.Tensor], qconfig: QuantConfig,
                recon: object | None = None, builder: object | None = None, progress: bool = False) -> dict:
    """Run the recipe's stages after the grids are set, on ``qmodel`` in place: layer-local GPTQ
    (through ``builder``, a ``layerwise.LocalLayerBuilder`` for ``fp_model`` on the calibration
    images: cached, the same layers the search measured), or sequential GPTQ; then reconstruction
    (``recon``, a ``brecq.ReconConfig``) and bias correction, walked layer by layer. Returns what
    each stage did."""

    stats: dict = {}
    if qconfig.rounding == "gptq":
        if builder is None:
            builder = LocalLayerBuilder(fp_model, torch.cat(list(batches)), qconfig)
        for fqn, m in qmodel.named_modules():
            if isinstance(m, QuantMixin) and m.w_spec is not None:
                got = builder.build(fqn, m, m.w_spec.bits, m.a_spec.bits if m.a_spec is not None else None)
                set_weight(m, {k: got[k] for k in ("weight", "w_scale", "w_zero_point")})  # the copy's own tensors
        stats["gptq"] = {"built": builder.built, "cached": builder.cached, "seconds": builder.seconds}
    elif qconfig.rounding == "gptq-seq":
        stats["gptq-seq"] = sequential_ptq(qmodel, fp_model, batches, GptqConfig(), False)
    if recon is not None:

        stats["recon"] = reconstruct(qmodel, fp_model, batches, recon, progress=progress)  # type: ignore[arg-type]
    if qconfig.bias_correction:
        stats["bias_correction"] = sequential_ptq(qmodel, fp_model, batches, None, True)
    return stats
