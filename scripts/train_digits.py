"""Train the DigitsCNN on scikit-learn's 8x8 digits and write src/mpqkit/zoo/weights/digits_cnn.pt.

Deterministic (seed 0, one thread, CPU); takes a few seconds. The data comes from
``mpqkit.zoo.load_data("digits", ...)`` so training and evaluation share one normalization.

    PYTHONPATH=src python scripts/train_digits.py [--epochs 40] [--out PATH]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpqkit.zoo.data import LabeledData, load_data
from mpqkit.zoo.models import DIGITS_WEIGHTS, DigitsCNN

EPOCHS, BATCH, LR, WD = 40, 64, 3e-3, 1e-4


@torch.no_grad()
def top1(model: torch.nn.Module, data: LabeledData) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.batches(500))
    return 100.0 * correct / len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = load_data("digits", "train"), load_data("digits", "test")
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), BATCH):
            idx = perm[i : i + BATCH]
            x, y = train.images[idx], train.labels[idx]
            # light augmentation: random +-1 pixel shift (zero fill)
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    secs = time.perf_counter() - t0
    tr, te = top1(model, train), top1(model, test)
    recipe = (
        f"DigitsCNN, sklearn digits train split ({len(train)} imgs, seeded perm 0), {args.epochs} epochs, "
        f"batch {BATCH}, Adam lr {LR} wd {WD}, cosine LR, random +-1 px roll, torch.manual_seed(0), 1 thread, "
        f"torch {torch.__version__}"
    )
    print(f"train top-1 {tr:.2f} %  test top-1 {te:.2f} %  ({secs:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "test_top1": te, "recipe": recipe}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
