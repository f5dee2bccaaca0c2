"""How ``train`` divides the training split among models, and the ``partition.json`` that
records which samples every model saw (``fuse`` draws its fusion set from it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PARTITION_FILE = "partition.json"
PARTITION_FORMAT = "neurofuse-partition"
FULL = "full"
"""Pseudo partition scheme: every model trains on the whole training split (seeds differ)."""


def make_parts(splits: Any, n: int, scheme: str, seed: int, **params: Any) -> Any:
    """Partition the training split into ``n`` parts (``full``: every model gets all of it)."""
    import torch

    from neurofuse import data

    if n < 1:
        raise ValueError(f"--models must be >= 1, got {n}")
    schemes = sorted([*data.PARTITION_SCHEMES, FULL])
    if scheme not in schemes:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(schemes)}"
        )
    if scheme == FULL:
        everything = torch.arange(len(splits.y_train))
        counts = torch.bincount(splits.y_train.cpu(), minlength=splits.num_classes)
        return data.Partition(
            scheme=FULL,
            indices=[everything.clone() for _ in range(n)],
            class_counts=counts.expand(n, -1).clone(),
            params={},
        )
    return data.partition(
        splits.y_train, n, scheme=scheme, seed=seed, num_classes=splits.num_classes, **params
    )


def write_partition_file(
    out: Path, spec: dict[str, Any], part: Any, seed: int, stems: Sequence[str]
) -> Path:
    """``out/partition.json``: which training samples every model saw (atomic write)."""
    from neurofuse.utils import atomic_write_text, to_jsonable

    record = {
        "format": PARTITION_FORMAT,
        "format_version": 1,
        "dataset": spec,
        "seed": seed,
        "n_parts": part.n_parts,
        "checkpoints": list(stems),
        **to_jsonable(part.to_dict()),
    }
    return atomic_write_text(out / PARTITION_FILE, json.dumps(record) + "\n")


def read_partition_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path}: corrupt partition file ({err}); delete or regenerate it"
        ) from err
    if not isinstance(record, dict) or record.get("format") != PARTITION_FORMAT:
        raise ValueError(f"{path}: not a neurofuse partition file")
    return record
