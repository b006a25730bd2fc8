"""Labelled evaluation/calibration data, loaded eagerly into normalized tensors.

Datasets: ``cifar10`` (the reconstructed torchvision-layout batches in ``<data_root>/cifar10``; splits
``test``, ``exact``, ``train``), ``digits`` (scikit-learn's bundled 8x8 digits; splits ``train``, ``test``),
``imagenet-subset`` (the 1,300 labelled ILSVRC2012 validation images in ``<data_root>/imagenet_val_subset``,
split by a fixed seed into 400 ``train`` images for calibration and 900 ``test`` images), ``sst2`` (GLUE SST-2
in ``<data_root>/text``: ``train`` = the 67,349 train phrases, ``test`` = GLUE dev, 872 sentences; "images"
are MiniLM token ids, N x 64 int64) and any image-folder directory (torchvision ``ImageFolder`` layout, ImageNet preprocessing; it has no
splits of its own, so ``test``, ``train`` and ``val`` all name every image in it).
Everything fits in memory, so a dataset is just two tensors plus metadata.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mpqkit.errors import DataError, MissingResourceError, UnknownNameError
from mpqkit.zoo.paths import data_root

__all__ = ["LabeledData", "load_data", "NORMALIZATION", "DATASETS", "IMAGE_FOLDER_SPLITS", "normalize"]

log = logging.getLogger("mpqkit")

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: (mean, std) applied after scaling pixels to [0, 1], per dataset name.
#: cifar10 uses ImageNet statistics because the checkpoints were trained that way (akamaster trainer.py).
#: digits scales 0..16 to [0, 1] then maps to [-1, 1] (mean 0.5, std 0.5): symmetric, simple, and what
#: scripts/train_digits.py trains with (it calls load_data, so the two cannot drift apart).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": _IMAGENET,
    "digits": ((0.5,), (0.5,)),
    "imagefolder": _IMAGENET,
    "imagenet-subset": _IMAGENET,  # models with other input scaling carry an InputAdapter (zoo/imagenet.py)
}

#: dataset name -> available splits
DATASETS: dict[str, tuple[str, ...]] = {"cifar10": ("test", "exact", "train"), "digits": ("train", "test"),
                                        "imagenet-subset": ("train", "test"), "sst2": ("train", "test")}
#: splits accepted for an image folder: each names the whole folder (calibration draws a seeded subset)
IMAGE_FOLDER_SPLITS: tuple[str, ...] = ("test", "train", "val")

_CIFAR_DIR = "cifar10"
_BATCHES = "cifar-10-batches-py"
_DIGITS_TRAIN = 1297  # first 1,297 of the seeded permutation; the last 500 are the test split
_DIGITS_SEED = 0
_INET_DIR, _INET_TRAIN, _INET_SEED, _INET_SIZE, _INET_CROP = "imagenet_val_subset", 400, 0, 224, 0.875


@dataclass
class LabeledData:
    """Normalized images (float32, N x C x H x W) with int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    split: str
    classes: int
    _sha: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> LabeledData:
        """The samples at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return LabeledData(self.images[idx], self.labels[idx], self.name, self.split, self.classes)

    def head(self, n: int) -> LabeledData:
        """The first ``n`` samples."""
        return LabeledData(self.images[:n], self.labels[:n], self.name, self.split, self.classes)

    def sample(self, n: int, seed: int = 0, offset: int = 0) -> LabeledData:
        """A fixed pseudo-random subset of ``min(n, len)`` samples (randperm order), reproducible from ``seed``.
        ``offset`` skips the first samples of that order: ``sample(m, seed, offset=n)`` is disjoint
        from ``sample(n, seed)`` (held-out images beside a calibration draw)."""
        if len(self) == 0:
            raise DataError(f"cannot sample from empty data {self.name}/{self.split}")
        return self.subset(sample_indices(len(self), n, seed, offset))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in order; the last may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield self.images[i : i + batch_size], self.labels[i : i + batch_size]

    def sha256(self) -> str:
        """Hash of the image and label bytes (cached): identifies the exact evaluation set in reports."""
        if self._sha is None:
            h = hashlib.sha256()
            for t in (self.images, self.labels):
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.numpy().tobytes())
            self._sha = h.hexdigest()
        return self._sha


def sample_indices(size: int, n: int, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Indices of :meth:`LabeledData.sample` on data of ``size`` samples."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[max(0, offset): max(0, offset) + max(0, min(n, size))]


def sample_data(name: str, split: str, n: int, seed: int = 0, offset: int = 0,
                root: str | Path | None = None) -> LabeledData:
    """``load_data(name, split, root).sample(n, seed, offset)``, the same bytes, without converting the
    whole split to float32 (for CIFAR-10 that copy and its normalised twin cost GBs to draw a
    1,024-image calibration set)."""
    if name != "cifar10":
        return load_data(name, split, root=root).sample(n, seed, offset)
    x, y = _cifar_raw(split, root, None)
    if len(y) == 0:
        raise DataError(f"cannot sample from empty data {name}/{split}")
    idx = sample_indices(len(y), n, seed, offset).numpy()
    return _cifar_tensors(x[idx], y[idx], split)


def normalize(pixels01: torch.Tensor, dataset: str) -> torch.Tensor:
    """Apply the per-channel (mean, std) of ``dataset`` to images already scaled to [0, 1]."""
    mean, std = NORMALIZATION[dataset]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels01 - m) / s


def load_data(
    name: str, split: str = "test", root: str | Path | None = None, limit: int | None = None
) -> LabeledData:
    """Load a dataset split. ``limit`` keeps the first N samples (a seeded subset for image folders)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name == "cifar10":
        data = _load_cifar(split, root, limit)
    elif name == "digits":
        data = _load_digits(split, limit)
    elif name == "imagenet-subset":
        data = _load_imagenet_subset(split, root, limit)
    elif name == "sst2":
        data = _load_sst2(split, root, limit)
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser()
        if split not in IMAGE_FOLDER_SPLITS:
            raise UnknownNameError(
                f"unknown split {split!r} for image folder {folder}: use one of {', '.join(IMAGE_FOLDER_SPLITS)} "
                f"(an image folder has no splits: each of them names all of its images)"
            )
        return _load_image_folder(folder, limit)
    else:
        raise UnknownNameError(
            f"unknown dataset {name!r}: use cifar10, digits, imagenet-subset, sst2, or the path of an existing image folder "
            f"(ImageFolder layout: one sub-folder per class)"
        )
    if len(data) == 0:
        raise DataError(f"dataset {name}/{split} is empty")
    return data


# --------------------------------------------------------------------------- CIFAR-10
def _check_split(name: str, split: str) -> None:
    if split not in DATASETS[name]:
        raise UnknownNameError(f"unknown split {split!r} for {name}: use one of {', '.join(DATASETS[name])}")


_SET_ROOT = "Set --data-root or $MPQKIT_DATA to the folder that holds cifar10/"


def _missing(path: Path) -> MissingResourceError:
    return MissingResourceError(f"CIFAR-10 file {path} not found. {_SET_ROOT}")


def _folder_problem(folder: Path, listed: bool = True) -> str | None:
    """Why the existing path ``folder`` cannot be used as a folder (listed, if ``listed``), or None.

    None also when ``folder`` is absent: the callers' not-found messages cover that case.
    """
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "it is a file, not a folder"
    if not listed:
        return None
    try:
        with os.scandir(folder) as it:
            next(it, None)
    except OSError as e:
        return f"it cannot be read ({e.strerror or type(e).__name__})"
    return None


def _check_cifar_folders(*folders: Path, listed: Path | None = None) -> None:
    """DataError naming the folder when one of ``folders`` is a file (or ``listed`` cannot be listed)."""
    for folder in folders:
        why = _folder_problem(folder, listed=folder == listed)
        if why:
            raise DataError(f"CIFAR-10 folder {folder}: {why}. {_SET_ROOT}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One torchvision-layout batch file -> (uint8 N x 3072, int64 N)."""
    if not path.is_file():
        raise _missing(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read CIFAR-10 file {path} ({e.strerror or type(e).__name__}). {_SET_ROOT}") from None
    try:
        with f:
            d = pickle.load(f, encoding="latin1")
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - anything here means a damaged file
        raise DataError(f"{path} is not a readable CIFAR-10 batch file: {type(e).__name__}: {e}") from e
    return _check_rows(path, x, y)


def _check_rows(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2 or x.shape[1] != 3072 or y.shape != (x.shape[0],):
        raise DataError(f"{path}: expected data N x 3072 and N labels, got {x.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return x, y


def _cifar_tensors(x: np.ndarray, y: np.ndarray, split: str) -> LabeledData:
    imgs = torch.from_numpy(x.reshape(-1, 3, 32, 32)).float().div_(255.0)
    return LabeledData(normalize(imgs, "cifar10"), torch.from_numpy(y), "cifar10", split, 10)


def _load_cifar(split: str, root: str | Path | None, limit: int | None) -> LabeledData:
    return _cifar_tensors(*_cifar_raw(split, root, limit), split)


def _cifar_raw(split: str, root: str | Path | None, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 split as stored: (uint8 N x 3072, int64 N)."""
    _check_split("cifar10", split)
    base = data_root(root) / _CIFAR_DIR
    batches = base / _BATCHES
    _check_cifar_folders(base, batches, listed=batches if split == "train" else None)
    if split == "test":
        x, y = _read_batch(batches / "test_batch")
    elif split == "exact":
        path = base / "exact_prefix_test_batch.npz"
        if not path.is_file():
            raise _missing(path)
        if not os.access(path, os.R_OK):
            raise DataError(f"cannot read CIFAR-10 file {path} (permission denied). {_SET_ROOT}")
        try:
            with np.load(path) as z:
                x, y = np.asarray(z["data"], dtype=np.uint8), np.asarray(z["labels"], dtype=np.int64)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path} is not a readable npz file: {type(e).__name__}: {e}") from e
        x, y = _check_rows(path, x, y)
    else:
        files = sorted(batches.glob("data_batch_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        if not files:
            raise _missing(batches / "data_batch_1")
        xs, ys, n = [], [], 0
        for f in files:
            if limit is not None and n >= limit:
                break
            bx, by = _read_batch(f)
            xs.append(bx), ys.append(by)
            n += len(by)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        log.info("cifar10 train: %d data_batch files found in %s (%s); using %d images",
                 len(files), batches, ", ".join(f.name for f in files), len(y))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


# --------------------------------------------------------------------------- digits
def _load_digits(split: str, limit: int | None) -> LabeledData:
    if split == "exact":
        raise DataError("split 'exact' is CIFAR-10 only (digits has train and test)")
    _check_split("digits", split)
    # lazy: only the digits data needs scikit-learn
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(_DIGITS_SEED).permutation(len(d.target))
    idx = perm[:_DIGITS_TRAIN] if split == "train" else perm[_DIGITS_TRAIN:]
    if limit is not None:
        idx = idx[:limit]
    imgs = torch.from_numpy(d.images[idx].astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(d.target[idx].astype(np.int64))
    return LabeledData(normalize(imgs, "digits"), labels, "digits", split, 10)


# --------------------------------------------------------------------------- ImageNet validation subset
def _load_imagenet_subset(split: str, root: str | Path | None, limit: int | None) -> LabeledData:
    """The shared 1,300-image ILSVRC2012 validation subset: centre crop 0.875, bilinear resize to 224,
    ImageNet normalisation (the folder README's recommended pipeline). Easier than the full validation
    set: never report its top-1 as ImageNet accuracy."""
    _check_split("imagenet-subset", split)
    # lazy: only image folders need Pillow
    from PIL import Image

    base = data_root(root) / _INET_DIR
    table = base / "labels.csv"
    hint = "Set --data-root or $MPQKIT_DATA to the folder that holds imagenet_val_subset/"
    if not table.is_file():
        raise MissingResourceError(f"ImageNet subset file {table} not found. {hint}")
    rows = [ln.split(",") for ln in table.read_text().splitlines()[1:] if ln.strip()]
    try:
        files, labels = [base / r[0] for r in rows], [int(r[1]) for r in rows]
    except (IndexError, ValueError) as e:
        raise DataError(f"{table} is not a 'file,label' table: {e}") from None
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(_INET_SEED)).tolist()
    idx = order[:_INET_TRAIN] if split == "train" else order[_INET_TRAIN:]
    if limit is not None:
        idx = idx[:limit]
    out = torch.empty((len(idx), 3, _INET_SIZE, _INET_SIZE), dtype=torch.float32)
    for j, i in enumerate(idx):
        try:
            with Image.open(files[i]) as im:
                im = im.convert("RGB")
                w, h = im.size
                cw, ch = int(w * _INET_CROP), int(h * _INET_CROP)
                left, top = (w - cw) // 2, (h - ch) // 2
                im = im.crop((left, top, left + cw, top + ch)).resize((_INET_SIZE, _INET_SIZE), Image.BILINEAR)
                arr = np.array(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot read ImageNet subset image {files[i]}: {e}. {hint}") from None
        out[j] = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    y = torch.tensor([labels[i] for i in idx], dtype=torch.long)
    return LabeledData(normalize(out, "imagenet-subset"), y, "imagenet-subset", split, 1000)


# --------------------------------------------------------------------------- SST-2
def _load_sst2(split: str, root: str | Path | None, limit: int | None) -> LabeledData:
    """GLUE SST-2 as MiniLM token ids (``train``: GLUE train; ``test``: GLUE dev, the split papers report)."""

    # lazy: torchvision takes seconds to import
    from mpqkit.zoo.text import tokenize

    _check_split("sst2", split)
    path = data_root(root) / "text" / ("sst2_train.tsv" if split == "train" else "sst2_dev.tsv")
    if not path.is_file():
        raise MissingResourceError(f"SST-2 file {path} not found. Set --data-root or $MPQKIT_DATA to the folder "
                                   f"that holds text/")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    if limit is not None:
        rows = rows[:limit]
    try:
        labels = torch.tensor([int(r[1]) for r in rows], dtype=torch.long)
    except (IndexError, ValueError) as e:
        raise DataError(f"{path} is not a 'sentence<TAB>label' table: {e}") from None
    if len(rows) == 0:
        raise DataError(f"{path} holds no sentences")
    return LabeledData(tokenize([r[0] for r in rows]), labels, "sst2", split, 2)


# --------------------------------------------------------------------------- image folders
def _load_image_folder(path: Path, limit: int | None) -> LabeledData:
    """Eagerly load an ImageFolder tree (resize 256, center-crop 224, ImageNet normalization)."""
    # lazy: torchvision takes seconds to import
    from torchvision import datasets, transforms

    why = _folder_problem(path)
    if why:
        raise DataError(f"image folder {path} (--data): {why}. Give --data the folder that holds one "
                        f"sub-folder of images per class")
    mean, std = NORMALIZATION["imagefolder"]
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    try:
        ds = datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        for sub in sorted(c for c in path.iterdir() if c.is_dir()):  # os.walk hides unreadable folders
            why = _folder_problem(sub)
            if why:
                raise DataError(f"image folder {path} (--data): class folder {sub.name}: {why}; "
                                f"check its permissions") from None
        raise DataError(f"image folder {path} holds no images in class sub-folders: {e}") from e
    except OSError as e:  # an unreadable class sub-folder
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        raise DataError(f"image folder {path} (--data): cannot read{where} "
                        f"({e.strerror or type(e).__name__}); check its permissions") from None
    n = len(ds)
    if n == 0:
        raise DataError(f"image folder {path} is empty")
    idx = list(range(n))
    if limit is not None and limit < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].tolist()
    try:
        pairs = [ds[i] for i in idx]
    except Exception as e:  # noqa: BLE001 - unreadable image file
        raise DataError(f"image folder {path}: cannot read an image: {type(e).__name__}: {e}") from e
    if not pairs:
        raise DataError(f"image folder {path}: limit={limit} leaves no images")
    images = torch.stack([p[0] for p in pairs])
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return LabeledData(images, labels, str(path), "folder", len(ds.classes))
