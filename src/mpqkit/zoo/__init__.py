"""Model zoo and datasets: named models with checkpoints, labelled data, and where to find them."""
from __future__ import annotations

from mpqkit.zoo.data import DATASETS, NORMALIZATION, LabeledData, load_data, normalize
from mpqkit.zoo.models import (
    CIFAR_MODELS,
    CifarResNet,
    DigitsCNN,
    ModelBundle,
    get_model,
    load_checkpoint,
    state_dict_sha256,
)
from mpqkit.zoo.paths import data_root, models_dir

__all__ = [
    "CIFAR_MODELS", "CifarResNet", "DATASETS", "DigitsCNN", "LabeledData", "ModelBundle", "NORMALIZATION",
    "data_root", "get_model", "load_checkpoint", "load_data", "models_dir", "normalize", "state_dict_sha256",
]
