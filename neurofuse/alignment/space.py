"""The :class:`Space` record: a set of neurons permuted together, and checks of hand-written
ones (``permutation_spaces(model, spec=...)``) against a model's ``state_dict``."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Member(NamedTuple):
    """One tensor axis that a space permutes.

    Along ``axis`` the tensor holds ``parts x size x repeat`` entries: neuron ``j`` of part
    ``q`` owns entries ``(q * size + j) * repeat .. (q * size + j) * repeat + repeat - 1``.
    ``repeat > 1`` when conv channels were flattened into a Linear's inputs; ``parts > 1``
    when one layer computes several copies of the space side by side (an attention's
    ``qkv`` projection: query, key and value, each ``size`` wide, permuted alike).
    """

    key: str
    axis: int
    repeat: int = 1
    parts: int = 1


def member_index(perm: Tensor, size: int, repeat: int = 1, parts: int = 1) -> Tensor:
    """Neuron permutation -> index permutation of a member axis (see :class:`Member`)."""
    p = perm.to(torch.long)
    if repeat > 1:
        p = (p[:, None] * repeat + torch.arange(repeat, device=p.device)).flatten()
    if parts > 1:
        offsets = torch.arange(parts, device=p.device)[:, None] * (size * repeat)
        p = (offsets + p[None, :]).flatten()
    return p


def neuron_rows(t: Tensor, member: Member, size: int) -> Tensor:
    """``(size, -1)``: every entry of ``t`` that belongs to each neuron of ``member``'s axis
    (all its parts and repeats), one row per neuron."""
    moved = t.movedim(member.axis, 0).reshape(member.parts, size, member.repeat, -1)
    return moved.transpose(0, 1).reshape(size, -1)


def random_permutation(space: Space, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of ``space``'s neurons that keeps the function: for a
    space of attention heads, a permutation of the heads and of the dimensions inside each."""
    if space.heads <= 1:
        return torch.randperm(space.size, generator=generator)
    h = space.head_dim
    order = torch.randperm(space.heads, generator=generator)
    return torch.cat(
        [order[i] * h + torch.randperm(h, generator=generator) for i in range(space.heads)]
    )


def head_blocks_kept(perm: Tensor, heads: int) -> bool:
    """Whether ``perm`` maps every head's block of ``size / heads`` neurons onto one block."""
    if heads <= 1:
        return True
    blocks = perm.reshape(heads, -1) // (perm.numel() // heads)
    return bool((blocks == blocks[:, :1]).all())


@dataclass
class Space:
    """A set of neurons that must be permuted together.

    Attributes:
        name: fx node name that creates it: the unit output (the Linear/Conv node, or the
            BatchNorm right after it), or the first residual ``add`` that joins it.
        size: number of neurons.
        members: :class:`Member` ``(state_dict key, axis, repeat, parts)``: axis 0 = a
            producer's outgoing neurons (weight rows, bias, BatchNorm and LayerNorm parameters
            and statistics), axis 1 = a consumer's incoming weights; a raw parameter added to
            the space (a transformer's class token or position embedding) on its last axis.
            ``repeat > 1`` when conv channels were flattened into a Linear's inputs: neuron
            ``c`` owns indices ``c*repeat .. c*repeat+repeat-1``; ``parts > 1`` when a layer
            computes several copies of the space side by side (query, key and value).
        nodes: fx node names whose output carries this space on its neuron axis, in graph order.
        fixed: an op that cannot be permuted touches it; leave it unpermuted.
        axes: the neuron axis of each node's output (parallel to ``nodes``; negative when only
            its position from the end is known). May be empty for hand-written spaces.
        heads: attention heads: the space is ``heads`` blocks of ``size / heads`` neurons (a
            head's dimensions), and only permutations that move whole blocks onto blocks keep
            the function (heads are permuted as units, their dimensions inside them).
        node_parts: how many parts (``[q | k | v]``) each node's neuron axis holds (parallel to
            ``nodes``; empty means one each).
        stream: the space is a residual stream (joined by additions across several layers).
    """

    name: str
    size: int
    members: list[Member]
    nodes: list[str]
    fixed: bool
    axes: list[int] = field(default_factory=list)
    heads: int = 1
    node_parts: list[int] = field(default_factory=list)
    stream: bool = False

    def __post_init__(self) -> None:
        self.members = [Member(*m) for m in self.members]

    @property
    def head_dim(self) -> int:
        return self.size // self.heads


def _check_spec(model: nn.Module, spec: Sequence[Space]) -> list[Space]:
    state = model.state_dict()
    seen: dict[tuple[str, int], str] = {}
    names = [s.name for s in spec]
    if len(set(names)) != len(names):
        raise ValueError(f"space names must be unique, got {names}")
    for s in spec:
        if not isinstance(s, Space):
            raise TypeError(f"spec must be a list of Space, got {type(s).__name__}")
        if s.heads < 1 or s.size % s.heads:
            raise ValueError(f"space {s.name!r}: heads={s.heads} does not divide size {s.size}")
        for key, axis, repeat, parts in s.members:
            if key not in state:
                raise ValueError(
                    f"space {s.name!r} names {key!r}, which is not in the model's state_dict "
                    f"(keys include {list(state)[:8]})"
                )
            t = state[key]
            if not 0 <= axis < t.dim() or t.shape[axis] != s.size * repeat * parts:
                raise ValueError(
                    f"space {s.name!r}: {key!r} has shape {tuple(t.shape)}, so axis {axis} "
                    f"cannot hold {s.size} neurons x repeat {repeat} x parts {parts}"
                )
            if (key, axis) in seen:
                raise ValueError(
                    f"{key!r} axis {axis} is in two spaces ({seen[(key, axis)]!r} and "
                    f"{s.name!r}); merge them into one space"
                )
            seen[(key, axis)] = s.name
    return copy.deepcopy(list(spec))
