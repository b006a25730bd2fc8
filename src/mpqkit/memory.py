"""Memory planning for a search: what it will hold before any cache, checked against ``--max-memory``
before the long work starts, and the probe engine's prefix cache sized inside what is left.

The estimate is a sum of named parts (MB), each from sizes known before the search runs:

- ``process``: what the process holds now (model, loaded data, the torch runtime);
- ``model copies``: the probe engine's and the layer-PTQ builder's private fp copies, plus one
  quantized copy of every layer per candidate bit-width the search may build;
- ``calibration copies``: the engine's batches and the builder's images;
- ``probe working set``: the live tensors at a layer cut for every calibration image (the walked
  reference and the probe run from it), at the largest layer input, twice;
- ``method``: what the method adds (e.g. a gradient pass on a chunk: ``Method.memory``);
- ``calibration pass``: the activation-range calibration's forward over one chunk of images
  (``quant.calibration``): the widest layer's input and output for the chunk, plus the observers'
  bounded transient (three buffers of ``UPDATE_PIECE`` values).

The probe working set, the method's own pass and the calibration pass are never live at the same
time (they run one after the other): the peak counts the largest of them. What is left under the
limit after the parts' peak goes to the prefix cache (the kept layer-cut tensors, which only save
time; kept while any of them runs), none when nothing is left. Without a limit the same sizing aims at
``DEFAULT_TARGET_MB`` without refusing anything. The estimate models the main buffers, not
every short-lived temporary.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from .errors import MpqkitError
from .profile import resident_mb
from .quant.calibration import calib_chunk
from .quant.observers import UPDATE_PIECE

MB = 2 ** 20
#: parts live one after the other, never together
TRANSIENT = ("probe working set", "method", "calibration pass")
#: MB kept free of the prefix cache under a limit or target, for the temporaries the estimate does not model
HEADROOM_MB = 256.0
#: without ``--max-memory`` (or ``--prefix-cache-mb``), the prefix cache is sized so that the estimated
#: peak stays within this many MB: 4 GiB less the headroom
DEFAULT_TARGET_MB = 4096.0 - HEADROOM_MB


class MemoryLimitError(MpqkitError):
    """The search would need more than ``--max-memory`` before any cache."""


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where there is
    no such call. Freed tensors otherwise stay resident in the process's heap, where the next search's
    estimate counts them as held and its new buffers, not always fitting the free holes, grow the
    process past its target (measured in docs/RESULTS.md, ``cost_mobilenetv2_auto_peaks``)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


#: tensors smaller than this stay where they are (:func:`off_heap`)
OFF_HEAP_MIN_BYTES = 1 << 20


def off_heap(t: Tensor) -> Tensor:
    """``t``'s values (same shape, strides and dtype) in pages of their own: an anonymous mmap that
    goes back to the system when the copy is freed, whatever the C heap around it does.

    For tensors kept long (the probe engine's layer-cut snapshots): glibc raises its mmap threshold
    after the first large frees, so in a process's later searches such tensors come from the heap,
    and one kept tensor there pins the freed temporaries around it (heap the process holds but does
    not use). Returns ``t`` itself when it is small (< :data:`OFF_HEAP_MIN_BYTES`), not dense in
    its own layout (contiguous or channels-last), needs grad, is not on the CPU, or is quantized."""
    nbytes = t.numel() * t.element_size()
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    if not nbytes or nbytes < OFF_HEAP_MIN_BYTES or not dense or t.requires_grad or t.device.type != "cpu" \
            or t.is_quantized:
        return t
    flat = torch.from_numpy(np.frombuffer(_private_pages(nbytes), dtype=np.uint8)).view(t.dtype)
    out = flat.as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def _private_pages(nbytes: int) -> mmap.mmap:
    """``nbytes`` of private anonymous memory (not the shared kind Python's ``mmap`` makes by default,
    which the kernel keeps as shmem), unmapped when the object is freed."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def search_parts(graph: Any, calib_images: Tensor, n_candidates: int,
                 method_memory: Callable[[], float] | None = None) -> dict[str, float]:
    """The named parts (MB) a search on ``graph`` with ``calib_images`` holds before its prefix cache.
    ``n_candidates``: bit-widths per layer the search may build (weights + activations);
    ``method_memory``: the method's own part (``Method.memory`` bound to the search's context)."""
    weight_bytes = 4 * sum(layer.weight_numel + layer.bias_numel for layer in graph.layers)
    model_bytes = 4 * graph.total_params
    trim_heap()  # what the process holds, not what its heap keeps free
    parts = {
        "process": resident_mb(),
        "model copies": (2 * model_bytes + n_candidates * weight_bytes) / MB,
        "calibration copies": 2 * calib_images.numel() * calib_images.element_size() / MB,
        "probe working set": 2 * len(calib_images) * 4 * graph.widest_in_numel / MB,
        "calibration pass": (2 * min(len(calib_images), calib_chunk(calib_images)) * graph.widest_in_numel
                             + 3 * UPDATE_PIECE) * 4 / MB,
    }
    if method_memory is not None:
        parts["method"] = float(method_memory())
    return parts


def plan_prefix_cache(limit_mb: float | None, parts: Mapping[str, float], requested_mb: float | None,
                      default_mb: float) -> float | None:
    """The prefix cache's size (MB) under ``limit_mb``: what the parts' peak (:func:`peak_mb`) leaves below
    the limit less :data:`HEADROOM_MB`, at most the requested or the default size. Raises
    ``MemoryLimitError`` (naming the parts and the smallest feasible limit) when the peak exceeds the
    limit. Without a limit: ``requested_mb`` when given, else the default size within
    :data:`DEFAULT_TARGET_MB` (a target, never a refusal: a search whose peak exceeds it runs with no
    prefix cache)."""
    if limit_mb is None:
        if requested_mb is not None:
            return requested_mb
        return min(default_mb, max(0.0, DEFAULT_TARGET_MB - peak_mb(parts)))
    need = peak_mb(parts)
    if need > limit_mb:
        detail = ", ".join(f"{k} {v:,.0f}" for k, v in parts.items())
        raise MemoryLimitError(
            f"--max-memory {limit_mb:,.0f} MB is below what this search holds before any cache: about {need:,.0f} MB "
            f"({detail}); the smallest limit it can run under is about {math.ceil(need):,} MB, or use a smaller "
            f"--calib-size (the calibration copies and the probe working set scale with it)")
    room = max(0.0, limit_mb - HEADROOM_MB - need)
    return min(room, requested_mb if requested_mb is not None else default_mb)


def peak_mb(parts: Mapping[str, float]) -> float:
    """The estimated peak of ``parts``: all of them, but only the largest of those in ``TRANSIENT``
    (they run one after the other)."""
    apart = [parts.get(k, 0.0) for k in TRANSIENT]
    return sum(v for k, v in parts.items() if k not in TRANSIENT) + max(apart)
