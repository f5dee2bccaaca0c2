"""Commands that list the name tables: datasets, architectures, fusion methods (and a
method's options) and importance scores."""

from __future__ import annotations

import dataclasses
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
        typer.Option(
            "--options",
            metavar="METHOD",
            help="Show this method's options: default, description, which methods use each.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the listing as JSON on stdout.")
    ] = False,
) -> None:
    """List the fusion methods, or one method's options with their defaults and descriptions."""
    import neurofuse as nf
    from neurofuse.methods import option_docs

    if options is None:
        listing = nf.available_methods()
        if as_json:
            caps = {m: dataclasses.asdict(nf.method_info(m).caps) for m in listing}
            print(
                json.dumps(
                    {m: {"description": d, "capabilities": caps[m]} for m, d in listing.items()},
                    indent=2,
                )
            )
        else:
            cli.console.print(names_table("Fusion methods", listing, "method"))
        return
    defaults = nf.method_options(options)
    docs = option_docs(nf.method_info(options).options)
    users = {
        key: [m for m in nf.available_methods() if key in nf.method_options(m)] for key in defaults
    }
    if as_json:
        print(
            json.dumps(
                {
                    key: {"default": value, "description": docs.get(key, ""), "used_by": users[key]}
                    for key, value in defaults.items()
                },
                indent=2,
                default=repr,
            )
        )
        return
    table = Table(
        title=f"Options of {options}",
        caption="fuse --option key=value",
        title_style="bold",
        header_style="bold cyan",
    )
    table.add_column("option", style="bold green", no_wrap=True)
    table.add_column("default", justify="right")
    table.add_column("description")
    table.add_column("also used by", style="dim")
    for key, value in defaults.items():
        others = [m for m in users[key] if m != options]
        shown = ", ".join(others) if len(others) <= 4 else f"{len(others)} other methods"
        table.add_row(key, escape(json.dumps(value)), escape(docs.get(key, "")), shown or "-")
    if not defaults:
        table.add_row("(none)", "", "", "")
    cli.console.print(table)


def importance() -> None:
    """List the neuron importance scores usable with fuse --importance."""
    from neurofuse.importance import available_importance

    cli.console.print(names_table("Importance scores", available_importance(), "importance"))
