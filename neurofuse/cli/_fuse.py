"""The ``fuse`` command: fuse checkpoints into one model, evaluate it, save it with its
provenance (inputs and their hashes, options, fusion set, metrics, the method's report)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from neurofuse import cli
from neurofuse.cli._common import (
    DataKwOption,
    RootOption,
    _int_list,
    load_checkpoints,
    load_dataset,
    metric_cells,
    metrics_table,
    parse_pairs,
    resolve_dataset,
)
from neurofuse.cli._partition import FULL, PARTITION_FILE, read_partition_file


def fusion_set(
    splits: Any, spec: dict[str, Any], first: tuple[Path, Any, dict], n: int, seed: int
) -> tuple[Any, dict[str, Any]]:
    """Indices of the fusion set and where they came from.

    When the first checkpoint's folder holds the ``partition.json`` of a non-IID training run
    on this very dataset, the set is drawn from that checkpoint's own part (what the first
    client could hold); otherwise from the whole training split.
    """
    from neurofuse import data

    path, _, sidecar = first
    record = read_partition_file(path.parent / PARTITION_FILE)
    recorded = sidecar.get("partition") or {}
    use_part = (
        record is not None
        and record.get("scheme") not in ("iid", FULL)
        and record.get("dataset") == spec
        and isinstance(recorded.get("part"), int)
        and 0 <= recorded["part"] < len(record["indices"])
    )
    if use_part:
        assert record is not None
        part = data.Partition.from_dict(record)
        from_part = recorded["part"]
        idx = data.fusion_indices(splits.y_train, part, n, seed=seed, from_part=from_part)
        source = {
            "source": f"part {recorded['part']} of the {record['scheme']} partition",
            "partition_file": str(path.parent / PARTITION_FILE),
            "scheme": record["scheme"],
            "from_part": from_part,
        }
    else:
        idx = data.fusion_indices(splits.y_train, None, n, seed=seed)
        source = {"source": "whole training split"}
    return idx, {"size": len(idx), **source, "seed": seed, "indices": _int_list(idx)}


def fuse(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoints of the base models (two or more).")
    ],
    method: Annotated[str, typer.Option("--method", "-m", help="Fusion method.")] = "kf_linear",
    importance: Annotated[
        str | None,
        typer.Option(
            "--importance",
            "-i",
            help="Neuron importance score (default: uniform, for methods that use importance).",
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option("--data", "--dataset", "-d", help="Dataset (default: the checkpoints' own)."),
    ] = None,
    data_kw: DataKwOption = None,
    root: RootOption = None,
    fusion_samples: Annotated[
        int, typer.Option(help="Size of the fusion set drawn from the training split.")
    ] = 400,
    seed: Annotated[int, typer.Option(help="Seeds the fusion set and the method.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Where to save the fused checkpoint (.safetensors).")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            metavar="KEY=VALUE",
            help="Method option, JSON value, repeatable (see: neurofuse methods --options M).",
        ),
    ] = None,
    levels: Annotated[
        str | None,
        typer.Option(help="Comma-separated module names, each ending a level (default: auto)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
) -> None:
    """Fuse checkpoints into one model, evaluate it and save it with its provenance."""
    import neurofuse as nf
    from neurofuse.checkpoint import save_checkpoint
    from neurofuse.evaluate import evaluate, evaluate_ensemble
    from neurofuse.utils import resolve_device, to_jsonable

    dev = resolve_device(device)
    options = parse_pairs(option, "--option")
    takes = nf.method_options(method)  # unknown method: fail before loading anything
    uses_importance = nf.method_info(method).caps.importance
    level_names = [name.strip() for name in levels.split(",") if name.strip()] if levels else None
    loaded = load_checkpoints(checkpoints, dev)
    if len(loaded) < 2:
        raise ValueError(f"fusion needs two or more checkpoints, got {len(loaded)}")
    spec = resolve_dataset(
        loaded[0][2].get("dataset"),
        dataset,
        parse_pairs(data_kw, "--data-kw"),
        seed,
        root,
        str(loaded[0][0]),
    )
    if "sample_counts" in takes and "sample_counts" not in options:
        counts = recorded_sample_counts([sidecar for _, _, sidecar in loaded])
        if counts is not None:
            options["sample_counts"] = counts
            cli.console.print(f"[dim]sample_counts {counts} (from the checkpoints' metadata)[/dim]")
    splits = load_dataset(spec)
    idx, set_info = fusion_set(splits, spec, loaded[0], fusion_samples, seed)
    models = [model for _, model, _ in loaded]
    # what the user gave goes to nf.fuse as given (it refuses, in one line, an argument the
    # method would ignore); the CLI's own default importance only to a method that uses it
    if importance is None and uses_importance:
        importance = "uniform"
    given: dict[str, Any] = {"importance": importance} if importance is not None else {}
    if level_names is not None:
        given["levels"] = level_names
    cli.console.print(
        f"Fusing {len(models)} models with [bold]{method}[/bold]"
        + (f" (importance {importance})" if importance is not None else "")
        + f" on {len(idx)} samples from the {set_info['source']} of {spec['name']}"
    )
    start = time.perf_counter()
    fused = nf.fuse(
        models,
        (splits.x_train[idx].to(dev), splits.y_train[idx].to(dev)),
        method=method,
        seed=seed,
        device=dev,
        progress=cli.console.is_terminal,
        **given,
        **options,
    )
    seconds = time.perf_counter() - start

    table = metrics_table(f"Test set of {spec['name']}", "model")
    for path, model, _ in loaded:
        table.add_row(str(path), *metric_cells(evaluate(model, splits.x_test, splits.y_test)))
    ensemble = evaluate_ensemble(models, splits.x_test, splits.y_test, device=dev)
    table.add_row(f"ensemble ({len(models)}x cost)", *metric_cells(ensemble), style="blue")
    metrics = evaluate(fused, splits.x_test, splits.y_test, device=dev)
    table.add_row(f"fused: {method}", *metric_cells(metrics), style="bold green")
    table.caption = f"fusion took {seconds:.2f} s on {dev}"
    cli.console.print(table)

    if out is None:
        cli.console.print(
            "[dim]not saved: pass --out FILE.safetensors to keep the fused model[/dim]"
        )
        return
    if getattr(fused, "neurofuse_config", None) is None:
        raise ValueError(
            f"method {method!r} returned a {type(fused).__name__}, not a model of the "
            "neurofuse zoo, so it cannot be saved as one checkpoint; its metrics are shown "
            "above, and the base checkpoints already hold all of its weights"
        )
    report = dict(getattr(fused, "neurofuse_report", {}))
    metadata = {
        "dataset": spec,
        "fusion": {
            "method": method,
            "options": to_jsonable(report.pop("options", options)),
            "importance": importance,
            "levels": level_names,
            "seed": seed,
            "seconds": round(seconds, 3),
            "device": str(dev),
            "fusion_set": set_info,
        },
        "inputs": [
            {
                "path": _relative_to(path, out),
                "sha256": sidecar["weights"]["sha256"],
                "model": sidecar.get("model"),
                "partition": sidecar.get("partition"),
            }
            for path, _, sidecar in loaded
        ],
        "metrics": {"test": metrics.to_dict(), "ensemble_test": ensemble.to_dict()},
        "report": _jsonable_or_repr(report),
    }
    path = save_checkpoint(fused, out, metadata=metadata)
    cli.console.print(f"saved [bold]{path}[/bold] (+ {path.with_suffix('.json').name})")


def recorded_sample_counts(sidecars: Sequence[dict[str, Any]]) -> list[int] | None:
    """Training samples of each checkpoint (the sum of its recorded class counts), for
    methods that weigh models by data size (FedAvg); None when one checkpoint lacks them."""
    counts = []
    for sidecar in sidecars:
        class_counts = (sidecar.get("partition") or {}).get("class_counts")
        if not isinstance(class_counts, list) or not class_counts:
            return None
        counts.append(int(sum(class_counts)))
    return counts


def _relative_to(path: Path, out: Path) -> str:
    """``path`` as seen from the folder of ``out`` (portable when both move together)."""
    return os.path.relpath(path.resolve(), Path(out).resolve().parent)


def _jsonable_or_repr(report: dict[str, Any]) -> dict[str, Any]:
    """The method's diagnostics as JSON; values that do not convert are kept as ``repr``."""
    from neurofuse.utils import to_jsonable

    clean = {}
    for key, value in report.items():
        try:
            clean[str(key)] = to_jsonable(value)
        except TypeError:
            clean[str(key)] = repr(value)
    return clean
