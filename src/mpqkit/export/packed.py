"""A compact file for a quantized model: b-bit packed integer weights, everything else raw.

Layout (one flat file, little-endian, no per-array headers, so its size is predictable)::

    b"MPQKPAK1"  u32 header length  zlib(JSON header)  payload

The JSON header holds the plan, each quantized layer's quantizer specs and a hash of the payload
layout. The payload walks the quantized model's ``state_dict`` in order:

* weight of a weight-quantized layer: its integer codes minus ``qmin``, packed at ``w_bits`` bits
  per value (:func:`pack_bits`); ceil(numel * w_bits / 8) bytes;
* zero points: packed at the layer's bits (nothing for symmetric quantizers, whose zero point is 0);
* scales (per channel for weights), every other parameter and buffer (biases, BatchNorm weights,
  running statistics): raw, in their dtype (float32);
* ``num_batches_tracked`` is skipped (unused in inference).

BatchNorm folding (default): a BN that directly follows a conv is folded into it — its per-channel
scale multiplies the conv's weight *scale* (the integer codes do not change) and its shift becomes
the conv's bias — so the file holds no BN parameters or running statistics. The ledger counts BN's
weight and bias (8 bytes per channel); the file holds a weight scale and a bias (8 bytes per
channel) instead, so what remains over the ledger is the zero points, the activation
quantizers, the header and byte rounding. The rebuilt model computes the same function up to
float rounding (BN applied inside the weights), which now and then moves a downstream activation
code by one step: logits agree closely on average, predictions almost always.
``fold_bn=False`` stores BN as is and reproduces the fake-quant model bit for bit, at the cost of
the running statistics and scales. ``save_packed`` returns the byte breakdown; the measured gaps are
in ``benchmarks/results/export_resnet20/table.md``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, fx, nn

from ..api import load_model
from ..budget import Ledger
from ..errors import CheckpointError, PlanError
from ..fileutil import atomic_write_bytes
from ..graph import discover
from ..plan import Plan
from ..quant.apply import set_submodule
from ..quant.fold import bn_affine, conv_bn_nodes
from ..quant.modules import QuantConv2d, QuantLinear, quantize_module
from ..quant.observers import QuantSpec
from ..quant.primitives import channel_shape, dequantize, quantize

MAGIC = b"MPQKPAK1"
FORMAT_VERSION = 1
_LEN = struct.Struct("<I")


# ------------------------------------------------------------------ bit packing
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``0 <= v < 2**bits`` at ``bits`` bits each into a uint8 array.

    Little-endian bit order: value ``i`` occupies stream bits ``i*bits .. (i+1)*bits - 1``, least
    significant first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. The result has
    ``ceil(len(values) * bits / 8)`` bytes; the unused high bits of the last byte are 0.
    """
    _check_bits(bits)
    v = np.asarray(values).reshape(-1)
    if v.dtype.kind not in "iub":
        raise ValueError(f"pack_bits needs integer values, got dtype {v.dtype}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must be in [0, {(1 << bits) - 1}] to pack at {bits} bits, "
                         f"got [{int(v.min())}, {int(v.max())}]")
    if bits == 8:
        return v.astype(np.uint8)
    if bits == 16:
        return v.astype("<u2").view(np.uint8)
    planes = (v.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` values packed by :func:`pack_bits` (uint8 for bits <= 8, else uint16)."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_size(count, bits)
    if packed.size < need:
        raise ValueError(f"{count} values at {bits} bits need {need} bytes, got {packed.size}")
    if bits == 8:
        return packed[:count].copy()
    if bits == 16:
        return packed[:need].view("<u2").astype(np.uint16)
    planes = np.unpackbits(packed[:need], count=count * bits, bitorder="little").reshape(count, bits)
    out = (planes.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1, dtype=np.uint16)
    return out.astype(np.uint8) if bits <= 8 else out


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` values packed at ``bits`` bits."""
    return math.ceil(count * bits / 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")


# ------------------------------------------------------------------ layout
def _spec_json(spec: QuantSpec | None) -> list[Any] | None:
    return None if spec is None else [spec.bits, spec.symmetric, spec.per_channel, spec.range_method]


def _spec_from_json(v: list[Any] | None) -> QuantSpec | None:
    return None if v is None else QuantSpec(bits=v[0], symmetric=v[1], per_channel=v[2], range_method=v[3])


def _layout(model: nn.Module) -> list[tuple[str, str, QuantSpec | None]]:
    """(state-dict key, encoding, spec) for every entry, in state-dict order.

    Encodings: ``codes`` (packed weight), ``zp`` (packed zero point), ``raw``, ``none`` (not stored).
    """
    quant = {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    out = []
    for key in model.state_dict():
        owner, _, attr = key.rpartition(".")
        m = quant.get(owner)
        if attr == "num_batches_tracked":
            out.append((key, "none", None))
        elif m is not None and attr == "weight" and m.w_spec is not None:
            out.append((key, "codes", m.w_spec))
        elif m is not None and attr in ("w_zero_point", "a_zero_point"):
            spec = m.w_spec if attr == "w_zero_point" else m.a_spec
            out.append((key, "none" if spec.symmetric else "zp", spec))
        else:
            out.append((key, "raw", None))
    return out


def _layout_hash(model: nn.Module, layout: list[tuple[str, str, QuantSpec | None]]) -> str:
    sd = model.state_dict()
    text = "\n".join(f"{k}|{tuple(sd[k].shape)}|{sd[k].dtype}|{enc}|{_spec_json(s)}" for k, enc, s in layout)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ BatchNorm folding
class _LeafTracer(fx.Tracer):
    """Treats (quantized) Conv2d/Linear and BatchNorm as leaves, so their names survive tracing."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where an eval-mode BatchNorm2d is the only consumer of a Conv2d's output."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model is simply stored unfolded
        return []
    return [(c.target, b.target) for c, b in conv_bn_nodes(graph.nodes, dict(model.named_modules()))]


def _fold_structure(model: nn.Module, pairs: Sequence[Sequence[str]]) -> None:
    """In place: each BN becomes Identity, its conv gets a bias and per-channel weight qparams.
    Shapes only; :func:`_fold_values` computes the values (the loader then overwrites them)."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        if getattr(conv, "w_spec", None) is not None and conv.w_scale.ndim == 0:
            shape = (conv.out_channels, 1, 1, 1)
            conv.w_scale = conv.w_scale.expand(shape).clone()
            conv.w_zero_point = conv.w_zero_point.expand(shape).clone()
        set_submodule(model, bn_name, nn.Identity())


@torch.no_grad()
def _fold_values(qmodel: nn.Module, pairs: Sequence[Sequence[str]]) -> nn.Module:
    """A copy of ``qmodel`` with every BN folded into its conv: the BN's per-channel scale goes into
    the conv's weight scale (integer codes unchanged), its shift into the conv's bias."""
    q = copy.deepcopy(qmodel)
    bns = {bn: q.get_submodule(bn) for _, bn in pairs}
    codes = {}
    for conv_name, _ in pairs:
        conv = q.get_submodule(conv_name)
        if getattr(conv, "w_spec", None) is not None:
            codes[conv_name] = quantize(conv.weight, conv.w_scale, conv.w_zero_point, *conv._w_range)
    old_bias = {c: (q.get_submodule(c).bias.clone() if q.get_submodule(c).bias is not None else None) for c, _ in pairs}
    _fold_structure(q, pairs)
    for conv_name, bn_name in pairs:
        conv, bn = q.get_submodule(conv_name), bns[bn_name]
        s, shift = bn_affine(bn, old_bias[conv_name])
        conv.bias.copy_(shift)
        if conv_name in codes:
            conv.w_scale.mul_(s.reshape(-1, 1, 1, 1))
            conv.weight.copy_(dequantize(codes[conv_name], conv.w_scale, conv.w_zero_point))
        else:
            conv.weight.mul_(s.reshape(-1, 1, 1, 1))
    return q


def _ledger(qmodel: nn.Module, plan: Plan, input_shape: Sequence[int]) -> tuple[Ledger, dict[str, float]]:
    """The cost ledger of ``qmodel``'s graph and each weight-quantized layer's weight size in it.

    Refuses a model whose weight bits are not the plan's: the ledger's figure would not describe
    the file."""
    quant = {n: m for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    model_bits = {f: m.w_spec.bits for f, m in quant.items() if m.w_spec is not None}
    plan_bits = {f: lq.w_bits for f, lq in plan.layers.items() if lq.w_bits is not None}
    bad = sorted(f for f in model_bits.keys() | plan_bits.keys() if model_bits.get(f) != plan_bits.get(f))
    if bad:
        raise PlanError(f"the model is not quantized with this plan: weight bits differ on layers {bad[:5]}")
    ledger = Ledger(discover(qmodel, tuple(input_shape)))
    assignment = plan.assignment()
    per_layer = {f: ledger.layer_cost("size", f, *assignment[f]) for f in model_bits if f in ledger.graph}
    return ledger, per_layer


# ------------------------------------------------------------------ save
@dataclass
class PackedReport:
    """File size and where its bytes go, next to the ledger's ``weight_bytes`` for the same plan."""

    path: Path
    file_bytes: int
    weights: int  # packed quantized weights
    params: int  # every other parameter, raw (biases, BN weight/bias, unquantized layers)
    qparams: int  # weight/activation scales and zero points
    buffers: int  # other buffers (BN running mean/var)
    header: int  # magic + length + compressed JSON header
    ledger_weight_bytes: float  # the ledger's weight_bytes of the plan (mpqkit.budget.Ledger.summary)
    folded_bn: int = 0  # BatchNorm layers folded into their conv
    layer_bytes: dict[str, int] = field(default_factory=dict)  # fqn -> packed weight bytes in the file
    ledger_layer_bytes: dict[str, float] = field(default_factory=dict)  # fqn -> the ledger's weight size

    @property
    def gap_pct(self) -> float:
        return 100.0 * (self.file_bytes - self.ledger_weight_bytes) / self.ledger_weight_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "file_bytes": self.file_bytes, "weights": self.weights,
                "params": self.params, "qparams": self.qparams, "buffers": self.buffers, "header": self.header,
                "ledger_weight_bytes": self.ledger_weight_bytes, "gap_pct": self.gap_pct, "folded_bn": self.folded_bn,
                "layer_bytes": self.layer_bytes, "ledger_layer_bytes": self.ledger_layer_bytes}


def _encode(t: Tensor, enc: str, spec: QuantSpec | None, module: nn.Module | None) -> bytes:
    if enc == "codes":
        assert spec is not None and module is not None
        qmin, qmax = module._w_range
        codes = quantize(t.detach(), module.w_scale, module.w_zero_point, qmin, qmax)
        return pack_bits(codes.to(torch.int64).cpu().numpy() - qmin, spec.bits).tobytes()
    if enc == "zp":
        assert spec is not None
        return pack_bits(t.detach().to(torch.int64).cpu().numpy() - spec.qrange[0], spec.bits).tobytes()
    return t.detach().cpu().contiguous().numpy().tobytes()


def save_packed(qmodel: nn.Module, plan: Plan, path: str | Path, fold_bn: bool = True, *,
                input_shape: Sequence[int]) -> PackedReport:
    """Write ``qmodel`` (a model quantized with ``plan``) as a packed file; see the module docstring.

    ``fold_bn`` (default): BatchNorm folded into the preceding conv's weight scale and bias — the
    deployable form, about the ledger's size; the same function as the fake-quant model up to float
    rounding. ``fold_bn=False``: BatchNorm stored as is, logits bit-identical, larger file.
    ``input_shape`` (no batch axis) lets the cost ledger trace the model; the report's ledger
    figures are :class:`~mpqkit.budget.Ledger`'s. The file is written atomically."""
    ledger, ledger_layers = _ledger(qmodel, plan, input_shape)
    pairs = conv_bn_pairs(qmodel) if fold_bn else []
    model = _fold_values(qmodel, pairs) if pairs else qmodel
    layout = _layout(model)
    sd = model.state_dict()
    modules = dict(model.named_modules())
    param_names = {n for n, _ in model.named_parameters()}
    specs = {n: [_spec_json(m.w_spec), _spec_json(m.a_spec)] for n, m in modules.items()
             if isinstance(m, (QuantConv2d, QuantLinear))}
    stored_plan = plan.to_dict()  # the header is part of the file size: keep what a loader and a user need
    stored_plan.pop("provenance", None)
    stored_plan["method"] = {"name": plan.method, "params": {}}
    header = zlib.compress(json.dumps({"format": FORMAT_VERSION, "layout": _layout_hash(model, layout),
                                       "specs": specs, "folded": bool(pairs), "plan": stored_plan},
                                      separators=(",", ":")).encode(), 9)
    sizes = {"weights": 0, "params": 0, "qparams": 0, "buffers": 0}
    layer_bytes: dict[str, int] = {}
    chunks = [MAGIC, _LEN.pack(len(header)), header]
    for key, enc, spec in layout:
        if enc == "none":
            continue
        owner, _, attr = key.rpartition(".")
        blob = _encode(sd[key], enc, spec, modules.get(owner))
        chunks.append(blob)
        if enc == "codes":
            layer_bytes[owner] = len(blob)
        kind = ("weights" if enc == "codes" else "qparams" if attr in ("w_scale", "w_zero_point", "a_scale", "a_zero_point")
                else "params" if key in param_names else "buffers")
        sizes[kind] += len(blob)
    path = Path(path)
    data = b"".join(chunks)
    atomic_write_bytes(path, data)
    return PackedReport(path, len(data), header=len(MAGIC) + _LEN.size + len(header),
                        ledger_weight_bytes=ledger.summary(plan.assignment())["weight_bytes"], folded_bn=len(pairs),
                        layer_bytes=layer_bytes, ledger_layer_bytes=ledger_layers, **sizes)


# ------------------------------------------------------------------ load
def _read(path: Path) -> tuple[dict[str, Any], memoryview]:
    if not path.is_file():
        raise CheckpointError(f"packed model file not found: {path}")
    raw = path.read_bytes()
    try:
        if raw[: len(MAGIC)] != MAGIC:
            raise ValueError("bad magic bytes")
        (n,) = _LEN.unpack_from(raw, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        header = json.loads(zlib.decompress(raw[start : start + n]))
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"format version {header.get('format')!r}, this mpqkit reads {FORMAT_VERSION}")
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is unusable
        raise CheckpointError(f"{path} is not an mpqkit packed model file ({e})") from None
    return header, memoryview(raw)[start + n :]


def _skeleton(model: nn.Module, specs: dict[str, list[Any]]) -> nn.Module:
    """A quantized copy of ``model`` with placeholder quantizer parameters of the right shapes."""
    q = copy.deepcopy(model).eval()
    names = dict(q.named_modules())
    for fqn, (w_json, a_json) in specs.items():
        m = names.get(fqn)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise PlanError(f"the packed file quantizes layer '{fqn}', which this model does not have "
                            "as a Conv2d/Linear")
        w_spec, a_spec = _spec_from_json(w_json), _spec_from_json(a_json)
        w_qp = a_qp = None
        if w_spec is not None:
            shape = channel_shape(m.weight, 0 if w_spec.per_channel else None)
            w_qp = (torch.ones(shape), torch.zeros(shape), *w_spec.qrange)
        if a_spec is not None:
            a_qp = (torch.ones(()), torch.zeros(()), *a_spec.qrange)
        set_submodule(q, fqn, quantize_module(m, w_spec, a_spec, w_qparams=w_qp, a_qparams=a_qp))
    return q


def _decode(buf: memoryview, pos: int, ref: Tensor, enc: str, spec: QuantSpec | None) -> tuple[Tensor, int]:
    n = ref.numel()
    if enc in ("codes", "zp"):
        assert spec is not None
        size = packed_size(n, spec.bits)
        vals = unpack_bits(np.frombuffer(buf, np.uint8, size, pos), spec.bits, n).astype(np.int64) + spec.qrange[0]
        return torch.from_numpy(vals).to(ref.dtype).reshape(ref.shape), pos + size
    size = n * ref.element_size()
    arr = np.frombuffer(buf, torch.empty((), dtype=ref.dtype).numpy().dtype, n, pos).copy()
    return torch.from_numpy(arr).reshape(ref.shape), pos + size


def load_packed(path: str | Path, model: Any, *, checkpoint: str | None = None, models_dir: str | None = None,
                input_shape: Sequence[int] | None = None) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save_packed`; its logits equal the original's.

    ``model`` is a model name, a ModelBundle or an nn.Module giving the architecture; named models
    are built with random weights (every tensor is overwritten from the file, so no checkpoint is
    needed), a given module is copied, never changed.
    """

    path = Path(path)
    header, buf = _read(path)
    if isinstance(model, str) and checkpoint is None:
        bundle = load_model(model, models_dir=models_dir, random_init=True)
    else:
        bundle = load_model(model, checkpoint=checkpoint, models_dir=models_dir, input_shape=input_shape)
    qmodel = _skeleton(bundle.model, header["specs"])
    if header.get("folded"):  # the same (conv, bn) pairs the writer found: tracing is deterministic
        _fold_structure(qmodel, conv_bn_pairs(qmodel))
    layout = _layout(qmodel)
    if _layout_hash(qmodel, layout) != header["layout"]:
        raise CheckpointError(f"{path} was written for another model or plan than '{bundle.name}' "
                              f"(plan for '{header['plan'].get('model', {}).get('name', '?')}'): tensor layout differs")
    sd = qmodel.state_dict()
    state: dict[str, Tensor] = {}
    pos = 0
    try:
        for key, enc, spec in layout:
            if enc == "none":
                state[key] = torch.zeros_like(sd[key])
            else:
                state[key], pos = _decode(buf, pos, sd[key], enc, spec)
    except ValueError as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {e}") from None
    if pos != len(buf):
        raise CheckpointError(f"{path} is corrupt: payload has {len(buf)} bytes, the layout needs {pos}")
    for key, enc, _ in layout:  # codes -> the fake-quant weight, which fake-quant maps to itself
        if enc == "codes":
            owner = key.rpartition(".")[0]
            state[key] = dequantize(state[key], state[f"{owner}.w_scale"], state[f"{owner}.w_zero_point"])
    qmodel.load_state_dict(state, strict=True)
    return qmodel


def read_packed_plan(path: str | Path) -> Plan:
    """The plan stored in a packed file."""
    header, _ = _read(Path(path))
    return Plan.from_dict(header["plan"], source=str(path))
