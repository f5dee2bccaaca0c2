"""Commands that list the name tables: datasets, architectures, fusion methods (and a
method's options) and importance scores."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from neurofuse import cli
from neurofuse.cli._common import names_table


def datasets() -> None:
    """List the registered datasets."""
    from neurofuse import data

    cli.console.print(names_table("Datasets", data.available_datasets()))


def archs() -> None:
    """List the model architectures (build kwargs with --arch-kw key=value)."""
    from neurofuse.models import available_architectures

    cli.console.print(names_table("Architectures", available_architectures()))


def methods(
    options: Annotated[
        str | None,
        typer.Option("--options", metavar="METHOD", help="Show this method's options."),
    ] = None,
) -> None:
    """List the fusion methods, or one method's options with their defaults."""
    import neurofuse as nf

    if options is None:
        cli.console.print(names_table("Fusion methods", nf.available_methods(), "method"))
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
    cli.console.print(table)


def importance() -> None:
    """List the neuron importance scores usable with fuse --importance."""
    from neurofuse.importance import available_importance

    cli.console.print(names_table("Importance scores", available_importance(), "importance"))
