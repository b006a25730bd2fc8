"""Attention with its projections as ``nn.Linear`` modules, so that they are searchable layers.

``nn.MultiheadAttention`` keeps the fused Q/K/V projection as a bare parameter (``in_proj_weight``) and
calls its ``out_proj`` weight through a functional kernel, so no forward hook ever sees a Linear: a
vit_b_16 plan would leave all of its attention in fp32. :func:`expose_attention` swaps every such module
for :class:`ExposedAttention`, which computes the same function with ``q_proj``, ``k_proj``, ``v_proj``
and ``out_proj`` as ordinary Linear layers (self-attention: q/k/v read one tensor, so the graph ties
their activation bits). Weights are copied, the result is numerically the same up to float rounding.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExposedAttention", "MatMulInput", "expose_attention", "exposed_state_dict"]

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
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by :class:`ExposedAttention`;
    returns how many were replaced."""
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
    return len(targets)


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
