"""What the graph walk knows about one node's output: its rank, and which space (if any) sits
on which axis. Every propagation rule maps the values of a node's inputs to its own.

A space's neuron index may be spread over several tensor axes: a Linear's ``3C`` outputs
unflattened into ``(3, heads, head_dim)`` put the *part* (query, key, value), the head and the
dimension inside the head on three axes. Such a tag lists its :class:`_Sub` axes from the most
to the least significant; an integer index on one of them (``qkv[0]``) selects it away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch.fx as fx

if TYPE_CHECKING:
    from neurofuse.alignment.analysis import _Analysis


@dataclass(frozen=True)
class _Sub:
    """One factor of a split neuron index: its tensor axis (from the end) and size; ``axis`` is
    ``None`` once an integer index selected it away (``qkv[0]`` keeps part 0)."""

    axis: int | None
    size: int


@dataclass(frozen=True)
class _Tag:
    space: int  # group id, resolved through the union-find
    axis: int  # neuron axis counted from the end (-1 = last): broadcasting aligns from the end
    flat: bool = False  # channels flattened into the last axis, ``repeat`` entries each
    subs: tuple[_Sub, ...] | None = None  # a split neuron index (heads); ``axis`` unused then
    parts: int = 1  # a plain axis holding ``parts`` copies of the space (``[q | k | v]``)

    @property
    def plain(self) -> bool:
        """One axis holds the whole space, one entry per neuron."""
        return self.subs is None and not self.flat and self.parts == 1

    def with_axes(self, fn: Callable[[int], int]) -> _Tag:
        """The tag with every tensor axis mapped through ``fn``."""
        if self.subs is None:
            return replace(self, axis=fn(self.axis))
        subs = tuple(_Sub(None if s.axis is None else fn(s.axis), s.size) for s in self.subs)
        return replace(self, subs=subs)

    def axes(self) -> list[int]:
        """The tensor axes that carry (part of) the space."""
        if self.subs is None:
            return [self.axis]
        return [s.axis for s in self.subs if s.axis is not None]


@dataclass(frozen=True)
class _Value:
    """What the analysis knows about one node's output."""

    rank: int | None = None
    tag: _Tag | None = None
    meta: bool = False  # a shape, size or dtype, not a tensor of neurons
    param: str | None = None  # a raw parameter (get_attr) not yet tied to a space
    param_axes: tuple[int, ...] | None = None  # for each axis of the value, the parameter's axis
    items: tuple[_Value, ...] | None = None  # a tuple of tensors (``split``, ``chunk``)


Rule = Callable[["_Analysis", fx.Node, Any], _Value]


def node_shape(n: fx.Node) -> tuple[int, ...] | None:
    """The output shape ``ShapeProp`` recorded for ``n`` (when an example input was given)."""
    meta = n.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None
