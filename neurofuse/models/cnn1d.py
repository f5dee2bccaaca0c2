"""1-D convolutional network for sequence inputs such as MNIST-1D, ``(B, in_channels, length)``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from neurofuse.checks import boolean, positive_int
from neurofuse.models._common import NamedSequential, linear_relu_stack, positive_ints
from neurofuse.models.registry import register_architecture


@register_architecture("cnn1d", "1-D CNN for (B, C, L) sequences such as MNIST-1D (B, 1, 40)")
class CNN1d(NamedSequential):
    """Children, in order: ``features``, ``flatten``, ``classifier``, ``head``.

    ``features`` is an ``nn.Sequential`` of ``Conv1d(k=3, padding=1)``, [``BatchNorm1d``],
    ``ReLU`` and, with ``pool``, ``MaxPool1d(2)`` for each entry of ``channels``.

    Args:
        in_channels: input channels (1 for MNIST-1D).
        length: input sequence length (40 for MNIST-1D), used to size the first Linear.
        num_classes: number of logits.
        channels: output channels of each conv layer.
        hidden: hidden widths of the classifier (Linear+ReLU) before the head.
        batch_norm: insert BatchNorm1d after every conv (the convs then have no bias).
        pool: halve the length after every conv with ``MaxPool1d(2)`` (default on:
            40 -> 20 -> 10 -> 5 for three layers keeps the head small).
    """

    def __init__(
        self,
        in_channels: int = 1,
        length: int = 40,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 32, 32),
        hidden: Sequence[int] = (),
        batch_norm: bool = False,
        pool: bool = True,
    ) -> None:
        width = positive_int("in_channels", in_channels)
        batch_norm = boolean("batch_norm", batch_norm)
        pool = boolean("pool", pool)
        size = positive_int("length", length)
        widths = positive_ints("channels", channels)
        if not widths:
            raise ValueError("channels must list at least one conv width, e.g. [32, 32, 32]")
        layers: list[nn.Module] = []
        for out in widths:
            layers.append(nn.Conv1d(width, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.ReLU())
            if pool:
                layers.append(nn.MaxPool1d(2))
                size //= 2
            width = out
        if size < 1:
            raise ValueError(
                f"length {length} is too short for {len(widths)} pooling layers; "
                "use pool=False, fewer channels entries, or longer inputs"
            )
        flat = width * size
        hidden = positive_ints("hidden", hidden)
        super().__init__(
            OrderedDict(
                features=nn.Sequential(*layers),
                flatten=nn.Flatten(),
                classifier=linear_relu_stack(hidden, flat),
                head=nn.Linear(
                    hidden[-1] if hidden else flat, positive_int("num_classes", num_classes)
                ),
            )
        )
        self.num_classes = num_classes
