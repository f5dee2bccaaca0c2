"""The one table of operations: how each module, function and tensor method treats neurons.

Every part of neurofuse that reads a model's graph (level cuts, the permutation-space analysis,
the Linear and Gradient engines, the importance probes) asks this table, so teaching it a new
per-neuron operation is one call, :func:`register_elementwise`, that every method then honours.

Kinds of operation:

- *affine units* (``Linear``, ``Conv1d``, ``Conv2d``): what the engines fit; levels end at them;
- *normalisations* (BatchNorm, LayerNorm): per-neuron affine maps the engines fold or align;
- *elementwise* operations act on each neuron alone and alike (activations, dropout, casts):
  a neuron's index passes through them; among them, *identities* are the identity in eval mode
  (dropout, ``nn.Identity``), and *activations* are the nonlinear ones (``cut="post"`` levels end
  after them);
- *reshapes* are linear and treat every neuron alike (``view``, ``transpose``, ``flatten``), so an
  affine map before them can be moved after them;
- *additions* of two computed values are residual connections.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
#: Normalisations whose affine part a following unit can absorb (the Linear engine folds them).
FOLDABLE_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)

ADD_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({operator.add, torch.add, operator.iadd})

# The mutable tables behind the predicates below; change them only through
# register_elementwise so that the tracer and every method see the same set.
_ACTIVATION_MODULES: set[type[nn.Module]] = {
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.SiLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Softsign,
    nn.Tanhshrink,
}
_IDENTITY_MODULES: set[type[nn.Module]] = {
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
}
_ACTIVATION_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.erf,
    torch.exp,
    torch.abs,
    torch.clamp,
    torch.square,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.tanh,
    F.sigmoid,
}
_IDENTITY_FUNCTIONS: set[Any] = {F.dropout}
_ACTIVATION_METHODS: set[str] = {
    *("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "erf", "exp", "abs"),
    *("clamp", "clamp_", "clip", "square"),
}
#: Tensor methods that change nothing but memory layout, dtype or device.
_IDENTITY_METHODS: set[str] = {"contiguous", "clone", "detach", "float", "to", "type_as"}
#: Linear per-neuron-alike reshapes (an affine map before them can move after them).
RESHAPE_METHODS: frozenset[str] = frozenset(
    {"transpose", "permute", "flatten", "reshape", "view", "unflatten"}
)


def register_elementwise(
    op: type[nn.Module] | Callable[..., Any] | str, *, identity: bool = False
) -> None:
    """Declare an operation that acts on each neuron alone and alike, so that every method
    passes neurons through it (a custom activation, a custom dropout).

    Args:
        op: an ``nn.Module`` subclass (it is also traced as one opaque call, so its ``forward``
            need not be traceable), a function called on the tensor (``torch.special.expit``),
            or a tensor method's name (``"sigmoid"``).
        identity: the operation is the identity in eval mode (a dropout): the Linear engine
            then sees a unit's output through it unchanged.

    Example::

        class Swish(nn.Module):
            def forward(self, x):
                return x * torch.sigmoid(x)

        neurofuse.register_elementwise(Swish)
    """
    if isinstance(op, type):
        if not issubclass(op, nn.Module):
            raise TypeError(f"register_elementwise: {op.__name__} is not an nn.Module subclass")
        (_IDENTITY_MODULES if identity else _ACTIVATION_MODULES).add(op)
    elif isinstance(op, str):
        (_IDENTITY_METHODS if identity else _ACTIVATION_METHODS).add(op)
    elif callable(op):
        (_IDENTITY_FUNCTIONS if identity else _ACTIVATION_FUNCTIONS).add(op)
    else:
        raise TypeError(
            "register_elementwise takes an nn.Module subclass, a function or a tensor method "
            f"name; got {type(op).__name__}"
        )


def registered_modules() -> tuple[type[nn.Module], ...]:
    """Every elementwise module type (activations and identities)."""
    return (*_ACTIVATION_MODULES, *_IDENTITY_MODULES)


def activation_modules() -> tuple[type[nn.Module], ...]:
    return tuple(_ACTIVATION_MODULES)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (``None`` for any other node)."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _module_in(gm: fx.GraphModule, node: fx.Node, table: set[type[nn.Module]]) -> bool:
    mod = module_of(gm, node)
    return mod is not None and any(t in table for t in type(mod).__mro__)


def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Identity in eval mode (dropout, ``nn.Identity``, a cast or ``contiguous``)."""
    if node.op == "call_module":
        return _module_in(gm, node, _IDENTITY_MODULES)
    if node.op == "call_function":
        return node.target in _IDENTITY_FUNCTIONS
    return node.op == "call_method" and str(node.target) in _IDENTITY_METHODS


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A nonlinear elementwise operation (an activation)."""
    if node.op == "call_module":
        return _module_in(gm, node, _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and str(node.target) in _ACTIVATION_METHODS


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Acts on each neuron alone and alike: an activation or an identity."""
    return is_activation(gm, node) or is_identity(gm, node)


def is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A linear op treating every neuron alike that moves or merges axes (or an identity)."""
    if is_identity(gm, node):
        return True
    if node.op == "call_method":
        return str(node.target) in RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.transpose, torch.permute, torch.reshape) or (
            node.target is operator.getitem
        )
    return isinstance(module_of(gm, node), nn.Flatten)


def is_affine(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), AFFINE_TYPES)


def is_residual_add(node: fx.Node) -> bool:
    """An addition of two computed values (not of a constant)."""
    return (
        node.op == "call_function"
        and node.target in ADD_FUNCTIONS
        and all(isinstance(a, fx.Node) for a in node.args)
    )
