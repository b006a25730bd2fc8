"""Attention with its projections as ``nn.Linear`` modules, so that they are searchable layers.

``nn.MultiheadAttention`` keeps the fused Q/K/V projection as a bare parameter (``in_proj_weight``) and
calls its ``out_proj`` weight through a functional kernel, so no forward hook ever sees a Linear: a
vit_b_16 plan would leave all of its attention in fp32. :func:`expose_attention` swaps every such module
for :class:`ExposedAttention`, which computes the same function with ``q_proj``, ``k_proj``, ``v_proj``
and ``out_proj`` as ordinary Linear layers (self-attention: q/k/v read one tensor, so the graph ties
their activation bits). Weights are copied, the result is numerically the same up to float rounding.

torchvision's Swin blocks (``ShiftedWindowAttention`` and its V2) own ``qkv`` and ``proj`` Linear
modules but pass their weights to a functional kernel; :func:`expose_attention` makes them call the
modules (same parameter names, so checkpoints load unchanged) with :class:`MatMulInput` taps.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

__all__ = ["ExposedAttention", "ExposedWindowAttention", "ExposedWindowAttentionV2", "MatMulInput",
           "expose_attention", "expose_window_attention", "exposed_state_dict", "unexposed_attention"]

log = logging.getLogger("mpqkit")


class MatMulInput(nn.Identity):
    """Marks an activation that feeds an attention matmul (Q, K, V, the attention probabilities).

    An identity in the float model; with ``QuantConfig.matmul_a_bits`` (``--matmul-a-bits``),
    ``apply_plan`` calibrates it like a layer input and swaps it for a fake-quantizer."""


class ExposedAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same forward signature and outputs) with Linear projections."""

    # what nn.TransformerEncoder(Layer) inspect before their fused fast path: these keep them off it
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_in, self.k_in, self.v_in, self.attn_in = (MatMulInput() for _ in range(4))

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> ExposedAttention:
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("MultiheadAttention with add_bias_kv or add_zero_attn")
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, mha.in_proj_bias is not None, mha.dropout,
                  mha.batch_first)
        e = mha.embed_dim
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                ws = mha.in_proj_weight.split(e)
            else:
                ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            bs = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None,) * 3
            for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt, _ = query.shape
        src = key.shape[1]
        h, d = self.num_heads, self.embed_dim // self.num_heads
        q = self.q_proj(query).reshape(n, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(n, src, h, d).transpose(1, 2)
        scores = self.q_in(q) @ self.k_in(k).transpose(-2, -1) / math.sqrt(d)
        if attn_mask is not None:
            m = attn_mask.reshape(-1, h, tgt, src) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
        elif is_causal:
            causal = torch.ones(tgt, src, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(n, 1, 1, src)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = self.out_proj((self.attn_in(attn) @ self.v_in(v)).transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(1) if average_attn_weights else attn


def expose_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by :class:`ExposedAttention` and make
    every torchvision Swin window attention call its ``qkv``/``proj`` modules; returns how many changed."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExposedAttention.from_mha(mha))
    for m in model.modules():  # its nested-tensor fast path calls the fused kernels directly
        if targets and isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    if targets:
        log.info("attention: %d nn.MultiheadAttention module(s) now expose q/k/v/out projections as Linear layers",
                 len(targets))
    return len(targets) + expose_window_attention(model)


def expose_window_attention(model: nn.Module) -> int:
    """Make torchvision Swin attention modules (in place) run ``qkv`` and ``proj`` as modules; returns how many."""
    classes = {ShiftedWindowAttention: ExposedWindowAttention, ShiftedWindowAttentionV2: ExposedWindowAttentionV2}
    n = 0
    for m in model.modules():
        new_cls = classes.get(type(m))
        if new_cls is None:
            continue
        m.__class__ = new_cls  # same attributes and parameter names: only forward changes
        m.q_in, m.k_in, m.v_in, m.attn_in = (MatMulInput() for _ in range(4))
        if new_cls is ExposedWindowAttentionV2 and m.qkv.bias is not None:
            with torch.no_grad():  # the V2 kernel zeroes the key bias on every call: do it once
                length = m.qkv.bias.numel() // 3
                m.qkv.bias[length:2 * length].zero_()
        n += 1
    if n:
        log.info("attention: %d Swin window attention module(s) now run qkv/proj as Linear layers", n)
    return n


def unexposed_attention(model: nn.Module) -> list[str]:
    """Names of attention modules whose projections no hook can see (expose_attention would convert them)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) or type(m) in (ShiftedWindowAttention, ShiftedWindowAttentionV2)]


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], device: torch.device) -> torch.Tensor:
    """(windows, tokens, tokens) additive mask: −100 between tokens that the cyclic shift brought from
    different image regions into one window (Swin's shifted-window rule), 0 elsewhere."""
    region = torch.zeros(pad_h, pad_w, device=device)
    count = 0
    for h0, h1 in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[h0:h1, w0:w1] = count
            count += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _window_attention(m: nn.Module, x: torch.Tensor, bias: torch.Tensor, logit_scale: torch.Tensor | None):
    """Swin's (shifted) window self-attention on (B, H, W, C), with ``m.qkv``/``m.proj`` called as modules."""
    b, h, w, c = x.shape
    win, shift = list(m.window_size), list(m.shift_size)
    pad_r, pad_b = (win[1] - w % win[1]) % win[1], (win[0] - h % win[0]) % win[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = x.shape[1], x.shape[2]
    shift = [0 if win[i] >= (ph, pw)[i] else shift[i] for i in range(2)]  # one window: nothing to shift
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw, t = (ph // win[0]) * (pw // win[1]), win[0] * win[1]
    x = x.view(b, ph // win[0], win[0], pw // win[1], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, t, c)
    heads = m.num_heads
    q, k, v = m.qkv(x).reshape(b * nw, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = m.q_in(q), m.k_in(k), m.v_in(v)
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + bias
    if any(shift):
        mask = _shift_mask(ph, pw, win, shift, x.device)
        attn = (attn.view(b, nw, heads, t, t) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, t, t)
    attn = F.dropout(attn.softmax(-1), p=m.attention_dropout, training=m.training)
    x = m.proj((m.attn_in(attn) @ v).transpose(1, 2).reshape(b * nw, t, c))
    x = F.dropout(x, p=m.dropout, training=m.training)
    x = x.view(b, ph // win[0], pw // win[1], win[0], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if any(shift):
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class ExposedWindowAttention(ShiftedWindowAttention):
    """torchvision Swin window attention whose ``qkv``/``proj`` run as modules (made by expose_attention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_attention(self, x, self.get_relative_position_bias(), None)


class ExposedWindowAttentionV2(ShiftedWindowAttentionV2):
    """Swin V2 (cosine attention, continuous position bias) with ``qkv``/``proj`` run as modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_attention(self, x, self.get_relative_position_bias(), self.logit_scale)


def exposed_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` (keys of ``nn.MultiheadAttention``: ``in_proj_weight`` / ``in_proj_bias`` or ``q/k/v_proj_weight``)
    with each exposed module's keys renamed and split for ``model``'s :class:`ExposedAttention` modules."""
    out = dict(sd)
    for name, m in model.named_modules():
        if not isinstance(m, ExposedAttention):
            continue
        p = f"{name}." if name else ""
        e = m.embed_dim
        if f"{p}in_proj_weight" in out:
            for proj, w in zip("qkv", out.pop(f"{p}in_proj_weight").split(e)):
                out[f"{p}{proj}_proj.weight"] = w
        for proj in "qkv":
            if f"{p}{proj}_proj_weight" in out:
                out[f"{p}{proj}_proj.weight"] = out.pop(f"{p}{proj}_proj_weight")
        if f"{p}in_proj_bias" in out:
            for proj, b in zip("qkv", out.pop(f"{p}in_proj_bias").split(e)):
                out[f"{p}{proj}_proj.bias"] = b
    return out
