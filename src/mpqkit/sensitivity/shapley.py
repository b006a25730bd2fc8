"""SMPQ and DMPQ: a differentiable bit-width supernet, with the bits chosen by Monte-Carlo Shapley
values of each (layer, bits) candidate (SMPQ) or by the largest architecture parameter (DMPQ).

One supernet run serves both methods (the run is cached on disk, so ``--method dmpq`` after
``--method smpq`` with the same settings reuses it, and a killed run resumes at its last epoch):

* supernet: every searched layer's weight is Σ_b softmax(α_ℓ)_b · Q_b(W_ℓ) (shared fp weights,
  per-channel asymmetric min-max fake-quant with a straight-through estimator); activations stay
  fp during the search (the plan is applied with the usual activation bits afterwards).
* bi-level training on a train subset split in two halves: weights (SGD) on one half, α (Adam) on
  the other with the penalty λ·E[avg weight bits]/max bits under softmax(α); the first ``warmup``
  epochs train weights only.
* Shapley (after each post-warm-up epoch): players = (layer, bits) candidates; value = supernet top-1
  on a fixed batch of the α half; for each of M permutations the players are removed one by one
  (their mixing weight zeroed, the layer's remaining weights renormalised — a layer with no
  candidate left outputs zero), marginal = accuracy drop; a permutation is truncated once the
  accuracy falls below ``truncate``× the full value. Estimate = mean − std over permutations.
  SMPQ's α_s ← α_s + η·m, m ← μ·m + (1 − μ)·v̂, v̂ = Shapley normalised per layer (η 0.1, μ 0.8).
* selection: per layer argmax α_s (SMPQ) or argmax α (DMPQ); when that plan breaks the budget the
  shared ILP decides, with −Shapley (SMPQ) or −softmax(α) (DMPQ) as the cost (``solve/supernet.py``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..plan import atomic_write_text
from ..quant.observers import QuantSpec, weight_qparams
from ..quant.primitives import fake_quant
from .base import METHODS, SearchContext, SensitivityTable
from .gradients import require_weight_search

log = logging.getLogger("mpqkit")


@dataclass(frozen=True)
class SupernetConfig:
    train_size: int = 10_000  # train-split images; half for weights, half for α
    epochs: int = 5
    warmup: int = 2
    batch_size: int = 128
    lr_w: float = 0.01
    lr_alpha: float = 0.01
    lam: float = 0.5
    permutations: int = 6
    val_size: int = 250
    truncate: float = 0.5
    eta: float = 0.1
    momentum: float = 0.8
    seed: int = 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "SupernetConfig":
        """quick: sized for 2 CPU cores (< 15 min on ResNet-20; measured ~300 s per Shapley epoch at
        M = 10 on 500 images, hence M = 6 on 250); full: METHODS.md's M = 10, for a GPU."""
        presets = {"quick": {}, "full": {"train_size": 50_000, "epochs": 30, "warmup": 10, "permutations": 10,
                                         "val_size": 1000}}
        if name not in presets:
            from ..errors import MpqkitError

            raise MpqkitError(f"unknown SMPQ preset '{name}': use quick or full")
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})


# ------------------------------------------------------------------ Monte-Carlo Shapley
def shapley_mc(players: Sequence, value: Callable[[frozenset], float], permutations: int, truncate: float = 0.5,
               seed: int = 0) -> tuple[dict, dict, dict]:
    """Monte-Carlo Shapley values by removal: for each random permutation, players are removed one
    by one from the full coalition; a player's marginal is the value lost when it leaves. Once the
    value falls below ``truncate``× the full value the rest of the permutation counts as 0 (their
    marginals are then small by assumption). Returns (mean, std, mean − std) per player."""
    rng = np.random.default_rng(seed)
    players = list(players)
    full = value(frozenset(players))
    samples: dict = {p: [] for p in players}
    for _ in range(permutations):
        order = rng.permutation(len(players))
        present = set(players)
        current = full
        truncated = False
        for i in order:
            p = players[i]
            if truncated:
                samples[p].append(0.0)
                continue
            present.discard(p)
            nxt = value(frozenset(present))
            samples[p].append(current - nxt)
            current = nxt
            if truncate > 0 and current < truncate * full:
                truncated = True
    mean = {p: float(np.mean(v)) for p, v in samples.items()}
    std = {p: float(np.std(v)) for p, v in samples.items()}
    return mean, std, {p: mean[p] - std[p] for p in players}


# ------------------------------------------------------------------ supernet
class _MixedWeight(nn.Module):
    """Σ_b w_b · Q_b(W) with per-channel min-max asymmetric fake-quant (scale from the current W)."""

    def __init__(self, layer: nn.Module, bits: Sequence[int]) -> None:
        super().__init__()
        self.layer, self.bits = layer, list(bits)
        self.mask = torch.ones(len(self.bits))  # 0 = player removed (Shapley)
        self.frozen: list[Tensor] | None = None  # Q_b(W) kept while W does not change (Shapley)

    def quantized(self) -> list[Tensor]:
        if self.frozen is not None:
            return self.frozen
        w = self.layer.weight  # the shared weight quantizer, min-max range (recomputed as W trains)
        return [fake_quant(w, *weight_qparams(w, QuantSpec(b, symmetric=False, per_channel=True,
                                                            range_method="minmax")))
                for b in self.bits]

    def freeze(self, on: bool) -> None:
        with torch.no_grad():
            self.frozen = None
            self.frozen = [q.detach() for q in self.quantized()] if on else None

    def forward(self, alpha: Tensor) -> Tensor:
        probs = F.softmax(alpha, 0) * self.mask.to(alpha)
        total = probs.sum()
        probs = probs / total if float(total.detach()) > 0 else probs
        out = torch.zeros_like(self.layer.weight)
        for p, q in zip(probs, self.quantized()):
            if float(p.detach()) != 0.0:
                out = out + p * q
        return out


class Supernet(nn.Module):
    """The model with each searched layer's weight replaced, per call, by its α-mixture of
    quantized versions (``torch.func.functional_call``: the fp weights stay the trained parameters)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], bits: Sequence[int]) -> None:
        super().__init__()
        self.net = copy.deepcopy(model)
        self.layers, self.bits = list(layers), list(bits)
        self.alpha = nn.Parameter(torch.zeros(len(self.layers), len(self.bits)))
        self.mixers = [_MixedWeight(self.net.get_submodule(f), bits) for f in self.layers]

    def forward(self, x: Tensor) -> Tensor:
        from torch.func import functional_call

        mixed = {f"{f}.weight": m(self.alpha[i]) for i, (f, m) in enumerate(zip(self.layers, self.mixers))}
        return functional_call(self.net, mixed, (x,), strict=False)

    def weight_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "alpha"]

    def expected_bits(self, numel: Tensor) -> Tensor:
        probs = F.softmax(self.alpha, 1)
        b = torch.tensor(self.bits, dtype=probs.dtype)
        return ((probs * b).sum(1) * numel).sum() / numel.sum()


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


def _run_key(ctx: SearchContext, cfg: SupernetConfig, data_sha: str) -> str:
    from ..zoo.models import state_dict_sha256

    spec = {"model": state_dict_sha256(ctx.model), "layers": ctx.searched, "bits": ctx.w_bits, "cfg": asdict(cfg),
            "data": data_sha, "v": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def train_supernet(ctx: SearchContext, cfg: SupernetConfig) -> dict:
    """Run (or resume, or read) the supernet search; returns α, α_s and the Shapley estimates."""
    from ..engine.cache import default_cache_dir

    data = ctx.load_train(cfg.train_size, cfg.seed)
    half = len(data) // 2
    xw, yw = data.images[:half], data.labels[:half]
    xa, ya = data.images[half:], data.labels[half:]
    xv, yv = xa[:cfg.val_size].to(ctx.device), ya[:cfg.val_size].to(ctx.device)
    key = _run_key(ctx, cfg, data.sha256())
    cache_dir = Path(ctx.engine_kwargs.get("cache_dir") or default_cache_dir()) / "supernet"
    done_path, ckpt_path = cache_dir / f"{key}.json", cache_dir / f"{key}.pt"
    if done_path.exists():
        try:
            return json.loads(done_path.read_text())
        except json.JSONDecodeError:
            pass  # a corrupt record is recomputed
    torch.manual_seed(cfg.seed)
    sup = Supernet(ctx.model, ctx.searched, ctx.w_bits).to(ctx.device)
    numel = torch.tensor([float(ctx.model.get_submodule(f).weight.numel()) for f in ctx.searched])
    opt_w = torch.optim.SGD(sup.weight_params(), lr=cfg.lr_w, momentum=0.9, weight_decay=5e-4)
    opt_a = torch.optim.Adam([sup.alpha], lr=cfg.lr_alpha)
    alpha_s = torch.zeros_like(sup.alpha)
    mom = torch.zeros_like(sup.alpha)
    history: list[dict] = []
    shap_est = None
    start = 0
    if ckpt_path.exists():
        try:
            st = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            sup.load_state_dict(st["supernet"])
            opt_w.load_state_dict(st["opt_w"])
            opt_a.load_state_dict(st["opt_a"])
            alpha_s, mom, history, shap_est, start = st["alpha_s"], st["mom"], st["history"], st["shapley"], st["epoch"]
            log.info("smpq: resuming the supernet run at epoch %d", start)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is recomputed, never trusted
            log.warning("smpq: ignoring unreadable checkpoint %s (%s)", ckpt_path, str(e).splitlines()[0][:100])
            start = 0
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if start > 0:
        gen.set_state(st["gen"])
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sup.train()
        perm_w = torch.randperm(half, generator=gen)
        perm_a = torch.randperm(len(xa), generator=gen)
        n_steps = half // cfg.batch_size
        for s in range(n_steps):
            iw = perm_w[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            opt_w.zero_grad(set_to_none=True)
            F.cross_entropy(sup(xw[iw].to(ctx.device)), yw[iw].to(ctx.device)).backward()
            sup.alpha.grad = None
            opt_w.step()
            if epoch >= cfg.warmup:
                ia = perm_a[(s * cfg.batch_size) % len(xa):][:cfg.batch_size]
                opt_a.zero_grad(set_to_none=True)
                for p in sup.weight_params():
                    p.grad = None
                loss = F.cross_entropy(sup(xa[ia].to(ctx.device)), ya[ia].to(ctx.device))
                loss = loss + cfg.lam * sup.expected_bits(numel.to(ctx.device)) / max(ctx.w_bits)
                loss.backward()
                opt_a.step()
        sup.eval()
        row = {"epoch": epoch, "val_top1": _accuracy(sup, xv, yv), "train_s": time.perf_counter() - t0}
        if epoch >= cfg.warmup:
            t1 = time.perf_counter()
            shap_est, mean, std = _shapley(sup, xv, yv, cfg, seed=cfg.seed * 1000 + epoch)
            v = torch.tensor([[shap_est[(i, j)] for j in range(len(sup.bits))] for i in range(len(sup.layers))])
            vhat = v / (v.abs().sum(1, keepdim=True) + 1e-12)
            mom = cfg.momentum * mom + (1 - cfg.momentum) * vhat
            alpha_s = alpha_s + cfg.eta * mom
            row["shapley_s"] = time.perf_counter() - t1
        history.append(row)
        log.info("smpq: epoch %d %s", epoch, row)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"supernet": sup.state_dict(), "opt_w": opt_w.state_dict(), "opt_a": opt_a.state_dict(),
                    "alpha_s": alpha_s, "mom": mom, "history": history, "shapley": shap_est, "epoch": epoch + 1,
                    "gen": gen.get_state()}, tmp)
        tmp.replace(ckpt_path)
    alpha = sup.alpha.detach().cpu()
    final_alpha_s = (alpha + alpha_s.cpu())
    if shap_est is None:  # no post-warm-up epoch: one estimate now so SMPQ has values to rank
        shap_est, _, _ = _shapley(sup, xv, yv, cfg, seed=cfg.seed * 1000 + cfg.epochs)
    result = {"alpha": alpha.tolist(), "alpha_s": final_alpha_s.tolist(),
              "shapley": [[shap_est[(i, j)] for j in range(len(sup.bits))] for i in range(len(sup.layers))],
              "history": history, "layers": list(sup.layers), "bits": list(sup.bits), "config": asdict(cfg),
              "train_images": len(data)}
    atomic_write_text(done_path, json.dumps(result) + "\n")
    return result


def _shapley(sup: Supernet, xv: Tensor, yv: Tensor, cfg: SupernetConfig, seed: int):
    players = [(i, j) for i in range(len(sup.layers)) for j in range(len(sup.bits))]

    def value(present: frozenset) -> float:
        for i, m in enumerate(sup.mixers):
            m.mask = torch.tensor([1.0 if (i, j) in present else 0.0 for j in range(len(sup.bits))])
        try:
            return _accuracy(sup, xv, yv)
        finally:
            for m in sup.mixers:
                m.mask = torch.ones(len(sup.bits))

    for m in sup.mixers:  # weights are fixed during the estimate: quantize each once
        m.freeze(True)
    try:
        with torch.no_grad():  # not inference_mode: the masks set here are used in training later
            mean, std, est = shapley_mc(players, value, cfg.permutations, cfg.truncate, seed)
    finally:
        for m in sup.mixers:
            m.freeze(False)
    return est, mean, std


def _run(ctx: SearchContext) -> dict:
    require_weight_search(ctx, "smpq/dmpq")
    o = ctx.options
    cfg = SupernetConfig.preset(o.get("preset", "quick"), **{k: o.get(k) for k in
                                                            ("train_size", "epochs", "warmup", "permutations", "lam")},
                                seed=ctx.seed)
    return train_supernet(ctx, cfg)


def _table(ctx: SearchContext, run: dict, which: str) -> SensitivityTable:
    layers, bits = run["layers"], run["bits"]
    if which == "smpq":
        choice = np.asarray(run["alpha_s"])
        cost = -np.asarray(run["shapley"])
    else:
        choice = np.asarray(run["alpha"])
        a = np.asarray(run["alpha"])
        cost = -np.exp(a - a.max(1, keepdims=True)) / np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)
    w = {f: {b: float(cost[i, j]) for j, b in enumerate(bits)} for i, f in enumerate(layers)}
    argmax = {f: bits[int(np.argmax(choice[i]))] for i, f in enumerate(layers)}
    return SensitivityTable(w=w, meta={"score": "-shapley (mean - std)" if which == "smpq" else "-softmax(alpha)",
                                       "argmax_bits": argmax, "alpha": run["alpha"], "alpha_s": run["alpha_s"],
                                       "shapley": run["shapley"], "history": run["history"],
                                       "supernet_config": run["config"], "train_images": run["train_images"]})


@METHODS.register("smpq", "supernet + Monte-Carlo Shapley value of each (layer, bits); argmax of Shapley-updated α "
                  "(ILP on −Shapley when over budget)", solver="supernet")
def smpq(ctx: SearchContext) -> SensitivityTable:
    return _table(ctx, _run(ctx), "smpq")


@METHODS.register("dmpq", "the same supernet, argmax of the trained α (the baseline SMPQ improves on)",
                  solver="supernet")
def dmpq(ctx: SearchContext) -> SensitivityTable:
    return _table(ctx, _run(ctx), "dmpq")
