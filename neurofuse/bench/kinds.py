"""The registry of benchmark cell kinds: a suite's ``kind`` (and each cell's) names one.

Every kind lives in its own module (:mod:`~neurofuse.bench.accuracy`,
:mod:`~neurofuse.bench.runtime`, :mod:`~neurofuse.bench.compression`) and gives two functions:
one that runs a cell into its record, and one that writes the kind's section of a suite's
report. :data:`CELL_KINDS` lists them here, in one place; importing a kind module registers
nothing. The kind modules import only the shared :mod:`~neurofuse.bench.records`, never the
runner or this module, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from neurofuse.bench.accuracy import accuracy_report, run_accuracy_cell
from neurofuse.bench.compression import compression_report, run_compression_cell
from neurofuse.bench.runtime import run_runtime_cell, runtime_report
from neurofuse.bench.spec import Cell, MethodRun
from neurofuse.bench.suites import Suite

#: ``run(suite, cell, runs, out, cache, device)``: the cell's record (written by the runner).
CellRunner = Callable[[Suite, Cell, Sequence[MethodRun], Path, Path, torch.device], dict[str, Any]]
#: ``report(suite, records, out)``: the kind's Markdown lines (plots are written into ``out``).
ReportSection = Callable[[Suite, list[dict[str, Any]], Path], list[str]]


@dataclasses.dataclass(frozen=True)
class CellKind:
    """How one kind of cell runs and how its suite's report shows the results."""

    run: CellRunner
    report: ReportSection


CELL_KINDS: dict[str, CellKind] = {
    "accuracy": CellKind(run_accuracy_cell, accuracy_report),
    "runtime": CellKind(run_runtime_cell, runtime_report),
    "compression": CellKind(run_compression_cell, compression_report),
}


def get_kind(name: str) -> CellKind:
    """The cell kind called ``name``; a ValueError listing the kinds if there is none."""
    if name not in CELL_KINDS:
        raise ValueError(
            f"unknown cell kind {name!r}; choose one of {', '.join(sorted(CELL_KINDS))}"
        )
    return CELL_KINDS[name]
