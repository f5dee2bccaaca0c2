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
- anything else that touches a tagged tensor (reshape into heads, ``cat``, indexing, a raw
  parameter fetched with ``get_attr``, the model's output) marks its space ``fixed``: it is kept
  unpermuted, which is always safe.

Teach the analysis your own per-neuron module with :func:`register_elementwise_module`, or give
the spaces yourself (``spec=``) for a model fx cannot trace.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from neurofuse.levels import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES, TraceError, trace, unit_end


@dataclass
class Space:
    """A set of neurons that must be permuted together.

    Attributes:
        name: fx node name that creates it: the unit output (the Linear/Conv node, or the
            BatchNorm right after it), or the first residual ``add`` that joins it.
        size: number of neurons.
        members: ``(state_dict key, axis, repeat)``: axis 0 = a producer's outgoing neurons
            (weight rows, bias, BatchNorm and LayerNorm parameters and statistics), axis 1 = a
            consumer's incoming weights. ``repeat > 1`` when conv channels were flattened into a
            Linear's inputs: neuron ``c`` owns indices ``c*repeat .. c*repeat+repeat-1``.
        nodes: fx node names whose output carries this space on its neuron axis, in graph order.
        fixed: an op that cannot be permuted touches it; leave it unpermuted.
        axes: the neuron axis of each node's output (parallel to ``nodes``; negative when only
            its position from the end is known). May be empty for hand-written spaces.
    """

    name: str
    size: int
    members: list[tuple[str, int, int]]
    nodes: list[str]
    fixed: bool
    axes: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class _Tag:
    space: int  # group id, resolved through the union-find
    axis: int  # neuron axis counted from the end (-1 = last): broadcasting aligns from the end
    flat: bool = False  # channels flattened into the last axis, ``repeat`` entries each


@dataclass(frozen=True)
class _Value:
    """What the analysis knows about one node's output."""

    rank: int | None = None
    tag: _Tag | None = None
    meta: bool = False  # a shape, size or dtype, not a tensor of neurons


@dataclass
class _Group:
    size: int
    origin: str
    members: dict[tuple[str, int], int] = field(default_factory=dict)  # (key, axis) -> repeat
    nodes: list[tuple[int, str, int]] = field(default_factory=list)  # (position, name, axis)
    fixed: bool = False
    joined_at: tuple[int, str] | None = None


Rule = Callable[["_Analysis", fx.Node, Any], _Value]


class _Analysis:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []
        self.groups: dict[int, _Group] = {}
        self.owner: dict[tuple[str, int], int] = {}
        self.values: dict[fx.Node, _Value] = {}
        self.pos: dict[fx.Node, int] = {}
        self.raw: set[str] = set()  # targets fetched with get_attr

    # -- union-find over spaces
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def group(self, i: int) -> _Group:
        return self.groups[self.find(i)]

    def new_space(self, node: fx.Node, size: int) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.groups[i] = _Group(size=size, origin=unit_end(self.gm, node).name)
        return i

    def union(self, a: int, b: int, at: fx.Node | None = None) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups.pop(ra), self.groups.pop(rb)
        self.parent[rb] = ra
        joins = [j for j in (ga.joined_at, gb.joined_at) if j is not None]
        if at is not None:
            joins.append((self.pos[at], at.name))
        merged = _Group(
            size=ga.size,
            origin=ga.origin,
            members=dict(ga.members),
            nodes=ga.nodes + gb.nodes,
            fixed=ga.fixed or gb.fixed or ga.size != gb.size,
            joined_at=min(joins) if joins else None,
        )
        for k, r in gb.members.items():
            if merged.members.setdefault(k, r) != r:
                merged.fixed = True
        self.groups[ra] = merged
        for k in merged.members:
            self.owner[k] = ra
        return ra

    def fix(self, *values: _Value | None) -> None:
        for v in values:
            if v is not None and v.tag is not None:
                self.group(v.tag.space).fixed = True

    def member(self, space: int, node: fx.Node, param: str, axis: int, repeat: int = 1) -> None:
        mod = self.gm.get_submodule(str(node.target))
        if getattr(mod, param, None) is None:
            return
        key = f"{node.target}.{param}"
        if (key, axis) in self.owner:  # a parameter shared by two calls couples both spaces
            space = self.union(self.owner[(key, axis)], space)
        g = self.group(space)
        if g.members.setdefault((key, axis), repeat) != repeat:
            g.fixed = True
        self.owner[(key, axis)] = self.find(space)

    def arg(self, node: fx.Node, i: int = 0) -> _Value:
        a = node.args[i] if i < len(node.args) else None
        return self.values[a] if isinstance(a, fx.Node) else _Value()

    def opaque(self, node: fx.Node) -> _Value:
        """An op we cannot see through: every space it touches stays unpermuted."""
        self.fix(*(self.values[a] for a in node.all_input_nodes if not self.values[a].meta))
        return _Value()

    # -- the walk
    def run(self) -> None:
        for i, n in enumerate(self.gm.graph.nodes):
            self.pos[n] = i
            if n.op == "placeholder":
                v = _Value()
            elif n.op == "get_attr":
                self.raw.add(str(n.target))
                v = _Value()
            elif n.op == "output":
                self.opaque(n)  # the logits (and any other returned value) are fixed
                continue
            elif n.all_input_nodes and all(self.values[a].meta for a in n.all_input_nodes):
                v = _Value(meta=True)  # arithmetic on shapes
            else:
                v = self.dispatch(n)
            self.values[n] = v
            if v.tag is not None and not v.tag.flat:
                axis = v.tag.axis + v.rank if v.rank is not None else v.tag.axis
                self.group(v.tag.space).nodes.append((i, n.name, axis))

    def dispatch(self, n: fx.Node) -> _Value:
        if n.op == "call_module":
            mod = self.gm.get_submodule(str(n.target))
            rule = next((MODULE_RULES[t] for t in type(mod).__mro__ if t in MODULE_RULES), None)
            return rule(self, n, mod) if rule is not None else self.opaque(n)
        if n.op == "call_function":
            rule = FUNCTION_RULES.get(n.target)  # type: ignore[arg-type]
            if rule is None and n.target in ACTIVATION_FUNCTIONS:
                rule = _elementwise
        else:
            rule = METHOD_RULES.get(str(n.target))
        return rule(self, n, None) if rule is not None else self.opaque(n)

    def spaces(self, state_keys: set[str], aliases: Mapping[str, set[str]]) -> list[Space]:
        out = []
        for root, g in self.groups.items():
            keys = {k for k, _ in g.members}
            if keys & self.raw or any(not (aliases.get(k, set()) <= keys) for k in keys):
                g.fixed = True  # also used outside the graph's module calls
            nodes = sorted(g.nodes)
            name = g.joined_at[1] if g.joined_at is not None else g.origin
            members = [(k, a, r) for (k, a), r in g.members.items() if k in state_keys]
            first = nodes[0][0] if nodes else len(self.pos)
            out.append(
                (
                    first,
                    root,
                    Space(
                        name=name,
                        size=g.size,
                        members=members,
                        nodes=[name_ for _, name_, _ in nodes],
                        fixed=g.fixed,
                        axes=[a for _, _, a in nodes],
                    ),
                )
            )
        return [s for _, _, s in sorted(out, key=lambda t: (t[0], t[1]))]


# ---------------------------------------------------------------------------- rules


def _elementwise(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """Per-neuron ops (activations, dropout, identity, dtype casts): the tag passes through."""
    return a.arg(n)


def _pool(dims: int) -> Rule:
    """Ops over the last ``dims`` axes only (pooling): any other axis passes through."""

    def rule(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
        x = a.arg(n)
        if x.tag is not None and (x.tag.flat or x.tag.axis > -(dims + 1)):
            a.fix(x)
            return _Value(rank=x.rank)
        return x

    return rule


def _channel_ok(x: _Value, spatial: Iterable[int]) -> bool:
    """The tag sits on axis 1 of a ``(B, C, *spatial)`` input (BatchNorm, GroupNorm)."""
    assert x.tag is not None
    if x.tag.flat:
        return False
    if x.rank is not None:
        return x.rank - 2 in spatial and x.rank + x.tag.axis == 1
    return x.tag.axis <= -2 and -x.tag.axis - 1 in spatial  # axis -1 could be (B,C) or (B,L,C)


def _linear(a: _Analysis, n: fx.Node, mod: nn.Linear) -> _Value:
    x = a.arg(n)
    if x.tag is not None:
        size = a.group(x.tag.space).size
        if x.tag.flat and mod.in_features % size == 0:
            a.member(x.tag.space, n, "weight", 1, mod.in_features // size)
        elif not x.tag.flat and x.tag.axis == -1 and mod.in_features == size:
            a.member(x.tag.space, n, "weight", 1)
        else:
            a.fix(x)
    s = a.new_space(n, mod.out_features)
    a.member(s, n, "weight", 0)
    a.member(s, n, "bias", 0)
    return _Value(rank=x.rank, tag=_Tag(s, -1))


def _conv(dims: int) -> Rule:
    def rule(a: _Analysis, n: fx.Node, mod: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> _Value:
        x, channel = a.arg(n), -(dims + 1)
        fits = x.tag is not None and not x.tag.flat and x.tag.axis == channel
        if mod.groups == 1:
            if fits:
                a.member(x.tag.space, n, "weight", 1)  # type: ignore[union-attr]
            else:
                a.fix(x)
            s = a.new_space(n, mod.out_channels)
            a.member(s, n, "weight", 0)
            a.member(s, n, "bias", 0)
            return _Value(rank=dims + 2, tag=_Tag(s, channel))
        if mod.groups == mod.in_channels == mod.out_channels and fits:  # depthwise
            a.member(x.tag.space, n, "weight", 0)  # type: ignore[union-attr]
            a.member(x.tag.space, n, "bias", 0)  # type: ignore[union-attr]
            return _Value(rank=dims + 2, tag=x.tag)
        a.fix(x)  # a grouped conv ties channels to their group
        return _Value(rank=dims + 2)

    return rule


def _batchnorm(spatial: tuple[int, ...]) -> Rule:
    def rule(a: _Analysis, n: fx.Node, mod: nn.Module) -> _Value:
        x = a.arg(n)
        if x.tag is None:
            return x
        if not _channel_ok(x, spatial):
            a.fix(x)
            return _Value(rank=x.rank)
        for p in ("weight", "bias", "running_mean", "running_var"):
            a.member(x.tag.space, n, p, 0)
        return x

    return rule


def _layernorm(a: _Analysis, n: fx.Node, mod: nn.LayerNorm) -> _Value:
    x, dims = a.arg(n), len(mod.normalized_shape)
    if x.tag is None or (not x.tag.flat and x.tag.axis < -dims):
        return x  # the neurons are not among the normalised axes
    if dims == 1 and not x.tag.flat and x.tag.axis == -1:
        a.member(x.tag.space, n, "weight", 0)
        a.member(x.tag.space, n, "bias", 0)
        return x
    a.fix(x)
    return _Value(rank=x.rank)


def _groupnorm(a: _Analysis, n: fx.Node, mod: nn.GroupNorm) -> _Value:
    x = a.arg(n)
    if x.tag is None:
        return x
    # one group (statistics over all channels) or one channel per group: permutation-equivariant
    if mod.num_groups in (1, mod.num_channels) and _channel_ok(x, range(0, 8)):
        a.member(x.tag.space, n, "weight", 0)
        a.member(x.tag.space, n, "bias", 0)
        return x
    a.fix(x)
    return _Value(rank=x.rank)


def _flatten_value(a: _Analysis, x: _Value, start: int, end: int) -> _Value:
    if x.rank is None:
        a.fix(x)
        return _Value(rank=start + 1 if end == -1 and start >= 0 else None)
    r = x.rank
    s, e = start % r, end % r
    rank = r - (e - s)
    if x.tag is None or s == e:
        return _Value(rank=rank, tag=x.tag)
    if x.tag.flat:
        if e < r - 1:
            return _Value(rank=rank, tag=x.tag)
        a.fix(x)
        return _Value(rank=rank)
    p = r + x.tag.axis
    if p < s:
        return _Value(rank=rank, tag=_Tag(x.tag.space, p - rank))
    if p > e:
        return _Value(rank=rank, tag=x.tag)
    if p == s and e == r - 1:
        return _Value(rank=rank, tag=_Tag(x.tag.space, -1, flat=True))
    a.fix(x)
    return _Value(rank=rank)


def _flatten_module(a: _Analysis, n: fx.Node, mod: nn.Flatten) -> _Value:
    return _flatten_value(a, a.arg(n), mod.start_dim, mod.end_dim)


def _flatten_call(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
    end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
    if not isinstance(start, int) or not isinstance(end, int):
        return a.opaque(n)
    return _flatten_value(a, a.arg(n), start, end)


def _view(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``x.view(x.size(0), -1)`` / ``x.reshape(B, -1)`` is a flatten from axis 1; other shapes
    cannot be followed without knowing the sizes."""
    shape = list(n.args[1:])
    if len(shape) == 1 and isinstance(shape[0], tuple | list):
        shape = list(shape[0])
    batch = shape[0] if shape else None
    if len(shape) == 2 and shape[1] == -1 and isinstance(batch, fx.Node) and a.values[batch].meta:
        return _flatten_value(a, a.arg(n), 1, -1)
    return a.opaque(n)


def _transpose(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    x = a.arg(n)
    d = [n.args[1] if len(n.args) > 1 else n.kwargs.get("dim0"), None]
    d[1] = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim1")
    if x.tag is None:
        return _Value(rank=x.rank)
    if not all(isinstance(v, int) for v in d) or x.tag.flat:
        return a.opaque(n)
    if x.rank is not None:
        d = [v % x.rank - x.rank for v in d]  # type: ignore[operator]
    elif any(v >= 0 for v in d):  # type: ignore[operator]
        return a.opaque(n)
    axis = x.tag.axis
    if axis in d:
        axis = d[1] if axis == d[0] else d[0]
    return _Value(rank=x.rank, tag=_Tag(x.tag.space, axis))  # type: ignore[arg-type]


def _permute(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    x = a.arg(n)
    dims = list(n.args[1:])
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = list(dims[0])
    if x.tag is None:
        return _Value(rank=x.rank)
    if x.rank is None or x.tag.flat or not all(isinstance(v, int) for v in dims):
        return a.opaque(n)
    order = [v % x.rank for v in dims]
    return _Value(rank=x.rank, tag=_Tag(x.tag.space, order.index(x.rank + x.tag.axis) - x.rank))


def _reduce(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``x.mean(dims)`` / ``x.sum(dims)`` over axes other than the neuron axis."""
    x = a.arg(n)
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    dims = [dim] if isinstance(dim, int) else dim
    if x.tag is None or x.rank is None or x.tag.flat or not isinstance(dims, tuple | list):
        return a.opaque(n) if x.tag is not None else _Value()
    dims = {d % x.rank for d in dims}
    p = x.rank + x.tag.axis
    if p in dims or not isinstance(keep, bool):
        return a.opaque(n)
    if keep:
        return x
    rank = x.rank - len(dims)
    return _Value(rank=rank, tag=_Tag(x.tag.space, p - sum(d < p for d in dims) - rank))


def _combine(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """Elementwise ops of several tensors (the residual ``add``, a gating ``mul``): the neurons
    of all operands meet one to one, so their spaces become one."""
    vals = [a.values[x] for x in n.all_input_nodes if not a.values[x].meta]
    ranks = [v.rank for v in vals]
    rank = max(ranks) if all(r is not None for r in ranks) else None  # type: ignore[type-var]
    tagged = [v for v in vals if v.tag is not None]
    if not tagged:
        return _Value(rank=rank)
    t0 = tagged[0].tag
    assert t0 is not None
    same = all(
        v.tag.axis == t0.axis
        and v.tag.flat == t0.flat
        and a.group(v.tag.space).size == a.group(t0.space).size
        for v in tagged
        if v.tag is not None
    )
    if len(tagged) < len(vals) or not same:
        a.fix(*tagged)  # added to a tensor we cannot permute, or broadcast across neurons
        return _Value(rank=rank)
    for v in tagged[1:]:
        a.union(t0.space, v.tag.space, at=n)  # type: ignore[union-attr]
    return _Value(rank=rank, tag=t0)


def _metadata(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    return _Value(meta=True)


def _getattr(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    if len(n.args) > 1 and n.args[1] in ("shape", "ndim", "dtype", "device", "is_cuda"):
        return _Value(meta=True)
    return a.opaque(n)


def _getitem(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    return _Value(meta=True) if a.arg(n).meta else a.opaque(n)


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
    nn.GroupNorm: _groupnorm,
    nn.Flatten: _flatten_module,
    **{t: _pool(d) for t, d in _POOLS.items()},
    **{
        t: _elementwise
        for t in (
            *ACTIVATION_MODULES,
            nn.Dropout,
            nn.Dropout1d,
            nn.Dropout2d,
            nn.Identity,
            nn.Hardswish,
            nn.Hardtanh,
            nn.ReLU6,
            nn.Mish,
            nn.Softmax,
        )
    },
}

#: Rules by called function.
FUNCTION_RULES: dict[Any, Rule] = {
    **{f: _combine for f in (operator.add, operator.iadd, operator.sub, operator.mul)},
    **{f: _combine for f in (operator.truediv, torch.add, torch.sub, torch.mul, torch.div)},
    F.dropout: _elementwise,
    F.hardswish: _elementwise,
    F.relu6: _elementwise,
    F.softmax: _elementwise,
    F.max_pool1d: _pool(1),
    F.avg_pool1d: _pool(1),
    F.adaptive_avg_pool1d: _pool(1),
    F.max_pool2d: _pool(2),
    F.avg_pool2d: _pool(2),
    F.adaptive_avg_pool2d: _pool(2),
    torch.flatten: _flatten_call,
    torch.transpose: _transpose,
    torch.mean: _reduce,
    torch.sum: _reduce,
    getattr: _getattr,
    operator.getitem: _getitem,
}

#: Rules by tensor method name.
METHOD_RULES: dict[str, Rule] = {
    **{
        m: _elementwise
        for m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous")
        + ("clone", "detach", "float", "to")
    },
    **{m: _combine for m in ("add", "add_", "sub", "mul", "mul_", "div")},
    "flatten": _flatten_call,
    "view": _view,
    "reshape": _view,
    "transpose": _transpose,
    "permute": _permute,
    "mean": _reduce,
    "sum": _reduce,
    "size": _metadata,
    "dim": _metadata,
    "numel": _metadata,
}


def register_elementwise_module(module_type: type[nn.Module]) -> None:
    """Declare a parameter-free module that acts on each neuron independently (an activation,
    a custom dropout), so the spaces it sees pass through it instead of being fixed."""
    MODULE_RULES[module_type] = _elementwise


# ---------------------------------------------------------------------------- public API


def _aliases(state: Mapping[str, Tensor]) -> dict[str, set[str]]:
    """Keys whose tensors share memory with another key's (tied parameters)."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, t in state.items():
        if t.numel():
            by_ptr.setdefault((t.data_ptr(), tuple(t.shape), t.stride()), []).append(k)
    return {k: set(ks) for ks in by_ptr.values() if len(ks) > 1 for k in ks}


def _check_spec(model: nn.Module, spec: Sequence[Space]) -> list[Space]:
    state = model.state_dict()
    seen: dict[tuple[str, int], str] = {}
    names = [s.name for s in spec]
    if len(set(names)) != len(names):
        raise ValueError(f"space names must be unique, got {names}")
    for s in spec:
        if not isinstance(s, Space):
            raise TypeError(f"spec must be a list of Space, got {type(s).__name__}")
        for key, axis, repeat in s.members:
            if key not in state:
                raise ValueError(
                    f"space {s.name!r} names {key!r}, which is not in the model's state_dict "
                    f"(keys include {list(state)[:8]})"
                )
            t = state[key]
            if not 0 <= axis < t.dim() or t.shape[axis] != s.size * repeat:
                raise ValueError(
                    f"space {s.name!r}: {key!r} has shape {tuple(t.shape)}, so axis {axis} "
                    f"cannot hold {s.size} neurons x repeat {repeat}"
                )
            if (key, axis) in seen:
                raise ValueError(
                    f"{key!r} axis {axis} is in two spaces ({seen[(key, axis)]!r} and "
                    f"{s.name!r}); merge them into one space"
                )
            seen[(key, axis)] = s.name
    return copy.deepcopy(list(spec))


def permutation_spaces(model: nn.Module, spec: Sequence[Space] | None = None) -> list[Space]:
    """Every set of neurons of ``model`` that must be permuted together, in graph order.

    Permuting every non-fixed space by any permutation (:func:`apply_permutation`) gives a
    model that computes the same function. The classifier's outputs, the model's input and
    anything an unsupported op touches are ``fixed`` spaces (or no space at all).

    Args:
        model: an fx-traceable model (see :func:`neurofuse.levels.trace`).
        spec: the spaces given by hand instead (for models fx cannot trace, or to override the
            analysis); they are checked against the model's ``state_dict`` and returned.
    """
    if spec is not None:
        return _check_spec(model, spec)
    try:
        gm = trace(model)
    except TraceError as exc:
        raise TraceError(
            f"{exc} Permutation spaces can also be given by hand: "
            "permutation_spaces(model, spec=[Space(name, size, members, nodes, fixed), ...])."
        ) from exc
    analysis = _Analysis(gm)
    analysis.run()
    state = model.state_dict()
    return analysis.spaces(set(state), _aliases(state))


def _expand(p: Tensor, repeat: int) -> Tensor:
    """Neuron permutation -> index permutation of an axis with ``repeat`` entries per neuron."""
    if repeat == 1:
        return p
    return (p[:, None] * repeat + torch.arange(repeat, device=p.device)).flatten()


def apply_permutation(
    state_dict: Mapping[str, Tensor], spaces: Sequence[Space], perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict with the neurons of each space in ``perms`` reordered.

    ``perms[space.name] = p`` (an index tensor, a permutation of ``range(space.size)``): new
    neuron ``i`` is old neuron ``p[i]``, i.e. every member becomes ``t.index_select(axis, p)``
    (expanded to ``repeat`` consecutive entries per neuron). Tensors of untouched keys are the
    given objects (not copied); nothing is modified in place.
    """
    by_name = {s.name: s for s in spaces}
    unknown = sorted(set(perms) - set(by_name))
    if unknown:
        raise ValueError(f"no space named {unknown}; spaces: {sorted(by_name)}")
    out = dict(state_dict)
    for name, p in perms.items():
        space = by_name[name]
        if space.fixed:
            raise ValueError(f"space {name!r} is fixed (an op that cannot be permuted uses it)")
        p = torch.as_tensor(p, dtype=torch.long).flatten()
        if p.numel() != space.size or not torch.equal(
            torch.sort(p.cpu()).values, torch.arange(space.size)
        ):
            raise ValueError(f"perms[{name!r}] must be a permutation of range({space.size})")
        for key, axis, repeat in space.members:
            if key not in out:
                raise ValueError(f"space {name!r} names {key!r}, which the state dict lacks")
            t = out[key]
            out[key] = t.index_select(axis, _expand(p.to(t.device), repeat))
    return out


_BATCHNORM = nn.modules.batchnorm._BatchNorm


def reestimate_batchnorm(model: nn.Module, inputs: Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics on ``inputs``, in place.

    Weight averaging shrinks and shifts the activations feeding each BatchNorm, so the
    averaged running statistics no longer describe them (the "variance collapse" of averaged
    networks). The statistics are reset and re-accumulated as a cumulative average over batches
    (``momentum=None``): the network runs forward in training mode for its BatchNorms only
    (dropout stays off), so each BatchNorm sees its input as normalised by the ones before it.
    With one batch, ``running_mean`` is the mean of the BatchNorm's input and ``running_var``
    its unbiased variance. The model is left in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.track_running_stats]
    model.eval()
    if not norms:
        return
    n = inputs.shape[0]
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:  # a batch of one has no batch statistics
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [n], strict=True))
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for lo, hi in bounds:
                model(inputs[lo:hi])
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


__all__ = [
    "Space",
    "apply_permutation",
    "permutation_spaces",
    "reestimate_batchnorm",
    "register_elementwise_module",
]
