"""The ``neurofuse`` command: train base models, evaluate checkpoints, fuse them, run the demo.

Every command prints rich tables on stdout. A user error (a bad command line, an unknown name,
a missing file, a value out of range, a refused pickle) is printed as one line on stderr,
``neurofuse: error: <message>``, and exits with code 2, without a traceback; anything else is a
bug and keeps its traceback. :mod:`._errors` says which exceptions are which and handles them
once, for every command; ``--debug`` (or ``NEUROFUSE_DEBUG=1``) shows every traceback.

Heavy imports (torch and the library) happen inside the commands, so ``--help`` stays quick.

One module per command group: :mod:`._listing` (datasets, archs, methods, importance),
:mod:`._train`, :mod:`._eval`, :mod:`._fuse`, :mod:`._federate`, :mod:`._demo` and
:mod:`._bench`; shared helpers
in :mod:`._common` (key=value parsing, tables, datasets, architecture kwargs, checkpoints) and
:mod:`._partition` (partition schemes and ``partition.json``). This module holds the typer app,
its global options, the consoles and the command table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from neurofuse._version import __version__
from neurofuse.cli._bench import bench
from neurofuse.cli._demo import demo
from neurofuse.cli._errors import DEBUG_ENV, USER_ERRORS, NeurofuseGroup, set_debug
from neurofuse.cli._eval import eval_
from neurofuse.cli._federate import federate
from neurofuse.cli._fuse import fuse
from neurofuse.cli._listing import archs, datasets, importance, methods
from neurofuse.cli._train import train

app = typer.Typer(
    name="neurofuse",
    cls=NeurofuseGroup,
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


#: the global ``--threads N`` of this invocation (None: not given), for commands that set their
#: own default (``bench`` runs at 2 threads unless told otherwise)
THREADS: dict[str, int | None] = {"value": None}


def _threads_callback(value: int | None) -> int | None:
    THREADS["value"] = value
    if value is not None:
        if value < 1:
            raise typer.BadParameter(f"must be >= 1, got {value}")
        import torch

        torch.set_num_threads(value)
    return value


def _debug_callback(value: bool) -> bool:
    if value:
        set_debug(True)
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
            help="Torch CPU threads for every command (default: torch's choice, one per "
            "physical core; bench: 2). On a shared machine give fewer; 1 is often fastest "
            "for small models.",
        ),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            callback=_debug_callback,
            is_eager=True,
            help="Show the full traceback of every error, user errors included "
            f"(also: {DEBUG_ENV}=1).",
        ),
    ] = False,
) -> None:
    """Fuse trained neural networks into one, without retraining, and compare fusion methods.

    Typical session: **neurofuse train** (base models on a non-IID split), **neurofuse fuse**
    (one fused model), **neurofuse eval** (compare). **neurofuse demo** runs the whole story on
    MNIST on a CPU (README.md gives the time and results of one run).
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
    "federate": federate,
    "demo": demo,
    "bench": bench,
}
for _name, _command in COMMANDS.items():
    app.command(name=_name)(_command)
del _name, _command

__all__ = ["COMMANDS", "THREADS", "USER_ERRORS", "app", "console", "err_console", "main"]
