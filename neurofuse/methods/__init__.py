"""Fusion methods, one file each, all registered in one name table (see ``registry``)."""

from neurofuse.methods import (  # noqa: F401  (importing a method file registers it)
    auto,
    cca_merge,
    ensemble,
    fedavg,
    git_rebasin,
    kd,
    lp,
    neuron_interpolation,
    otfusion,
    transformer_otfusion,
    transplant,
    vanilla,
    zipit,
)
from neurofuse.methods.registry import (
    Capabilities,
    FusionContext,
    available_methods,
    get_method,
    method_info,
    method_options,
    option_docs,
    register_method,
)

__all__ = [
    "Capabilities",
    "FusionContext",
    "available_methods",
    "get_method",
    "method_info",
    "method_options",
    "option_docs",
    "register_method",
]
