"""Resolving names to objects: models, data splits, calibration and held-out sets, devices, output folders."""
from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device import resolve_device
from .engine.cache import default_cache_dir
from .errors import CheckpointError, DataError, MpqkitError
from .fileutil import check_output_dir
from .quant.apply import model_device
from .settings import CALIB_SIZE, RunSettings, resolve_settings
from .zoo.data import LabeledData, load_data, sample_data
from .zoo.models import FIXED_RESOLUTION, ModelBundle, get_model, state_dict_sha256

log = logging.getLogger("mpqkit")

def load_model(model: str | nn.Module | ModelBundle, settings: RunSettings | None = None,
               **overrides: Any) -> ModelBundle:
    """A ModelBundle from a name (zoo, with the settings' checkpoint / models dir / random init),
    a bundle, or a bare module (needs ``input_shape``)."""
    s = resolve_settings(settings, overrides)
    if isinstance(model, ModelBundle):
        return model
    if isinstance(model, nn.Module):
        if s.input_shape is None:
            raise MpqkitError("pass input_shape=(C, H, W) with a bare nn.Module")
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"model tensor '{name}' contains NaN or Inf")
        # lazy: torchvision takes seconds to import
        from .attention import expose_attention

        expose_attention(model)  # in place: the same function, with searchable attention projections
        return ModelBundle(model.eval(), type(model).__name__, tuple(s.input_shape), -1, None, state_dict_sha256(model))
    return get_model(model, checkpoint=s.checkpoint, models_dir=s.models_dir, random_init=s.random_init)


def load_split(data: str | LabeledData, split: str = "test", settings: RunSettings | None = None,
               limit: int | None = None) -> LabeledData:
    if isinstance(data, LabeledData):
        return data if limit is None else data.head(limit)
    return load_data(data, split, root=(settings or RunSettings()).data_root, limit=limit)


def calibration_set(data: str | LabeledData, n: int = CALIB_SIZE, seed: int = 0,
                    data_root: str | None = None) -> LabeledData:
    """The fixed-seed calibration/sensitivity subset of the train split (or of the given data)."""
    if isinstance(data, LabeledData):
        return data.sample(n, seed)
    return _named_calibration_set(data, n, seed, str(data_root) if data_root else None, os.environ.get("MPQKIT_DATA"))


@functools.lru_cache(maxsize=8)
def _named_calibration_set(data: str, n: int, seed: int, data_root: str | None, _env: str | None) -> LabeledData:
    """Kept per process: the subset is small, the train split it is drawn from is not."""
    return sample_data(data, "train", n, seed, root=data_root)


def train_subset(data: str | LabeledData, n: int, seed: int, data_root: str | None) -> LabeledData:
    """Up to ``n`` training images (all of them when the split is smaller), fixed seed."""
    if isinstance(data, LabeledData):
        return data.sample(min(n, len(data)), seed)
    return sample_data(data, "train", n, seed, root=data_root)


def heldout_set(data: str | LabeledData, calib_n: int, n: int, seed: int, data_root: str | None) -> LabeledData:
    """Up to ``n`` training images disjoint from ``calibration_set(data, calib_n, seed)``."""
    held = data.sample(n, seed, offset=calib_n) if isinstance(data, LabeledData) else \
        sample_data(data, "train", n, seed, offset=calib_n, root=data_root)
    if len(held) == 0:
        raise DataError(f"no training images are left beside the {calib_n}-image calibration draw for a held-out "
                        f"set: lower --calib-size")
    return held


def check_compatible(bundle: ModelBundle, data: LabeledData) -> None:
    shape = tuple(data.images.shape[1:])
    if len(shape) != len(bundle.input_shape) or shape[0] != bundle.input_shape[0]:
        raise DataError(f"data {data.name}/{data.split} has images of shape {shape}, but model {bundle.name} "
                        f"expects {bundle.input_shape}")
    fixed_resolution = bundle.name in FIXED_RESOLUTION  # trained at one input size
    if fixed_resolution and shape != tuple(bundle.input_shape):
        raise DataError(f"data {data.name}/{data.split} has images of shape {shape}, but model {bundle.name} "
                        f"expects {bundle.input_shape}")


def on_device(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """The model itself when already there, else a moved copy (the caller's model never moves)."""

    dev = resolve_device(device)
    if model_device(model) == dev:
        return model

    return copy.deepcopy(model).to(dev)


def check_out_dir(out: str | Path | None, what: str, settings: RunSettings | None = None) -> None:
    """Fail before any long work when ``out`` cannot hold a results directory (or the settings'
    probe cache cannot be written)."""

    if settings is not None and settings.use_cache:

        check_output_dir(Path(settings.cache_dir) if settings.cache_dir else default_cache_dir(),
                         "probe cache directory (--cache-dir / $MPQKIT_CACHE)")
    if out is not None:
        if str(out).strip() in ("", "-"):
            raise MpqkitError(f"{what} {str(out)!r} is not a path (results go into a folder; stdout is not one)")
        check_output_dir(Path(out), what)
