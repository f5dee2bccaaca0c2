"""neurofuse: fuse trained neural networks into one, without retraining.

>>> import neurofuse as nf
>>> fused = nf.fuse([model_a, model_b], fusion_inputs, method="kf_linear")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from neurofuse._version import __version__

# Public names resolved on first use, so `import neurofuse.data` stays light and quick.
_LAZY = {
    "fuse": ("neurofuse.api", "fuse"),
    "finetune": ("neurofuse.finetuning", "finetune"),
    "Levels": ("neurofuse.graph", "Levels"),
    "register_elementwise": ("neurofuse.graph", "register_elementwise"),
    "method_info": ("neurofuse.methods", "method_info"),
    "Importance": ("neurofuse.importance", "Importance"),
    "compute_importance": ("neurofuse.importance", "compute_importance"),
    "available_importance": ("neurofuse.importance", "available_importance"),
    "available_methods": ("neurofuse.methods", "available_methods"),
    "method_options": ("neurofuse.methods", "method_options"),
    "register_method": ("neurofuse.methods", "register_method"),
    "save_pretrained": ("neurofuse.pretrained", "save_pretrained"),
    "load_pretrained": ("neurofuse.pretrained", "load_pretrained"),
    "load_models": ("neurofuse.sources", "load_models"),
    "load_recipe": ("neurofuse.recipe", "load_recipe"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'neurofuse' has no attribute {name!r}")
