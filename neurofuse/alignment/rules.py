"""The tables that map a module type, a function or a tensor method to its propagation rule.

Elementwise operations (activations, dropout, casts) are not listed here: the analysis asks the
graph toolkit's one table (:mod:`neurofuse.graph.ops`), which a user extends with
:func:`neurofuse.register_elementwise`."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.alignment.layer_rules import (
    _attention,
    _batchnorm,
    _conv,
    _elementwise,
    _embedding,
    _groupnorm,
    _layernorm,
    _linear,
    _pool,
)
from neurofuse.alignment.tensor_rules import (
    _cat,
    _chunks,
    _combine,
    _expand,
    _flatten_call,
    _flatten_module,
    _getattr,
    _getitem,
    _metadata,
    _permute,
    _reduce,
    _transpose,
    _unbind,
    _unflatten,
    _view,
)
from neurofuse.alignment.values import Rule

_POOLS: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.AvgPool1d: 1,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.AvgPool2d: 2,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveMaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool3d: 3,
}

#: Rules by module type (looked up along the MRO).
MODULE_RULES: dict[type, Rule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv(1),
    nn.Conv2d: _conv(2),
    nn.Conv3d: _conv(3),
    nn.BatchNorm1d: _batchnorm((0, 1)),
    nn.BatchNorm2d: _batchnorm((2,)),
    nn.BatchNorm3d: _batchnorm((3,)),
    nn.LayerNorm: _layernorm,
    nn.Embedding: _embedding,
    nn.GroupNorm: _groupnorm,
    nn.Flatten: _flatten_module,
    **{t: _pool(d) for t, d in _POOLS.items()},
    # softmax over the neuron axis is not elementwise but permutation-equivariant: the tag passes
    nn.Softmax: _elementwise,
}

#: Rules by called function.
FUNCTION_RULES: dict[Any, Rule] = {
    **{f: _combine for f in (operator.add, operator.iadd, operator.sub, operator.mul)},
    **{f: _combine for f in (operator.truediv, torch.add, torch.sub, torch.mul, torch.div)},
    F.softmax: _elementwise,
    F.max_pool1d: _pool(1),
    F.avg_pool1d: _pool(1),
    F.adaptive_avg_pool1d: _pool(1),
    F.max_pool2d: _pool(2),
    F.avg_pool2d: _pool(2),
    F.adaptive_avg_pool2d: _pool(2),
    torch.flatten: _flatten_call,
    torch.transpose: _transpose,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.unflatten: _unflatten,
    torch.split: _chunks,
    torch.chunk: _chunks,
    torch.unbind: _unbind,
    F.scaled_dot_product_attention: _attention,
    torch.mean: _reduce,
    torch.sum: _reduce,
    getattr: _getattr,
    operator.getitem: _getitem,
}

#: Rules by tensor method name.
METHOD_RULES: dict[str, Rule] = {
    **{m: _combine for m in ("add", "add_", "sub", "mul", "mul_", "div")},
    "flatten": _flatten_call,
    "view": _view,
    "reshape": _view,
    "unflatten": _unflatten,
    "split": _chunks,
    "chunk": _chunks,
    "unbind": _unbind,
    "expand": _expand,
    "repeat": _expand,
    "transpose": _transpose,
    "permute": _permute,
    "mean": _reduce,
    "sum": _reduce,
    "size": _metadata,
    "dim": _metadata,
    "numel": _metadata,
}
