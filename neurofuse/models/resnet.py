"""CIFAR-style ResNet (He et al. 2016): 3x3 stem with stride 1, no max-pool, BasicBlocks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.checks import positive_int
from neurofuse.models._common import NamedSequential
from neurofuse.models.registry import register_architecture


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)``, two 3x3 convolutions.

    ``identity`` is ``x``, or ``downsample(x)`` (1x1 conv + BatchNorm) when the stride or
    the channel count changes. Children: ``conv1``, ``bn1``, ``conv2``, ``bn2`` and, when
    needed, ``downsample``; the ReLUs are functional so the children are exactly the
    weighted layers.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Sequential | None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return F.relu(out)


class ResNet(NamedSequential):
    """Children, in order: ``conv1``, ``bn1``, ``relu``, ``layer1``..``layer4``, ``avgpool``,
    ``flatten``, ``fc``.

    Stage ``i`` (1-based) has ``blocks[i-1]`` BasicBlocks with ``width * 2**(i-1)`` channels;
    stages 2-4 halve the spatial size in their first block.

    Args:
        blocks: number of BasicBlocks per stage (four stages).
        in_channels: input image channels.
        num_classes: number of logits.
        width: channels of the first stage (64 in the standard network).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
    ) -> None:
        if len(blocks) != 4:
            raise ValueError(f"ResNet needs four stages of blocks, got {list(blocks)}")
        width = positive_int("width", width)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(positive_int("in_channels", in_channels), width, 3, 1, 1, bias=False),
            bn1=nn.BatchNorm2d(width),
            relu=nn.ReLU(),
        )
        channels = width
        for stage, count in enumerate(blocks, start=1):
            out = width * 2 ** (stage - 1)
            stride = 1 if stage == 1 else 2
            stage_blocks = []
            for i in range(positive_int(f"blocks[{stage - 1}]", count)):
                stage_blocks.append(BasicBlock(channels, out, stride if i == 0 else 1))
                channels = out
            layers[f"layer{stage}"] = nn.Sequential(*stage_blocks)
        layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(channels, positive_int("num_classes", num_classes))
        super().__init__(layers)
        self.num_classes = num_classes
        _init_weights(self)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, BatchNorm as identity (weight 1, bias 0)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@register_architecture("resnet18", "CIFAR-style ResNet-18: BasicBlocks [2, 2, 2, 2]")
def resnet18(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18; ``width`` scales all stages (width, 2w, 4w, 8w)."""
    return ResNet([2, 2, 2, 2], in_channels=in_channels, num_classes=num_classes, width=width)


@register_architecture("resnet34", "CIFAR-style ResNet-34: BasicBlocks [3, 4, 6, 3]")
def resnet34(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-34; ``width`` scales all stages (width, 2w, 4w, 8w)."""
    return ResNet([3, 4, 6, 3], in_channels=in_channels, num_classes=num_classes, width=width)
