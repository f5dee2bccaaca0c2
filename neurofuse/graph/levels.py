"""Split a model into levels: consecutive sub-networks whose composition is the model.

A *level* ends at a *cut*: a node of the model's torch.fx graph after which nothing computed
earlier is needed again (the only live value is the cut's output). Levels are what the
neuron-interpolation algorithms fuse one after another; a level may hold a single layer or a
whole residual block.

Automatic levels end at every affine layer (``Linear``, ``Conv1d``, ``Conv2d``), together with
the BatchNorm that directly follows it, so a level's output is the *pre-activation* and the
activation starts the next level (``cut="pre"``, the default, which keeps every Linear-variant
level affine in its weights). ``cut="post"`` moves each cut past the activation. A cut that would
leave a skip connection dangling (a layer inside a residual block) is moved forward to the first
valid cut, so a residual block becomes one level.

Transformer-like models (any LayerNorm or attention in the graph) are cut as the
neuron-interpolation paper cuts its ViTs (appendix F.2): the embedding (up to the first value of
the residual stream), then each block (a module whose forward holds residual additions: an
encoder block), then the head (final norm, pooling, classifier).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch import Tensor, nn

from neurofuse.graph.ops import (
    ADD_FUNCTIONS,
    AFFINE_TYPES,
    NORM_TYPES,
    is_activation,
    module_of,
)
from neurofuse.graph.tracing import trace

CUT_SIDES = ("pre", "post")


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def unit_end(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node that ends an affine unit: the layer itself or the BatchNorm right after it."""
    user = _sole_user(node)
    if user is not None and isinstance(module_of(gm, user), NORM_TYPES):
        return user
    return node


def affine_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every call of an affine layer (Linear, Conv1d, Conv2d), in execution order."""
    return [n for n in gm.graph.nodes if isinstance(module_of(gm, n), AFFINE_TYPES)]


def _valid_cut_flags(nodes: list[fx.Node]) -> list[bool]:
    """flags[i]: nothing computed before node i is used after it (node i is the only live value)."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = [max((index[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
    flags, reach = [], -1
    for i, n in enumerate(nodes):
        flags.append(reach <= i and n.op not in ("placeholder", "output", "get_attr"))
        if n.op != "get_attr":  # parameters may be fetched anywhere: they are not live values
            reach = max(reach, last_use[i])
    return flags


def _resolve_name(gm: fx.GraphModule, name: str) -> fx.Node:
    """A node name, or a module name (the last node computed inside that module)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    for n in nodes:
        if n.name == name:
            return n
    inside = [n for n in nodes if name in n.meta.get("nn_module_stack", {}) or n.target == name]
    if inside:
        return inside[-1]
    modules = [m for m, _ in gm.named_modules() if m]
    raise ValueError(
        f"level name {name!r} is neither a module nor a graph node of the model. Valid module "
        f"names include: {', '.join(modules[:40])}{' ...' if len(modules) > 40 else ''}."
    )


@dataclass
class Levels:
    """Where a model is cut into levels.

    Args:
        names: module names (or fx node names), each ending a level, in forward order; ``None``
            for automatic levels. The last level always ends at the model's output.
        cut: ``"pre"`` (levels end before activations) or ``"post"``; only for automatic levels.
        neuron_axes: optional ``{level index: axis}`` overriding the detected neuron axis.
    """

    names: Sequence[str] | None = None
    cut: str = "pre"
    neuron_axes: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cut not in CUT_SIDES:
            raise ValueError(f"cut must be one of {CUT_SIDES}, got {self.cut!r}")
        if self.names is not None:
            if isinstance(self.names, str) or not all(isinstance(n, str) for n in self.names):
                raise TypeError("levels must be a list of module names (strings)")
            if len(self.names) == 0:
                raise ValueError("levels is an empty list: give at least one module name")

    @classmethod
    def coerce(cls, levels: Levels | Sequence[str] | None, cut: str = "pre") -> Levels:
        if isinstance(levels, Levels):
            return levels
        if levels is None:
            return cls(None, cut=cut)
        if isinstance(levels, str):
            raise TypeError("levels must be a list of module names, not a single string")
        return cls(list(levels), cut=cut)

    def cut_nodes(self, gm: fx.GraphModule) -> list[fx.Node]:
        """The nodes of ``gm`` that end each level, in order."""
        nodes = list(gm.graph.nodes)
        flags = _valid_cut_flags(nodes)
        index = {n: i for i, n in enumerate(nodes)}
        out_node = next(n for n in nodes if n.op == "output")
        final = out_node.args[0]
        if not isinstance(final, fx.Node):
            raise ValueError("the model must return a single tensor (its logits)")
        if self.names is None:
            blocks = _block_ends(gm)
            if blocks is not None:
                wanted = sorted({index[n] for n in blocks})
            else:
                wanted = [index[self._auto_end(gm, n)] for n in affine_nodes(gm)]
        else:
            wanted = [index[_resolve_name(gm, name)] for name in self.names]
            for name, i in zip(self.names, wanted, strict=True):
                if not flags[i]:
                    raise ValueError(
                        f"cannot end a level at {name!r}: a value computed before it is still "
                        "needed after it (a skip connection crosses it). End the level at the "
                        "enclosing block instead, e.g. the residual block's name."
                    )
            if sorted(wanted) != wanted or len(set(wanted)) != len(wanted):
                raise ValueError(f"level names must be distinct and in forward order: {self.names}")
        cuts: list[int] = []
        for i in wanted:
            while not flags[i]:
                i += 1
            if i < index[final] and (not cuts or i > cuts[-1]):
                cuts.append(i)
        cuts.append(index[final])
        return [nodes[i] for i in cuts]

    def _auto_end(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        end = unit_end(gm, node)
        if self.cut == "post":
            user = _sole_user(end)
            if user is not None and is_activation(gm, user):
                end = user
        return end


def _data_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose values depend on the input's values (not only on parameters or shapes)."""
    data: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            data.add(n)
        elif n.op == "call_method" and n.target in ("size", "dim"):
            continue
        elif n.op == "call_function" and n.target is getattr:
            continue
        elif any(a in data for a in n.all_input_nodes):
            data.add(n)
    return data


def _residual_adds(gm: fx.GraphModule) -> list[fx.Node]:
    """Additions of two tensors computed from the input (residual connections), in order."""
    data = _data_nodes(gm)
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ADD_FUNCTIONS:
            args = [a for a in n.args if isinstance(a, fx.Node)]
            if len(args) == 2 and all(a in data and a.op != "placeholder" for a in args):
                out.append(n)
    return out


def is_transformer_like(gm: fx.GraphModule) -> bool:
    return any(
        isinstance(module_of(gm, n), nn.LayerNorm | nn.MultiheadAttention)
        or (n.op == "call_function" and n.target is nn.functional.scaled_dot_product_attention)
        for n in gm.graph.nodes
    )


def _block_ends(gm: fx.GraphModule) -> list[fx.Node] | None:
    """For transformer-like models: the end of the embedding (the skip operand of the first
    residual addition) and the last node of every module whose forward holds residual
    additions (its blocks). ``None`` for other models, or when no block is found."""
    if not is_transformer_like(gm):
        return None
    adds = _residual_adds(gm)
    if not adds:
        return None
    owners: dict[str, fx.Node] = {}
    for add in adds:
        stack = list(add.meta.get("nn_module_stack", {}))
        if stack:
            owners[stack[-1]] = add
    if not owners:
        return None
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    ends = []
    for path in owners:
        inside = [n for n in nodes if path in n.meta.get("nn_module_stack", {})]
        ends.append(inside[-1])
    first = adds[0]
    skip = [a for a in first.args if isinstance(a, fx.Node)]
    position = {n: i for i, n in enumerate(nodes)}
    embed = min(skip, key=lambda a: position.get(a, -1))
    return [embed, *ends]


def _copy_segment(
    gm: fx.GraphModule, segment: list[fx.Node], start: fx.Node | None, end: fx.Node, root: nn.Module
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is not None:
        env[start] = graph.placeholder("x")

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:
            if arg.op == "get_attr":  # parameters can be re-fetched inside any level
                env[arg] = graph.node_copy(arg, lookup)
            else:
                raise ValueError(
                    f"node {arg.name!r} is used inside a level that starts after it: the level "
                    "boundaries cut a skip connection; choose cuts at block outputs"
                )
        return env[arg]

    for n in segment:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            continue
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[end])
    return fx.GraphModule(root, graph)


def split(model: nn.Module, levels: Levels, gm: fx.GraphModule | None = None) -> list[nn.Module]:
    """Cut ``model`` into level modules that share its parameters: ``model(x)`` equals applying
    the returned modules in turn."""
    if gm is None:
        gm = trace(model)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError("fusion needs models with exactly one input tensor")
    cuts = levels.cut_nodes(gm)
    out: list[nn.Module] = []
    start: fx.Node | None = None
    lo = 0
    for cut in cuts:
        segment = nodes[lo : index[cut] + 1]
        out.append(_copy_segment(gm, segment, start, cut, gm))
        start, lo = cut, index[cut] + 1
    return out


def neuron_axis(output: Tensor, hint_size: int | None = None, channels_first: bool = True) -> int:
    """The axis of ``output`` that holds neurons: 1 for (B, C), (B, C, L), (B, C, H, W);
    the last axis for token tensors (B, T, C). ``hint_size`` (the number of neurons the producing
    layer has) and ``channels_first`` (whether that layer is a convolution/BatchNorm) decide the
    ambiguous 3-D case."""
    if output.dim() < 2:
        raise ValueError(f"level output of shape {tuple(output.shape)} has no neuron axis")
    if output.dim() in (2, 4):
        return 1
    if output.dim() == 3:
        if hint_size is not None:
            c1, c2 = output.shape[1] == hint_size, output.shape[2] == hint_size
            if c1 and not c2:
                return 1
            if c2 and not c1:
                return 2
        return 1 if channels_first else 2
    raise ValueError(
        f"level output of shape {tuple(output.shape)} is not (B, C), (B, C, L), (B, C, H, W) or "
        "(B, T, C); give its neuron axis with Levels(neuron_axes={level: axis})"
    )


def producing_layer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The nearest parametric layer upstream of ``node`` (through its first tensor argument)."""
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        mod = module_of(gm, n)
        if mod is not None and any(True for _ in mod.parameters(recurse=False)):
            return mod
        frontier.extend(a for a in n.all_input_nodes if a.op not in ("get_attr", "placeholder"))
    return None


def layer_width(mod: nn.Module | None) -> tuple[int | None, bool]:
    """(number of output neurons, channels_first) of a parametric layer."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, False
    if isinstance(mod, nn.Conv1d | nn.Conv2d):
        return mod.out_channels, True
    if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
        return mod.num_features, True
    if isinstance(mod, nn.LayerNorm):
        return int(mod.normalized_shape[-1]), False
    return None, True


def to_neurons(output: Tensor, axis: int) -> Tensor:
    """(d, N) matrix: one row per neuron, its values over every sample and position."""
    return output.movedim(axis, -1).reshape(-1, output.shape[axis]).T


def from_neurons(rows: Tensor, like: Tensor, axis: int) -> Tensor:
    """Inverse of :func:`to_neurons` for a tensor shaped like ``like`` but with ``rows.shape[0]``
    neurons."""
    moved = list(like.movedim(axis, -1).shape)
    moved[-1] = rows.shape[0]
    return rows.T.reshape(moved).movedim(-1, axis)
