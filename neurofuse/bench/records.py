"""Cell result files shared by every cell kind: where a cell's record lives, the partial record
of an unfinished run (resume), and atomic writes.

Resume works at two grains: a cell whose result file exists is skipped, and inside an
unfinished cell every method already recorded in its ``.partial.json`` is kept, so a killed run
loses at most the method that was running.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from neurofuse.bench.spec import Cell
from neurofuse.utils import atomic_write_text, to_jsonable


def result_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.cell_id}.json"


def partial_path(out: Path, cell: Cell) -> Path:
    return result_path(out, cell).with_suffix(".partial.json")


def resumable_record(
    out: Path, cell: Cell, digest: str | None = None, base: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The partial record of a killed (or finished, now extended) run of ``cell``, or {}.
    With ``digest`` (:func:`~neurofuse.bench.basemodels.models_digest` of the base models at
    hand), a record made from other base models (the cache was rebuilt) counts as absent, so
    one record never mixes two sets of base models; see :func:`same_base_models`."""
    path = partial_path(out, cell)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("methods"), dict):
        return {}
    if digest is not None and not same_base_models(record, digest, base):
        return {}
    return record


def same_base_models(
    record: dict[str, Any], digest: str, base: list[dict[str, Any]] | None = None
) -> bool:
    """Was ``record`` made from the base models whose digest is ``digest``? A record older
    than digests is matched by its base models' test metrics (``base``) instead."""
    if "base_digest" in record:
        return record["base_digest"] == digest
    recorded = record.get("base")
    try:
        return (
            base is not None
            and len(recorded) == len(base)  # type: ignore[arg-type]
            and all(
                abs(r["accuracy"] - b["accuracy"]) < 1e-9 and abs(r["nll"] - b["nll"]) < 1e-6
                for r, b in zip(recorded, base, strict=True)  # type: ignore[arg-type]
            )
        )
    except (TypeError, KeyError):
        return False


def finished_methods(
    out: Path, cell: Cell, digest: str | None = None, base: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The method entries of :func:`resumable_record` recorded without error (resume)."""
    return without_errors(resumable_record(out, cell, digest, base))


def without_errors(record: dict[str, Any]) -> dict[str, Any]:
    """The method entries of ``record`` whose status is not ``"error"``."""
    methods = record.get("methods", {})
    return {k: e for k, e in methods.items() if e.get("status") != "error"}


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(to_jsonable(record), indent=1, sort_keys=True))


def measure_cells(
    cells: Sequence[Cell],
    store: Path,
    measure: Callable[[Cell], dict[str, Any] | None],
    summary: Callable[[dict[str, Any]], str] = lambda record: "done",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The records of a benchmark script that keeps one JSON file of per-cell records keyed
    by cell id (``store``): each cell not in it yet is measured (``measure`` returns its
    record, or ``None`` when the cell's base models are not cached) and the file rewritten
    atomically after it, so a killed run resumes at the next cell; ``log`` gets a line per
    cell (``summary`` of its record and the time). Returns every record, old and new."""
    records: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    for i, cell in enumerate(cells, 1):
        if cell.cell_id in records:
            continue
        start = time.perf_counter()
        record = measure(cell)
        if record is None:
            log(f"[{i}/{len(cells)}] {cell.cell_id}: base models not cached, skipped")
            continue
        records[cell.cell_id] = record
        atomic_write_text(store, json.dumps(records))
        log(
            f"[{i}/{len(cells)}] {cell.cell_id}: {summary(record)} ({time.perf_counter() - start:.0f} s)"
        )
    return records
