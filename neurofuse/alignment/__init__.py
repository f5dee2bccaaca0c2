"""Which parameter axes of a network must be permuted together, derived from its torch.fx graph.

Permuting the hidden neurons of a layer leaves the network's function unchanged if every
parameter that touches those neurons is permuted the same way: the layer's weight rows and bias,
the BatchNorm/LayerNorm parameters that act on them, the incoming weight columns of every layer
that reads them, and, through a residual addition ``a + b``, everything coupled to ``b`` as well.
Such a set of neurons is a :class:`Space`. Permutation-based fusion (OTFusion, Git Re-Basin,
Neuron Transplantation) aligns or prunes models space by space.

:func:`permutation_spaces` finds the spaces of any fx-traceable model without a hand-written
per-architecture spec. It walks the graph once in execution order, tagging each node's output
with the space carried on its neuron axis:

- a ``Linear``/``Conv`` output opens a new space (weight rows and bias are its axis-0 members;
  the layer's weight columns join the input's space as an axis-1 member);
- per-neuron ops pass the tag on (activations, dropout, identity, pooling over other axes,
  BatchNorm and LayerNorm over the neuron axis, whose parameters join as axis-0 members);
- flattening a conv output into features turns the next ``Linear``'s columns into a member with
  ``repeat = in_features / channels`` (channel ``c`` feeds inputs ``c*repeat .. c*repeat+repeat-1``);
- an elementwise op on two tagged tensors (the residual ``add``, a gating ``mul``) unions their
  spaces (union-find), as does a parameter shared by two calls;
- attention: a projection's output unflattened (or split, then viewed) into ``(parts, heads,
  head_dim)`` and fed to ``scaled_dot_product_attention`` as query, key and value makes a space
  of ``heads`` blocks (:attr:`Space.heads`) whose permutations move whole heads and the
  dimensions inside them, alike in every part; the joint ``qkv`` weight is a member with
  ``parts=3``;
- raw parameters fetched with ``get_attr`` (a class token, a position embedding) that are added
  to or concatenated with a tagged tensor along another axis join its space; token selection
  (``x[:, 0]``), ``expand`` and slices of other axes pass the tag on;
- anything else that touches a tagged tensor (an unknown reshape, ``cat`` along the neurons,
  indexing single neurons, the model's output) marks its space ``fixed``: it is kept
  unpermuted, which is always safe.

Teach the analysis your own per-neuron module with :func:`neurofuse.register_elementwise`, or give
the spaces yourself (``spec=``) for a model fx cannot trace.

The package, one mechanism per module: :mod:`.space` (the :class:`Space` record and checks of
hand-written ones), :mod:`.analysis` (the graph walk with its union-find), :mod:`.values` (what
the walk knows of a node's output), :mod:`.layer_rules` and :mod:`.tensor_rules` (how each op
moves the neuron axis), :mod:`.rules` (the tables that map ops to rules), :mod:`.permute`
(applying permutations to a state dict) and :mod:`.batchnorm` (re-estimating BatchNorm
statistics after averaging).
"""

from __future__ import annotations

from neurofuse.alignment.analysis import permutation_spaces
from neurofuse.alignment.batchnorm import reestimate_batchnorm
from neurofuse.alignment.permute import apply_permutation
from neurofuse.alignment.rules import FUNCTION_RULES as FUNCTION_RULES
from neurofuse.alignment.rules import METHOD_RULES as METHOD_RULES
from neurofuse.alignment.rules import MODULE_RULES as MODULE_RULES
from neurofuse.alignment.space import Member, Space, random_permutation
from neurofuse.alignment.values import Rule as Rule

__all__ = [
    "Member",
    "Space",
    "random_permutation",
    "apply_permutation",
    "permutation_spaces",
    "reestimate_batchnorm",
]
