"""The ``train`` command: one model per part of a data partition, saved as checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from neurofuse import cli
from neurofuse.cli._common import (
    DataKwOption,
    RootOption,
    _int_list,
    architecture_kwargs,
    dataset_spec,
    load_dataset,
    metric_cells,
    metrics_table,
    parse_pairs,
)
from neurofuse.cli._partition import FULL, PARTITION_FILE, make_parts, write_partition_file


def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")] = "mnist5k",
    data_kw: DataKwOption = None,
    root: RootOption = None,
    arch: Annotated[str, typer.Option("--arch", "-a", help="Architecture name.")] = "mlp",
    arch_kw: Annotated[
        list[str] | None,
        typer.Option(
            "--arch-kw",
            metavar="KEY=VALUE",
            help="Architecture kwarg, JSON value, repeatable (e.g. hidden=[128,128]); "
            "input size and num_classes come from the dataset.",
        ),
    ] = None,
    partition: Annotated[
        str,
        typer.Option(
            "--partition",
            "-p",
            help="How the training split is divided: sharded | dirichlet | iid, or full "
            "(every model sees all of it).",
        ),
    ] = FULL,
    n_models: Annotated[int, typer.Option("--models", "-n", help="Number of models.")] = 2,
    seed: Annotated[int, typer.Option(help="Seeds data split, partition and models.")] = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs per model.")] = 20,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 128,
    optimizer: Annotated[str, typer.Option(help="adamw | adam | sgd.")] = "adamw",
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    val_fraction: Annotated[
        float, typer.Option(help="Share of each model's part held out for model selection.")
    ] = 0.1,
    alpha_min: Annotated[float, typer.Option(help="Dirichlet: smallest alpha.")] = 1.0,
    min_max_ratio: Annotated[float, typer.Option(help="Dirichlet: alpha_min / alpha_max.")] = 0.2,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default runs/DATASET-ARCH-PARTITION-sSEED)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
) -> None:
    """Train one model per part of a data partition and save them as checkpoints.

    Writes OUT/model_0.safetensors, model_1, ... with a JSON sidecar (dataset, partition,
    class counts, seed, test metrics, training summary) and OUT/partition.json.
    """
    from neurofuse.checkpoint import save_checkpoint
    from neurofuse.evaluate import evaluate
    from neurofuse.models import build
    from neurofuse.train import TrainConfig, train_models
    from neurofuse.utils import resolve_device

    dev = resolve_device(device)
    config = TrainConfig(
        optimizer=optimizer,  # type: ignore[arg-type]  # TrainConfig checks the name
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        val_fraction=val_fraction,
        seed=seed,
        device=dev,
        progress=cli.console.is_terminal,
    )
    spec = dataset_spec(dataset, parse_pairs(data_kw, "--data-kw"), seed, root)
    splits = load_dataset(spec)
    kwargs = architecture_kwargs(arch, parse_pairs(arch_kw, "--arch-kw"), splits)
    build(arch, **kwargs)  # fail on bad kwargs before partitioning or training anything
    params = {}
    if partition == "dirichlet":
        params = {"alpha_min": alpha_min, "min_max_ratio": min_max_ratio}
    part = make_parts(splits, n_models, partition, seed, **params)
    out = out or Path("runs") / f"{dataset}-{arch}-{partition}-s{seed}"
    cli.console.print(
        f"[bold]{dataset}[/bold]: {len(splits.y_train)} train / {len(splits.y_test)} test, "
        f"{splits.num_classes} classes, partition [bold]{part.scheme}[/bold] into "
        f"{n_models}; [bold]{arch}[/bold] {escape(json.dumps(kwargs))} on {dev}"
    )

    trained = train_models(
        lambda i: build(arch, **kwargs),
        splits.x_train,
        splits.y_train,
        list(part.indices),
        config,
        num_classes=splits.num_classes,
    )
    table = metrics_table(f"Test set of {dataset}", "model", ["train samples", "best epoch"])
    stems = []
    for i, (model, result) in enumerate(trained):
        metrics = evaluate(model, splits.x_test, splits.y_test, device=dev)
        stem = f"model_{i}"
        stems.append(stem)
        save_checkpoint(
            model,
            out / stem,
            metadata={
                "dataset": spec,
                "partition": {
                    "scheme": part.scheme,
                    "params": part.params,
                    "seed": seed,
                    "n_parts": n_models,
                    "part": i,
                    "file": PARTITION_FILE,
                    "class_counts": _int_list(part.class_counts[i]),
                },
                "seed": seed,
                "model_seed": seed + i,
                "metrics": {"test": metrics.to_dict()},
                "train_config": {
                    k: v for k, v in config.to_dict().items() if k not in ("progress", "augment")
                },
                "history": _history_summary(result),
            },
        )
        table.add_row(
            stem,
            str(result.num_train),
            str(result.best_epoch),
            *metric_cells(metrics),
        )
    write_partition_file(out, spec, part, seed, stems)
    table.caption = f"saved in {out} (with JSON sidecars and {PARTITION_FILE})"
    cli.console.print(table)


def _history_summary(result: Any) -> dict[str, Any]:
    history = result.history
    return {
        "epochs": len(history),
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "final_train_loss": history[-1].train_loss if history else None,
        "train_loss": [round(h.train_loss, 6) for h in history],
        "val_accuracy": [h.val_accuracy for h in history],
        "num_train": result.num_train,
        "num_val": result.num_val,
        "seconds": round(result.seconds, 3),
    }
