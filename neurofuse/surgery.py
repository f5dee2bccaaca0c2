"""Change how many neurons a model's hidden spaces have, or keep only some of them.

A *space* (see :mod:`neurofuse.alignment`) is a set of neurons that must be permuted together,
listed as the tensors it touches: ``(state_dict key, axis, repeat)``, where axis 0 is a producer's
outgoing neurons (weight rows, bias, normalisation parameters and statistics) and axis 1 a
consumer's incoming weights; ``repeat > 1`` when each channel occupies ``repeat`` consecutive
entries (conv channels flattened into a Linear's inputs). Along such an axis a tensor is viewed
as ``(neurons, repeat)``, so neuron ``j`` owns entries ``j * repeat .. (j + 1) * repeat - 1``.

- :func:`resize` gives a copy of a model whose spaces have new widths (layers rebuilt with the
  new shapes and their size attributes updated);
- :func:`select` picks (or reorders, or repeats) neurons of a state dict, space by space.

Structured pruning libraries (e.g. Torch-Pruning) do the narrowing part; Neuron Transplantation
also needs to *widen* one model into the block-diagonal concatenation of several, which they do
not, so both directions are written here on top of the spaces.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from neurofuse.checks import integer


class SpaceLike(Protocol):
    """What surgery needs of a space (:class:`neurofuse.alignment.Space` has it)."""

    name: str
    size: int

    @property
    def members(self) -> Sequence[tuple[str, int, int, int]]:
        """``(state_dict key, axis, repeat, parts)`` (:class:`neurofuse.alignment.Member`)."""
        ...


# --------------------------------------------------------------------------- layer sizes

SizeSync = Callable[[nn.Module], None]
_SYNC: dict[type[nn.Module], SizeSync] = {}


def register_layer(*types: type[nn.Module]) -> Callable[[SizeSync], SizeSync]:
    """Teach :func:`resize` a layer type: ``fn(module)`` updates the module's size attributes
    (``in_features``, ``num_features``, ...) from its already-resized tensors."""

    def deco(fn: SizeSync) -> SizeSync:
        for t in types:
            _SYNC[t] = fn
        return fn

    return deco


# Each function below is registered for, and so only called with (see _sync_for), its types.


@register_layer(nn.Linear)
def _sync_linear(m: nn.Module) -> None:
    assert isinstance(m, nn.Linear)
    m.out_features, m.in_features = m.weight.shape


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _sync_conv(m: nn.Module) -> None:
    assert isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    if m.groups != 1:
        raise NotImplementedError(
            f"{m} is a grouped convolution: changing its widths would change its groups; "
            "surgery supports groups=1 only"
        )
    m.out_channels, m.in_channels = m.weight.shape[:2]


@register_layer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _sync_batchnorm(m: nn.Module) -> None:
    assert isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
    t = m.weight if m.weight is not None else m.running_mean
    assert t is not None  # resize touched one of its tensors
    m.num_features = t.shape[0]


@register_layer(nn.LayerNorm)
def _sync_layernorm(m: nn.Module) -> None:
    assert isinstance(m, nn.LayerNorm)
    m.normalized_shape = tuple(m.weight.shape)


@register_layer(nn.GroupNorm)
def _sync_groupnorm(m: nn.Module) -> None:
    assert isinstance(m, nn.GroupNorm)
    m.num_channels = m.weight.shape[0]
    if m.num_channels % m.num_groups:
        raise ValueError(
            f"{m}: {m.num_channels} channels cannot be split into {m.num_groups} groups; "
            "choose a width divisible by the number of groups"
        )


def _sync_for(module: nn.Module) -> SizeSync:
    for cls in type(module).__mro__:
        if cls in _SYNC:
            return _SYNC[cls]
    raise TypeError(
        f"surgery does not know how to resize a {type(module).__name__}; supported: "
        f"{', '.join(sorted(t.__name__ for t in _SYNC))}. Teach it with "
        "neurofuse.surgery.register_layer(YourLayer)(fn) where fn updates its size attributes"
    )


# --------------------------------------------------------------------------- tensor views


def neuron_view(t: Tensor, axis: int, repeat: int) -> Tensor:
    """``t`` with ``axis`` split into ``(neurons, repeat)`` (a view when ``t`` is contiguous)."""
    if t.shape[axis] % repeat:
        raise ValueError(f"axis {axis} of size {t.shape[axis]} is not a multiple of {repeat}")
    return t.unflatten(axis, (t.shape[axis] // repeat, repeat))


def _touching(spaces: Sequence[SpaceLike]) -> dict[str, list[tuple[int, int, SpaceLike]]]:
    """key -> [(axis, repeat, space)] for every tensor that a space touches."""
    out: dict[str, list[tuple[int, int, SpaceLike]]] = {}
    for s in spaces:
        for key, axis, repeat, _parts in s.members:
            out.setdefault(key, []).append((axis, repeat, s))
    for key, items in out.items():
        axes = [a for a, _, _ in items]
        if len(set(axes)) != len(axes):
            names = [s.name for _, _, s in items]
            raise ValueError(f"{key!r} is touched twice on one axis by spaces {names}")
    return out


def _check_names(names: Sequence[str], spaces: Sequence[SpaceLike], what: str) -> None:
    valid = [s.name for s in spaces]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown space(s) {unknown} in {what}; valid spaces: {', '.join(valid)}")


def _resized(t: Tensor, axis: int, repeat: int, size: int, fill: float) -> Tensor:
    view = neuron_view(t, axis, repeat)
    shape = list(view.shape)
    shape[axis] = size
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    keep = min(size, view.shape[axis])
    out.narrow(axis, 0, keep).copy_(view.narrow(axis, 0, keep))
    return out.flatten(axis, axis + 1)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if attr not in module._parameters and attr not in module._buffers:
        raise ValueError(f"{key!r} is neither a parameter nor a buffer of the model")
    return module, attr


def resize(
    model: nn.Module, new_sizes: Mapping[str, int], spaces: Sequence[SpaceLike]
) -> nn.Module:
    """A deep copy of ``model`` in which each space named in ``new_sizes`` has that width.

    Every tensor a resized space touches is replaced by one of the new shape; the first
    ``min(old, new)`` neurons keep their values and new neurons are zero (``running_var``: one),
    so resizing to the same widths returns an identical copy. Layer size attributes
    (``out_features``, ``in_channels``, ``num_features``, ``normalized_shape``, ...) are updated;
    unknown layer types raise a TypeError (see :func:`register_layer`). Spaces not named keep
    their width. ``model`` is not modified.
    """
    _check_names(list(new_sizes), spaces, "new_sizes")
    for name, size in new_sizes.items():
        integer(f"new width of space {name!r}", size, 1)
    wide = copy.deepcopy(model)
    touched: dict[int, nn.Module] = {}
    for key, items in _touching(spaces).items():
        changes = [(a, r, s) for a, r, s in items if s.name in new_sizes]
        if not changes:
            continue
        module, attr = _owner(wide, key)
        old = getattr(module, attr)
        t = old.detach()
        fill = 1.0 if attr == "running_var" else 0.0
        for axis, repeat, space in changes:
            t = _resized(t, axis, repeat, new_sizes[space.name], fill)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = t
        touched[id(module)] = module
    for module in touched.values():
        _sync_for(module)(module)
    return wide


def select(
    state_dict: Mapping[str, Tensor],
    spaces: Sequence[SpaceLike],
    keep: Mapping[str, Tensor | Sequence[int]],
) -> dict[str, Tensor]:
    """A new state dict in which every space named in ``keep`` holds only the neurons
    ``keep[name]`` (a 1-D index tensor, in the order given: it may also permute or repeat).

    Each touched tensor ``t`` becomes ``index_select(view(t), axis, keep)`` on its
    ``(neurons, repeat)`` view. Other tensors are shared, not copied."""
    _check_names(list(keep), spaces, "keep")
    sizes = {s.name: s.size for s in spaces}
    index: dict[str, Tensor] = {}
    for name, idx in keep.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(
                f"keep[{name!r}] must be a 1-D index tensor, got shape {tuple(idx.shape)}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sizes[name]):
            raise ValueError(
                f"keep[{name!r}] has indices outside 0..{sizes[name] - 1} (the space's width)"
            )
        index[name] = idx
    out: dict[str, Any] = dict(state_dict)
    for key, items in _touching(spaces).items():
        chosen = [(a, r, s) for a, r, s in items if s.name in index]
        if not chosen:
            continue
        if key not in out:
            raise ValueError(f"space member {key!r} is not in the state dict")
        t = out[key]
        for axis, repeat, space in chosen:
            view = neuron_view(t, axis, repeat)
            t = view.index_select(axis, index[space.name].to(t.device)).flatten(axis, axis + 1)
        out[key] = t
    return out
