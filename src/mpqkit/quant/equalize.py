"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019) of consecutive convolutions.

For a pair conv1 → [BatchNorm] → [ReLU / ReLU6 / ZeroPad2d / Identity] → conv2 in which conv2 reads
exactly conv1's output channels (a plain conv or a depthwise one), dividing channel ``c`` of conv1's
output by ``s_c`` and multiplying conv2's input channel ``c`` by ``s_c`` leaves the network's function
unchanged. With ``s_c = sqrt(r1_c / r2_c)`` (``r1_c``: range of conv1's folded weights of output
channel ``c``, ``r2_c``: range of conv2's weights reading channel ``c``) both become
``sqrt(r1_c·r2_c)``: the channels of conv2's weights and of the activation between the two convs get
similar ranges, which per-tensor activation grids and conv2's weight grid prefer.

How each piece follows the scale, exactly:

* BatchNorm after conv1 (eval mode): its weight and bias are divided by ``s`` (``BN(z)/s``); conv1's
  own weights are left as they are. Without BN, conv1's weight rows and bias are divided.
* ReLU is positively homogeneous (``relu(z/s) = relu(z)/s``). **ReLU6 is not**: ``min(max(z,0),6)/s =
  min(max(z/s,0), 6/s)``, so the ReLU6 module is replaced by a :class:`ChannelClip` with the per-channel
  upper bound ``6/s_c`` — the fp outputs stay exactly those of the original model (the DFQ paper
  instead replaces ReLU6 by ReLU, which changes the fp model; we do not).
* zero padding commutes with the scale.

Pairs are found on the torch.fx graph (every node of the chain used once); the scales are iterated
over all pairs until they settle, since a depthwise conv is conv2 of one pair and conv1 of the next.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..tracing import trace_model

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.ZeroPad2d, nn.Identity, nn.Dropout)


class ChannelClip(nn.Module):
    """``min(max(x, 0), upper_c)`` per channel: what a ReLU6 becomes once its input channel ``c`` was
    divided by ``s_c`` (``upper_c = 6 / s_c``)."""

    def __init__(self, upper: Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(F.relu(x), self.upper)


def _single_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def find_pairs(model: nn.Module) -> list[tuple[str, str | None, list[str], str]]:
    """``(conv1, bn or None, [activation modules to rescale], conv2)`` for every equalizable pair, in
    graph order; empty when the model does not trace."""
    gm = trace_model(model)
    if gm is None:
        return []
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(mods.get(n.target), nn.Conv2d):
            continue
        conv1 = mods[n.target]
        bn, acts, cur = None, [], n
        while (nxt := _single_user(cur)) is not None and nxt.args and nxt.args[0] is cur:
            m = mods.get(nxt.target) if nxt.op == "call_module" else None
            if isinstance(m, nn.BatchNorm2d) and cur is n and not m.training and m.affine:
                bn = nxt.target
            elif isinstance(m, (*_PASS_MODULES, ChannelClip)):
                if isinstance(m, (nn.ReLU6, ChannelClip)):
                    acts.append(nxt.target)
            elif nxt.op == "call_function" and nxt.target in (F.relu, torch.relu) and len(nxt.args) == 1:
                pass
            elif isinstance(m, nn.Conv2d):
                dw = m.groups == m.in_channels == m.out_channels
                shared = any(calls.get(t, 0) > 1 for t in (n.target, bn, *acts, nxt.target) if t is not None)
                if m.in_channels == conv1.out_channels and (m.groups == 1 or dw) and len(nxt.args) == 1 \
                        and not shared:
                    pairs.append((n.target, bn, acts, nxt.target))
                break
            else:
                break
            cur = nxt
    return pairs


def _in_ranges(conv2: nn.Conv2d) -> Tensor:
    """Per input channel, the largest |weight| of conv2 that reads it."""
    w = conv2.weight.detach().abs()
    if conv2.groups > 1:  # depthwise: channel c is row c
        return w.flatten(1).amax(1)
    return w.transpose(0, 1).flatten(1).amax(1)


def _out_ranges(conv1: nn.Conv2d, bn: nn.BatchNorm2d | None) -> Tensor:
    """Per output channel, the largest |weight| of conv1 with the BatchNorm scale folded in."""
    r = conv1.weight.detach().abs().flatten(1).amax(1)
    if bn is not None:
        r = r * (bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)).abs()
    return r


@torch.no_grad()
def _scale_pair(model: nn.Module, conv1: str, bn: str | None, acts: list[str], conv2: str) -> float:
    c1, c2 = model.get_submodule(conv1), model.get_submodule(conv2)
    b = model.get_submodule(bn) if bn is not None else None
    r1, r2 = _out_ranges(c1, b), _in_ranges(c2)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / r2.clamp(min=1e-30)), torch.ones_like(r1))
    if b is not None:
        b.weight.div_(s)
        b.bias.div_(s)
    else:
        c1.weight.div_(s.reshape(-1, 1, 1, 1))
        if c1.bias is not None:
            c1.bias.div_(s)
    for a in acts:
        m = model.get_submodule(a)
        upper = m.upper.reshape(-1) if isinstance(m, ChannelClip) else torch.full_like(s, 6.0)
        parent, _, child = a.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ChannelClip(upper / s))
    if c2.groups > 1:
        c2.weight.mul_(s.reshape(-1, 1, 1, 1))
    else:
        c2.weight.mul_(s.reshape(1, -1, 1, 1))
    return float((s.log().abs()).max())


def equalize(model: nn.Module, iters: int = 20, tol: float = 1e-6) -> list[tuple[str, str]]:
    """Equalize every pair of ``model`` in place (function unchanged); returns the (conv1, conv2) pairs."""
    pairs = find_pairs(model)
    for _ in range(iters):
        # an activation module replaced in one round is found again as a ChannelClip in the next
        change = max((_scale_pair(model, *p) for p in pairs), default=0.0)
        if change < tol:
            break
    return [(p[0], p[3]) for p in pairs]
