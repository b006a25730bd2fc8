"""The one calibration path: activation statistics of a model's layer inputs on a calibration set.

The probe engine (which measures a plan during search) and ``apply_plan`` (which builds the plan
for evaluation and export) both call ``calibrate``: the same images in the same fixed chunks,
the same observer seed, so an activation scale does not depend on which of them computed it,
on the engine's batch size, or on the device's batch size. (Before this, the 4-bit MSE scale of
one ResNet-20 activation came out 0.366, 0.345 or 0.356 depending on batch size and seed.)
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from ..errors import DataError
from .observers import ActivationObserver

#: images per forward pass during calibration (at most); fixed by the input's shape so the
#: observers' reservoir sampling sees the same sequence of updates on every path
CALIB_CHUNK = 256
#: input values per calibration forward (at most): large inputs (224 x 224 images) go in fewer
#: images per forward, so the forward's live activations stay bounded; 32 x 32 images and
#: 64-token texts stay at ``CALIB_CHUNK``
CALIB_CHUNK_ELEMS = 1 << 22


def calib_chunk(images: torch.Tensor) -> int:
    """Images per calibration forward for ``images`` (N x sample shape): ``CALIB_CHUNK``, fewer
    when a sample has more than ``CALIB_CHUNK_ELEMS / CALIB_CHUNK`` values; at least 1."""
    per_sample = max(1, images[0].numel()) if len(images) else 1
    return max(1, min(CALIB_CHUNK, CALIB_CHUNK_ELEMS // per_sample))


def calib_batches(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """``images`` in consecutive chunks of ``calib_chunk(images)``: the chunks every calibration-set
    pass walks (activation ranges, layer-PTQ statistics, reconstruction batches)."""
    step = calib_chunk(images)
    for i in range(0, len(images), step):
        yield images[i:i + step]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def calibrate(model: nn.Module, fqns: Iterable[str], images: torch.Tensor, seed: int = 0,
              memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, ActivationObserver]:
    """Observe the input of each named layer of the (fp) model over ``images``, in chunks of
    ``calib_chunk(images)`` in order, with observers seeded by ``seed``."""
    fqns = list(fqns)
    if len(images) == 0:
        raise DataError("calibration data is empty: activation ranges cannot be calibrated")
    observers = {f: ActivationObserver(seed=seed) for f in fqns}
    handles = [model.get_submodule(f).register_forward_pre_hook(lambda m, args, f=f: observers[f].update(args[0]))
               for f in fqns]
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for chunk in calib_batches(images):
            x = chunk.to(device)
            model(x.contiguous(memory_format=memory_format) if x.ndim == 4 else x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return observers
