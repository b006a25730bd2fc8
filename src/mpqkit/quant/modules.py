"""QuantConv2d / QuantLinear: a Conv2d / Linear with weight and input-activation fake-quant.

Quantization parameters are buffers fixed at construction (weights) or after calibration
(activations); the forward applies ``fake_quant`` with a straight-through estimator, so the same
modules serve post-training evaluation and quantization-aware training. ``from_float`` shares the
float module's weight and bias tensors (no copy): the caller decides whether to copy the model.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .observers import QuantSpec, weight_qparams
from .primitives import fake_quant

QParams = tuple[Tensor, Tensor, int, int]  # scale, zero point, qmin, qmax


class QuantMixin:
    """Shared state and logic of the quantized layer types."""

    w_spec: Optional[QuantSpec]
    a_spec: Optional[QuantSpec]

    def _init_quant(self, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                    w_qparams: QParams | None = None, a_qparams: QParams | None = None) -> None:
        self.w_spec, self.a_spec = w_spec, a_spec
        self._w_range = self._a_range = (0, 0)
        self._w_cache: Tensor | None = None
        self.freeze_weight = False  # cache the fake-quantized weight (inference only)
        # optional replacements of the two quantizers (weight -> Ŵ, input -> x̂), installed by
        # PTQ reconstruction (quant/brecq.py) while it learns rounding and step sizes
        self.weight_fn: Optional[Callable[[Tensor], Tensor]] = None
        self.input_fn: Optional[Callable[[Tensor], Tensor]] = None
        if w_spec is not None:
            scale, zp, qmin, qmax = w_qparams if w_qparams is not None else weight_qparams(self.weight.detach(), w_spec)
            self.register_buffer("w_scale", scale.detach().clone())
            self.register_buffer("w_zero_point", zp.detach().clone())
            self._w_range = (qmin, qmax)
        if a_spec is not None and a_qparams is not None:
            self.set_activation_qparams(a_qparams)

    def set_activation_qparams(self, a_qparams: QParams) -> None:
        scale, zp, qmin, qmax = a_qparams
        if hasattr(self, "a_scale"):
            self.a_scale.copy_(scale)
            self.a_zero_point.copy_(zp)
        else:
            self.register_buffer("a_scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
            self.register_buffer("a_zero_point", torch.as_tensor(zp, dtype=torch.float32).detach().clone())
        self._a_range = (qmin, qmax)

    @property
    def activation_calibrated(self) -> bool:
        return self.a_spec is None or hasattr(self, "a_scale")

    def quantized_weight(self) -> Tensor:
        if self.w_spec is None:
            return self.weight
        if self.weight_fn is not None:
            return self.weight_fn(self.weight)
        if self.freeze_weight and self._w_cache is not None:
            return self._w_cache
        w = fake_quant(self.weight, self.w_scale, self.w_zero_point, *self._w_range)
        if self.freeze_weight:
            self._w_cache = w.detach()
        return w

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.a_spec is None:
            return x
        if self.input_fn is not None:
            return self.input_fn(x)
        if not hasattr(self, "a_scale"):
            raise RuntimeError("activation quantizer is not calibrated: run calibration before the forward pass")
        return fake_quant(x, self.a_scale, self.a_zero_point, *self._a_range)

    def extra_repr(self) -> str:  # type: ignore[override]
        w = self.w_spec.name if self.w_spec else "fp32"
        a = self.a_spec.name if self.a_spec else "fp32"
        return f"{super().extra_repr()}, w={w}, a={a}"


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


def install_quantizers(layer: QuantMixin, weight_fn: Callable[[Tensor], Tensor] | None,
                       input_fn: Callable[[Tensor], Tensor] | None) -> None:
    """Swap a quantized layer's weight and input quantizers (None: its own fixed grids again), without
    registering them as submodules, so the layer's state dict is unchanged."""
    object.__setattr__(layer, "weight_fn", weight_fn)
    object.__setattr__(layer, "input_fn", input_fn)
    layer._w_cache = None


def quantize_module(module: nn.Module, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                    w_qparams: QParams | None = None, a_qparams: QParams | None = None) -> nn.Module:
    """The quantized counterpart of a Conv2d or Linear, sharing its weight and bias tensors."""
    if isinstance(module, QuantMixin):
        raise TypeError("module is already quantized")
    if isinstance(module, nn.Conv2d):
        cls: type = QuantConv2d
    elif isinstance(module, nn.Linear):
        cls = QuantLinear
    else:
        raise TypeError(f"cannot quantize {type(module).__name__}: only Conv2d and Linear are quantizable")
    q = cls.__new__(cls)
    nn.Module.__init__(q)
    for k, v in module.__dict__.items():  # hyper-parameters (stride, padding, ...), not the registries
        if k not in q.__dict__:
            q.__dict__[k] = v
    q._parameters = dict(module._parameters)
    q._buffers = dict(module._buffers)
    q.train(module.training)
    q._init_quant(w_spec, a_spec, w_qparams, a_qparams)
    return q


class QuantAct(nn.Module):
    """Fake-quantizes the activation passing through (an attention matmul input; no weight)."""

    def __init__(self, a_spec: QuantSpec, a_qparams: QParams) -> None:
        super().__init__()
        self.a_spec = a_spec
        scale, zp, qmin, qmax = a_qparams
        self.register_buffer("a_scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
        self.register_buffer("a_zero_point", torch.as_tensor(zp, dtype=torch.float32).detach().clone())
        self._a_range = (qmin, qmax)

    def forward(self, x: Tensor) -> Tensor:
        return fake_quant(x, self.a_scale, self.a_zero_point, *self._a_range)

    def extra_repr(self) -> str:
        return f"a={self.a_spec.name}"
