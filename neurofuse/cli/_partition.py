"""How ``train`` divides the training split among models, and the ``partition.json`` that
records which samples every model saw (``fuse`` draws its fusion set from it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neurofuse.cli._common import _int_list

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


def fusion_set(
    splits: Any,
    spec: dict[str, Any],
    first: Any,
    n: int,
    seed: int,
    from_part: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Indices of the fusion set and where they came from.

    ``from_part=K`` draws from part ``K`` of the ``partition.json`` beside the first model
    (the non-IID training run's split of this very dataset). Without it, the set comes from the
    first model's own part when its checkpoint records one of that partition (what the first
    client could hold), otherwise from the whole training split.
    """
    from neurofuse import data

    path, sidecar = first.path, first.sidecar
    record = read_partition_file(path.parent / PARTITION_FILE)
    recorded = sidecar.get("partition") or {}
    if from_part is not None:
        if record is None:
            raise ValueError(
                f"--from-part {from_part} needs the {PARTITION_FILE} of the training run beside "
                f"the first model ({path.parent / PARTITION_FILE} does not exist)"
            )
        if record.get("dataset") != spec:
            raise ValueError(
                f"{path.parent / PARTITION_FILE} partitions {record.get('dataset')}, not the "
                f"dataset of this fusion {spec}; --from-part would index another dataset"
            )
        part_index = from_part
    elif (
        record is not None
        and record.get("scheme") not in ("iid", FULL)
        and record.get("dataset") == spec
        and isinstance(recorded.get("part"), int)
        and 0 <= recorded["part"] < len(record["indices"])
    ):
        part_index = recorded["part"]
    else:
        idx = data.fusion_indices(splits.y_train, None, n, seed=seed)
        return idx, {
            "size": len(idx),
            "source": "whole training split",
            "seed": seed,
            "indices": _int_list(idx),
        }
    assert record is not None
    part = data.Partition.from_dict(record)
    idx = data.fusion_indices(splits.y_train, part, n, seed=seed, from_part=part_index)
    source = {
        "source": f"part {part_index} of the {record['scheme']} partition",
        "partition_file": str(path.parent / PARTITION_FILE),
        "scheme": record["scheme"],
        "from_part": part_index,
    }
    return idx, {"size": len(idx), **source, "seed": seed, "indices": _int_list(idx)}
