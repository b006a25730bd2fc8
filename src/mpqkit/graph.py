"""Model introspection: quantizable layers (Conv2d, Linear), their costs and tie groups.

One forward pass at the model's input resolution records, for every quantizable layer, its input
shape, output shape and MACs. Layers that consume the very same input tensor form a *tie group*
(e.g. a ResNet block's conv1 and its 1x1 downsample conv): quantizing that tensor once means they
must share activation bits, which the solver can enforce.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from .errors import UnknownNameError

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

log = logging.getLogger("mpqkit")


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer. Shapes exclude the batch dimension; MACs are per sample."""

    fqn: str
    kind: str  # "conv" | "linear"
    index: int  # execution order in the discovery forward
    weight_shape: tuple[int, ...]
    weight_numel: int
    bias_numel: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int

    @property
    def in_numel(self) -> int:
        n = 1
        for d in self.in_shape:
            n *= d
        return n


@dataclass
class ModelGraph:
    """Quantizable layers of a model in execution order, plus what the cost ledger needs."""

    layers: list[LayerInfo]
    tie_groups: list[tuple[str, ...]]
    total_params: int
    input_shape: tuple[int, ...]
    _by_name: dict[str, LayerInfo] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {layer.fqn: layer for layer in self.layers}

    def __getitem__(self, fqn: str) -> LayerInfo:
        try:
            return self._by_name[fqn]
        except KeyError:
            raise UnknownNameError(unknown_layer_message(fqn, self.names)) from None

    def __contains__(self, fqn: object) -> bool:
        return fqn in self._by_name

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.fqn for layer in self.layers]

    @property
    def quantizable_weight_numel(self) -> int:
        return sum(layer.weight_numel for layer in self.layers)

    @property
    def widest_in_numel(self) -> int:
        """Elements of the largest quantizable layer's input, per sample (1 with no layer)."""
        return max((layer.in_numel for layer in self.layers), default=1)

    @property
    def other_params(self) -> int:
        """Parameters that stay fp32 (biases, norms, embeddings): 32 bits each in the ledger."""
        return self.total_params - self.quantizable_weight_numel

    def default_fixed(self) -> list[str]:
        """First and last quantizable layers: kept at 8/8 and excluded from the search by default."""
        if len(self.layers) <= 2:
            return []
        return [self.layers[0].fqn, self.layers[-1].fqn]

    def check_names(self, names: Iterable[str]) -> None:
        for name in names:
            self[name]


def unknown_layer_message(fqn: str, known: list[str]) -> str:
    close = difflib.get_close_matches(fqn, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    shown = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
    return f"unknown layer '{fqn}'.{hint} The model's quantizable layers are: {shown}"


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return int(out[0].numel() * (module.in_channels // module.groups) * kh * kw)
    if isinstance(module, nn.Linear):
        return int(out[0].numel() * module.in_features)
    raise TypeError(type(module))


def discover(model: nn.Module, input_shape: tuple[int, ...]) -> ModelGraph:
    """Run one forward pass (batch 1, zeros) and record every Conv2d/Linear in execution order."""
    # lazy: torchvision takes seconds to import
    from .attention import unexposed_attention

    hidden = unexposed_attention(model)
    if hidden:
        log.warning("%d attention module(s) (%s) keep their projections out of reach: they stay fp32 unless "
                    "you call mpqkit.attention.expose_attention(model) first (load_model does)", len(hidden), hidden[0])
    records, inputs = _trace(model, input_shape)
    silent = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES) and n not in records]
    if silent:
        log.warning("%d Conv2d/Linear module(s) never ran as modules in the forward pass (their weights are used "
                    "functionally, e.g. %s): they are not searchable and stay fp32", len(silent), ", ".join(silent[:3]))
    layers = [_layer_info(name, rec) for name, rec in sorted(records.items(), key=lambda kv: kv[1]["index"])]
    total = sum(p.numel() for p in model.parameters())
    return ModelGraph(layers=layers, tie_groups=_tie_groups(inputs), total_params=total,
                      input_shape=tuple(input_shape))


def _trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict[str, dict], list[tuple[str, torch.Tensor]]]:
    """One forward pass of zeros with a hook on every quantizable module: per module name its record
    (module, first-call index, input/output shapes, MACs summed over calls), and each call's input
    tensor (kept alive, so that tensor identity says which layers read the same input)."""
    records: dict[str, dict] = {}
    inputs: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name in records:  # module called twice (weight sharing): count its MACs each time
                records[name]["macs"] += _macs(module, out)
                return
            x = args[0]
            inputs.append((name, x))
            records[name] = {"module": module, "index": len(records), "in_shape": tuple(x.shape[1:]),
                             "out_shape": tuple(out.shape[1:]), "macs": _macs(module, out)}

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records, inputs


def _layer_info(name: str, rec: dict) -> LayerInfo:
    m = rec["module"]
    return LayerInfo(fqn=name, kind="conv" if isinstance(m, nn.Conv2d) else "linear", index=rec["index"],
                     weight_shape=tuple(m.weight.shape), weight_numel=m.weight.numel(),
                     bias_numel=m.bias.numel() if m.bias is not None else 0, in_shape=rec["in_shape"],
                     out_shape=rec["out_shape"], macs=rec["macs"])


def _tie_groups(inputs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, ...]]:
    """Layers that read the very same input tensor (e.g. q/k/v projections), in first-call order."""
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in inputs:
        for gx, members in groups:
            if gx is x:
                members.append(name)
                break
        else:
            groups.append((x, [name]))
    return [tuple(m) for _, m in groups if len(m) > 1]
