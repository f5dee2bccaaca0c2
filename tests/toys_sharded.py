"""A toy sharded task: two small MLPs that each saw half of the classes (for baseline tests)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn
from toys import accuracy, mlp, toy_task, train


@dataclass
class ShardedTask:
    models: list[nn.Module]
    x_fusion: Tensor
    y_fusion: Tensor
    x_test: Tensor
    y_test: Tensor

    def weakest(self) -> float:
        return min(accuracy(m, self.x_test, self.y_test) for m in self.models)


@lru_cache(maxsize=4)
def sharded_task(hidden: tuple[int, ...] = (32,), n_fusion: int = 300) -> ShardedTask:
    """4 classes; model A trains on classes {0, 1} only, model B on {2, 3} (the sharded regime),
    so each is right on about half of the test set. The fusion set is drawn from the *whole*
    training set (the IID fusion-set setting), so distilling towards the ensemble can recover
    all four classes. Cached: built once per test session; fusion never modifies its models."""
    x, y = toy_task(n=3000, d=10, classes=4, seed=0)
    x_train, y_train, x_test, y_test = x[:2000], y[:2000], x[2000:], y[2000:]
    models = []
    for seed, shard in enumerate([y_train < 2, y_train >= 2], start=1):
        torch.manual_seed(seed)
        models.append(
            train(mlp(10, hidden, 4), x_train[shard], y_train[shard], epochs=30, seed=seed)
        )
    idx = torch.randperm(2000, generator=torch.Generator().manual_seed(3))[:n_fusion]
    return ShardedTask(models, x_train[idx], y_train[idx], x_test, y_test)
