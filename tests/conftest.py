"""Shared fixtures: tiny traceable models for unit tests, and real-data fixtures that skip cleanly."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_sessionstart(session):
    """``MPQKIT_SHARED=require`` (what ``make test`` and so CI set): the integration tests' data and
    models must be there; a missing ../shared stops the run naming the path, never a silent skip."""
    if os.environ.get("MPQKIT_SHARED", "optional") != "require":
        return
    from mpqkit.errors import MissingResourceError
    from mpqkit.zoo.paths import data_root, models_dir

    try:
        data_root()
        models_dir()
    except MissingResourceError as e:
        pytest.exit(f"MPQKIT_SHARED=require but the shared data/models are missing: {e} "
                    "(run `make test SHARED=optional` to skip the integration tests instead)", returncode=3)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own probe cache, so no test sees another's results."""
    monkeypatch.setenv("MPQKIT_CACHE", str(tmp_path / "cache"))


class TinyNet(nn.Module):
    """conv1 → relu → {conv2, conv3} (a tie group: same input) → add (+ skip) → relu → conv4 → BN → pool → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(8)  # folded into conv4 by the probe engine
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        y = self.conv2(x)
        y += self.conv3(x)  # in-place add on purpose: the engine must not corrupt cached tensors
        y = self.relu(y + x)
        y = F.relu(self.bn4(self.conv4(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class UntraceableNet(TinyNet):
    """Same computation, but data-dependent control flow defeats torch.fx: the engine falls back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e30:  # always true, but not traceable
            return super().forward(x)
        return x


def make_tiny(seed: int = 0, cls=TinyNet) -> nn.Module:
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is really exercised
        model.bn4.running_mean.uniform_(-0.5, 0.5)
        model.bn4.running_var.uniform_(0.5, 2.0)
        model.bn4.weight.uniform_(0.5, 1.5)
        model.bn4.bias.uniform_(-0.2, 0.2)
    return model.eval()


def tiny_data(model: nn.Module, n: int = 96, seed: int = 1):
    """Random images labelled by the fp model itself (so fp top-1 is 100 %, quantization lowers it)."""
    from mpqkit.zoo.data import LabeledData

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
    return LabeledData(images=x, labels=logits.argmax(1), name="tiny", split="train", classes=4)


@pytest.fixture
def tiny():
    return make_tiny()


def shared_available() -> bool:
    from mpqkit.errors import MissingResourceError
    from mpqkit.zoo.paths import data_root, models_dir

    try:
        data_root()
        models_dir()
        return True
    except MissingResourceError:
        return False


requires_shared = pytest.mark.skipif(not shared_available(), reason="../shared data/models not found "
                                     "(set MPQKIT_DATA / MPQKIT_MODELS)")


def assert_on_planned_grid(layer: nn.Module, bits: int) -> None:
    """The quantized layer's weight lies on a ``bits``-bit grid: its spec says ``bits``, the integer range
    has 2^bits levels, and every (scale, zero point) code of ``quantized_weight()`` is an integer in it.
    A layer left in fp32 or quantized at other bits fails."""
    assert getattr(layer, "w_spec", None) is not None and layer.w_spec.bits == bits, (getattr(layer, "w_spec", None), bits)
    qmin, qmax = layer._w_range
    assert qmax - qmin + 1 == 2 ** bits
    w = layer.quantized_weight().detach().double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    scale = layer.w_scale.double().reshape(shape if layer.w_scale.numel() > 1 else ())
    zp = layer.w_zero_point.double().reshape(shape if layer.w_zero_point.numel() > 1 else ())
    codes = w / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3), "weights off the grid"
    assert int(codes.round().min()) >= qmin and int(codes.round().max()) <= qmax
