"""Pre-norm residual MLP: a width-``dim`` residual stream that every block adds to.

The simplest network whose levels are residual blocks with LayerNorm inside, as in a
transformer without attention: ``x + fc2(act(fc1(norm(x))))``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from neurofuse.checks import positive_int
from neurofuse.models._common import NamedSequential, make_activation, positive_ints
from neurofuse.models.registry import register_architecture


class ResidualMLPBlock(nn.Module):
    """``x + fc2(act(fc1(norm(x))))``; children ``norm``, ``fc1``, ``act``, ``fc2``."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@register_architecture("resmlp", "pre-norm residual MLP: embed, LayerNorm residual blocks, head")
class ResidualMLP(NamedSequential):
    """Children, in order: ``flatten``, ``embed`` (Linear to the stream width), ``blocks``
    (``ResidualMLPBlock``s), ``norm`` (final LayerNorm), ``head``.

    Args:
        in_features: flattened input size; or ``input_shape`` (e.g. ``[1, 28, 28]``).
        num_classes: number of logits.
        dim: width of the residual stream.
        hidden: hidden width of each block's MLP (one entry per block).
        activation: ``"gelu"``, ``"relu"`` or ``"tanh"``.
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int = 10,
        dim: int = 128,
        hidden: Sequence[int] = (256, 256),
        activation: str = "gelu",
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if input_shape is not None:
            in_features = math.prod(positive_ints("input_shape", input_shape))
        if in_features is None:
            raise TypeError("resmlp needs in_features (an int) or input_shape (e.g. [1, 28, 28])")
        in_features = positive_int("in_features", in_features)
        dim = positive_int("dim", dim)
        blocks = [ResidualMLPBlock(dim, h, activation) for h in positive_ints("hidden", hidden)]
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                embed=nn.Linear(in_features, dim),
                blocks=nn.Sequential(*blocks),
                norm=nn.LayerNorm(dim),
                head=nn.Linear(dim, positive_int("num_classes", num_classes)),
            )
        )
        self.in_features = in_features
        self.num_classes = num_classes
