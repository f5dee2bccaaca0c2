"""Benchmarks of fusion methods: suites of cells (dataset x architecture x regime x models x
seed), a resumable runner writing one JSON per cell, aggregation over seeds (mean ± std, EGR),
Markdown tables and PNG plots. Entry point: :func:`bench` (``neurofuse bench SUITE``).
The kinds of cell (accuracy, runtime, compression) are listed in :data:`CELL_KINDS`."""

from neurofuse.bench.aggregate import egr, load_results, mean_std, summarise
from neurofuse.bench.command import bench
from neurofuse.bench.kinds import CELL_KINDS, CellKind
from neurofuse.bench.runner import run_suite
from neurofuse.bench.spec import Cell, MethodRun, Split
from neurofuse.bench.suites import SUITES, Suite, available_suites, get_suite, register_suite

__all__ = [
    "CELL_KINDS",
    "SUITES",
    "Cell",
    "CellKind",
    "MethodRun",
    "Split",
    "Suite",
    "available_suites",
    "bench",
    "egr",
    "get_suite",
    "load_results",
    "mean_std",
    "register_suite",
    "run_suite",
    "summarise",
]
