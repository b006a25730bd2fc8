"""The evaluation loop: top-1 and mean cross-entropy of a model on labelled data."""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError
from .quant.apply import model_device
from .quant.calibration import CALIB_CHUNK_ELEMS
from .zoo.data import LabeledData


#: input elements per evaluation batch when no batch size is given: as many as a calibration
#: forward (``quant.calibration``; 500 CIFAR images at the cap, 27 at 224 x 224), so the live
#: activations of a 224 x 224 network stay bounded the same way
EVAL_BATCH_ELEMENTS = CALIB_CHUNK_ELEMS


def eval_batch_size(data: LabeledData, cap: int = 500) -> int:
    per_image = max(1, data.images[0].numel()) if len(data) else 1
    return max(1, min(cap, EVAL_BATCH_ELEMENTS // per_image))


@torch.inference_mode()
def evaluate_model(model: nn.Module, data: LabeledData, batch_size: int | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Returns {"top1", "loss", "n", "seconds", "images_per_s"}; top1 is a fraction. ``batch_size``
    defaults to :func:`eval_batch_size` (sized by the input)."""
    if len(data) == 0:
        raise DataError(f"{data.name}/{data.split} is empty: nothing to evaluate")
    batch_size = batch_size or eval_batch_size(data)
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct, loss, n = 0, 0.0, 0
    t0 = time.perf_counter()
    batches = data.batches(batch_size)
    for x, y in tqdm(batches, total=(len(data) + batch_size - 1) // batch_size, desc=f"eval {data.split}",
                     disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        if logits.ndim != 2 or logits.shape[0] != len(y):
            raise DataError(f"model output has shape {tuple(logits.shape)}; expected (batch, classes)")
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    secs = time.perf_counter() - t0
    return {"top1": correct / n, "loss": loss / n, "n": n, "seconds": secs, "images_per_s": n / secs}


@torch.inference_mode()
def check_outputs(model: nn.Module, images: torch.Tensor, what: str = "the calibration set", n: int = 64) -> None:
    """DataError when the model's logits on (the first ``n`` of) ``images`` are NaN/Inf or the same for
    every image: a sensitivity measured on such a model is zero or meaningless, and a solver would
    return an "optimal" plan from it in silence."""
    x = images[:n].to(model_device(model))
    if len(x) == 0:
        raise DataError(f"{what} is empty")
    was_training = model.training
    model.eval()
    try:
        logits = model(x).float()
    finally:
        model.train(was_training)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).sum())
        raise DataError(f"the model's logits are NaN or Inf on {bad} of the first {len(x)} images of {what}: "
                        f"check the weights and the input normalisation before searching a plan")
    spread = float((logits - logits[:1]).abs().max())
    if len(x) > 1 and spread <= 1e-6 * max(1.0, float(logits.abs().max())):
        raise DataError(f"the model's logits are the same for all of the first {len(x)} images of {what} "
                        f"(it ignores its input: random or broken weights, or a wrong input size?): every "
                        f"sensitivity would be 0 and any plan 'optimal'")
