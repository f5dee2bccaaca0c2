"""A small GPT-style causal transformer (Radford et al. 2019), written for torch.fx.

Input: token ids ``(B, T)`` (any dtype; they are cast to ``long``, so a float tensor of ids
works as a fusion set). Output: next-token logits ``(B, T, vocab_size)``. Pre-norm blocks with
causal multi-head self-attention; the joint ``qkv`` projection is split into query, key and
value with ``split`` and into heads with ``view``, as in nanoGPT.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.checks import positive_int, probability
from neurofuse.models._common import NamedSequential
from neurofuse.models.registry import register_architecture


class CausalSelfAttention(nn.Module):
    """Causal softmax attention; ``qkv`` maps ``(B, T, C)`` to ``[q | k | v]`` (each ``C``),
    ``proj`` mixes the concatenated heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; choose dim = k*heads")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.size(0), x.size(1)
        q, k, v = self.qkv(x).split(self.dim, dim=2)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, self.dim))


class GPTBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``; children ``ln1``, ``attn``, ``ln2``,
    ``mlp`` (``fc1``, ``act`` = GELU, ``fc2``)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(dim, mlp_dim), act=nn.GELU(), fc2=nn.Linear(mlp_dim, dim))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TokenEmbedding(nn.Module):
    """Token ids ``(B, T)`` -> ``tok(ids) + pos[:, :T]`` of shape ``(B, T, dim)``."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.tok(ids.long()) + self.pos[:, : ids.size(1)])


@register_architecture("gpt", "GPT-style causal transformer language model (token ids in)")
class GPT(NamedSequential):
    """Children, in order: ``embed`` (``TokenEmbedding``), ``blocks`` (``GPTBlock``s),
    ``norm`` (final LayerNorm), ``head`` (Linear to the vocabulary, untied).

    Args:
        vocab_size: number of tokens.
        max_len: longest sequence.
        dim: residual stream width.
        depth: number of blocks.
        heads: attention heads; must divide ``dim``.
        mlp_dim: hidden width of each block's MLP.
        dropout: dropout on the embeddings.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        max_len: int = 32,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        dim = positive_int("dim", dim)
        heads = positive_int("heads", heads)
        mlp_dim = positive_int("mlp_dim", mlp_dim)
        vocab_size = positive_int("vocab_size", vocab_size)
        super().__init__(
            OrderedDict(
                embed=TokenEmbedding(
                    vocab_size,
                    positive_int("max_len", max_len),
                    dim,
                    probability("dropout", dropout),
                ),
                blocks=nn.Sequential(
                    *[GPTBlock(dim, heads, mlp_dim) for _ in range(positive_int("depth", depth))]
                ),
                norm=nn.LayerNorm(dim),
                head=nn.Linear(dim, vocab_size),
            )
        )
        self.num_classes = vocab_size
