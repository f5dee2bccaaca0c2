"""The ``eval`` command: accuracy, NLL and ECE of checkpoints (and of their ensemble)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from neurofuse import cli
from neurofuse.cli._common import (
    ArchOption,
    DataKwOption,
    ModelKwOption,
    ModelOption,
    RootOption,
    dataset_spec,
    load_checkpoints,
    load_dataset,
    metric_cells,
    metrics_table,
    model_spec,
    parse_pairs,
    resolve_dataset,
)


def eval_(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Models: neurofuse checkpoints, plain state-dict or safetensors files (with "
            "--model or --arch), model folders, or folders of these (natural name order)."
        ),
    ],
    model: ModelOption = None,
    model_kw: ModelKwOption = None,
    arch: ArchOption = None,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Dataset (default: the checkpoints' own)."),
    ] = None,
    data_file: Annotated[
        Path | None,
        typer.Option("--data", help="Evaluate on a labelled file instead (.npz x, y; .pt)."),
    ] = None,
    data_kw: DataKwOption = None,
    root: RootOption = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="Add the prediction ensemble of all checkpoints.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Dataset seed when none is recorded.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the metrics as one JSON object on stdout.")
    ] = False,
) -> None:
    """Accuracy, NLL and ECE of models on a test set (and of their ensemble)."""
    from neurofuse.data import load_fusion_file
    from neurofuse.evaluate import evaluate, evaluate_ensemble
    from neurofuse.utils import parameter_count, resolve_device

    dev = resolve_device(device)
    spec = model_spec(model, arch, model_kw)
    named = (
        dataset_spec(dataset, parse_pairs(data_kw, "--data-kw"), seed, root) if dataset else None
    )
    early = load_dataset(named) if named is not None and arch is not None else None
    loaded = load_checkpoints(checkpoints, dev, spec, early)
    if data_file is not None:
        if dataset is not None:
            raise ValueError("give --dataset or --data (a labelled file), not both")
        x_test, y_test = load_fusion_file(data_file)
        if y_test is None:
            raise ValueError(f"{data_file} has no labels 'y'; evaluation needs them")
        title = f"Test set {data_file}"
    else:
        ds = resolve_dataset(
            loaded[0].sidecar.get("dataset"),
            dataset,
            parse_pairs(data_kw, "--data-kw"),
            seed,
            root,
            str(loaded[0].path),
        )
        splits = load_dataset(ds)
        x_test, y_test, title = splits.x_test, splits.y_test, f"Test set of {ds['name']}"
    table = metrics_table(title, "checkpoint", ["arch", "parameters"])
    results: dict[str, Any] = {}
    for m in loaded:
        metrics = evaluate(m.model, x_test, y_test, device=dev)
        name = (m.sidecar.get("model") or {}).get("name") or spec.target or spec.arch or "?"
        results[str(m.path)] = {"arch": name, **metrics.to_dict()}
        table.add_row(str(m.path), name, f"{parameter_count(m.model):,}", *metric_cells(metrics))
    if ensemble:
        metrics = evaluate_ensemble([m.model for m in loaded], x_test, y_test, device=dev)
        results["ensemble"] = metrics.to_dict()
        table.add_row(f"ensemble of {len(loaded)}", "", "", *metric_cells(metrics), style="blue")
    if as_json:
        print(json.dumps({"test_set": title, "models": results}, indent=2))
    else:
        cli.console.print(table)
