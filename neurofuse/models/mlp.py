"""Multi-layer perceptron: flatten, then Linear/activation pairs, then a Linear head."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from neurofuse.checks import boolean, positive_int
from neurofuse.models._common import NamedSequential, make_activation, positive_ints
from neurofuse.models.registry import register_architecture


@register_architecture("mlp", "fully connected network: flatten, hidden Linear+activation, head")
class MLP(NamedSequential):
    """Children, in order: ``flatten``, ``fc1``, ``act1``, ..., ``fcK``, ``actK``, ``head``.

    Args:
        in_features: flattened input size; or give ``input_shape`` (e.g. ``[1, 28, 28]``)
            and it is the product of that shape.
        input_shape: per-sample input shape, an alternative to ``in_features``.
        num_classes: number of logits.
        hidden: widths of the hidden layers, ``[]`` for a linear model.
        activation: ``"relu"``, ``"gelu"`` or ``"tanh"``.
        bias: whether the Linear layers have biases.
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int = 10,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
        bias: bool = True,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        in_features = _resolve_in_features(in_features, input_shape)
        positive_int("num_classes", num_classes)
        bias = boolean("bias", bias)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_features
        for i, out in enumerate(positive_ints("hidden", hidden), start=1):
            layers[f"fc{i}"] = nn.Linear(width, out, bias=bias)
            layers[f"act{i}"] = make_activation(activation)
            width = out
        layers["head"] = nn.Linear(width, num_classes, bias=bias)
        super().__init__(layers)
        self.in_features = in_features
        self.num_classes = num_classes


def _resolve_in_features(in_features: int | None, input_shape: Sequence[int] | None) -> int:
    if input_shape is not None:
        from_shape = math.prod(positive_ints("input_shape", input_shape))
        if in_features is not None and in_features != from_shape:
            raise ValueError(
                f"in_features={in_features} disagrees with input_shape={list(input_shape)} "
                f"(product {from_shape}); give only one of them"
            )
        return from_shape
    if in_features is None:
        raise TypeError("mlp needs in_features (an int) or input_shape (e.g. [1, 28, 28])")
    return positive_int("in_features", in_features)
