"""Reordering the neurons of permutation spaces in a state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from neurofuse.alignment.space import Space, head_blocks_kept, member_index


def apply_permutation(
    state_dict: Mapping[str, Tensor], spaces: Sequence[Space], perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict with the neurons of each space in ``perms`` reordered.

    ``perms[space.name] = p`` (an index tensor, a permutation of ``range(space.size)``): new
    neuron ``i`` is old neuron ``p[i]``, i.e. every member becomes ``t.index_select(axis, p)``
    (expanded to ``repeat`` consecutive entries per neuron and to each of its ``parts``). A
    space with ``heads > 1`` takes only permutations that move whole heads (blocks of
    ``size / heads`` neurons). Tensors of untouched keys are the given objects (not copied);
    nothing is modified in place.
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
        if not head_blocks_kept(p, space.heads):
            raise ValueError(
                f"perms[{name!r}] splits an attention head: space {name!r} has {space.heads} "
                f"heads of {space.head_dim} neurons, and a permutation must move whole heads"
            )
        for key, axis, repeat, parts in space.members:
            if key not in out:
                raise ValueError(f"space {name!r} names {key!r}, which the state dict lacks")
            t = out[key]
            index = member_index(p.to(t.device), space.size, repeat, parts)
            out[key] = t.index_select(axis, index)
    return out
