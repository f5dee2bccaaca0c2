"""Propagation rules of tensor ops: flatten / view / transpose / permute / reductions move the
neuron axis, elementwise ops of several tensors join spaces, and shape queries carry metadata."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from neurofuse.alignment.values import _Tag, _Value

if TYPE_CHECKING:
    from neurofuse.alignment.analysis import _Analysis


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
