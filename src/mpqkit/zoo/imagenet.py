"""ImageNet models ported from TensorFlow: MobileNetV2-1.0-224 and EfficientNet-Lite0.

Both need two things a torchvision-style model lacks, built into the modules here so that every copy
of the model (quantized, traced, exported) keeps them:

* TensorFlow "SAME" padding on stride-2 convs (pad 0 before, 1 after for an even input and a 3x3
  kernel): an ``nn.ZeroPad2d`` just before the conv (a Sequential entry named ``pad``, so the conv
  keeps its checkpoint name); stride-1 convs get the equal symmetric ``padding``.
* Their own input scaling ([-1, 1]-ish instead of ImageNet mean/std): an :class:`InputAdapter` that
  maps the ImageNet-normalised images every image dataset here yields to what the weights expect,
  so the data pipeline stays one for all models.

MobileNetV2's file has 1001 classes (index 0 = background); its forward drops column 0 so labels are
the usual 0..999.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["InputAdapter", "TFMobileNetV2", "EfficientNetLite0", "same_padding", "IMAGENET_MEAN_STD"]

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class InputAdapter(nn.Module):
    """Per-channel affine from one input normalisation to another (no parameters)."""

    def __init__(self, src: tuple[tuple[float, ...], tuple[float, ...]],
                 dst: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
        super().__init__()
        (sm, ss), (dm, ds) = src, dst
        sm_, ss_, dm_, ds_ = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (sm, ss, dm, ds))
        # x_dst = ((x * ss + sm) - dm) / ds
        self.register_buffer("scale", ss_ / ds_, persistent=False)
        self.register_buffer("shift", (sm_ - dm_) / ds_, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) of one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_module(conv: nn.Conv2d, size: int) -> nn.Module | None:
    """Set ``conv`` up for TF SAME padding at input ``size``: symmetric padding in the conv, or a ZeroPad2d."""
    before, after = same_padding(size, conv.kernel_size[0], conv.stride[0])
    if before == after:
        conv.padding = (before, before)
        return None
    conv.padding = (0, 0)
    return nn.ZeroPad2d((before, after, before, after))


# --------------------------------------------------------------------------- MobileNetV2
class TFMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (1001 classes) with TF SAME padding, [-1, 1] input and 1000 logits out."""

    def __init__(self, input_size: int = 224) -> None:
        super().__init__()
        # lazy: torchvision takes seconds to import
        import torchvision

        base = torchvision.models.mobilenet_v2(weights=None, num_classes=1001)
        self.adapter = InputAdapter(IMAGENET_MEAN_STD, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        self.features = base.features
        self.classifier = base.classifier
        size = input_size
        for seq in self.features.modules():
            if not isinstance(seq, nn.Sequential) or not isinstance(seq[0] if len(seq) else None, nn.Conv2d):
                continue
            conv = seq[0]
            if conv.stride[0] == 2:
                pad = _pad_module(conv, size)
                size = -(-size // 2)
                if pad is not None:
                    items = [("pad", pad)] + [(k, m) for k, m in seq._modules.items()]
                    seq._modules = OrderedDict(items)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.adapter(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)[:, 1:]


# --------------------------------------------------------------------------- EfficientNet-Lite0
#: (repeats, kernel, stride, expand, in, out) per stage: efficientnet_lite_builder.py's lite0 block strings
_LITE0 = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
_BN = {"eps": 1e-3, "momentum": 0.01}


class LiteMBConv(nn.Module):
    """Inverted residual without squeeze-excitation, ReLU6; attribute names of efficientnet_lite_pytorch."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._pad = _pad_module(self._depthwise_conv, size) or nn.Identity()
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(self._pad(x))))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, the TF 'lite' variant: ReLU6, no SE, fixed stem/head), 224 px."""

    def __init__(self, num_classes: int = 1000, input_size: int = 224) -> None:
        super().__init__()
        # TF lite preprocessing: (pixel - 127) / 128 on 0..255
        self.adapter = InputAdapter(IMAGENET_MEAN_STD, ((127 / 255,) * 3, (128 / 255,) * 3))
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._pad_stem = _pad_module(self._conv_stem, input_size) or nn.Identity()
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        size = -(-input_size // 2)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0:
            for r in range(repeats):
                blocks.append(LiteMBConv(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, size))
                if r == 0:
                    size = -(-size // s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self._pad_stem(self.adapter(x)))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
