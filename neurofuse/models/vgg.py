"""VGG: stacks of 3x3 convolutions and 2x2 max-pooling, then a fully connected classifier."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from neurofuse.checks import boolean, positive_int
from neurofuse.models._common import (
    NamedSequential,
    image_size_pair,
    linear_relu_stack,
    positive_ints,
)
from neurofuse.models.registry import register_architecture

POOL = "M"

#: Channel lists; ``"M"`` is a 2x2 max-pool. vgg11/13/16 are Simonyan & Zisserman's A/B/D
#: configurations; the small ones suit 28x28 inputs (MNIST) and fast tests.
# fmt: off
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg13": [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL,
              512, 512, 512, POOL, 512, 512, 512, POOL],
    "vgg_small": [16, POOL, 32, POOL, 64, 64, POOL],
    "vgg_mnist": [32, 32, POOL, 64, 64, POOL, 128, 128, POOL],
}
# fmt: on


@register_architecture("vgg", "VGG (vgg11/13/16 or small presets, or a custom channel list)")
class VGG(NamedSequential):
    """Children, in order: ``features``, ``flatten``, ``classifier``, ``head``.

    ``features`` is an ``nn.Sequential`` of ``Conv2d(3x3, padding=1)``, [``BatchNorm2d``],
    ``ReLU`` per channel entry and ``MaxPool2d(2)`` per ``"M"``. ``classifier`` holds
    Linear+ReLU pairs for the hidden widths and is empty by default, which gives the
    CIFAR-10 VGG11 of OTFusion and the neuron-interpolation paper (features, then one Linear).

    Args:
        config: a name from `VGG_CONFIGS` or a list of channel counts and ``"M"``.
        in_channels: input image channels.
        num_classes: number of logits.
        input_size: input height/width (int or ``[h, w]``), used to size the first Linear.
        batch_norm: insert BatchNorm2d after every conv (the convs then have no bias).
        classifier: hidden widths of the classifier before the head.
    """

    def __init__(
        self,
        config: str | Sequence[int | str] = "vgg11",
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int | Sequence[int] = 32,
        batch_norm: bool = False,
        classifier: Sequence[int] = (),
    ) -> None:
        entries = _resolve_config(config)
        batch_norm = boolean("batch_norm", batch_norm)
        height, width = image_size_pair("input_size", input_size)
        channels = positive_int("in_channels", in_channels)
        layers: list[nn.Module] = []
        for entry in entries:
            if isinstance(entry, str):  # POOL, the only string _resolve_config lets through
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
                continue
            layers.append(nn.Conv2d(channels, entry, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(entry))
            layers.append(nn.ReLU())
            channels = entry
        if height < 1 or width < 1:
            raise ValueError(
                f"input_size {input_size} is too small for {entries.count(POOL)} max-pools; "
                "use a larger input_size or a config with fewer 'M' entries"
            )
        flat = channels * height * width
        hidden = positive_ints("classifier", classifier)
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
        _init_weights(self)


def _resolve_config(config: str | Sequence[int | str]) -> list[int | str]:
    if isinstance(config, str):
        if config not in VGG_CONFIGS:
            raise ValueError(
                f"unknown VGG config {config!r}; valid: {', '.join(VGG_CONFIGS)}, "
                "or a list of channel counts and 'M'"
            )
        return list(VGG_CONFIGS[config])
    entries = list(config)
    for entry in entries:
        if entry != POOL:
            positive_int("VGG config entry (a channel count or 'M')", entry)
    if not any(entry != POOL for entry in entries):
        raise ValueError(f"VGG config {entries} has no convolution; add channel counts")
    return entries


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (He et al. 2015), the usual VGG initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
