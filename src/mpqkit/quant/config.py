"""QuantConfig: how weights and activations are quantized when a plan does not say otherwise."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from ..flagspec import QUANT, flag
from .observers import RANGE_METHODS, QuantSpec

#: "gptq": each layer rounded on the fp model's inputs (layer-local: a layer depends only on its own bits);
#: "gptq-seq": on the inputs of the already-quantized network before it (the paper's sequential order)
ROUNDINGS = ("nearest", "gptq", "gptq-seq")
#: the layer-local PTQ a plan recorded before these settings existed (plans without the keys)
LEGACY_PTQ = {"rounding": "nearest", "bias_correction": False, "equalize": False}


@dataclass(frozen=True)
class QuantConfig:
    """Defaults (docs/METHODS.md): per-channel asymmetric MSE-range weights; per-tensor asymmetric
    activations with the range calibrated (MSE) on the calibration set.

    The post-training steps every quantized layer gets, in the probe engine (so a plan is chosen
    under them) and in ``apply_plan`` (so it ships with them): ``rounding`` "nearest" or "gptq"
    (second-order rounding on the same grid, ``quant/gptq.py``), ``bias_correction`` (each layer's
    mean output shift on the calibration set removed, ``quant/layerwise.py``) and ``equalize``
    (cross-layer equalization of consecutive convs before quantizing, ``quant/equalize.py``)."""

    w_per_channel: bool = field(default=True, metadata=flag(
        "--w-per-tensor", group=QUANT, kind="false", help="per-tensor weights (default per-channel)"))
    w_symmetric: bool = field(default=False, metadata=flag(
        "--w-symmetric", group=QUANT, kind="true", help="symmetric weights (default asymmetric)"))
    w_range: str = field(default="mse", metadata=flag(
        "--w-range", group=QUANT, choices=RANGE_METHODS, help="weight range estimator (default mse)"))
    a_symmetric: bool = field(default=False, metadata=flag(
        "--a-symmetric", group=QUANT, kind="true", help="symmetric activations (default asymmetric)"))
    a_range: str = field(default="mse", metadata=flag(
        "--a-range", group=QUANT, choices=RANGE_METHODS, help="activation range estimator (default mse)"))
    #: bits of the attention matmul inputs (``MatMulInput`` taps: Q, K, V, probabilities); None = fp32
    matmul_a_bits: int | None = field(default=None, metadata=flag(
        "--matmul-a-bits", group=QUANT, kind="int",
        help="bits of the attention matmul inputs (Q, K, V, probabilities) of transformer models; default fp32. "
             "Recorded in the plan; not searched, not in the cost ledger"))
    rounding: str = field(default="gptq", metadata=flag(
        "--rounding", group=QUANT, choices=ROUNDINGS,
        help="how weights are rounded on their grid, in the search's probes and in the plan's default PTQ: "
             "nearest, or gptq (second-order, on the calibration set) (default gptq)"))
    bias_correction: bool = field(default=False, metadata=flag(
        "--bias-correction", group=QUANT, kind="toggle",
        help="remove each quantized layer's mean output shift on the calibration set (default off)"))
    equalize: bool = field(default=False, metadata=flag(
        "--equalize", group=QUANT, kind="toggle",
        help="cross-layer equalization of consecutive convs before quantizing (same fp outputs) (default off)"))

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown weight rounding '{self.rounding}', expected one of {ROUNDINGS}")
        for name in ("bias_correction", "equalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.matmul_a_bits is not None and not (isinstance(self.matmul_a_bits, int) and
                                                   2 <= self.matmul_a_bits <= 16):
            raise ValueError(f"matmul_a_bits must be an integer in 2..16 or None, got {self.matmul_a_bits!r}")
        for r in (self.w_range, self.a_range):
            if r not in RANGE_METHODS:
                raise ValueError(f"unknown range method '{r}', expected one of {RANGE_METHODS}")

    def w_spec(self, bits: int, per_channel: bool | None = None, symmetric: bool | None = None) -> QuantSpec:
        return QuantSpec(
            bits=bits,
            symmetric=self.w_symmetric if symmetric is None else symmetric,
            per_channel=self.w_per_channel if per_channel is None else per_channel,
            range_method=self.w_range,
        )

    def a_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=self.a_symmetric, per_channel=False, range_method=self.a_range)

    @property
    def w_granularity(self) -> str:
        return "per_channel" if self.w_per_channel else "per_tensor"

    @property
    def layer_ptq(self) -> bool:
        """Whether quantized layers get more than nearest rounding on their grid (GPTQ, bias correction)."""
        return self.rounding != "nearest" or self.bias_correction

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        """From ``to_dict``'s output; a dict written before the PTQ keys existed means what it meant
        then (nearest rounding, no bias correction, no equalization). Unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown quantizer setting(s) {', '.join(unknown)}")
        return cls(**{**LEGACY_PTQ, **d})
