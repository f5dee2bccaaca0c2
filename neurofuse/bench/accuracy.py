"""The ``accuracy`` cell: train (or load) the base models, evaluate them and their prediction
ensemble, then fuse once with every method run and evaluate the fused model on the test set.
Its report section gives, per architecture, accuracy, EGR and wall-time tables and plots."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import neurofuse as nf
from neurofuse.bench import plots, tables
from neurofuse.bench.aggregate import summarise
from neurofuse.bench.basemodels import Setup, models_cached, models_digest, prepare
from neurofuse.bench.records import (
    partial_path,
    resumable_record,
    same_base_models,
    without_errors,
    write_record,
)
from neurofuse.bench.spec import Cell, MethodRun
from neurofuse.bench.suites import Suite
from neurofuse.evaluate import evaluate, evaluate_ensemble
from neurofuse.utils import parameter_count


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
            seed=cell.seed,
            device=device,
            **run.fuse_arguments(),
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
        metrics["parameters_vs_one_model"] = parameter_count(fused) / parameter_count(
            setup.models[0]
        )
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
    recorded = resumable_record(out, cell)  # whatever base models its rows came from
    if recorded and not models_cached(cell, cache):  # (refused before any training)
        _refuse_dropping_rows(suite, cell, runs, recorded, f"the cache {cache} lacks them")
    setup = prepare(cell, cache, device)
    digest = models_digest(setup.models)
    base = [_metrics(m, setup, device) for m in setup.models]
    # (the record read above, if it was made from these base models: no second read)
    earlier = recorded if recorded and same_base_models(recorded, digest, base) else {}
    if recorded and not earlier:
        _refuse_dropping_rows(suite, cell, runs, recorded, f"the cache {cache} holds others")
    done = without_errors(earlier)
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


def _refuse_dropping_rows(
    suite: Suite, cell: Cell, runs: Sequence[MethodRun], recorded: dict[str, Any], why: str
) -> None:
    """A recorded cell whose base models are not at hand is recomputed whole, from new base
    models; when only some of the suite's runs are selected (``--methods``) that would replace
    its record by those runs alone, so refuse, naming the rows that would be lost."""
    selected = {r.key for r in runs}
    in_suite = {r.key for r in suite.methods}
    lost = sorted(k for k in recorded.get("methods", {}) if k in in_suite - selected)
    if lost:
        shown = ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
        raise ValueError(
            f"{cell.cell_id}: its recorded rows were fused from base models that are not at "
            f"hand ({why}); recomputing it with the selected runs alone would drop {len(lost)} "
            f"other rows ({shown}). Run the cell with all of the suite's runs (no --methods / "
            "--rerun) to recompute it whole, or pass the --cache that holds its base models"
        )


def accuracy_report(suite: Suite, records: list[dict[str, Any]], out: Path) -> list[str]:
    """The report section of an accuracy suite: per architecture, the best run per split,
    accuracy, EGR and wall-time tables and their plots (written into ``out``), then errors."""
    lines = [
        "Accuracy is test accuracy (%) as mean ± sample std over seeds; `*`: some seed "
        "errored; `n/a`: method not defined for this many models. EGR = (fused − best base) / "
        "(ensemble − best base) on seed-averaged accuracies.",
        "",
    ]
    for arch, group in summarise(records, [r.key for r in suite.methods]).items():
        seeds = {c: sorted(s) for c, s in group.seeds.items()}
        lines += [
            f"## {arch}",
            "",
            f"Seeds per column: `{seeds}`",
            "",
            "### Best neurofuse run per split",
            "",
            tables.best_table(group),
            "",
            "### Accuracy",
            "",
            tables.accuracy_table(group),
            "",
            "### EGR",
            "",
            tables.egr_table(group),
            "",
            "### Fusion wall time (s, mean over seeds)",
            "",
            tables.seconds_table(group),
            "",
        ]
        cost = tables.cost_table(group)
        if cost is not None:
            lines += [
                "### Inference cost (parameters, multiple of one base model)",
                "",
                "Rows that keep more than one network's parameters (the ensemble, ZipIt!'s "
                "partial zip); every other row is one network of the base models' size. These "
                "rows are not counted as the strongest baseline of a split.",
                "",
                cost,
                "",
            ]
        acc_png, n_png, rt_png = (
            f"{arch}_accuracy.png",
            f"{arch}_vs_models.png",
            f"{arch}_runtime.png",
        )
        plots.plot_accuracy(group, out / acc_png)
        lines += [f"![accuracy]({acc_png})", ""]
        if plots.model_counts(group.columns):
            plots.plot_vs_models(group, out / n_png)
            lines += [f"![vs models]({n_png})", ""]
        names, secs = plots.group_runtime(group)
        if names:
            plots.plot_runtime(names, secs, out / rt_png, f"{arch}: mean fusion time")
            lines += [f"![runtime]({rt_png})", ""]
    errors = sorted(
        {
            f"{k}: {e.get('error', '')[:160]}"
            for r in records
            for k, e in r["methods"].items()
            if e.get("status") == "error"
        }
    )
    if errors:
        lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    return lines
