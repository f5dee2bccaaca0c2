"""The walk over a model's fx graph that finds its permutation spaces.

Each node's output is tagged with the space on its neuron axis (:mod:`.values`); the rules of
:mod:`.rules` say how an op opens, passes on, joins or fixes spaces. Spaces joined by a
residual ``add`` or a shared parameter are merged with a union-find. :func:`permutation_spaces`
is the public entry point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from neurofuse.alignment.layer_rules import _elementwise
from neurofuse.alignment.rules import FUNCTION_RULES, METHOD_RULES, MODULE_RULES
from neurofuse.alignment.space import Member, Space, _check_spec
from neurofuse.alignment.tensor_rules import _cat, _combine
from neurofuse.alignment.values import _Tag, _Value, node_shape
from neurofuse.graph import TraceError, is_elementwise, trace, unit_end

#: Rules that make a raw parameter a member of a space (or mark it raw themselves).
_JOINING_RULES = (_combine, _cat)


@dataclass
class _Group:
    size: int
    origin: str
    # (key, axis) -> (repeat, parts)
    members: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # (position, name, axis, parts)
    nodes: list[tuple[int, str, int, int]] = field(default_factory=list)
    fixed: bool = False
    joined_at: tuple[int, str] | None = None
    heads: int = 1
    parts: int = 1


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
            fixed=ga.fixed or gb.fixed or ga.size != gb.size or ga.parts != gb.parts,
            joined_at=min(joins) if joins else None,
            heads=max(ga.heads, gb.heads),
            parts=ga.parts,
        )
        if 1 < ga.heads != gb.heads > 1:
            merged.fixed = True
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
        self.member_key(space, f"{node.target}.{param}", axis, repeat)

    def member_key(self, space: int, key: str, axis: int, repeat: int = 1, parts: int = 1) -> None:
        if (key, axis) in self.owner:  # a parameter shared by two calls couples both spaces
            space = self.union(self.owner[(key, axis)], space)
        g = self.group(space)
        if g.members.setdefault((key, axis), (repeat, parts)) != (repeat, parts):
            g.fixed = True
        self.owner[(key, axis)] = self.find(space)

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        """Shape of a parameter or buffer of the traced model."""
        path, _, attr = key.rpartition(".")
        t = getattr(self.gm.get_submodule(path), attr)
        return tuple(t.shape)

    def split_space(self, space: int, parts: int, heads: int) -> bool:
        """Declare that the space's index is ``parts`` copies of ``heads`` blocks: its members
        so far (a layer computing all parts at once) hold every part. False (and the space is
        fixed) when this contradicts what is known of it."""
        g = self.group(space)
        size = g.size if g.parts == parts else g.size // parts
        if g.parts not in (1, parts) or g.size % (parts // g.parts) or size % heads:
            g.fixed = True
            return False
        if g.parts == 1 and parts > 1:
            g.size //= parts
            g.members = {k: (r, parts) for k, (r, _) in g.members.items()}
            g.nodes = [(i, name, a, parts) for i, name, a, _ in g.nodes]
            g.parts = parts
        if g.heads not in (1, heads):
            g.fixed = True
            return False
        g.heads = heads
        return True

    def arg(self, node: fx.Node, i: int = 0) -> _Value:
        a = node.args[i] if i < len(node.args) else None
        return self.values[a] if isinstance(a, fx.Node) else _Value()

    def opaque(self, node: fx.Node) -> _Value:
        """An op we cannot see through: every space it touches stays unpermuted, and so does
        any space holding a raw parameter it reads."""
        for a in node.all_input_nodes:
            v = self.values[a]
            if v.meta:
                continue
            self.fix(v, *(v.items or ()))
            for item in (v, *(v.items or ())):
                if item.param is not None:
                    self.raw.add(item.param)
        return _Value()

    # -- the walk
    def run(self) -> None:
        for i, n in enumerate(self.gm.graph.nodes):
            self.pos[n] = i
            if n.op == "placeholder":
                v = _Value()
            elif n.op == "get_attr":
                v = self.get_attr(n)
            elif n.op == "output":
                self.opaque(n)  # the logits (and any other returned value) are fixed
                continue
            elif _shape_arithmetic(n) and all(self.values[a].meta for a in n.all_input_nodes):
                v = _Value(meta=True)  # arithmetic on shapes
            else:
                v = self.dispatch(n)
            if v.rank is None and v.items is None and not v.meta:
                shape = node_shape(n)
                if shape is not None:
                    v = replace(v, rank=len(shape))
            self.values[n] = v
            tag = v.tag
            if tag is not None and not tag.flat and tag.subs is None:
                axis = tag.axis + v.rank if v.rank is not None else tag.axis
                self.group(tag.space).nodes.append((i, n.name, axis, tag.parts))

    def get_attr(self, n: fx.Node) -> _Value:
        """A raw parameter (a class token, a position embedding): it joins the space of
        whatever it is added to or concatenated with, on the matching axis."""
        key = str(n.target)
        try:
            shape = self.tensor_shape(key)
        except AttributeError:
            self.raw.add(key)
            return _Value()
        return _Value(rank=len(shape), param=key, param_axes=tuple(range(len(shape))))

    def join_param(self, param: _Value, tag: _Tag, rank: int | None) -> bool:
        """Make the raw parameter ``param`` a member of ``tag``'s space on the axis that meets
        the tag's neuron axis (broadcasting aligns axes from the end). False if impossible."""
        if param.param is None or param.param_axes is None or param.rank is None:
            return False
        if not tag.plain:
            return False
        at = param.rank + tag.axis
        if at < 0:
            return False
        axis = param.param_axes[at]
        if axis is None:
            return False
        size = self.tensor_shape(param.param)[axis]
        if size != self.group(tag.space).size:
            return False  # broadcast across the neurons
        self.member_key(tag.space, param.param, axis)
        return True

    def dispatch(self, n: fx.Node) -> _Value:
        mod = None
        if n.op == "call_module":
            mod = self.gm.get_submodule(str(n.target))
            rule = next((MODULE_RULES[t] for t in type(mod).__mro__ if t in MODULE_RULES), None)
        elif n.op == "call_function":
            rule = FUNCTION_RULES.get(n.target)
        else:
            rule = METHOD_RULES.get(str(n.target))
        if rule is None and is_elementwise(self.gm, n):  # the graph toolkit's one table
            rule = _elementwise
        if rule is None:
            return self.opaque(n)
        out = rule(self, n, mod)
        if rule not in _JOINING_RULES:  # those add a raw parameter to a space, or mark it raw
            for a in n.all_input_nodes:
                v = self.values[a]
                if v.param is not None and v.param != out.param:
                    self.raw.add(v.param)  # read here without its space's permutation
        return out

    def spaces(self, state_keys: set[str], aliases: Mapping[str, set[str]]) -> list[Space]:
        out = []
        for root, g in self.groups.items():
            keys = {k for k, _ in g.members}
            if keys & self.raw:
                g.fixed = True  # also used outside the graph's module calls
            # a tensor shared by two names (tied weights) is permuted once: every name must be
            # a member on the same axis, else one permutation would undo the other
            if any((t, axis) not in g.members for k, axis in g.members for t in aliases.get(k, ())):
                g.fixed = True
            if not keys <= state_keys:
                g.fixed = True  # a non-persistent buffer: not in the state dict to permute
            nodes = sorted(g.nodes)
            name = g.joined_at[1] if g.joined_at is not None else g.origin
            members = [
                Member(k, a, r, p) for (k, a), (r, p) in g.members.items() if k in state_keys
            ]
            first = nodes[0][0] if nodes else len(self.pos)
            out.append(
                (
                    first,
                    root,
                    Space(
                        name=name,
                        size=g.size,
                        members=members,
                        nodes=[name_ for _, name_, _, _ in nodes],
                        fixed=g.fixed,
                        axes=[a for _, _, a, _ in nodes],
                        heads=g.heads,
                        node_parts=[p for _, _, _, p in nodes],
                        stream=g.joined_at is not None,
                    ),
                )
            )
        return [s for _, _, s in sorted(out, key=lambda t: (t[0], t[1]))]


def _shape_arithmetic(n: fx.Node) -> bool:
    """Ops that compute sizes from sizes (``x.size(0) // 2``); a tensor made from sizes
    (``torch.arange(T)``, an embedding of it) is data, not a shape."""
    if not n.all_input_nodes:
        return False
    if n.op == "call_function":
        return n.target is getattr or getattr(n.target, "__module__", "") in (
            "_operator",
            "operator",
        )
    return n.op == "call_method" and n.target in ("size", "dim", "numel")


def _aliases(state: Mapping[str, Tensor]) -> dict[str, set[str]]:
    """Keys whose tensors share memory with another key's (tied parameters)."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, t in state.items():
        if t.numel():
            by_ptr.setdefault((t.data_ptr(), tuple(t.shape), t.stride()), []).append(k)
    return {k: set(ks) for ks in by_ptr.values() if len(ks) > 1 for k in ks}


def permutation_spaces(
    model: nn.Module,
    spec: Sequence[Space] | None = None,
    example: Tensor | None = None,
    gm: fx.GraphModule | None = None,
) -> list[Space]:
    """Every set of neurons of ``model`` that must be permuted together, in graph order.

    Permuting every non-fixed space by any permutation (:func:`apply_permutation`) gives a
    model that computes the same function. The classifier's outputs, the model's input and
    anything an unsupported op touches are ``fixed`` spaces (or no space at all).

    Args:
        model: an fx-traceable model (see :func:`neurofuse.graph.trace`).
        spec: the spaces given by hand instead (for models fx cannot trace, or to override the
            analysis); they are checked against the model's ``state_dict`` and returned.
        example: an input batch (a few samples). With it every node's rank is known, which
            some ops need to be followed (token embeddings of ids, ``split`` along a positive
            axis); without it such ops leave their spaces fixed.
        gm: ``model``'s trace, when the caller holds it already (:class:`~neurofuse.graph.GraphCache`).
    """
    if spec is not None:
        return _check_spec(model, spec)
    try:
        gm = trace(model) if gm is None else gm
    except TraceError as exc:
        raise TraceError(
            f"{exc} Permutation spaces can also be given by hand: "
            "permutation_spaces(model, spec=[Space(name, size, members, nodes, fixed), ...])."
        ) from exc
    if example is not None:  # in eval mode: a training-mode BatchNorm must not update its stats
        modes = {m: m.training for m in gm.modules()}
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example[:2])
        finally:
            for m, training in modes.items():
                m.training = training
    analysis = _Analysis(gm)
    analysis.run()
    state = model.state_dict()
    return analysis.spaces(set(state), _aliases(state))
