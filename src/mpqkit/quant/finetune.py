"""Quantization-aware fine-tuning of a quantized model (LSQ), resumable epoch by epoch.

The model is the output of ``quant.apply.apply_plan``. A conv's weight is quantized before its
BatchNorm (the packed export folds BN into the per-channel scale afterwards), so BatchNorm stays in
eval mode with its statistics frozen — and its affine frozen too unless ``train_norm`` — and what is
trained is what is exported.
Every quantized layer gets LSQ quantizers (:mod:`.lsq`) initialised from its PTQ step sizes — per
output channel for weights, per tensor for inputs — and trains its latent weights, biases and step
sizes with straight-through rounding. Bits, grids (symmetric or not, zero points) and therefore the
plan's budget are unchanged. The loss is the KL divergence to the fp model's logits (distillation,
default) or cross-entropy with the labels. At the end the step sizes are written into the layers'
buffers and the weights onto their grids, so the result is an ordinary quantized model.

Determinism: epoch ``e``'s image order and augmentation come from a generator seeded by
``(seed, e)``, and a checkpoint (weights, step sizes, optimizer, schedule, history) is written after
every epoch, so a run killed after epoch ``k`` and resumed ends with the same weights as one that
was never stopped (same machine and thread count).
"""
from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import CheckpointError, DataError, MpqkitError
from ..fileutil import atomic_write_bytes
from .lsq import LsqQuantizer, lsq_grad_scale
from .modules import QuantAct, QuantMixin, install_quantizers
from .primitives import fake_quant

log = logging.getLogger("mpqkit")

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """How a plan is fine-tuned; recorded in the fine-tuned plan (``method_params["finetune"]``)."""

    epochs: int = 5
    lr: float = 1e-4  #: Adam learning rate of weights, biases and step sizes (cosine to 0 over the run)
    batch_size: int = 128
    distill: bool = True  #: KL to the fp model's logits (else cross-entropy with the labels)
    temperature: float = 1.0
    augment: str = "none"  #: "crop-flip" (pad 4, random 32×32 crop, horizontal flip) or "none"
    seed: int = 0
    #: images per epoch, drawn afresh each epoch from the training set (None: all of them)
    train_size: int | None = None
    #: how step sizes are trained: "log" (Adam on log s: relative steps) or "linear" (Adam on s itself)
    steps: str = "log"
    #: also train the affine scale and shift of the norm layers (their statistics stay frozen): the
    #: per-channel correction a conv without bias has no other way to learn; BN folds them on export
    train_norm: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise MpqkitError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise MpqkitError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise MpqkitError(f"{name} must be a finite number > 0, got {v!r}")
        if self.train_size is not None and not (isinstance(self.train_size, int) and self.train_size >= 1):
            raise MpqkitError(f"train size must be an integer >= 1, got {self.train_size!r}")
        if self.steps not in ("log", "linear"):
            raise MpqkitError(f"steps must be 'log' or 'linear', got {self.steps!r}")
        if self.augment not in AUGMENTATIONS:
            raise MpqkitError(f"unknown augmentation {self.augment!r}: use one of {', '.join(AUGMENTATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ data
def _crop_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Zero-pad 4 pixels, take a random crop of the original size, flip half the images horizontally."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen).tolist()
    dx = torch.randint(0, 9, (n,), generator=gen).tolist()
    flip = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if any(flip):
        idx = torch.tensor(flip)
        out[idx] = out[idx].flip(-1)
    return out


AUGMENTATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor] | None] = {"none": None, "crop-flip": _crop_flip}


def epoch_batches(images: Tensor, labels: Tensor, cfg: FinetuneConfig, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Epoch ``epoch``'s shuffled, augmented batches (the first ``cfg.train_size`` images of its order):
    a function of ``(cfg.seed, epoch)`` only."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(images), generator=gen)[:cfg.train_size]
    aug = AUGMENTATIONS[cfg.augment]
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        x = images[idx]
        if aug is not None and x.dim() == 4:
            x = aug(x, gen)
        yield x, labels[idx]


# ------------------------------------------------------------------------------ quantizers
@dataclass
class _Learned:
    """The LSQ quantizers installed on one layer (None where that side is not quantized)."""

    weight: LsqQuantizer | None
    input: LsqQuantizer | None


def install_lsq(qmodel: nn.Module, log_domain: bool = True) -> dict[str, _Learned]:
    """Give every quantized layer of ``qmodel`` LSQ quantizers initialised from its current step sizes
    (trained as ``log s`` with ``log_domain``)."""
    learned: dict[str, _Learned] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantMixin):
            wq = aq = None
            if m.w_spec is not None:
                per_step = m.weight[0].numel() if m.w_scale.dim() > 0 else m.weight.numel()
                wq = LsqQuantizer(m.w_scale, m.w_zero_point, *m._w_range, g=lsq_grad_scale(per_step, m._w_range[1]),
                                  log_domain=log_domain)
            if m.a_spec is not None:
                aq = LsqQuantizer(m.a_scale, m.a_zero_point, *m._a_range, g=1.0, log_domain=log_domain)
            install_quantizers(m, wq, aq)
            learned[name] = _Learned(wq, aq)
    if not learned:
        raise MpqkitError("the model has no quantized layer to fine-tune")
    return learned


@torch.no_grad()
def bake(qmodel: nn.Module, learned: dict[str, _Learned]) -> None:
    """Write the learned step sizes into the layers' buffers and the weights onto their grids, then
    remove the LSQ quantizers: the model is an ordinary quantized model again."""
    for name, lq in learned.items():
        m = qmodel.get_submodule(name)
        if lq.weight is not None:  # fake_quant's arithmetic, so the stored weight is exactly on its grid
            m.w_scale.copy_(lq.weight.step().reshape(m.w_scale.shape))
            m.weight.copy_(fake_quant(m.weight.detach(), m.w_scale, m.w_zero_point, *m._w_range))
        if lq.input is not None:
            m.a_scale.copy_(lq.input.step().reshape(m.a_scale.shape))
        install_quantizers(m, None, None)


NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _trainable(qmodel: nn.Module, learned: dict[str, _Learned], norm: bool = False) -> list[nn.Parameter]:
    """The quantized layers' weights, biases and step sizes, and with ``norm`` the affine parameters
    of the norm layers; every other parameter (norm layers without ``norm``, layers left in fp32) is
    frozen, so the backward pass computes no gradient for it."""
    for p in qmodel.parameters():
        p.requires_grad_(False)
    params = []
    for name, lq in learned.items():
        m = qmodel.get_submodule(name)
        params += [p for p in (m.weight, m.bias) if p is not None]
        params += [q.scale for q in (lq.weight, lq.input) if q is not None]
    if norm:
        params += [p for m in qmodel.modules() if isinstance(m, NORMS) for p in (m.weight, m.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    return params


# ------------------------------------------------------------------------------ the loop
@dataclass
class FinetuneState:
    """What a checkpoint holds besides the tensors: epochs done and the per-epoch history."""

    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _loss(logits: Tensor, teacher: Tensor | None, labels: Tensor, cfg: FinetuneConfig) -> Tensor:
    if teacher is None:
        return F.cross_entropy(logits, labels)
    t = cfg.temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def finetune(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, labels: Tensor, cfg: FinetuneConfig,
             checkpoint: Path | None = None, heldout: Callable[[nn.Module], float] | None = None,
             progress: bool = False, stop_after: int | None = None) -> FinetuneState:
    """Fine-tune ``qmodel`` (changed in place) on ``images`` / ``labels``; returns the history.

    ``checkpoint``: a file written after every epoch and resumed from when present (its config must
    equal ``cfg``). ``heldout(model) -> top-1`` is called after every epoch (the model in its LSQ form).
    ``stop_after``: return after that many epochs in total (simulates a killed run; the model is then
    left with its LSQ quantizers baked, like a finished one).
    """
    if len(images) == 0:
        raise DataError("fine-tuning needs training data: the training set is empty")
    for m in qmodel.modules():
        if isinstance(m, QuantAct):
            raise MpqkitError("fine-tuning a model with quantized attention matmuls is not supported yet")
    learned = install_lsq(qmodel, log_domain=cfg.steps == "log")
    params = _trainable(qmodel, learned, cfg.train_norm)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps_per_epoch = math.ceil(min(len(images), cfg.train_size or len(images)) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch, eta_min=0.0)
    state = FinetuneState()
    if checkpoint is not None and checkpoint.is_file():
        state = _resume(checkpoint, qmodel, learned, opt, sched, cfg)
    qmodel.eval()  # norm layers left unfolded stay frozen; dropout off
    fp_model.eval()
    try:
        for epoch in range(state.epochs_done, cfg.epochs):
            if stop_after is not None and epoch >= stop_after:
                break
            row = _epoch(qmodel, fp_model, images, labels, cfg, epoch, opt, sched, progress)
            if heldout is not None:
                with torch.no_grad():
                    row["heldout_top1"] = heldout(qmodel)
            state.history.append(row)
            state.epochs_done = epoch + 1
            log.info("[finetune] epoch %d/%d: loss %.4f%s (%.0f s)", epoch + 1, cfg.epochs, row["loss"],
                     f", held-out top-1 {100 * row['heldout_top1']:.2f} %" if "heldout_top1" in row else "",
                     row["seconds"])
            if checkpoint is not None:
                _save(checkpoint, qmodel, learned, opt, sched, cfg, state)
    finally:
        bake(qmodel, learned)
    return state


def _epoch(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, labels: Tensor, cfg: FinetuneConfig,
           epoch: int, opt: torch.optim.Optimizer, sched: Any, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    total, n = 0.0, 0
    device = next(qmodel.parameters()).device
    per_epoch = min(len(images), cfg.train_size or len(images))
    bar = tqdm(epoch_batches(images, labels, cfg, epoch), total=math.ceil(per_epoch / cfg.batch_size),
               desc=f"finetune epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    with torch.enable_grad():
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            teacher = None
            if cfg.distill:
                with torch.no_grad():
                    teacher = fp_model(x)
            loss = _loss(qmodel(x), teacher, y, cfg)
            if not torch.isfinite(loss):
                raise MpqkitError(f"fine-tuning diverged (loss {float(loss)}) in epoch {epoch + 1}: lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(x)
            n += len(x)
            bar.set_postfix(loss=f"{total / n:.4f}")
    return {"epoch": epoch + 1, "loss": total / n, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ checkpoints
def _save(path: Path, qmodel: nn.Module, learned: dict[str, _Learned], opt: torch.optim.Optimizer, sched: Any,
          cfg: FinetuneConfig, state: FinetuneState) -> None:

    buf = io.BytesIO()
    torch.save({"mpqkit_finetune": 1, "config": cfg.to_dict(), "epochs_done": state.epochs_done,
                "history": state.history, "model": qmodel.state_dict(),
                "lsq": {n: {k: q.state_dict() for k, q in (("weight", lq.weight), ("input", lq.input)) if q is not None}
                        for n, lq in learned.items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _resume(path: Path, qmodel: nn.Module, learned: dict[str, _Learned], opt: torch.optim.Optimizer, sched: Any,
            cfg: FinetuneConfig) -> FinetuneState:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("mpqkit_finetune") != 1:
            raise ValueError("not a fine-tuning checkpoint")
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(f"{path} is not a readable fine-tuning checkpoint ({str(e).splitlines()[0]}): "
                              f"delete it to start over") from None
    saved = {**FinetuneConfig().to_dict(), **ck["config"]}  # a setting added since: its default then
    if saved != cfg.to_dict():
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
        raise MpqkitError(f"{path} was written by a fine-tuning run with other settings "
                          f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}): "
                          f"use another --out or the same settings")
    try:
        qmodel.load_state_dict(ck["model"], strict=True)
        for n, lq in learned.items():
            for k, q in (("weight", lq.weight), ("input", lq.input)):
                if q is not None:
                    q.load_state_dict(ck["lsq"][n][k])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match this model and plan ({str(e).splitlines()[0]}): "
                              f"delete it to start over") from None
    log.info("[finetune] resuming after epoch %d of %d from %s", ck["epochs_done"], cfg.epochs, path)
    return FinetuneState(int(ck["epochs_done"]), list(ck["history"]))
