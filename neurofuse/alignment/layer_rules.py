"""Propagation rules of layers: per-neuron ops, pooling, Linear/Conv (which open a space) and
the normalisations whose parameters join the space they normalise."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from neurofuse.alignment.values import Rule, _Tag, _Value

if TYPE_CHECKING:
    from neurofuse.alignment.analysis import _Analysis


def _elementwise(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """Per-neuron ops (activations, dropout, identity, dtype casts): the tag passes through."""
    return a.arg(n)


def _pool(dims: int) -> Rule:
    """Ops over the last ``dims`` axes only (pooling): any other axis passes through."""

    def rule(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
        x = a.arg(n)
        if x.tag is not None and (x.tag.flat or max(x.tag.axes()) > -(dims + 1)):
            a.fix(x)
            return _Value(rank=x.rank)
        return x

    return rule


def _channel_ok(x: _Value, spatial: Iterable[int]) -> bool:
    """The tag sits on axis 1 of a ``(B, C, *spatial)`` input (BatchNorm, GroupNorm)."""
    assert x.tag is not None
    if not x.tag.plain:
        return False
    if x.rank is not None:
        return x.rank - 2 in spatial and x.rank + x.tag.axis == 1
    return x.tag.axis <= -2 and -x.tag.axis - 1 in spatial  # axis -1 could be (B,C) or (B,L,C)


def _linear(a: _Analysis, n: fx.Node, mod: nn.Linear) -> _Value:
    x = a.arg(n)
    if x.tag is not None:
        size = a.group(x.tag.space).size
        tag = x.tag
        if tag.flat and mod.in_features % size == 0:
            a.member(tag.space, n, "weight", 1, mod.in_features // size)
        elif tag.subs is None and not tag.flat and tag.axis == -1:
            if mod.in_features == size * tag.parts:
                a.member_key(tag.space, f"{n.target}.weight", 1, 1, tag.parts)
            else:
                a.fix(x)
        else:
            a.fix(x)
    s = a.new_space(n, mod.out_features)
    a.member(s, n, "weight", 0)
    a.member(s, n, "bias", 0)
    return _Value(rank=x.rank, tag=_Tag(s, -1))


def _conv(dims: int) -> Rule:
    def rule(a: _Analysis, n: fx.Node, mod: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> _Value:
        x, channel = a.arg(n), -(dims + 1)
        fits = x.tag is not None and x.tag.plain and x.tag.axis == channel
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
    if x.tag is None or (not x.tag.flat and max(x.tag.axes()) < -dims):
        return x  # the neurons are not among the normalised axes
    if dims == 1 and x.tag.plain and x.tag.axis == -1:
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


def _embedding(a: _Analysis, n: fx.Node, mod: nn.Embedding) -> _Value:
    """A lookup table: its rows are indexed by the input, its columns are a new space."""
    x = a.arg(n)
    a.fix(x)
    s = a.new_space(n, mod.embedding_dim)
    a.member(s, n, "weight", 1)
    return _Value(rank=None if x.rank is None else x.rank + 1, tag=_Tag(s, -1))


def _attention(a: _Analysis, n: fx.Node, mod: Any) -> _Value:
    """``scaled_dot_product_attention(q, k, v)`` on ``(..., heads, tokens, head_dim)``.

    Query, key and value must carry one space split into heads (axis -3) and head dimensions
    (axis -1), the parts of a joint ``qkv`` projection selected away: a permutation of whole
    heads, and of the dimensions inside each head applied alike to q, k and v, keeps every
    head's ``softmax(q k^T) v`` (permuted). The output carries the value's neurons.
    """
    qkv = [a.arg(n, i) for i in range(3)]
    extra = [a.values[x] for x in n.all_input_nodes if x not in n.args[:3]]
    tags = [v.tag for v in qkv]
    ok = all(t is not None and t.subs is not None for t in tags)
    if ok:
        live = [[s for s in t.subs if s.axis is not None] for t in tags]  # type: ignore[union-attr]
        ok = all([s.axis for s in lv] == [-3, -1] for lv in live)
        ok = ok and len({(lv[0].size, lv[1].size) for lv in live}) == 1
        picked = [[s for s in t.subs if s.axis is None] for t in tags]  # type: ignore[union-attr]
        ok = ok and all(t.subs[: len(p)] == tuple(p) for t, p in zip(tags, picked, strict=True))  # type: ignore[union-attr, index]
    if not ok or any(v.tag is not None for v in extra):
        a.fix(*qkv, *extra)
        return _Value(rank=qkv[0].rank)
    heads = live[0][0].size
    for t in tags[1:]:
        a.union(tags[0].space, t.space)  # type: ignore[union-attr]
    parts = 1
    for s in picked[0]:
        parts *= s.size
    if not a.split_space(tags[0].space, parts, heads):  # type: ignore[union-attr]
        return _Value(rank=qkv[0].rank)
    return qkv[2]
