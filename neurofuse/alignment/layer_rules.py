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
