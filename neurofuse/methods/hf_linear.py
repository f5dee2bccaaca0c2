"""Hungarian Fusion, Linear: one-to-one matching of two equal-width models, closed-form refit (paper sec. 4)."""

from __future__ import annotations

from torch import nn

from neurofuse.methods._linear import LinearOptions, fuse_linear
from neurofuse.methods.registry import FusionContext, register_method


@register_method(
    "hf_linear",
    "Hungarian Fusion, Linear: one-to-one matching of two equal-width models, closed-form refit (paper sec. 4)",
    LinearOptions,
)
def hf_linear(ctx: FusionContext) -> nn.Module:
    return fuse_linear(ctx, grouping_method="hungarian")
