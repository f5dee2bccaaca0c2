"""Small building blocks shared by the architectures (their argument checks come from
:mod:`neurofuse.checks`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import nn

from neurofuse.checks import positive_int

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (see `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


def positive_ints(name: str, values: Any) -> list[int]:
    """Return `values` as a list of positive ints (an empty list is allowed)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
    return [positive_int(f"{name}[{i}]", v) for i, v in enumerate(values)]


def image_size_pair(name: str, value: Any) -> tuple[int, int]:
    """Accept an int (square) or a pair [height, width]; return (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return positive_int(name, value), value
    sizes = positive_ints(name, value)
    if len(sizes) != 2:
        raise ValueError(f"{name} must be an int or a pair [height, width], got {value!r}")
    return sizes[0], sizes[1]


def linear_relu_stack(widths: Sequence[int], in_features: int) -> nn.Sequential:
    """Linear+ReLU pairs mapping `in_features` through each width (empty for no widths)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers)


class NamedSequential(nn.Sequential):
    """An ``nn.Sequential`` of named children whose slices are plain ``nn.Sequential``s.

    ``nn.Sequential.__getitem__`` rebuilds slices with ``self.__class__``, which a subclass
    whose constructor takes hyperparameters cannot support; ``model[:k]`` (the first k levels)
    must keep working for level-wise fusion.
    """

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)
