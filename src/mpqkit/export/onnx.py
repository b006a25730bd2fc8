"""Export a fake-quant model to ONNX with QuantizeLinear/DequantizeLinear (QDQ), and verify it.

How the graph is built: a copy of the quantized model, in which every QuantConv2d/QuantLinear marks
its input activation and its weight with a placeholder op (``mpqkit::Mark``), is exported with
PyTorch's TorchScript exporter (``dynamo=False``; it needs no extra package). The placeholders are
then lowered with the ``onnx`` helper API:

* weight: the integer codes, computed with mpqkit's own :func:`~mpqkit.quant.primitives.quantize`
  (bit-identical to the fake-quant forward), become an integer initializer followed by
  ``DequantizeLinear`` (per channel: ``axis=0``; per tensor: scalar scale/zero point);
* input activation: ``QuantizeLinear -> DequantizeLinear`` with the layer's calibrated scale and
  zero point.

Integer types: the narrowest ONNX type that holds the plan's grid — (u)int4 for 1-4 bits, (u)int8
for 5-8, (u)int16 for 9-16 (4- and 16-bit types need opset 21); unsigned for asymmetric grids,
signed for symmetric ones. Bits with no ONNX type of their own (1-3, 5-7, 9-15) are stored in the
next wider type with one warning naming the layers: weight codes stay inside the plan's range by
construction, and a widened activation gets a ``Clip`` after its ``DequantizeLinear`` to the plan's
real range, so results are unchanged. The placeholders also keep the exporter from folding
BatchNorm into (quantized) conv weights.

Exactness (:func:`check_onnx`): dequantized weights are bit-identical to PyTorch's. Activation
codes can differ by one step where a value sits within float rounding of a rounding boundary:
conv/matmul kernels sum in another order than PyTorch's (~1e-6 apart), and ONNX computes
``x / scale`` where mpqkit computes ``x * (1 / scale)``. In a deep network such a flip perturbs the
next layers and flips a few more codes there. ``check_onnx`` uses ``ORT_DISABLE_ALL`` by default,
so onnxruntime runs exactly the graph that was written (``OPTIMIZATION_LEVELS`` selects others).
How often codes flip, and what each optimization level does to the graph, is measured in
``benchmarks/results/export_resnet20/table.md`` (docs/USAGE.md, "Deployable output").
"""
from __future__ import annotations

import copy
import importlib
import io
import json
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import MpqkitError
from ..fileutil import atomic_write_bytes
from ..plan import Plan
from ..quant.apply import model_device
from ..quant.modules import QuantConv2d, QuantLinear, QuantMixin
from ..quant.primitives import quantize
from ..zoo.data import LabeledData

MARK_DOMAIN = "mpqkit"
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's newest opset; the graph is relabelled after
MIN_OPSET = 13  # per-axis DequantizeLinear
OPTIMIZATION_LEVELS = ("disable_all", "basic", "extended", "all")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(MpqkitError):
    """The model or plan cannot be written as ONNX (e.g. bits with no integer type at this opset)."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: file, opset, and the integer type chosen per layer."""

    path: Path
    opset: int
    bytes: int
    weight_types: dict[str, str] = field(default_factory=dict)  # fqn -> ONNX type name of its weight
    act_types: dict[str, str] = field(default_factory=dict)  # fqn -> ONNX type name of its input
    widened: list[str] = field(default_factory=list)  # "fqn weight 3-bit -> UINT4", ...
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "opset": self.opset, "bytes": self.bytes, "weight_types": self.weight_types,
                "act_types": self.act_types, "widened": self.widened, "seconds": self.seconds}


def require(package: str) -> Any:
    """Import ``onnx``/``onnxruntime``, or fail with one clear message naming what to install."""

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ExportError(f"ONNX export needs the '{package}' package: pip install onnx onnxruntime") from None


# ------------------------------------------------------------------ integer containers
def _int_types() -> list[tuple[int, bool, int, int, Any]]:
    """(width, signed, min opset, ONNX type, numpy dtype), narrowest first."""
    # lazy: only ONNX export needs onnx
    import ml_dtypes
    from onnx import TensorProto as T

    return [(4, True, 21, T.INT4, ml_dtypes.int4), (4, False, 21, T.UINT4, ml_dtypes.uint4),
            (8, True, 10, T.INT8, np.int8), (8, False, 10, T.UINT8, np.uint8),
            (16, True, 21, T.INT16, np.int16), (16, False, 21, T.UINT16, np.uint16)]


def container(qmin: int, qmax: int, opset: int) -> tuple[int, int, Any]:
    """``(width, ONNX type, numpy dtype)`` of the narrowest integer type holding ``[qmin, qmax]``
    (signed for a grid with negative codes, i.e. a symmetric quantizer; unsigned otherwise)."""
    signed = qmin < 0
    for width, is_signed, min_opset, onnx_type, dtype in _int_types():
        lo, hi = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2**width - 1)
        if is_signed == signed and opset >= min_opset and lo <= qmin and qmax <= hi:
            return width, onnx_type, dtype
    raise ExportError(f"no ONNX integer type at opset {opset} holds the range [{qmin}, {qmax}] "
                      f"(4- and 16-bit types need opset 21)")


def _bits(qmin: int, qmax: int) -> int:
    return int(qmax - qmin).bit_length()


# ------------------------------------------------------------------ placeholder marks
class _Mark(torch.autograd.Function):
    """Fake-quant in PyTorch; a ``mpqkit::Mark`` placeholder in the exported graph."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int,  # type: ignore[override]
                layer: str, role: str) -> Tensor:
        return quantize(x, scale, zp, qmin, qmax).sub_(zp).mul_(scale).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, layer, role):  # noqa: ANN001, ANN205 - exporter API
        out = g.op(f"{MARK_DOMAIN}::Mark", x, layer_s=layer, role_s=role)
        out.setType(x.type())
        return out


def _export_forward(self: QuantMixin, x: Tensor) -> Tensor:
    """Forward of a quantized layer in the export copy: marked input and weight, then conv/linear."""
    if self.a_spec is not None:
        x = _Mark.apply(x, self.a_scale, self.a_zero_point, *self._a_range, self._fqn, "act")
    w = self.weight
    if self.w_spec is not None:
        w = _Mark.apply(w, self.w_scale, self.w_zero_point, *self._w_range, self._fqn, "weight")
    if isinstance(self, QuantConv2d):
        return self._conv_forward(x, w, self.bias)
    return F.linear(x, w, self.bias)


def quant_layers(qmodel: nn.Module) -> dict[str, QuantMixin]:
    """The quantized layers of a model by name."""
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def _marked_copy(qmodel: nn.Module) -> nn.Module:
    model = copy.deepcopy(qmodel).cpu().eval()
    for fqn, m in quant_layers(model).items():
        m._fqn = fqn
        m.forward = types.MethodType(_export_forward, m)
    return model


def _torchscript_export(model: nn.Module, input_shape: tuple[int, ...], opset: int,
                        input_dtype: torch.dtype = torch.float32) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's concern
        torch.onnx.export(model, (torch.zeros(1, *input_shape, dtype=input_dtype),), buf, dynamo=False,
                          opset_version=min(opset, TORCHSCRIPT_MAX_OPSET), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          custom_opsets={MARK_DOMAIN: 1}, do_constant_folding=True)
    return buf.getvalue()


# ------------------------------------------------------------------ lowering marks to QDQ
class _Lowering:
    """Replaces each Mark node by real QDQ nodes; collects initializers and the report."""

    def __init__(self, layers: dict[str, QuantMixin], opset: int) -> None:
        self.layers, self.opset = layers, opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.report = ExportReport(Path(), opset, 0)

    def _init(self, name: str, arr: np.ndarray) -> str:
        # lazy: only ONNX export needs onnx
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))  # keeps 0-d
        return name

    def _int_init(self, name: str, values: Tensor, dtype: Any) -> str:
        return self._init(name, values.detach().cpu().to(torch.int64).numpy().astype(dtype))

    def _type(self, fqn: str, role: str, qmin: int, qmax: int) -> tuple[int, Any]:
        # lazy: only ONNX export needs onnx
        from onnx import TensorProto

        width, onnx_type, dtype = container(qmin, qmax, self.opset)
        name = TensorProto.DataType.Name(onnx_type)
        bits = _bits(qmin, qmax)
        if bits != width:
            self.report.widened.append(f"{fqn} {role} {bits}-bit -> {name}")
        (self.report.weight_types if role == "weight" else self.report.act_types)[fqn] = name
        return width, dtype

    def weight(self, fqn: str, out: str) -> None:
        # lazy: only ONNX export needs onnx
        from onnx import helper

        m = self.layers[fqn]
        qmin, qmax = m._w_range
        _, dtype = self._type(fqn, "weight", qmin, qmax)
        codes = quantize(m.weight.detach(), m.w_scale, m.w_zero_point, qmin, qmax)
        per_channel = m.w_spec.per_channel and m.w_scale.dim() > 0
        scale, zp = (m.w_scale.reshape(-1), m.w_zero_point.reshape(-1)) if per_channel else (m.w_scale, m.w_zero_point)
        ins = [self._int_init(f"{fqn}.weight_quantized", codes, dtype),
               self._init(f"{fqn}.weight_scale", scale.detach().cpu().float().numpy()),
               self._int_init(f"{fqn}.weight_zero_point", zp, dtype)]
        self.nodes.append(helper.make_node("DequantizeLinear", ins, [out], name=f"{fqn}/weight_dequant",
                                           **({"axis": 0} if per_channel else {})))

    def act(self, fqn: str, x_in: str, out: str) -> None:
        # lazy: only ONNX export needs onnx
        from onnx import helper

        m = self.layers[fqn]
        qmin, qmax = m._a_range
        width, dtype = self._type(fqn, "act", qmin, qmax)
        scale = m.a_scale.detach().cpu().float().reshape(())
        zp = m.a_zero_point.detach().cpu().reshape(())
        s = self._init(f"{fqn}.input_scale", scale.numpy())
        z = self._int_init(f"{fqn}.input_zero_point", zp, dtype)
        deq = out if _bits(qmin, qmax) == width else f"{fqn}/input_dequantized"
        self.nodes += [helper.make_node("QuantizeLinear", [x_in, s, z], [f"{fqn}/input_quantized"], name=f"{fqn}/act_quant"),
                       helper.make_node("DequantizeLinear", [f"{fqn}/input_quantized", s, z], [deq], name=f"{fqn}/act_dequant")]
        if deq != out:  # widened container: clip to the plan's grid, in real values, exactly as DQ computes them
            lo = (np.float32(qmin) - np.float32(zp.item())) * scale.numpy()
            hi = (np.float32(qmax) - np.float32(zp.item())) * scale.numpy()
            self.nodes.append(helper.make_node("Clip", [deq, self._init(f"{fqn}.input_min", lo),
                                                        self._init(f"{fqn}.input_max", hi)], [out], name=f"{fqn}/act_clip"))


def _attr(node: Any, name: str) -> str:
    return next(a.s.decode() for a in node.attribute if a.name == name)


def lower_marks(model_bytes: bytes, layers: dict[str, QuantMixin], opset: int) -> tuple[Any, ExportReport]:
    """The exported graph with every Mark replaced by QDQ nodes, relabelled to ``opset``."""
    # lazy: only ONNX export needs onnx
    import onnx

    model = onnx.load_from_string(model_bytes)
    low = _Lowering(layers, opset)
    new_nodes = []
    for node in model.graph.node:
        if node.domain != MARK_DOMAIN:
            new_nodes.append(node)
            continue
        fqn, role = _attr(node, "layer"), _attr(node, "role")
        start = len(low.nodes)
        if role == "weight":
            low.weight(fqn, node.output[0])  # the float weight initializer becomes unused
        else:
            low.act(fqn, node.input[0], node.output[0])
        new_nodes += low.nodes[start:]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + low.inits)
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", opset)])
    model.producer_name = "mpqkit"
    onnx.checker.check_model(model, full_check=True)
    return model, low.report


def export_onnx(qmodel: nn.Module, plan: Plan, input_shape: tuple[int, ...], path: str | Path,
                opset: int = 21, input_dtype: torch.dtype = torch.float32) -> ExportReport:
    """Write ``qmodel`` (from :func:`mpqkit.apply_plan`) as a QDQ ONNX model with a dynamic batch axis.
    ``input_dtype``: the input's type (``torch.long`` for token ids).

    ``plan`` is the plan the model was quantized with: the file records it in its metadata, and
    every planned layer must be a quantized layer of ``qmodel``. Unquantized layers stay float.
    The file is written atomically: a failed export leaves any earlier file at ``path`` as it was.
    """
    onnx = require("onnx")
    t0 = time.perf_counter()
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset must be in {MIN_OPSET}..{onnx.defs.onnx_opset_version()}, got {opset}")
    layers = quant_layers(qmodel)
    missing = [f for f, lq in plan.layers.items() if (lq.w_bits or lq.a_bits) and f not in layers]
    if missing:
        raise ExportError(f"the model is not quantized with this plan: layers {missing[:5]} are not quantized")
    uncalibrated = [f for f, m in layers.items() if not m.activation_calibrated]
    if uncalibrated:
        raise ExportError(f"activation quantizers of {uncalibrated[:5]} are not calibrated")
    graph = _torchscript_export(_marked_copy(qmodel), tuple(input_shape), opset, input_dtype)
    model, report = lower_marks(graph, layers, opset)
    onnx.helper.set_model_props(model, {"mpqkit_plan": json.dumps(plan.to_dict(), separators=(",", ":"))})
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())  # temp file + rename: never a half-written .onnx
    if report.widened:
        warnings.warn("ONNX has no integer type of these widths; stored in the next wider type (values stay "
                      "within the plan's range): " + "; ".join(report.widened), stacklevel=2)
    report.path, report.bytes, report.seconds = path, path.stat().st_size, time.perf_counter() - t0
    return report


# ------------------------------------------------------------------ verification
def _ort_level_name(optimization: str) -> str:
    return "ORT_DISABLE_ALL" if optimization == "disable_all" else f"ORT_ENABLE_{optimization.upper()}"


def ort_session(path: str | Path, optimization: str = "disable_all", threads: int = 1) -> Any:
    """A CPU onnxruntime session with the given graph optimization level and thread count."""
    ort = require("onnxruntime")
    if optimization not in OPTIMIZATION_LEVELS:
        raise MpqkitError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ort_level_name(optimization))
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def check_onnx(path: str | Path, qmodel: nn.Module, data: LabeledData, batch_size: int = 500,
               optimization: str = "disable_all", threads: int = 1, progress: bool = False) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime and the PyTorch fake-quant model on ``data``; compare.

    Returns top-1 of each, their difference in percentage points, max |logit difference|, the
    fraction of samples whose predicted class agrees, and the session options used. ``progress``
    shows a progress bar.
    """

    sess = ort_session(path, optimization, threads)
    qmodel = qmodel.eval()
    device = model_device(qmodel)
    n = correct_onnx = correct_torch = agree = 0
    max_diff = 0.0
    for images, labels in tqdm(data.batches(batch_size), total=-(-len(data) // batch_size), desc="check onnx",
                               unit="batch", disable=not progress, leave=False):
        ref = qmodel(images.to(device)).float().cpu()
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0])
        max_diff = max(max_diff, float((got - ref).abs().max()))
        p_onnx, p_torch = got.argmax(1), ref.argmax(1)
        correct_onnx += int((p_onnx == labels).sum())
        correct_torch += int((p_torch == labels).sum())
        agree += int((p_onnx == p_torch).sum())
        n += len(labels)
    if n == 0:
        raise MpqkitError("check_onnx: the data is empty")
    top1_onnx, top1_torch = correct_onnx / n, correct_torch / n
    return {"n": n, "top1_onnx": top1_onnx, "top1_torch": top1_torch,
            "top1_diff_pt": 100 * (top1_onnx - top1_torch), "max_abs_logit_diff": max_diff,
            "argmax_agreement": agree / n, "onnxruntime": require("onnxruntime").__version__,
            "session_options": {"graph_optimization_level": _ort_level_name(optimization),
                                "intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                "providers": ["CPUExecutionProvider"]}}
