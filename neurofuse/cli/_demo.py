"""The ``demo`` command (the demo itself is :mod:`neurofuse.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neurofuse import cli


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

    run_demo(out, seed=seed, quick=quick, device=device, console=cli.console)
