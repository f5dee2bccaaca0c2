"""Run the cells of a suite: one JSON result per cell, written atomically when it finishes.

Each cell is run by its kind (:data:`neurofuse.bench.kinds.CELL_KINDS`); resume is described
in :mod:`neurofuse.bench.records`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch

from neurofuse.bench.kinds import get_kind
from neurofuse.bench.records import partial_path, result_path, write_record
from neurofuse.bench.spec import Cell, MethodRun
from neurofuse.bench.suites import Suite
from neurofuse.utils import resolve_device


def run_suite(
    suite: Suite,
    seeds: Sequence[int],
    out: Path,
    device: str | torch.device | None = None,
    methods: Sequence[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    threads: int | None = 2,
    log: Callable[[str], None] | None = None,
    cache: Path | None = None,
    splits: Sequence[str] | None = None,
    rerun: Sequence[str] | None = None,
) -> list[Path]:
    """Run every cell of ``suite`` for ``seeds``; return the result files (one per cell).

    ``methods`` keeps only the runs whose method name or label is listed; ``splits`` only the
    cells whose split key (``noniid2``, ``sharded6``, ``full2`` ...) is listed. With ``resume``, a
    cell whose result file exists is not recomputed, except for runs its record lacks (added to
    the suite since) or recorded as errors, which are fused with the cached base models, and
    the runs named in ``rerun`` (method names or labels, among the selected runs: rows whose
    method changed since), which are fused again and replace their old entries. A finished
    cell made from other base models than the cache holds is recomputed whole when every run
    of the suite is selected; with only some selected it fails (logged, its record kept as
    it was): recomputing it would drop the other runs' rows.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    runs = select_runs(suite.methods, methods)
    again = {r.key for r in select_runs(runs, rerun)} if rerun else set()
    cells = select_cells(suite.cells(seeds), splits)
    kinds = {kind: get_kind(kind) for kind in {c.kind for c in cells}}  # unknown: ValueError
    paths: list[Path] = []
    failed: list[str] = []
    from neurofuse.progress import progress_bar

    with progress_bar(progress, f"bench {suite.name}", len(cells)) as update:
        for done, cell in enumerate(cells, 1):
            path = result_path(out, cell)
            if resume and path.exists() and not _missing_runs(path, runs, again):
                status = "cached"
            else:
                if resume and path.exists():  # a finished cell gains the runs added since
                    record = json.loads(path.read_text())
                    for key in again:
                        record.get("methods", {}).pop(key, None)
                    write_record(partial_path(out, cell), record)
                try:
                    record = kinds[cell.kind].run(
                        suite, cell, runs, out, cache or out / "cache", dev
                    )
                except Exception as exc:  # one broken cell must not stop the suite
                    failed.append(cell.cell_id)
                    if log is not None:
                        log(
                            f"[{done}/{len(cells)}] {cell.cell_id}: FAILED {type(exc).__name__}: {exc}"
                        )
                    update(done)
                    continue
                record["suite"] = suite.name
                write_record(path, record)
                path.with_suffix(".partial.json").unlink(missing_ok=True)
                status = f"done in {record['seconds']:.0f}s"
            if log is not None:
                log(f"[{done}/{len(cells)}] {cell.cell_id}: {status}")
            paths.append(path)
            update(done)
    return paths


def _missing_runs(
    path: Path, runs: Sequence[MethodRun], again: Collection[str] = ()
) -> list[MethodRun]:
    """The runs that a finished cell's record lacks (methods added to the suite since),
    recorded as errors (rerun, e.g. after a fix) or whose key is in ``again``."""
    try:
        done = json.loads(path.read_text()).get("methods", {})
    except (OSError, ValueError):
        return list(runs)
    return [
        r for r in runs if r.key in again or done.get(r.key, {}).get("status", "error") == "error"
    ]


def select_runs(runs: Sequence[MethodRun], methods: Sequence[str] | None) -> list[MethodRun]:
    if not methods:
        return list(runs)
    wanted = {m.strip() for m in methods}
    known = {r.method for r in runs} | {r.label for r in runs}
    unknown = wanted - known
    if unknown:
        raise ValueError(
            f"unknown method(s) {sorted(unknown)} for this suite; choose from {sorted(known)}"
        )
    return [r for r in runs if r.method in wanted or r.label in wanted]


def select_cells(cells: Sequence[Cell], splits: Sequence[str] | None) -> list[Cell]:
    """The cells whose split key (regime + number of models, e.g. ``noniid2``) is in
    ``splits``; every cell when ``splits`` is empty."""
    if not splits:
        return list(cells)
    wanted = {s.strip() for s in splits}
    known = {c.split.key for c in cells}
    if wanted - known:
        raise ValueError(
            f"unknown split(s) {sorted(wanted - known)} for this suite; choose from {sorted(known)}"
        )
    return [c for c in cells if c.split.key in wanted]
