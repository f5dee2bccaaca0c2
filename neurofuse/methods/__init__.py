"""Fusion methods, one file each, all registered in one name table (see ``registry``)."""

from neurofuse.methods import hf_gradient, hf_linear, kf_gradient, kf_linear  # noqa: F401
from neurofuse.methods.registry import (
    FusionContext,
    available_methods,
    get_method,
    method_options,
    register_method,
)

__all__ = ["FusionContext", "available_methods", "get_method", "method_options", "register_method"]
