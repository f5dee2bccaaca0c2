"""What the graph walk knows about one node's output: its rank, and which space (if any) sits
on which axis. Every propagation rule maps the values of a node's inputs to its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx

if TYPE_CHECKING:
    from neurofuse.alignment.analysis import _Analysis


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


Rule = Callable[["_Analysis", fx.Node, Any], _Value]
