"""The ``neurofuse`` command: train base models, evaluate checkpoints, fuse them, run the demo.

Every command prints rich tables on stdout. A user error (an unknown name, a missing file, a
value out of range: the ``ValueError``/``TypeError``/``FileNotFoundError`` the library raises
with a message that names the fix) is printed as one red line on stderr and exits with code 2,
without a traceback; anything else is a bug and keeps its traceback.

Heavy imports (torch and the library) happen inside the commands, so ``--help`` stays quick.

One module per command group: :mod:`._listing` (datasets, archs, methods, importance),
:mod:`._train`, :mod:`._eval`, :mod:`._fuse` and :mod:`._demo`; shared helpers in
:mod:`._common` (error conversion, key=value parsing, tables, datasets, architecture kwargs,
checkpoints) and :mod:`._partition` (partition schemes and ``partition.json``). This module
holds the typer app, its global options, the consoles and the command table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from neurofuse._version import __version__
from neurofuse.cli._bench import bench
from neurofuse.cli._common import (
    USER_ERRORS,
    architecture_kwargs,
    checkpoint_stems,
    dataset_spec,
    fail,
    load_checkpoints,
    load_dataset,
    metric_cells,
    metrics_table,
    names_table,
    parse_pairs,
    resolve_dataset,
    user_errors,
)
from neurofuse.cli._demo import demo
from neurofuse.cli._eval import eval_
from neurofuse.cli._fuse import fuse, fusion_set, recorded_sample_counts
from neurofuse.cli._listing import archs, datasets, importance, methods
from neurofuse.cli._partition import (
    FULL,
    PARTITION_FILE,
    PARTITION_FORMAT,
    make_parts,
    read_partition_file,
    write_partition_file,
)
from neurofuse.cli._train import train

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


# Command name -> function, in the order ``--help`` lists them.
COMMANDS: dict[str, Callable[..., None]] = {
    "datasets": datasets,
    "archs": archs,
    "methods": methods,
    "importance": importance,
    "train": train,
    "eval": eval_,
    "fuse": fuse,
    "demo": demo,
    "bench": bench,
}
for _name, _command in COMMANDS.items():
    app.command(name=_name)(_command)
del _name, _command

__all__ = [
    "COMMANDS",
    "FULL",
    "PARTITION_FILE",
    "PARTITION_FORMAT",
    "USER_ERRORS",
    "app",
    "architecture_kwargs",
    "archs",
    "bench",
    "checkpoint_stems",
    "console",
    "dataset_spec",
    "datasets",
    "demo",
    "err_console",
    "eval_",
    "fail",
    "fuse",
    "fusion_set",
    "importance",
    "load_checkpoints",
    "load_dataset",
    "main",
    "make_parts",
    "methods",
    "metric_cells",
    "metrics_table",
    "names_table",
    "parse_pairs",
    "read_partition_file",
    "recorded_sample_counts",
    "resolve_dataset",
    "train",
    "user_errors",
    "write_partition_file",
]
