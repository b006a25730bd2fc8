"""Fine-tune an akamaster CIFAR ResNet on the JPEG-reconstructed CIFAR-10 train split.

The akamaster checkpoints were trained on the original pixels and lose ~10 points on the JPEG pixels
in ``shared/data/cifar10``; this is the recipe that made ``cifar10_resnet20_jpegft`` (81.0 -> 87.5 %):
SGD (momentum 0.9, Nesterov, weight decay 1e-4), batch 128, OneCycle LR max 0.02 with 15 % warm-up,
random crop (4 black pixels of padding) + horizontal flip, BatchNorm in train mode, seed 0, one thread.
It writes ``<models-dir>/cifar10_resnet<D>_jpegft/resnet<D>_jpegft.th`` (the zoo's ``resnet<D>``) in the
akamaster file format plus a README with the recipe, accuracies, wall time and sha256.

    PYTHONPATH=src python scripts/finetune_cifar_resnet.py --depth 56 [--epochs 3] [--models-dir DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpqkit.zoo.data import NORMALIZATION, LabeledData, load_data
from mpqkit.zoo.models import CIFAR_MODELS, CifarResNet, load_checkpoint
from mpqkit.zoo.paths import models_dir

BATCH, LR_MAX, WARMUP, WD, PAD = 128, 0.02, 0.15, 1e-4, 4


@torch.no_grad()
def top1(model: torch.nn.Module, data: LabeledData) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.batches(500))
    return 100.0 * correct / len(data)


def augment(x: torch.Tensor, g: torch.Generator, black: torch.Tensor) -> torch.Tensor:
    """Random 32x32 crop of the image padded by 4 black pixels, then a random horizontal flip."""
    n, c, h, w = x.shape
    padded = black.expand(n, c, h + 2 * PAD, w + 2 * PAD).clone()
    padded[:, :, PAD:PAD + h, PAD:PAD + w] = x
    dy, dx = torch.randint(0, 2 * PAD + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * PAD)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, choices=(20, 32, 44, 56), required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models-dir", default=None, help="folder of the checkpoint folders (default: the zoo's)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = models_dir(args.models_dir)
    src = root / CIFAR_MODELS[f"resnet{args.depth}-orig" if args.depth != 20 else "resnet20-orig"][1]
    model = CifarResNet(args.depth)
    model.load_state_dict(load_checkpoint(src), strict=False)
    train, test, exact = load_data("cifar10", "train"), load_data("cifar10", "test"), load_data("cifar10", "exact")
    before = (top1(model, test), top1(model, exact))
    mean, std = NORMALIZATION["cifar10"]
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)

    steps = args.epochs * ((len(train) + BATCH - 1) // BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=LR_MAX, momentum=0.9, nesterov=True, weight_decay=WD)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR_MAX, total_steps=steps, pct_start=WARMUP)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(augment(train.images[idx], g, black)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: last loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s",
              flush=True)
    secs = time.perf_counter() - t0
    after = (top1(model, test), top1(model, exact))

    out_dir = root / f"cifar10_resnet{args.depth}_jpegft"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"resnet{args.depth}_jpegft.th"
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "best_prec1": after[0]}, out)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    if (src.parent / "LICENSE").is_file():  # BSD-2-Clause: the licence travels with derived weights
        shutil.copyfile(src.parent / "LICENSE", out_dir / "LICENSE")
    (out_dir / "README.md").write_text(
        f"# ResNet-{args.depth} (CIFAR-10), fine-tuned on the JPEG-reconstructed CIFAR-10 train split\n\n"
        f"Made by mpqkit's `scripts/finetune_cifar_resnet.py --depth {args.depth} --epochs {args.epochs}` from\n"
        f"`{src.relative_to(root)}` (BSD-2-Clause, (c) 2018 Yerlan Idelbayev; LICENSE copied beside this file).\n"
        f"Same architecture and file format.\n\n"
        f"sha256 {sha}  {out.name}\n\n"
        f"| evaluation set | original | this checkpoint |\n|---|---:|---:|\n"
        f"| cifar10 test_batch (10k, JPEG pixels) | {before[0]:.2f} % | {after[0]:.2f} % |\n"
        f"| exact_prefix_test_batch.npz (1,017 original pixels) | {before[1]:.2f} % | {after[1]:.2f} % |\n\n"
        f"Recipe: {args.epochs} epochs over the 50k JPEG train images, batch {BATCH}, SGD momentum 0.9 nesterov, "
        f"weight decay {WD}, OneCycle LR max {LR_MAX} ({WARMUP:.0%} warm-up), random crop (black pad {PAD}) + "
        f"horizontal flip, torch.manual_seed(0), BN in train mode, {args.threads} thread(s), {secs:.0f} s wall.\n"
    )
    print(f"wrote {out}: test {before[0]:.2f} -> {after[0]:.2f} %, exact {before[1]:.2f} -> {after[1]:.2f} % "
          f"({secs:.0f} s)")


if __name__ == "__main__":
    main()
