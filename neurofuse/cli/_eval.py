"""The ``eval`` command: accuracy, NLL and ECE of checkpoints (and of their ensemble)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from neurofuse import cli
from neurofuse.cli._common import (
    DataKwOption,
    RootOption,
    load_checkpoints,
    load_dataset,
    metric_cells,
    metrics_table,
    parse_pairs,
    resolve_dataset,
)


def _count_parameters(model: Any) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,}"


def eval_(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoints (stem, .safetensors or .json).")
    ],
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Dataset (default: the checkpoints' own)."),
    ] = None,
    data_kw: DataKwOption = None,
    root: RootOption = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="Add the prediction ensemble of all checkpoints.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Dataset seed when none is recorded.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
) -> None:
    """Accuracy, NLL and ECE of checkpoints on a test set (and of their ensemble)."""
    from neurofuse.evaluate import evaluate, evaluate_ensemble
    from neurofuse.utils import resolve_device

    dev = resolve_device(device)
    loaded = load_checkpoints(checkpoints, dev)
    spec = resolve_dataset(
        loaded[0][2].get("dataset"),
        dataset,
        parse_pairs(data_kw, "--data-kw"),
        seed,
        root,
        str(loaded[0][0]),
    )
    splits = load_dataset(spec)
    table = metrics_table(f"Test set of {spec['name']}", "checkpoint", ["arch", "parameters"])
    for path, model, sidecar in loaded:
        metrics = evaluate(model, splits.x_test, splits.y_test, device=dev)
        arch = (sidecar.get("model") or {}).get("name", "?")
        table.add_row(str(path), arch, _count_parameters(model), *metric_cells(metrics))
    if ensemble:
        metrics = evaluate_ensemble(
            [model for _, model, _ in loaded], splits.x_test, splits.y_test, device=dev
        )
        table.add_row(f"ensemble of {len(loaded)}", "", "", *metric_cells(metrics), style="blue")
    cli.console.print(table)
