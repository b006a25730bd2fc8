"""A traced model as a program of torch.fx nodes that runs from any cut point.

Shared by the probe engine (probes start at the first overridden layer from the live tensors kept
there) and by the PTQ steps that walk a network layer by layer (GPTQ, bias correction): both need
"run the network from node i to node j with these modules swapped in". Models that torch.fx cannot
trace get ``None`` from :func:`trace_model`; callers fall back to full forwards.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .quant.fold import bn_affine, conv_bn_nodes
from .quant.modules import QuantAct, QuantMixin

log = logging.getLogger("mpqkit")

_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


class _Tracer(fx.Tracer):
    """torch.fx's tracer with mpqkit's quantized modules (and fake-quant taps) as leaves, so a
    quantized copy of a model traces like the fp model it came from."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantMixin, QuantAct)) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module) -> fx.GraphModule | None:
    """Trace with torch.fx and rewrite in-place ops, which would corrupt cached tensors; None when
    the model does not trace (or takes more than one input). The GraphModule shares the model's
    submodules: a module changed in place is seen by the next run."""
    try:
        graph = _Tracer().trace(model)
        gm = fx.GraphModule(model, graph, type(model).__name__)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use the fallback
        log.warning("torch.fx could not trace the model (%s): falling back to full forwards (same results, "
                    "slower)", e)
        return None
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
            node.target = _INPLACE_FUNCTIONS[node.target]
        elif node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
                and not node.target.startswith("_") and hasattr(torch.Tensor, node.target[:-1]):
            node.target = node.target[:-1]
        if "inplace" in node.kwargs:
            node.kwargs = {**node.kwargs, "inplace": False}
    for m in gm.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        log.warning("model takes %d inputs; the probe engine supports one: full forward per probe", len(placeholders))
        return None
    return gm


class Stacked(nn.Module):
    """K variants of one layer applied to a batch stacked K times along dim 0: variant k gets the
    k-th of K equal slices (``Program.run`` does the same inside a fused conv → BN). Lets K probes that
    differ only in that layer run as one forward of K × the batch."""

    def __init__(self, variants: Sequence[nn.Module]):
        super().__init__()
        self.variants = list(variants)  # not registered: the stack holds no parameters of its own

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        k = len(self.variants)
        if x.shape[0] % k:
            raise ValueError(f"a stack of {k} variants needs a batch divisible by {k}, got {x.shape[0]}")
        return x.split(x.shape[0] // k)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.cat([m(part, *args, **kwargs) for m, part in zip(self.variants, self.split(x))])


class Program:
    """A traced model as a list of nodes that can be run from any cut point."""

    def __init__(self, gm: fx.GraphModule, layer_names: Iterable[str], fold_bn: bool = True,
                 channels_last: bool = False):
        self.gm = gm
        self.channels_last = channels_last
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in self.nodes}
        self.frees: list[list[fx.Node]] = [[] for _ in self.nodes]  # nodes dead after node i ran
        for n, last in self.last_use.items():
            if n.op != "output":
                self.frees[last].append(n)
        self.cut: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and n.target in layer_names and n.target not in self.cut:
                self.cut[n.target] = i
        # conv → BatchNorm pairs (eval-mode BN, conv output used only by it): run as one fused conv
        self.bn_after: dict[fx.Node, nn.BatchNorm2d] = {}
        if fold_bn:
            for conv, bn in conv_bn_nodes(self.nodes, self.modules):
                if self.modules[conv.target].padding_mode == "zeros":
                    self.bn_after[conv] = self.modules[bn.target]
        self._fused: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def _conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
        """BN(conv(x)) as one conv with the BN folded into the (possibly quantized) weight and bias."""
        key = (id(conv), id(bn))
        if key not in self._fused:
            w = conv.quantized_weight() if hasattr(conv, "quantized_weight") else conv.weight
            scale, shift = bn_affine(bn, conv.bias)
            wf = (w * scale.reshape(-1, 1, 1, 1)).detach()
            if self.channels_last:
                wf = wf.contiguous(memory_format=torch.channels_last)
            self._fused[key] = (wf, shift)
        wf, bf = self._fused[key]
        if hasattr(conv, "quantize_input"):
            x = conv.quantize_input(x)
        return F.conv2d(x, wf, bf, conv.stride, conv.padding, conv.dilation, conv.groups)

    def initial_env(self, x: Tensor) -> dict[fx.Node, Tensor]:
        return {self.nodes[0]: x}

    def run(self, env: dict[fx.Node, Any], start: int, stop: int | None,
            swaps: Mapping[str, nn.Module], taps: Mapping[str, Callable[[Tensor], None]] | None = None) -> Any:
        """Run nodes [start, stop) on a copy of ``env``; returns the env (or the output at the end).
        ``taps`` receive the output of the named modules as they run."""
        env = dict(env)
        stop = len(self.nodes) if stop is None else stop
        fused: set[fx.Node] = set()  # BN nodes already applied inside their conv in this run
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            if node in fused:
                env[node] = env[node.args[0]]
                for dead in self.frees[i]:
                    env.pop(dead, None)
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "call_module":
                mod = swaps[node.target] if node.target in swaps else self.modules[node.target]
                bn = self.bn_after.get(node)
                tapped = bool(taps) and node.target in taps
                if bn is not None and not kwargs and len(args) == 1:
                    env[node] = (torch.cat([self._conv_bn(m, bn, x) for m, x in zip(mod.variants, mod.split(args[0]))])
                                 if isinstance(mod, Stacked) else self._conv_bn(mod, bn, args[0]))
                    fused.add(next(iter(node.users)))
                    if tapped:  # the tap sees the conv's own output; the network goes on with the fused one
                        taps[node.target](mod(*args))
                else:
                    env[node] = mod(*args, **kwargs)
                    if tapped:
                        taps[node.target](env[node])
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                obj: Any = self.gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = obj
            elif node.op == "output":
                return args[0]
            for dead in self.frees[i]:
                env.pop(dead, None)
        return env
