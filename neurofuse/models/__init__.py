"""Model zoo in plain torch (no torchvision), behind one name table.

    >>> from neurofuse.models import build, model_config, build_from_config
    >>> model = build("resnet18", num_classes=100, width=16)
    >>> twin = build_from_config(model_config(model))  # same architecture, fresh weights

Every built-in model is an ``nn.Sequential`` of named children (see each class for the names),
so fusion code can cut it into levels by module name; all are ``torch.fx``-traceable.
Add your own with `register_architecture`.
"""

from __future__ import annotations

# Importing the architecture modules registers them.
from neurofuse.models import cnn1d, gpt, mlp, resmlp, resnet, vgg, vit  # noqa: F401
from neurofuse.models.cnn1d import CNN1d
from neurofuse.models.gpt import GPT, GPTBlock
from neurofuse.models.mlp import MLP
from neurofuse.models.registry import (
    architecture_factory,
    available_architectures,
    build,
    build_from_config,
    model_config,
    register_architecture,
)
from neurofuse.models.resmlp import ResidualMLP, ResidualMLPBlock
from neurofuse.models.resnet import BasicBlock, ResNet
from neurofuse.models.vgg import VGG, VGG_CONFIGS
from neurofuse.models.vit import (
    ClassTokenPool,
    EncoderBlock,
    MultiHeadSelfAttention,
    PatchEmbedding,
    VisionTransformer,
)

__all__ = [
    "BasicBlock",
    "CNN1d",
    "ClassTokenPool",
    "EncoderBlock",
    "GPT",
    "GPTBlock",
    "MLP",
    "MultiHeadSelfAttention",
    "PatchEmbedding",
    "ResNet",
    "ResidualMLP",
    "ResidualMLPBlock",
    "VGG",
    "VGG_CONFIGS",
    "VisionTransformer",
    "architecture_factory",
    "available_architectures",
    "build",
    "build_from_config",
    "model_config",
    "register_architecture",
]
