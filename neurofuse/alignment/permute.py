"""Reordering the neurons of permutation spaces in a state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from neurofuse.alignment.space import Space


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
