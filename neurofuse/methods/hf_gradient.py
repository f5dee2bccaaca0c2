"""Hungarian Fusion, Gradient: one-to-one matching, each level trained to the matched centroids."""

from __future__ import annotations

from torch import nn

from neurofuse.methods._gradient import GradientOptions, fuse_gradient
from neurofuse.methods.registry import FusionContext, register_method


@register_method(
    "hf_gradient",
    "Hungarian Fusion, Gradient: one-to-one matching, each level trained to the matched centroids",
    GradientOptions,
)
def hf_gradient(ctx: FusionContext) -> nn.Module:
    return fuse_gradient(ctx, grouping_method="hungarian")
