"""Export quantized models: QDQ ONNX (verified in onnxruntime) and a compact bit-packed file.

``onnx`` and ``onnxruntime`` are imported only when ONNX export or checking is used.
"""
from __future__ import annotations

from .onnx import ExportError, ExportReport, check_onnx, export_onnx
from .packed import PackedReport, load_packed, pack_bits, read_packed_plan, save_packed, unpack_bits

__all__ = ["export_onnx", "check_onnx", "ExportReport", "ExportError", "save_packed", "load_packed",
           "read_packed_plan", "PackedReport", "pack_bits", "unpack_bits"]
