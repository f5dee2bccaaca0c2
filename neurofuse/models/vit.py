"""Vision Transformer (Dosovitskiy et al. 2021) in the small CIFAR form of omihub777/ViT-CIFAR.

Token tensors are ``(B, T, C)``: ``T = 1 + (image_size / patch_size)**2`` tokens (the class token
first), ``C = dim``. Everything is written with plain modules and tensor ops so that
``torch.fx.symbolic_trace`` sees every Linear, including each attention's ``qkv`` and ``proj``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.checks import positive_int, probability
from neurofuse.models._common import NamedSequential
from neurofuse.models.registry import register_architecture


class PatchEmbedding(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> tokens ``(B, 1 + T, dim)``.

    ``proj`` (a Conv2d with kernel = stride = patch) cuts and embeds patches; the learnable
    ``cls_token`` is prepended, the learnable ``pos_embedding`` added, then ``drop`` applied.
    """

    def __init__(
        self, image_size: int, patch_size: int, in_channels: int, dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not divisible by patch_size {patch_size}; "
                "pick a patch size that divides the image size"
            )
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.drop(torch.cat([cls, patches], dim=1) + self.pos_embedding)


class MultiHeadSelfAttention(nn.Module):
    """Softmax attention with ``heads`` heads of size ``head_dim = dim / heads``.

    ``qkv`` maps ``(B, T, C)`` to ``(B, T, 3C)``; its output features are laid out
    ``[q | k | v]``, each split into ``heads`` contiguous blocks of ``head_dim``, so head ``h``
    of the query is ``qkv.weight[h*head_dim:(h+1)*head_dim]``. Per head,
    ``softmax(q k^T / sqrt(head_dim)) v``; heads are concatenated (same order) and mixed by
    ``proj``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; choose dim = k*heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, 3C) -> (3, B, heads, T, head_dim)
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Children: ``norm1``, ``attn``, ``norm2``, ``mlp`` (``fc1``, ``act`` = GELU, ``fc2``) and
    ``drop`` (dropout on both residual branches; identity at ``dropout=0``).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(dim, mlp_dim), act=nn.GELU(), fc2=nn.Linear(mlp_dim, dim))
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ClassTokenPool(nn.Module):
    """``(B, T, C)`` -> ``(B, C)``: the class token, ``x[:, 0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


@register_architecture("vit", "Vision Transformer with class token and pre-norm encoder blocks")
class VisionTransformer(NamedSequential):
    """Children, in order: ``embed``, ``blocks`` (``EncoderBlock``s), ``norm``, ``pool``, ``head``.

    Args:
        image_size: input height = width.
        patch_size: side of the square patches; must divide ``image_size``.
        in_channels: input image channels.
        num_classes: number of logits.
        dim: token width (the "encoder hidden size").
        depth: number of encoder blocks.
        heads: attention heads per block; must divide ``dim``.
        mlp_dim: hidden width of each block's MLP (the "feed-forward hidden size").
        dropout: dropout rate on the embeddings and the residual branches.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 8,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 384,
        depth: int = 7,
        heads: int = 12,
        mlp_dim: int = 384,
        dropout: float = 0.0,
    ) -> None:
        dropout = probability("dropout", dropout)
        dim = positive_int("dim", dim)
        heads = positive_int("heads", heads)
        mlp_dim = positive_int("mlp_dim", mlp_dim)
        embed = PatchEmbedding(
            positive_int("image_size", image_size),
            positive_int("patch_size", patch_size),
            positive_int("in_channels", in_channels),
            dim,
            dropout,
        )
        blocks = [
            EncoderBlock(dim, heads, mlp_dim, dropout) for _ in range(positive_int("depth", depth))
        ]
        super().__init__(
            OrderedDict(
                embed=embed,
                blocks=nn.Sequential(*blocks),
                norm=nn.LayerNorm(dim),
                pool=ClassTokenPool(),
                head=nn.Linear(dim, positive_int("num_classes", num_classes)),
            )
        )
        self.num_classes = num_classes


#: Presets: registered architectures whose defaults differ from ``vit`` (any kwarg still
#: overrides). ``vit_cifar`` is the CIFAR-100 model of the neuron-interpolation paper
#: (Appendix E): patch 8, 7 encoder blocks, 12 heads, width 384, MLP 384.
VIT_PRESETS: dict[str, tuple[dict, str]] = {
    "vit_cifar": (
        dict(image_size=32, patch_size=8, num_classes=100, dim=384, depth=7, heads=12, mlp_dim=384),
        "ViT of the paper's CIFAR-100 runs: patch 8, 7 blocks, 12 heads, width 384, MLP 384",
    ),
    "vit_tiny": (
        dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64),
        "tiny ViT for tests and quick runs: patch 8, 2 blocks, 2 heads, width 32, MLP 64",
    ),
}

for _name, (_defaults, _description) in VIT_PRESETS.items():
    register_architecture(_name, _description)(functools.partial(VisionTransformer, **_defaults))
