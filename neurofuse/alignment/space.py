"""The :class:`Space` record: a set of neurons permuted together, and checks of hand-written
ones (``permutation_spaces(model, spec=...)``) against a model's ``state_dict``."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn


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
