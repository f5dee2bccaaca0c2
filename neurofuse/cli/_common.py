"""Helpers shared by the commands: ``key=value`` parsing, metric tables, the dataset record of
a run, architecture kwargs derived from a dataset, and loading checkpoints."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

#: ``--data-kw KEY=VALUE`` (repeatable) and ``--root``, shared by train, eval and fuse
DataKwOption = Annotated[
    list[str] | None,
    typer.Option("--data-kw", metavar="KEY=VALUE", help="Dataset option (repeatable)."),
]
RootOption = Annotated[
    Path | None,
    typer.Option(help="Folder or file the dataset is read from (cifar10, npz, ...)."),
]


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
    from neurofuse.models import architecture_factory

    factory = architecture_factory(arch)  # an unknown name raises, listing the valid ones
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


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="MODULE:CLASS",
        help="Your model class (or factory) for plain weights files, 'package.module:Name'; "
        "the current directory is importable.",
    ),
]
ModelKwOption = Annotated[
    list[str] | None,
    typer.Option(
        "--model-kw",
        metavar="KEY=VALUE",
        help="Argument of --model or --arch, JSON value (repeatable).",
    ),
]
ArchOption = Annotated[
    str | None,
    typer.Option(
        "--arch", help="A neurofuse architecture for plain weights files (see: neurofuse archs)."
    ),
]


def model_spec(model: str | None, arch: str | None, model_kw: Sequence[str] | None) -> Any:
    """The :class:`neurofuse.sources.ModelSpec` of ``--model`` / ``--arch`` / ``--model-kw``."""
    from neurofuse.sources import ModelSpec

    kwargs = parse_pairs(model_kw, "--model-kw")
    if kwargs and model is None and arch is None:
        raise ValueError("--model-kw needs --model MODULE:CLASS or --arch NAME")
    return ModelSpec(target=model, arch=arch, kwargs=kwargs)


def load_checkpoints(
    paths: Sequence[Path], device: Any, spec: Any = None, splits: Any = None
) -> list[Any]:
    """Every model named by ``paths`` (:func:`neurofuse.sources.load_models`: checkpoints,
    plain state dicts, plain safetensors, folders); a zoo ``--arch`` takes its input and class
    sizes from ``splits`` when given."""
    from neurofuse.sources import load_models

    derived = None
    if splits is not None:

        def derived(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
            return architecture_kwargs(arch, kwargs, splits)

    return load_models(paths, spec, device, derived)


def _int_list(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]
