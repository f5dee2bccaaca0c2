"""Propagation rules of tensor ops: flatten / view / transpose / permute / indexing /
reductions move the neuron axis, elementwise ops of several tensors join spaces (and the raw
parameters added to them), and shape queries carry metadata."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from neurofuse.alignment.values import _Sub, _Tag, _Value, node_shape

if TYPE_CHECKING:
    from neurofuse.alignment.analysis import _Analysis


def _space_width(a: _Analysis, tag: _Tag) -> int:
    """Entries of a plain neuron axis: the space's size times the parts it holds."""
    return a.group(tag.space).size * tag.parts


def _merged(a: _Analysis, x: _Value, s: int, e: int, rank: int) -> _Value | None:
    """Axes ``s..e`` (positions) of a split tag merged into one: a plain tag when they are
    exactly its unselected factors, in order (e.g. heads and head dimension back to width)."""
    tag, r = x.tag, x.rank
    if tag is None or tag.subs is None or r is None:
        return None
    live = [sub for sub in tag.subs if sub.axis is not None]
    if [r + sub.axis for sub in live] != list(range(s, e + 1)):  # type: ignore[operator]
        return None
    return _Value(rank=rank, tag=_Tag(tag.space, s - rank))


def _flatten_value(a: _Analysis, x: _Value, start: int, end: int) -> _Value:
    if x.rank is None:
        a.fix(x)
        return _Value(rank=start + 1 if end == -1 and start >= 0 else None)
    r = x.rank
    s, e = start % r, end % r
    rank = r - (e - s)
    if x.tag is None or s == e:
        return _Value(rank=rank, tag=x.tag)
    if x.tag.subs is not None:
        merged = _merged(a, x, s, e, rank)
        if merged is not None:
            return merged
        if all(ax < s - r or ax > e - r for ax in x.tag.axes()):  # other axes: shift
            return _Value(rank=rank, tag=x.tag.with_axes(lambda ax: ax + (e - s) * (ax < s - r)))
        a.fix(x)
        return _Value(rank=rank)
    if x.tag.flat:
        if e < r - 1:
            return _Value(rank=rank, tag=x.tag)
        a.fix(x)
        return _Value(rank=rank)
    p = r + x.tag.axis
    if p < s:
        return _Value(rank=rank, tag=replace(x.tag, axis=p - rank))
    if p > e:
        return _Value(rank=rank, tag=x.tag)
    if p == s and e == r - 1 and x.tag.parts == 1:
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


def _live(tag: _Tag) -> list[_Sub]:
    return [s for s in (tag.subs or ()) if s.axis is not None]


def _last_axis_width(a: _Analysis, tag: _Tag) -> int | None:
    """Entries of the neuron axis when it is a single last axis (plain, or the one live
    factor of a split index), else ``None``."""
    if tag.subs is None:
        return _space_width(a, tag) if not tag.flat and tag.axis == -1 else None
    live = _live(tag)
    return live[0].size if len(live) == 1 and live[0].axis == -1 else None


def _split_axis(a: _Analysis, x: _Value, n: fx.Node, sizes: list[int]) -> _Value:
    """The neuron axis of ``x`` (its last axis) unflattened into ``sizes`` (attention heads,
    or ``(3, heads, head_dim)`` for a joint query/key/value projection)."""
    tag = x.tag
    assert tag is not None and x.rank is not None
    width = _last_axis_width(a, tag)
    if width is None or len(sizes) < 2 or math.prod(sizes) != width or min(sizes) < 1:
        return a.opaque(n)
    m = len(sizes)
    new = [_Sub(-m + i, s) for i, s in enumerate(sizes)]
    if tag.subs is None:
        if tag.parts > 1 and sizes[0] != tag.parts:
            return a.opaque(n)  # the axis already holds [q | k | v]: parts lead
        subs = tuple(new)
    else:
        subs = tuple(s for s in tag.subs if s.axis is None) + tuple(new)
    return _Value(rank=x.rank - 1 + m, tag=_Tag(tag.space, -1, subs=subs))


def _shape_args(n: fx.Node, first: int) -> list[Any]:
    shape = list(n.args[first:])
    if len(shape) == 1 and isinstance(shape[0], tuple | list):
        shape = list(shape[0])
    return shape


def _view(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``view``/``reshape``: a flatten from axis 1 (``x.view(x.size(0), -1)``), heads split off
    the last axis (``x.view(B, T, heads, head_dim)``) or merged back (``x.view(B, T, C)``).
    Leading sizes must be shape queries or integers kept from the input."""
    x = a.arg(n)
    shape = _shape_args(n, 1)
    batch = shape[0] if shape else None
    if len(shape) == 2 and shape[1] == -1 and isinstance(batch, fx.Node) and a.values[batch].meta:
        return _flatten_value(a, x, 1, -1)
    known = node_shape(n)  # sizes computed in forward (``C // n_head``) are known from an example
    if known is not None and len(known) == len(shape):
        shape = list(known)
    if x.tag is None or x.rank is None or not shape:
        return a.opaque(n) if x.tag is not None else _Value(rank=len(shape) or None)
    trailing = [s for s in reversed(shape) if isinstance(s, int) and s > 0]
    width = _last_axis_width(a, x.tag)
    if width is not None:
        sizes: list[int] = []
        prod = 1
        for s in trailing:
            if prod >= width:
                break
            sizes.insert(0, s)
            prod *= s
        if prod == width and len(shape) - len(sizes) == x.rank - 1 and len(sizes) >= 2:
            return _split_axis(a, x, n, sizes)
        if prod == width and len(sizes) == 1 and len(shape) == x.rank:
            return x  # the same shape
    if x.tag.subs is not None:
        live = _live(x.tag)
        keep = x.rank - len(live)
        if len(shape) == keep + 1 and [s.axis for s in live] == list(range(-len(live), 0)):
            last = shape[-1]
            size_query = isinstance(last, fx.Node) and a.values[last].meta
            if last == -1 or size_query or last == math.prod(s.size for s in live):
                return _merged(a, x, keep, x.rank - 1, keep + 1) or a.opaque(n)
    return a.opaque(n)


def _unflatten(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    x = a.arg(n)
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    sizes = n.args[2] if len(n.args) > 2 else n.kwargs.get("sizes")
    if x.tag is None:
        n_sizes = len(sizes) if isinstance(sizes, tuple | list) else 0
        return _Value(rank=None if x.rank is None else x.rank + n_sizes - 1)
    if not isinstance(dim, int) or not isinstance(sizes, tuple | list) or x.rank is None:
        return a.opaque(n)
    if not all(isinstance(s, int) for s in sizes):
        return a.opaque(n)
    pos = dim % x.rank
    if pos == x.rank - 1 and _last_axis_width(a, x.tag) is not None:
        return _split_axis(a, x, n, list(sizes))
    if pos > max(x.rank + ax for ax in x.tag.axes()):
        # unflattening an axis after the neurons: the neuron axes move left
        grow = len(sizes) - 1
        return _Value(rank=x.rank + grow, tag=x.tag.with_axes(lambda ax: ax - grow))
    if pos < min(x.rank + ax for ax in x.tag.axes()):
        return _Value(rank=x.rank + len(sizes) - 1, tag=x.tag)
    return a.opaque(n)


def _chunks(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``split``/``chunk`` of the neuron axis into equal parts (``q, k, v = qkv.split(C, -1)``):
    a tuple whose items each hold one part."""
    x = a.arg(n)
    if x.tag is None:
        return _Value(rank=x.rank) if not x.meta else _Value(meta=True)
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("split_size_or_sections", None)
    if arg is None:
        arg = n.kwargs.get("chunks", n.kwargs.get("split_size"))
    tag = x.tag
    if not isinstance(dim, int) or x.rank is None or not isinstance(arg, int):
        return a.opaque(n)
    if tag.subs is not None or not tag.plain or dim % x.rank != x.rank + tag.axis:
        return a.opaque(n)  # splitting another axis, or a split index: not followed
    width = _space_width(a, tag)
    name = getattr(n.target, "__name__", str(n.target))
    parts = arg if name == "chunk" else (width // arg if width % arg == 0 else 0)
    if parts < 2 or width % parts:
        return a.opaque(n)
    if not a.split_space(tag.space, parts, 1):
        return _Value(rank=x.rank)
    size = width // parts
    items = tuple(
        _Value(rank=x.rank, tag=_Tag(tag.space, -1, subs=(_Sub(None, parts), _Sub(-1, size))))
        for _ in range(parts)
    )
    return _Value(rank=x.rank, items=items)


def _transpose(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    x = a.arg(n)
    d = [n.args[1] if len(n.args) > 1 else n.kwargs.get("dim0"), None]
    d[1] = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim1")
    if x.tag is None and x.param is None:
        return _Value(rank=x.rank)
    if not all(isinstance(v, int) for v in d) or (x.tag is not None and x.tag.flat):
        return a.opaque(n)
    if x.rank is not None:
        d = [v % x.rank - x.rank for v in d]  # type: ignore[operator]
    elif any(v >= 0 for v in d):  # type: ignore[operator]
        return a.opaque(n)

    def move(axis: int) -> int:
        if axis in d:
            return d[1] if axis == d[0] else d[0]  # type: ignore[return-value]
        return axis

    if x.tag is None:  # a raw parameter
        assert x.rank is not None  # a raw parameter's rank is its shape's
        return _param_reordered(x, [move(ax) for ax in range(-x.rank, 0)])
    return _Value(rank=x.rank, tag=x.tag.with_axes(move))


def _param_reordered(x: _Value, sources: list[int]) -> _Value:
    """A raw parameter value whose new axis ``i`` is old axis ``sources[i]`` (from the end)."""
    assert x.param_axes is not None and x.rank is not None
    axes = tuple(x.param_axes[x.rank + s] for s in sources)
    return replace(x, param_axes=axes)


def _permute(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    x = a.arg(n)
    dims = _shape_args(n, 1)
    if x.tag is None:
        return _Value(rank=x.rank)
    if x.rank is None or x.tag.flat or not all(isinstance(v, int) for v in dims):
        return a.opaque(n)
    order = [v % x.rank for v in dims]
    rank = x.rank
    return _Value(rank=rank, tag=x.tag.with_axes(lambda ax: order.index(rank + ax) - rank))


def _reduce(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``x.mean(dims)`` / ``x.sum(dims)`` over axes other than the neuron axis."""
    x = a.arg(n)
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    dims = [dim] if isinstance(dim, int) else dim
    if x.tag is None or x.rank is None or x.tag.flat or not isinstance(dims, tuple | list):
        return a.opaque(n) if x.tag is not None else _Value()
    r = x.rank
    reduced = {int(d) % r for d in dims}
    if any(r + ax in reduced for ax in x.tag.axes()) or not isinstance(keep, bool):
        return a.opaque(n)
    if keep:
        return x
    rank = r - len(reduced)
    return _Value(
        rank=rank,
        tag=x.tag.with_axes(lambda ax: (r + ax) - sum(d < r + ax for d in reduced) - rank),
    )


def _same_layout(a: _Analysis, t0: _Tag, t: _Tag) -> bool:
    if t.flat != t0.flat or t.parts != t0.parts or a.group(t.space).size != a.group(t0.space).size:
        return False
    if t0.subs is None or t.subs is None:
        return t0.subs is None and t.subs is None and t.axis == t0.axis
    return t.subs == t0.subs


def _combine(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """Elementwise ops of several tensors (the residual ``add``, a gating ``mul``): the neurons
    of all operands meet one to one, so their spaces become one. A raw parameter among them
    (a position embedding, a layer scale) joins that space on the matching axis."""
    vals = [a.values[x] for x in n.all_input_nodes if not a.values[x].meta]
    ranks = [v.rank for v in vals]
    rank = max(ranks) if all(r is not None for r in ranks) else None  # type: ignore[type-var]
    tagged = [v for v in vals if v.tag is not None]
    if not tagged:
        params = [v for v in vals if v.param is not None]
        if len(params) == 1 and len(vals) == 1 and params[0].rank == rank:
            return params[0]  # a parameter scaled by a constant stays a parameter
        for v in params:
            a.raw.add(v.param)  # type: ignore[arg-type]
        return _Value(rank=rank)
    t0 = tagged[0].tag
    assert t0 is not None
    same = all(_same_layout(a, t0, v.tag) for v in tagged if v.tag is not None)
    others = [v for v in vals if v.tag is None]
    joined = all(a.join_param(v, t0, rank) for v in others)
    if not same or not joined:
        a.fix(*tagged)  # added to a tensor we cannot permute, or broadcast across neurons
        for v in others:
            if v.param is not None:
                a.raw.add(v.param)
        return _Value(rank=rank)
    for v in tagged[1:]:
        a.union(t0.space, v.tag.space, at=n)  # type: ignore[union-attr]
    return _Value(rank=rank, tag=t0)


def _cat(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """Concatenation along an axis that holds no neurons (a class token prepended to the
    patch tokens): every operand carries the same space, or is a raw parameter that joins it."""
    seq = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if not isinstance(seq, tuple | list) or not all(isinstance(s, fx.Node) for s in seq):
        return a.opaque(n)
    vals = [a.values[s] for s in seq]
    tagged = [v for v in vals if v.tag is not None]
    ranks = {v.rank for v in vals}
    rank = ranks.pop() if len(ranks) == 1 else None
    if not tagged:
        for v in vals:
            if v.param is not None:
                a.raw.add(v.param)
        return _Value(rank=rank)
    t0 = tagged[0].tag
    assert t0 is not None
    ok = isinstance(dim, int) and rank is not None and t0.plain
    ok = ok and all(_same_layout(a, t0, v.tag) for v in tagged if v.tag is not None)
    ok = ok and (dim % rank) != rank + t0.axis  # type: ignore[operator]
    ok = ok and all(a.join_param(v, t0, rank) for v in vals if v.tag is None)
    if not ok:
        return a.opaque(n)
    for v in tagged[1:]:
        a.union(t0.space, v.tag.space)  # type: ignore[union-attr]
    return _Value(rank=rank, tag=t0)


def _expand(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``expand``/``repeat`` of size-1 axes (a class token broadcast over the batch): the
    neurons stay where they are."""
    x = a.arg(n)
    sizes = _shape_args(n, 1)
    if x.rank is not None and len(sizes) != x.rank:
        return a.opaque(n)
    if x.tag is not None and x.rank is not None:
        for ax in x.tag.axes():
            s = sizes[x.rank + ax]
            if str(n.target) == "repeat" and s != 1 or str(n.target) == "expand" and s != -1:
                return a.opaque(n)
    return x


def _metadata(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    return _Value(meta=True)


def _getattr(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    if len(n.args) > 1 and n.args[1] in ("shape", "ndim", "dtype", "device", "is_cuda"):
        return _Value(meta=True)
    return a.opaque(n)


def _index_plan(index: Any, rank: int) -> list[tuple[str, Any]] | None:
    """Per input axis: ``("keep", slice)``, ``("drop", int)``; ``("new", None)`` entries insert
    axes. ``None`` when the index is not made of ints, slices, ``None`` and one ``...``."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(i is Ellipsis for i in items) > 1:
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    plan: list[tuple[str, Any]] = []
    for i in items:
        if i is Ellipsis:
            plan.extend(("keep", slice(None)) for _ in range(rank - used))
        elif i is None:
            plan.append(("new", None))
        elif isinstance(i, int):
            plan.append(("drop", i))
        elif isinstance(i, slice):
            plan.append(("keep", i))
        else:
            return None
    if not any(i is Ellipsis for i in items):
        plan.extend(("keep", slice(None)) for _ in range(rank - used))
    if sum(1 for kind, _ in plan if kind != "new") != rank:
        return None
    return plan


def _getitem(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """Indexing: an item of a tuple (``split``), token selection (``x[:, 0]``), a part of a
    split neuron index (``qkv[0]``), a slice of a raw parameter (``pos[:, :T]``)."""
    x = a.arg(n)
    index = n.args[1] if len(n.args) > 1 else None
    if x.meta:
        return _Value(meta=True)
    if x.items is not None:
        if isinstance(index, int) and -len(x.items) <= index < len(x.items):
            return x.items[index]
        return a.opaque(n)
    if x.rank is None or (x.tag is None and x.param is None):
        return a.opaque(n) if x.tag is not None or x.param is not None else _Value()
    plan = _index_plan(index, x.rank)
    if plan is None:
        return a.opaque(n)
    full = slice(None)
    out_pos: dict[int, int | None] = {}  # input position -> output position (None: dropped)
    pos_in, pos_out = 0, 0
    for kind, _ in plan:
        if kind == "new":
            pos_out += 1
            continue
        out_pos[pos_in] = None if kind == "drop" else pos_out
        if kind == "keep":
            pos_out += 1
        pos_in += 1
    rank = pos_out
    kinds = [(k, w) for k, w in plan if k != "new"]
    if x.tag is None:  # a raw parameter: track which of its axes survive, unsliced
        assert x.param_axes is not None
        axes: list[int | None] = [None] * rank
        for p, q in out_pos.items():
            if q is not None:
                axes[q] = x.param_axes[p] if kinds[p][1] == full else None
        return replace(x, rank=rank, param_axes=tuple(axes))  # type: ignore[arg-type]
    tag = x.tag
    tag_pos = {x.rank + ax for ax in tag.axes()}
    for p in tag_pos:
        kind, what = kinds[p]
        if kind == "keep" and what != full:
            return a.opaque(n)  # a slice of the neurons
        if kind == "drop" and tag.subs is None:
            return a.opaque(n)  # one neuron picked out
    if tag.subs is None:
        q = out_pos[x.rank + tag.axis]
        return _Value(rank=rank, tag=replace(tag, axis=q - rank))  # type: ignore[operator]
    subs = []
    for s in tag.subs:
        if s.axis is None:
            subs.append(s)
            continue
        q = out_pos[x.rank + s.axis]
        subs.append(_Sub(None if q is None else q - rank, s.size))
    return _Value(rank=rank, tag=replace(tag, subs=tuple(subs)))


def _unbind(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``qkv.unbind(0)``: a tuple of the parts along a factor axis of a split index."""
    x = a.arg(n)
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if x.tag is None or x.tag.subs is None or x.rank is None or not isinstance(dim, int):
        return a.opaque(n)
    pos = dim % x.rank
    hit = [s for s in x.tag.subs if s.axis is not None and x.rank + s.axis == pos]
    if not hit:
        return a.opaque(n)
    rank = x.rank - 1
    subs = tuple(
        _Sub(
            None if s.axis is None or x.rank + s.axis == pos else s.axis + (x.rank + s.axis < pos),
            s.size,
        )
        for s in x.tag.subs
    )
    item = _Value(rank=rank, tag=replace(x.tag, subs=subs))
    return _Value(rank=rank, items=tuple(item for _ in range(hit[0].size)))
