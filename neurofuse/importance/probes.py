"""Probe copies: a traced copy of a model with an ``nn.Identity`` right after chosen graph nodes.

Attribution libraries attribute to the output of a *module*; a fusion level may end at a node
with no module of its own (a residual ``add``, a functional ``relu``, a ``flatten``). Inserting an
identity module after each such node gives every node a module output to attribute to, and a
place to hook its values and gradients, without changing what the model computes.

The copy shares parameters with the model and never modifies it. It is also made safe for
attribution: in-place operations become out-of-place (an in-place op after a probe would
overwrite the probed value), and, for DeepLIFT, functional nonlinearities become modules and
every nonlinearity call gets a module of its own (Captum's DeepLIFT hooks modules, and a module
called twice would mix up the stored activations of its two calls).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neurofuse.graph import (
    CUT_SIDES,
    Levels,
    affine_nodes,
    copy_graph,
    is_residual_add,
    trace,
    unit_end,
)
from neurofuse.importance.deeplift import RULES

_PROBE_PREFIX = "_neurofuse_probe"

_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
}

#: Functional nonlinearities (called with the input alone) and the module DeepLIFT knows them by.
_FUNCTIONAL_NONLINEAR: dict[object, type[nn.Module]] = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    torch.sigmoid: nn.Sigmoid,
    F.sigmoid: nn.Sigmoid,
    torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh,
    F.elu: nn.ELU,
    F.leaky_relu: nn.LeakyReLU,
    F.softplus: nn.Softplus,
}
_METHOD_NONLINEAR: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
#: Nonlinearity modules with a DeepLIFT rule (each call gets its own copy).
_MODULE_NONLINEAR: tuple[type[nn.Module], ...] = tuple(RULES)


@dataclass
class Probed:
    """A probe copy: ``module`` computes what the model computes; ``probes[name]`` is the
    identity module whose output is the value of graph node ``name``."""

    module: fx.GraphModule
    probes: dict[str, nn.Module]


def node_names(model: nn.Module | fx.GraphModule) -> list[str]:
    """The names of the computing nodes of ``model``'s torch.fx graph (what probes can follow)."""
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]


def probe(
    model: nn.Module,
    names: Sequence[str],
    *,
    deeplift: bool = False,
    gm: fx.GraphModule | None = None,
) -> Probed:
    """A traced copy of ``model`` with an identity probe after each node in ``names``.

    Args:
        model: any torch.fx-traceable model (its parameters are shared, never changed).
        names: fx node names (see :func:`node_names`).
        deeplift: also turn functional nonlinearities into modules, one per call.
        gm: ``model``'s trace if the caller holds it (it is copied, never edited).
    """
    gm = copy_graph(gm) if gm is not None else trace(model)
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    missing = [n for n in names if n not in by_name or by_name[n].op in ("placeholder", "output")]
    if missing:
        valid = node_names(gm)
        raise ValueError(
            f"no graph node named {missing[:5]} in {type(model).__name__}; importance is given per "
            f"fx node (neurofuse.graph.trace(model)); valid names include {valid[:30]}"
        )
    _out_of_place(gm)
    if deeplift:
        _own_nonlinearities(gm)
    probes: dict[str, nn.Module] = {}
    for i, name in enumerate(dict.fromkeys(names)):
        node = by_name[name]
        attr = f"{_PROBE_PREFIX}_{i}"
        probes[name] = nn.Identity()
        gm.add_submodule(attr, probes[name])
        with graph.inserting_after(node):
            tap = graph.call_module(attr, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
    graph.lint()
    gm.recompile()
    return Probed(gm, probes)


def _fresh(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    """Make ``node`` call its own copy ``module`` (the original stays shared and untouched)."""
    attr = f"{_PROBE_PREFIX}_own_{node.name}"
    gm.add_submodule(attr, module)
    node.target = attr


def _out_of_place(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if node.target in _OUT_OF_PLACE:
                node.target = _OUT_OF_PLACE[node.target]
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
                node.target = name[:-1]
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if getattr(module, "inplace", False) and not any(module.parameters()):
                clone = copy.deepcopy(module)
                setattr(clone, "inplace", False)  # noqa: B010  (torch types module attributes as Tensor | Module)
                _fresh(gm, node, clone)


def _own_nonlinearities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        only_input = len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
        if node.op == "call_function" and node.target in _FUNCTIONAL_NONLINEAR and only_input:
            _replace_by_module(gm, node, _FUNCTIONAL_NONLINEAR[node.target]())
        elif node.op == "call_method" and node.target in _METHOD_NONLINEAR and only_input:
            _replace_by_module(gm, node, _METHOD_NONLINEAR[str(node.target)]())
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if type(module) in _MODULE_NONLINEAR and not any(module.parameters()):
                _fresh(gm, node, copy.deepcopy(module))


def _replace_by_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    """Turn a functional call into a call of ``module``, keeping the node (and its name)."""
    attr = f"{_PROBE_PREFIX}_own_{node.name}"
    gm.add_submodule(attr, module)
    node.op, node.target = "call_module", attr
    node.args, node.kwargs = (node.args[0],), {}


def default_nodes(model: nn.Module | fx.GraphModule) -> list[str]:
    """Every node at which the fusion engines ask for scores, in graph order.

    These are the ends of affine units (the layer, or the BatchNorm right after it: Linear
    variants), residual additions (Linear variants), and the level cuts of automatic levels on
    both sides of activations (Gradient variants; the last one is the classifier head).
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    wanted: set[fx.Node] = {unit_end(gm, n) for n in affine_nodes(gm)}
    wanted.update(n for n in gm.graph.nodes if is_residual_add(n))
    for side in CUT_SIDES:
        try:
            wanted.update(Levels(cut=side).cut_nodes(gm))
        except ValueError:  # no automatic levels for this graph: keep the other nodes
            pass
    return [n.name for n in gm.graph.nodes if n in wanted and n.op not in ("output", "get_attr")]
