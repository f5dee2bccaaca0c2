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
import types
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class OpTable:
    """Module types, functions and tensor method names of one kind of operation."""

    modules: set[type[nn.Module]]
    functions: set[Any]
    methods: set[str]

    def holds(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Whether ``node`` calls an operation of this table."""
        if node.op == "call_module":
            mod = module_of(gm, node)
            return mod is not None and any(t in self.modules for t in type(mod).__mro__)
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and str(node.target) in self.methods


# The two tables of elementwise operations; change them only through register_elementwise so
# that the tracer and every method see the same set.
#: Nonlinear elementwise operations.
ACTIVATIONS = OpTable(
    modules={
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
    },
    functions={
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
    },
    methods={
        *("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "erf", "exp", "abs"),
        *("clamp", "clamp_", "clip", "square"),
    },
)
#: The identity in eval mode, or a change of memory layout, dtype or device only.
IDENTITIES = OpTable(
    modules={nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout},
    functions={F.dropout},
    methods={"contiguous", "clone", "detach", "float", "to", "type_as"},
)
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
        op: an ``nn.Module`` subclass or a plain Python function called by its module-level
            name (either is then traced as one opaque call, so its body need not be
            traceable), a torch function called on the tensor (``torch.special.expit``), or a
            tensor method's name (``"sigmoid"``).
        identity: the operation is the identity in eval mode (a dropout): the Linear engine
            then sees a unit's output through it unchanged.

    Example::

        class Swish(nn.Module):
            def forward(self, x):
                return x * torch.sigmoid(x)

        neurofuse.register_elementwise(Swish)
    """
    table = IDENTITIES if identity else ACTIVATIONS
    if isinstance(op, type):
        if not issubclass(op, nn.Module):
            raise TypeError(f"register_elementwise: {op.__name__} is not an nn.Module subclass")
        table.modules.add(op)
    elif isinstance(op, str):
        table.methods.add(op)
    elif callable(op):
        table.functions.add(op)
        if isinstance(op, types.FunctionType):
            _PYTHON_FUNCTIONS.add(op)  # traced as one call, not inlined
    else:
        raise TypeError(
            "register_elementwise takes an nn.Module subclass, a function or a tensor method "
            f"name; got {type(op).__name__}"
        )


#: registered plain Python functions: torch.fx would trace through them, so the tracer keeps
#: each as one call (``autowrap_functions``)
_PYTHON_FUNCTIONS: set[types.FunctionType] = set()


def registered_functions() -> tuple[types.FunctionType, ...]:
    """The plain Python functions registered with :func:`register_elementwise`."""
    return tuple(_PYTHON_FUNCTIONS)


def registered_modules() -> tuple[type[nn.Module], ...]:
    """Every elementwise module type (activations and identities)."""
    return (*ACTIVATIONS.modules, *IDENTITIES.modules)


def activation_modules() -> tuple[type[nn.Module], ...]:
    return tuple(ACTIVATIONS.modules)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (``None`` for any other node)."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Identity in eval mode (dropout, ``nn.Identity``, a cast or ``contiguous``)."""
    return IDENTITIES.holds(gm, node)


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A nonlinear elementwise operation (an activation)."""
    return ACTIVATIONS.holds(gm, node)


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
