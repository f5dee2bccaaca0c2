"""K-means Fusion, Gradient: k-means grouping, each level trained to the centroids (Table 9 presets)."""

from __future__ import annotations

from torch import nn

from neurofuse.methods._gradient import GradientOptions, fuse_gradient
from neurofuse.methods.registry import FusionContext, register_method


@register_method(
    "kf_gradient",
    "K-means Fusion, Gradient: k-means grouping, each level trained to the centroids (Table 9 presets)",
    GradientOptions,
    single_model=True,
)
def kf_gradient(ctx: FusionContext) -> nn.Module:
    return fuse_gradient(ctx, grouping_method="kmeans")
