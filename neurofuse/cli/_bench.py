"""``neurofuse bench SUITE``: run a benchmark suite (resumable) and write its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

#: the registered suites (neurofuse.bench.suites.SUITES; listed here so that ``--help`` does
#: not import the benchmark machinery; a test keeps the two equal)
SUITE_NAMES = (
    "paper-mlp",
    "paper-cnn",
    "mnist1d",
    "paper-vit",
    "runtime",
    "fusion-size",
    "compression",
    "ablation-mlp",
    "quick",
)


def bench(
    suite: Annotated[
        str,
        typer.Argument(help="suite name: " + ", ".join(SUITE_NAMES)),
    ],
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds, e.g. 0,1,2")] = None,
    out: Annotated[
        Path | None, typer.Option(help="result folder (default benchmarks/results/SUITE)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: auto)")] = None,
    methods: Annotated[
        str | None, typer.Option(help="only these methods/labels, comma-separated")
    ] = None,
    resume: Annotated[bool, typer.Option(help="reuse finished cells")] = True,
    cache: Annotated[
        Path | None, typer.Option(help="trained-model cache (default OUT/cache)")
    ] = None,
    splits: Annotated[
        str | None, typer.Option(help="only these splits, e.g. noniid2,sharded2 (default all)")
    ] = None,
    report_only: Annotated[
        bool, typer.Option(help="only rewrite report.md and plots from finished cells")
    ] = False,
    rerun: Annotated[
        str | None,
        typer.Option(
            help="fuse these methods/labels again in finished cells (rows whose code changed), "
            "comma-separated"
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch CPU threads [default: the global --threads, else 2, the setting the "
            "committed reports were measured with]",
            min=1,
        ),
    ] = None,
) -> None:
    """Run a benchmark suite cell by cell (a killed run resumes) and write its report and plots.

    Suites: **paper-mlp**, **paper-cnn**, **mnist1d**, **paper-vit** (the paper's tables),
    **runtime**, **fusion-size**, **compression**, **ablation-mlp**, **quick** (a smoke test).
    """
    from neurofuse import cli
    from neurofuse.bench.command import bench as run_bench

    if threads is None:
        threads = cli.THREADS["value"] or 2

    path = run_bench(
        suite,
        seeds,
        out,
        device,
        methods,
        resume,
        cache=cache,
        splits=splits,
        report_only=report_only,
        threads=threads,
        rerun=rerun,
    )
    typer.echo(f"report: {path}")
