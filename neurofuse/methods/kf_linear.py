"""K-means Fusion, Linear: importance-weighted k-means of any number of models, closed-form refit."""

from __future__ import annotations

from torch import nn

from neurofuse.methods._linear import LinearOptions, fuse_linear
from neurofuse.methods.registry import FusionContext, register_method


@register_method(
    "kf_linear",
    "K-means Fusion, Linear: importance-weighted k-means of any number of models, closed-form refit",
    LinearOptions,
    single_model=True,
)
def kf_linear(ctx: FusionContext) -> nn.Module:
    return fuse_linear(ctx, grouping_method="kmeans")
