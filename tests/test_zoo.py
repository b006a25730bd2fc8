"""Tests for mpqkit.zoo: architectures, checkpoints, data loading and their error messages."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.fx

from mpqkit.errors import CheckpointError, DataError, MissingResourceError, UnknownNameError
from mpqkit.zoo import (
    CIFAR_MODELS, CifarResNet, DigitsCNN, get_model, load_checkpoint, load_data, paths, state_dict_sha256,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shared() -> tuple[Path, Path]:
    """(data_root, models_dir) of ../shared; skip the test when they are not available."""
    try:
        return paths.data_root(), paths.models_dir()
    except MissingResourceError as e:
        pytest.skip(f"shared CIFAR-10 data/checkpoints not available: {e}")


@pytest.fixture(scope="module")
def cifar_head(shared) -> object:
    return load_data("cifar10", "test", limit=1000)


@torch.no_grad()
def top1(model: torch.nn.Module, data) -> float:
    return 100.0 * sum(int((model(x).argmax(1) == y).sum()) for x, y in data.batches(500)) / len(data)


# --------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("model,shape", [(CifarResNet(20), (2, 3, 32, 32)), (DigitsCNN(), (2, 1, 8, 8))])
def test_fx_traceable(model, shape):
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(shape)
    torch.testing.assert_close(gm(x), model(x))
    assert gm(x).shape == (2, 10)


def test_resnet_keys_and_params():
    m = CifarResNet(20)
    keys = list(m.state_dict())
    assert len(keys) == 116  # 97 + 19 num_batches_tracked buffers
    assert keys[0] == "conv1.weight" and keys[-1] == "linear.bias"
    assert "layer3.2.bn2.running_var" in keys
    assert sum(p.numel() for p in m.parameters()) == 269_722
    with pytest.raises(ValueError):
        CifarResNet(21)


def test_state_dict_sha256_deterministic():
    torch.manual_seed(0)
    a = DigitsCNN()
    b = DigitsCNN()
    b.load_state_dict(a.state_dict())
    assert state_dict_sha256(a) == state_dict_sha256(b)
    with torch.no_grad():
        b.fc.bias[0] += 1
    assert state_dict_sha256(a) != state_dict_sha256(b)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.integration
def test_resnet20_loads(shared):
    b = get_model("resnet20")
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert b.checkpoint == shared[1] / CIFAR_MODELS["resnet20"][1]
    assert not b.model.training
    assert b.sha256 == get_model("resnet20").sha256


@pytest.mark.integration
def test_resnet20_accuracy_first_1000(cifar_head):
    # fine-tuned ResNet-20: 87.53 % on all 10k JPEG test images, 87.4 % on the first 1,000
    acc = top1(get_model("resnet20").model, cifar_head)
    assert 86.0 <= acc <= 89.0, acc


@pytest.mark.integration
def test_mismatched_checkpoint(shared):
    r32 = shared[1] / CIFAR_MODELS["resnet32-orig"][1]
    with pytest.raises(CheckpointError, match="does not match architecture CifarResNet\\(20\\)"):
        get_model("resnet20", checkpoint=r32)


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        get_model("resnet20", checkpoint=bad)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(MissingResourceError, match="nope.th"):
        get_model("resnet20", checkpoint=tmp_path / "nope.th")


def test_missing_models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQKIT_MODELS", str(tmp_path / "absent"))
    with pytest.raises(MissingResourceError, match="MPQKIT_MODELS"):
        get_model("resnet20")


def test_nan_checkpoint(tmp_path):
    m = DigitsCNN()
    sd = m.state_dict()
    sd["fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="fc.weight"):
        get_model("digits-cnn", checkpoint=path)


def test_unknown_model():
    with pytest.raises(UnknownNameError, match="resnet20"):
        get_model("resnet7")


def test_torchvision_model(tmp_path):
    with pytest.raises(MissingResourceError, match="--random-init"):
        get_model("mobilenet_v2")
    b = get_model("mobilenet_v2", random_init=True)
    assert b.input_shape == (3, 224, 224) and b.num_classes == 1000 and b.checkpoint is None
    # a DataParallel-style wrapped checkpoint round-trips
    path = tmp_path / "mnv2.pt"
    torch.save({"model": {f"module.{k}": v for k, v in b.model.state_dict().items()}}, path)
    assert get_model("mobilenet_v2", checkpoint=path).sha256 == b.sha256
    with pytest.raises(CheckpointError, match="number of classes"):
        get_model("mobilenet_v2", checkpoint=path, num_classes=10)


# --------------------------------------------------------------------------- data
def test_missing_data_root(tmp_path, monkeypatch):
    with pytest.raises(MissingResourceError, match="MPQKIT_DATA"):
        load_data("cifar10", root=tmp_path / "absent")
    monkeypatch.setenv("MPQKIT_DATA", str(tmp_path / "absent"))
    with pytest.raises(MissingResourceError, match="MPQKIT_DATA"):
        load_data("cifar10")
    with pytest.raises(MissingResourceError, match="test_batch.*MPQKIT_DATA"):
        load_data("cifar10", root=tmp_path)  # root exists, files do not


def test_corrupt_cifar_batch(tmp_path):
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_data("cifar10", root=tmp_path)


def test_tiny_cifar_train(tmp_path):
    """Train split concatenates whichever data_batch_* exist, in numeric order."""
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in (1, 2, 10):
        data = torch.full((3, 3072), i, dtype=torch.uint8).numpy()
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10] * 3}, f)
    tr = load_data("cifar10", "train", root=tmp_path)
    assert len(tr) == 9 and tr.labels.tolist() == [1] * 3 + [2] * 3 + [0] * 3
    assert tr.images.shape == (9, 3, 32, 32) and tr.images.dtype == torch.float32
    assert len(load_data("cifar10", "train", root=tmp_path, limit=4)) == 4


@pytest.mark.integration
def test_cifar_splits(shared, cifar_head):
    assert cifar_head.images.shape == (1000, 3, 32, 32) and cifar_head.labels.dtype == torch.int64
    ex = load_data("cifar10", "exact", limit=10)
    assert len(ex) == 10 and ex.labels.tolist() == cifar_head.labels[:10].tolist()
    assert len(load_data("cifar10", "train", limit=100)) == 100
    with pytest.raises(UnknownNameError):
        load_data("cifar10", "val")


def test_unknown_dataset():
    with pytest.raises(UnknownNameError, match="digits"):
        load_data("imagenet-does-not-exist")


def test_digits_and_digits_cnn():
    train, test = load_data("digits", "train"), load_data("digits", "test")
    assert len(train) == 1297 and len(test) == 500 and test.images.shape[1:] == (1, 8, 8)
    assert float(test.images.min()) >= -1.0 and float(test.images.max()) <= 1.0
    with pytest.raises(DataError, match="CIFAR"):
        load_data("digits", "exact")
    b = get_model("digits-cnn")
    assert b.input_shape == (1, 8, 8) and b.checkpoint is not None and b.checkpoint.name == "digits_cnn.pt"
    assert top1(b.model, test) >= 95.0


def test_labeled_data_helpers():
    test = load_data("digits", "test")
    s1, s2 = test.sample(50, seed=3), test.sample(50, seed=3)
    assert torch.equal(s1.labels, s2.labels) and s1.sha256() == s2.sha256()
    assert s1.sha256() != test.sample(50, seed=4).sha256()
    assert len(test.sample(10_000, seed=0)) == len(test)
    assert [len(y) for _, y in test.batches(200)] == [200, 200, 100]
    assert torch.equal(test.subset([2, 0]).labels, test.labels[[2, 0]])
    with pytest.raises(DataError):
        test.subset([]).sample(5, seed=0)


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), (i * 100, 50, 200)).save(tmp_path / cls / f"{i}.png")
    d = load_data(str(tmp_path))
    assert d.images.shape == (4, 3, 224, 224) and d.classes == 2 and d.labels.tolist() == [0, 0, 1, 1]
    assert len(load_data(str(tmp_path), limit=3)) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        load_data(str(empty))
