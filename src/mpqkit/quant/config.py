"""QuantConfig: how weights and activations are quantized when a plan does not say otherwise."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .observers import RANGE_METHODS, QuantSpec


@dataclass(frozen=True)
class QuantConfig:
    """Defaults (docs/METHODS.md): per-channel asymmetric MSE-range weights; per-tensor asymmetric
    activations with the range calibrated (MSE) on the calibration set."""

    w_per_channel: bool = True
    w_symmetric: bool = False
    w_range: str = "mse"
    a_symmetric: bool = False
    a_range: str = "mse"
    #: bits of the attention matmul inputs (``MatMulInput`` taps: Q, K, V, probabilities); None = fp32
    matmul_a_bits: int | None = None

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict:
        return asdict(self)
