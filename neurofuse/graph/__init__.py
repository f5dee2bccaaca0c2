"""The graph toolkit: everything neurofuse knows about a model's torch.fx graph.

- :mod:`.ops`: the one table of operations (affine units, normalisations, elementwise ops,
  reshapes, residual additions) and :func:`register_elementwise`;
- :mod:`.tracing`: :func:`trace` and the per-fusion :class:`GraphCache`;
- :mod:`.levels`: where a model is cut into levels (:class:`Levels`, :func:`split`) and the
  neuron axis of a level's output;
- :mod:`.runner`: memoised evaluation of a graph's nodes on one batch.
"""

from neurofuse.graph.levels import (
    CUT_SIDES,
    Levels,
    affine_nodes,
    from_neurons,
    is_transformer_like,
    layer_width,
    neuron_axis,
    producing_layer,
    split,
    to_neurons,
    unit_end,
)
from neurofuse.graph.ops import (
    ADD_FUNCTIONS,
    AFFINE_TYPES,
    FOLDABLE_NORMS,
    NORM_TYPES,
    is_activation,
    is_affine,
    is_elementwise,
    is_identity,
    is_reshape,
    is_residual_add,
    module_of,
    register_elementwise,
)
from neurofuse.graph.runner import GraphRunner
from neurofuse.graph.tracing import GraphCache, TraceError, copy_graph, release, trace

__all__ = [
    "ADD_FUNCTIONS",
    "AFFINE_TYPES",
    "CUT_SIDES",
    "FOLDABLE_NORMS",
    "NORM_TYPES",
    "GraphCache",
    "GraphRunner",
    "Levels",
    "TraceError",
    "affine_nodes",
    "copy_graph",
    "from_neurons",
    "is_activation",
    "is_affine",
    "is_elementwise",
    "is_identity",
    "is_reshape",
    "is_residual_add",
    "is_transformer_like",
    "layer_width",
    "module_of",
    "neuron_axis",
    "producing_layer",
    "register_elementwise",
    "release",
    "split",
    "to_neurons",
    "trace",
    "unit_end",
]
