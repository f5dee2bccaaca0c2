"""Fusion methods, one file each, all registered in one name table (see ``registry``)."""

from neurofuse.methods import (  # noqa: F401  (importing a method file registers it)
    auto,
    distilled,
    ensemble,
    fedavg,
    git_rebasin,
    hf_gradient,
    hf_linear,
    kd,
    kf_gradient,
    kf_linear,
    lp,
    otfusion,
    transformer_otfusion,
    transplant,
    vanilla,
)
from neurofuse.methods.registry import (
    FusionContext,
    available_methods,
    get_method,
    method_options,
    register_method,
)

__all__ = ["FusionContext", "available_methods", "get_method", "method_options", "register_method"]
