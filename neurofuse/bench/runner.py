"""Run the cells of a suite: one JSON result per cell, written atomically when it finishes.

Resume works at two grains: a cell whose result file exists is skipped, and inside an
unfinished cell every method already recorded in its ``.partial.json`` is kept, so a killed run
loses at most the method that was running.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import neurofuse as nf
from neurofuse.bench.basemodels import Setup, models_digest, prepare
from neurofuse.bench.spec import Cell, MethodRun
from neurofuse.bench.suites import Suite
from neurofuse.evaluate import evaluate, evaluate_ensemble
from neurofuse.utils import atomic_write_text, resolve_device, to_jsonable

CellRunner = Callable[[Suite, Cell, Sequence[MethodRun], Path, Path, torch.device], dict[str, Any]]


def result_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.cell_id}.json"


def partial_path(out: Path, cell: Cell) -> Path:
    return result_path(out, cell).with_suffix(".partial.json")


def resumable_record(
    out: Path, cell: Cell, digest: str | None = None, base: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The partial record of a killed (or finished, now extended) run of ``cell``, or {}.
    With ``digest`` (:func:`models_digest` of the base models at hand), a record made from
    other base models (the cache was rebuilt) counts as absent, so one record never mixes two
    sets of base models; see :func:`same_base_models`."""
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
    return _without_errors(resumable_record(out, cell, digest, base))


def _without_errors(record: dict[str, Any]) -> dict[str, Any]:
    methods = record.get("methods", {})
    return {k: e for k, e in methods.items() if e.get("status") != "error"}


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(to_jsonable(record), indent=1, sort_keys=True))


def _metrics(model: torch.nn.Module, setup: Setup, device: torch.device) -> dict[str, Any]:
    return evaluate(model, setup.data.x_test, setup.data.y_test, device=device).to_dict()


def fuse_once(run: MethodRun, setup: Setup, cell: Cell, device: torch.device) -> dict[str, Any]:
    """Fuse with one method run and evaluate the result on the test set; never raises (an
    error is recorded in the returned entry)."""
    entry: dict[str, Any] = run.entry()
    if run.pairwise and cell.split.n_models != 2:
        return {**entry, "status": "n/a", "reason": "defined for two models only"}
    if run.archs and cell.arch_label not in run.archs:
        return {**entry, "status": "n/a", "reason": f"run only on {list(run.archs)}"}
    if run.regimes and cell.split.regime not in run.regimes:
        return {**entry, "status": "n/a", "reason": f"run only on {list(run.regimes)} splits"}
    options = run.kwargs()
    if run.needs_counts:
        options["sample_counts"] = [int(len(p)) for p in setup.parts]
    start = time.perf_counter()
    try:
        fused = nf.fuse(
            setup.models,
            (setup.fusion_x, setup.fusion_y),
            method=run.method,
            importance=run.importance,
            seed=cell.seed,
            device=device,
            **options,
        )
        if run.finetune_epochs:  # on the labelled union of the models' training data
            rows = torch.cat(list(setup.parts)).unique()
            fused = nf.finetune(
                fused,
                (setup.data.x_train[rows], setup.data.y_train[rows]),
                epochs=run.finetune_epochs,
                seed=cell.seed,
                device=device,
            )
        seconds = time.perf_counter() - start
        metrics = _metrics(fused, setup, device)
    except Exception as exc:  # a failing method must not stop the suite
        return {
            **entry,
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=4),
            "seconds": time.perf_counter() - start,
        }
    report = getattr(fused, "neurofuse_report", {}) or {}
    return {
        **entry,
        "status": "ok",
        "seconds": seconds,
        **metrics,
        "phases": report.get("seconds", {}),
        **({"chosen": report["auto"]["chosen"]} if "auto" in report else {}),
    }


def run_accuracy_cell(
    suite: Suite,
    cell: Cell,
    runs: Sequence[MethodRun],
    out: Path,
    cache: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Train/load the base models, evaluate them and their ensemble, fuse with every run."""
    partial = partial_path(out, cell)
    start = time.perf_counter()
    setup = prepare(cell, cache, device)
    digest = models_digest(setup.models)
    base = [_metrics(m, setup, device) for m in setup.models]
    earlier = resumable_record(out, cell, digest, base)
    done = _without_errors(earlier)
    record: dict[str, Any] = {
        "cell": cell.describe(),
        "base_digest": digest,
        "partition": setup.partition,
        "train": setup.train_info,
        "base": base,
        "ensemble": evaluate_ensemble(
            setup.models, setup.data.x_test, setup.data.y_test, device=device
        ).to_dict(),
        "fusion_set": {
            "n": int(len(setup.fusion_x)),
            "classes": sorted(set(setup.fusion_y.tolist())),
        },
        "methods": done,
    }
    for run in runs:
        if run.key in done:
            continue
        record["methods"][run.key] = fuse_once(run, setup, cell, device)
        write_record(partial, record)
    # a finished cell that gained runs keeps the time it took before
    record["seconds"] = float(earlier.get("seconds", 0.0)) + time.perf_counter() - start
    record["device"] = str(device)
    record["torch_threads"] = torch.get_num_threads()
    return record


CELL_RUNNERS: dict[str, CellRunner] = {"accuracy": run_accuracy_cell}


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
) -> list[Path]:
    """Run every cell of ``suite`` for ``seeds``; return the result files (one per cell).

    ``methods`` keeps only the runs whose method name or label is listed; ``splits`` only the
    cells whose split key (``noniid2``, ``sharded6``, ``full2`` ...) is listed. With ``resume``, a
    cell whose result file exists is not recomputed, except for runs its record lacks (added to
    the suite since) or recorded as errors, which are fused with the cached base models.
    """
    # importing these registers the "runtime" and "compression" cell runners
    from neurofuse.bench.compression import run_compression_cell  # noqa: F401
    from neurofuse.bench.runtime import run_runtime_cell  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    runs = select_runs(suite.methods, methods)
    cells = select_cells(suite.cells(seeds), splits)
    paths: list[Path] = []
    failed: list[str] = []
    from neurofuse.progress import progress_bar

    with progress_bar(progress, f"bench {suite.name}", len(cells)) as update:
        for done, cell in enumerate(cells, 1):
            path = result_path(out, cell)
            if resume and path.exists() and not _missing_runs(path, runs):
                status = "cached"
            else:
                if resume and path.exists():  # a finished cell gains the runs added since
                    write_record(partial_path(out, cell), json.loads(path.read_text()))
                try:
                    record = CELL_RUNNERS[cell.kind](
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


def _missing_runs(path: Path, runs: Sequence[MethodRun]) -> list[MethodRun]:
    """The runs that a finished cell's record lacks (methods added to the suite since) or
    recorded as errors (rerun, e.g. after a fix)."""
    try:
        done = json.loads(path.read_text()).get("methods", {})
    except (OSError, ValueError):
        return list(runs)
    return [r for r in runs if done.get(r.key, {}).get("status", "error") == "error"]


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
