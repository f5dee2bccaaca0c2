"""The base models of a cell: data, partition, training, and the on-disk cache that lets a
rerun (or another cell sharing the same models) skip training."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurofuse.bench.spec import WEAK_OWNER_SAMPLES, Arch, Cell
from neurofuse.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from neurofuse.data import DataSplits, Partition, fusion_indices, load, partition
from neurofuse.models import build
from neurofuse.train import TrainConfig, train_model


@dataclasses.dataclass
class Setup:
    """What every method of a cell shares: the data, the parts, the trained models and the
    fusion set (inputs and labels, already augmented where the cell asks)."""

    data: DataSplits
    parts: list[torch.Tensor]
    models: list[nn.Module]
    fusion_x: torch.Tensor
    fusion_y: torch.Tensor
    train_info: list[dict[str, Any]]
    partition: dict[str, Any]


def models_digest(models: list[nn.Module]) -> str:
    """A fingerprint of the models' weights and buffers (SHA-256 over every tensor, in order):
    a cell's record carries it so that runs added later are only merged into a record made
    from the same base models (a missing cache retrains them, and training is not
    bit-reproducible across machines or thread counts)."""
    h = hashlib.sha256()
    for model in models:
        for key, t in sorted(model.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def dataset(name: str) -> DataSplits:
    """The dataset, always generated with seed 0: seeds vary partitions and models, not data."""
    return load(name, seed=0)


def split_data(cell: Cell, data: DataSplits) -> tuple[list[torch.Tensor], Partition | None]:
    """Each model's training indices; ``full`` gives every model the whole split."""
    n = cell.split.n_models
    if cell.split.scheme == "full":
        return [torch.arange(data.num_train) for _ in range(n)], None
    if cell.split.scheme == "weakowner":
        return _weak_owner(cell, data)
    part = partition(
        data.y_train, n, cell.split.scheme, seed=cell.seed, num_classes=data.num_classes
    )
    return list(part.indices), part


def _weak_owner(cell: Cell, data: DataSplits) -> tuple[list[torch.Tensor], Partition]:
    """The non-IID split of the same seed, parts ordered by size (smallest first, so model 0,
    whose data forms the fusion set, has the least), model 0's part cut to a seeded random
    :data:`WEAK_OWNER_SAMPLES` samples (the rest is unused)."""
    part = partition(
        data.y_train,
        cell.split.n_models,
        "dirichlet",
        seed=cell.seed,
        num_classes=data.num_classes,
    )
    parts = sorted(part.indices, key=len)
    g = torch.Generator().manual_seed(cell.seed)
    keep = torch.randperm(len(parts[0]), generator=g)[:WEAK_OWNER_SAMPLES]
    parts[0] = parts[0][keep].sort().values
    counts = torch.stack(
        [torch.bincount(data.y_train[p], minlength=data.num_classes) for p in parts]
    )
    params = {**part.params, "owner_samples": WEAK_OWNER_SAMPLES, "order": "smallest part first"}
    return parts, Partition("weakowner", parts, counts, params)


def _train_one(
    arch: Arch, data: DataSplits, idx: torch.Tensor, seed: int, device: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """``arch`` trained on ``data.x_train[idx]``, seeded by ``seed``."""
    torch.manual_seed(seed)
    model = build(arch.name, **arch.build_kwargs())
    train = dict(arch.train)
    if isinstance(train.get("augment"), str):  # a spec such as "crop=2" (kept JSON-friendly)
        from neurofuse.data import Augment

        train["augment"] = Augment.from_spec(train["augment"])
    cfg = TrainConfig(**train, seed=seed, device=device, progress=False)
    result = train_model(
        model, data.x_train[idx], data.y_train[idx], cfg, num_classes=data.num_classes
    )
    train = {k: v for k, v in result.to_dict().items() if k != "history"}
    return model.cpu().eval(), train


def load_or_train(
    path: Path,
    arch: Arch,
    data: DataSplits,
    idx: torch.Tensor,
    seed: int,
    device: Any,
    metadata: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model cached at ``path``, or ``arch`` trained on ``idx`` and cached there (with
    ``metadata`` in its sidecar); also returns its training record."""
    try:
        model, sidecar = load_checkpoint(path, device="cpu")
        return model.eval(), {"cached": True, **sidecar.get("train", {})}
    except Exception:
        pass
    model, train = _train_one(arch, data, idx, seed, device)
    save_checkpoint(model, path, metadata={"train": train, **(metadata or {})})
    return model, {"cached": False, **train}


def _fusion_set(
    cell: Cell, data: DataSplits, parts: list[torch.Tensor], part: Partition | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # the paper's 400 samples come from model 0's data; a small Dirichlet part (e.g. 8
    # non-IID models) may hold fewer, and then all of it is used (recorded in the result)
    n_fusion = cell.fusion_samples if part is None else min(cell.fusion_samples, len(parts[0]))
    fuse_idx = fusion_indices(data.y_train, part, n_fusion, seed=cell.seed, from_part=0)
    x, y = data.x_train[fuse_idx], data.y_train[fuse_idx]
    if cell.augment_copies:
        from neurofuse.data import augmented_copies

        x, ya = augmented_copies(x, y, cell.augment_copies, "crop=2", seed=cell.seed)
        assert ya is not None
        y = ya
    return x, y


def fusion_set(cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell's fusion set (inputs, labels) as :func:`prepare` draws it, without the models
    (it depends on the data, the split and the seed only)."""
    data = dataset(cell.dataset)
    parts, part = split_data(cell, data)
    return _fusion_set(cell, data, parts, part)


def model_path(cell: Cell, cache: Path, index: int) -> Path:
    """Where :func:`prepare` caches the cell's base model ``index`` (a checkpoint stem)."""
    return cache / f"{cell.models_id}_model{index}"


def models_cached(cell: Cell, cache: Path) -> bool:
    """Whether every base model of the cell is in ``cache`` (so :func:`prepare` trains none)."""
    return all(
        checkpoint_paths(model_path(cell, cache, i))[0].exists() for i in range(cell.split.n_models)
    )


def prepare(cell: Cell, cache: Path, device: Any) -> Setup:
    """Train the cell's base models or load them from ``cache``; draw its fusion set."""
    data = dataset(cell.dataset)
    parts, part = split_data(cell, data)
    models, info = [], []
    for i, idx in enumerate(parts):
        path = model_path(cell, cache, i)
        model, train = load_or_train(
            path, cell.arch, data, idx, 1000 * cell.seed + i, device, {"cell": cell.describe()}
        )
        models.append(model)
        info.append(train)
    x, y = _fusion_set(cell, data, parts, part)
    part_info = {"sizes": [int(len(p)) for p in parts]}
    if part is not None:
        part_info["class_counts"] = part.class_counts.tolist()
    return Setup(data, parts, models, x, y, info, part_info)
