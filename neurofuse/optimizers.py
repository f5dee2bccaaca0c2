"""The optimizers that neurofuse trains with, by name: one table for every user (base-model
training, the gradient fits of the fusion methods, distillation, fine-tuning)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

__all__ = ["OPTIMIZERS", "OptimizerName", "check_optimizer", "make_optimizer"]

#: the names of :data:`OPTIMIZERS`, for option annotations (checked against it by a test)
OptimizerName = Literal["adam", "adamw", "sgd"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
"""Optimizer classes by name. Weight decay is decoupled for ``adamw``, an L2 term for ``adam``
and ``sgd``; only ``sgd`` takes a momentum."""


def check_optimizer(name: Any) -> None:
    """Raise a ValueError listing the choices unless ``name`` is a key of :data:`OPTIMIZERS`."""
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")


def make_optimizer(
    name: str,
    params: Iterable[Any],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``; ``momentum`` is used by ``sgd`` only."""
    check_optimizer(name)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kwargs["momentum"] = momentum
    return OPTIMIZERS[name](params, **kwargs)
