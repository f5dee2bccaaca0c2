"""The ``neurofuse`` command: train base models, evaluate checkpoints, fuse them, run the demo.

Every command prints rich tables on stdout. A user error (an unknown name, a missing file, a
value out of range: the ``ValueError``/``TypeError``/``FileNotFoundError`` the library raises
with a message that names the fix) is printed as one red line on stderr and exits with code 2,
without a traceback; anything else is a bug and keeps its traceback.

Heavy imports (torch and the library) happen inside the commands, so ``--help`` stays quick.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neurofuse._version import __version__

app = typer.Typer(
    name="neurofuse",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
"""Exceptions that mean "bad input": shown as one red line and exit code 2."""

PARTITION_FILE = "partition.json"
PARTITION_FORMAT = "neurofuse-partition"
FULL = "full"
"""Pseudo partition scheme: every model trains on the whole training split (seeds differ)."""

F = TypeVar("F", bound=Callable[..., Any])


# ----------------------------------------------------------------------------- plumbing


def fail(message: str) -> typer.Exit:
    """Print ``message`` as one red line on stderr and return the exit (code 2) to raise."""
    text = " ".join(str(message).split())
    err_console.print(
        f"[bold red]error:[/bold red] {escape(text)}", soft_wrap=True, highlight=False
    )
    return typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Turn the library's input errors into :func:`fail` messages for a command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise fail(str(err)) from None

    return wrapper  # type: ignore[return-value]


def parse_pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: json.loads(v)}``; a value that is not JSON stays a string."""
    pairs: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"{flag} expects key=value with a JSON value (e.g. {flag} hidden=[256,256]), "
                f"got {item!r}"
            )
        try:
            pairs[key] = json.loads(raw)
        except json.JSONDecodeError:
            pairs[key] = raw
    return pairs


def metric_cells(metrics: Any) -> list[str]:
    """Accuracy (%), NLL and ECE of a :class:`neurofuse.evaluate.Metrics` as table cells."""
    return [f"{100 * metrics.accuracy:.2f}%", f"{metrics.nll:.4f}", f"{metrics.ece:.4f}"]


def metrics_table(title: str, first: str, extra: Sequence[str] = ()) -> Table:
    """A table whose columns are ``first``, ``extra`` and accuracy / NLL / ECE."""
    table = Table(title=title, title_style="bold", header_style="bold cyan")
    table.add_column(first, style="bold", overflow="fold")
    for column in extra:
        table.add_column(column, justify="right")
    for column in ("accuracy", "NLL", "ECE"):
        table.add_column(column, justify="right")
    return table


def names_table(title: str, names: dict[str, str], column: str = "name") -> Table:
    table = Table(title=title, title_style="bold", header_style="bold cyan")
    table.add_column(column, style="bold green", no_wrap=True)
    table.add_column("description")
    for name, description in names.items():
        table.add_row(name, description)
    return table


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"neurofuse {__version__}")
        raise typer.Exit()


def _threads_callback(value: int | None) -> int | None:
    if value is not None:
        if value < 1:
            raise typer.BadParameter(f"must be >= 1, got {value}")
        import torch

        torch.set_num_threads(value)
    return value


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_version_callback,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            callback=_threads_callback,
            metavar="N",
            help="Torch CPU threads (default: torch's choice). 1 is often fastest for small "
            "models and on busy machines.",
        ),
    ] = None,
) -> None:
    """Fuse trained neural networks into one, without retraining, and compare fusion methods.

    Typical session: **neurofuse train** (base models on a non-IID split), **neurofuse fuse**
    (one fused model), **neurofuse eval** (compare). **neurofuse demo** runs the whole story on
    MNIST in about a minute.
    """


# ----------------------------------------------------------------------------- name tables


@app.command()
@user_errors
def datasets() -> None:
    """List the registered datasets."""
    from neurofuse import data

    console.print(names_table("Datasets", data.available_datasets()))


@app.command()
@user_errors
def archs() -> None:
    """List the model architectures (build kwargs with --arch-kw key=value)."""
    from neurofuse.models import available_architectures

    console.print(names_table("Architectures", available_architectures()))


@app.command()
@user_errors
def methods(
    options: Annotated[
        str | None,
        typer.Option("--options", metavar="METHOD", help="Show this method's options."),
    ] = None,
) -> None:
    """List the fusion methods, or one method's options with their defaults."""
    import neurofuse as nf

    if options is None:
        console.print(names_table("Fusion methods", nf.available_methods(), "method"))
        return
    defaults = nf.method_options(options)
    table = Table(
        title=f"Options of {options}",
        caption="fuse --option key=value",
        title_style="bold",
        header_style="bold cyan",
    )
    table.add_column("option", style="bold green")
    table.add_column("default", justify="right")
    for key, value in defaults.items():
        table.add_row(key, escape(json.dumps(value)))
    if not defaults:
        table.add_row("(none)", "")
    console.print(table)


@app.command()
@user_errors
def importance() -> None:
    """List the neuron importance scores usable with fuse --importance."""
    from neurofuse.importance import available_importance

    console.print(names_table("Importance scores", available_importance(), "importance"))


# ----------------------------------------------------------------------------- data helpers


def dataset_spec(
    name: str, kwargs: dict[str, Any], seed: int, root: str | Path | None = None
) -> dict[str, Any]:
    """The record that reloads a dataset identically: ``load(name, root=, seed=, **kwargs)``."""
    return {
        "name": name,
        "kwargs": kwargs,
        "seed": seed,
        "root": None if root is None else str(root),
    }


def load_dataset(spec: dict[str, Any]) -> Any:
    from neurofuse import data

    return data.load(spec["name"], root=spec.get("root"), seed=spec["seed"], **spec["kwargs"])


def resolve_dataset(
    recorded: Any,
    name: str | None,
    kwargs: dict[str, Any],
    seed: int,
    root: Path | None,
    where: str,
) -> dict[str, Any]:
    """Dataset of a command run on checkpoints: the one recorded in their metadata, unless
    ``--dataset``/``--data-kw``/``--root`` say otherwise. The recorded seed is kept so the
    train/test split is the one the models were trained with."""
    if not isinstance(recorded, dict) or "name" not in recorded:
        if name is None:
            from neurofuse import data

            raise ValueError(
                f"{where} records no dataset; pass --dataset NAME (one of "
                f"{', '.join(data.available_datasets())})"
            )
        return dataset_spec(name, kwargs, seed, root)
    if name is None or name == recorded["name"]:
        return dataset_spec(
            recorded["name"],
            kwargs or dict(recorded.get("kwargs") or {}),
            int(recorded.get("seed", seed)),
            root if root is not None else recorded.get("root"),
        )
    return dataset_spec(name, kwargs, seed, root)


# Values derived from a dataset for architecture kwargs, applied only when the factory takes
# that keyword and the user did not give it (nor one of its alternatives).
_DERIVED_KWARGS: dict[str, Callable[[tuple[int, ...], int], Any]] = {
    "num_classes": lambda shape, k: k,
    "in_features": lambda shape, k: math.prod(shape),
    "in_channels": lambda shape, k: shape[0] if len(shape) >= 2 else None,
    "length": lambda shape, k: shape[1] if len(shape) == 2 else None,
    "input_size": lambda shape, k: list(shape[1:]) if len(shape) == 3 else None,
    "image_size": lambda shape, k: shape[1] if len(shape) == 3 and shape[1] == shape[2] else None,
}
_ALTERNATIVES = {"in_features": ("input_shape",)}


def architecture_kwargs(arch: str, given: dict[str, Any], splits: Any) -> dict[str, Any]:
    """``given`` plus the input size / channels / classes that ``arch`` takes, from ``splits``."""
    from neurofuse.models.registry import _lookup

    factory = _lookup(arch).factory  # an unknown name raises, listing the valid ones
    try:
        accepted = set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # no introspectable signature: fill nothing
        accepted = set()
    shape = tuple(int(s) for s in splits.input_shape)
    kwargs = dict(given)
    for key, derive in _DERIVED_KWARGS.items():
        taken = key in given or any(alt in given for alt in _ALTERNATIVES.get(key, ()))
        value = derive(shape, int(splits.num_classes))
        if key in accepted and not taken and value is not None:
            kwargs[key] = value
    return kwargs


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


def _int_list(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


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


# ----------------------------------------------------------------------------- train


@app.command()
@user_errors
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")] = "mnist5k",
    data_kw: Annotated[
        list[str] | None,
        typer.Option("--data-kw", metavar="KEY=VALUE", help="Dataset option (repeatable)."),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(help="Folder or file the dataset is read from (cifar10, npz, ...)."),
    ] = None,
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
    optimizer: Annotated[str, typer.Option(help="adamw | sgd.")] = "adamw",
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
        optimizer=optimizer,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        val_fraction=val_fraction,
        seed=seed,
        device=dev,
        progress=console.is_terminal,
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
    console.print(
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
    console.print(table)


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


# ----------------------------------------------------------------------------- eval


def checkpoint_stems(paths: Sequence[Path]) -> list[Path]:
    """Unique checkpoint weights paths, in order (``model_*`` globs list both files of one)."""
    from neurofuse.checkpoint import checkpoint_paths

    seen: dict[Path, None] = {}
    for path in paths:
        seen.setdefault(checkpoint_paths(path)[0], None)
    return list(seen)


def load_checkpoints(paths: Sequence[Path], device: Any) -> list[tuple[Path, Any, dict]]:
    from neurofuse.checkpoint import load_checkpoint

    loaded = []
    for path in checkpoint_stems(paths):
        model, sidecar = load_checkpoint(path, device=device)
        loaded.append((path, model, sidecar))
    return loaded


def _count_parameters(model: Any) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,}"


@app.command(name="eval")
@user_errors
def eval_(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoints (stem, .safetensors or .json).")
    ],
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Dataset (default: the checkpoints' own)."),
    ] = None,
    data_kw: Annotated[
        list[str] | None,
        typer.Option("--data-kw", metavar="KEY=VALUE", help="Dataset option (repeatable)."),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(help="Folder or file the dataset is read from (cifar10, npz, ...)."),
    ] = None,
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
    console.print(table)


# ----------------------------------------------------------------------------- fuse


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


@app.command()
@user_errors
def fuse(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoints of the base models (two or more).")
    ],
    method: Annotated[str, typer.Option("--method", "-m", help="Fusion method.")] = "kf_linear",
    importance: Annotated[
        str, typer.Option("--importance", "-i", help="Neuron importance score.")
    ] = "uniform",
    dataset: Annotated[
        str | None,
        typer.Option("--data", "--dataset", "-d", help="Dataset (default: the checkpoints' own)."),
    ] = None,
    data_kw: Annotated[
        list[str] | None,
        typer.Option("--data-kw", metavar="KEY=VALUE", help="Dataset option (repeatable)."),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(help="Folder or file the dataset is read from (cifar10, npz, ...)."),
    ] = None,
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
            console.print(f"[dim]sample_counts {counts} (from the checkpoints' metadata)[/dim]")
    splits = load_dataset(spec)
    idx, set_info = fusion_set(splits, spec, loaded[0], fusion_samples, seed)
    models = [model for _, model, _ in loaded]
    console.print(
        f"Fusing {len(models)} models with [bold]{method}[/bold] (importance {importance}) on "
        f"{len(idx)} samples from the {set_info['source']} of {spec['name']}"
    )
    start = time.perf_counter()
    fused = nf.fuse(
        models,
        (splits.x_train[idx].to(dev), splits.y_train[idx].to(dev)),
        method=method,
        importance=importance,
        levels=level_names,
        seed=seed,
        device=dev,
        progress=console.is_terminal,
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
    console.print(table)

    if out is None:
        console.print("[dim]not saved: pass --out FILE.safetensors to keep the fused model[/dim]")
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
    console.print(f"saved [bold]{path}[/bold] (+ {path.with_suffix('.json').name})")


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


# ----------------------------------------------------------------------------- demo


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for results.json and the chart.")] = Path(
        "demo_output"
    ),
    seed: Annotated[int, typer.Option(help="Seeds the split, the models and the fusion.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="Reduced setting (for tests): smaller, fewer epochs.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "cpu",
) -> None:
    """Two MLPs, each trained on 5 of MNIST's 10 digits, fused into one without retraining."""
    from neurofuse.demo import run_demo

    run_demo(out, seed=seed, quick=quick, device=device, console=console)
