"""Write a suite's Markdown report (``report.md``) and plots from its cell results."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from neurofuse.bench.aggregate import load_results
from neurofuse.bench.kinds import get_kind
from neurofuse.bench.provenance import code_lines
from neurofuse.bench.suites import Suite
from neurofuse.utils import atomic_write_text


def _settings(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, str] = {}
    for rec in records:
        cell = rec["cell"]
        text = f"`{cell['arch_build']}`, training `{cell['train']}`"
        if "student_build" in cell:
            text += (
                f"; student `{cell['student_build']}`, training `{cell['student_train']}`, "
                f"levels `{cell['levels'] or 'automatic'}`"
            )
        seen.setdefault(cell["arch"], text)
    return [f"- {arch}: {text}" for arch, text in seen.items()]


def write_report(
    suite: Suite, out: Path, command: str, expected_cells: int, suite_cells: int | None = None
) -> Path:
    """Aggregate every finished cell in ``out`` into ``out/report.md`` and PNG plots."""
    records = load_results(out)
    n_done = len(records)
    status = (
        "complete" if n_done >= expected_cells else f"PARTIAL ({n_done}/{expected_cells} cells)"
    )
    if suite_cells is not None and suite_cells > expected_cells:
        status += f"; this run selects {expected_cells} of the suite's {suite_cells} cells"
    seconds = sum(r.get("seconds", 0.0) for r in records)
    lines = [
        f"# neurofuse bench `{suite.name}`",
        "",
        suite.description,
        "",
        f"- Command: `{command}`",
        f"- Status: {status}; compute time of the finished cells {seconds / 60:.1f} min",
        f"- Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"device {records[0].get('device', '?') if records else '?'}, "
        f"{records[0].get('torch_threads', '?') if records else '?'} threads",
        *code_lines(records),
        *_settings(records),
        "",
    ]
    lines += get_kind(suite.kind).report(suite, records, out)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
