"""BatchNorm folding, shared by the probe engine (fused conv+BN kernels) and the packed export."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, fx, nn


def conv_bn_nodes(nodes: Iterable[fx.Node], modules: Mapping[str, nn.Module]) -> list[tuple[fx.Node, fx.Node]]:
    """(conv node, bn node) where an eval-mode BatchNorm2d is the only consumer of a Conv2d's output."""
    pairs = []
    for n in nodes:
        if n.op != "call_module" or not isinstance(modules.get(n.target), nn.Conv2d) or len(n.users) != 1:
            continue
        (u,) = n.users
        bn = modules.get(u.target) if u.op == "call_module" else None
        if (isinstance(bn, nn.BatchNorm2d) and u.args == (n,) and not u.kwargs and not bn.training
                and bn.track_running_stats):
            pairs.append((n, u))
    return pairs


def bn_affine(bn: nn.BatchNorm2d, conv_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(scale, shift) per output channel such that BN(conv(x) + b) = conv(x)·scale + shift."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv_bias if conv_bias is not None else torch.zeros_like(bn.running_mean)
    shift = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0.0)
    return scale.detach(), shift.detach()
