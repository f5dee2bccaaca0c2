"""Write a suite's Markdown report (``report.md``) and plots from its cell results."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from neurofuse.bench import plots, tables
from neurofuse.bench.aggregate import load_results, summarise
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
        *_settings(records),
        "",
    ]
    if suite.kind == "runtime":
        for rec in records:
            lines += [
                f"## seed {rec['cell']['seed']} ({rec['cell']['split']}, {rec['repeats']} repeats)",
                "",
                tables.runtime_table(rec),
                "",
            ]
            ok = [
                (k, e["median_seconds"])
                for k, e in rec["methods"].items()
                if e.get("status") == "ok"
            ]
            if ok:
                png = f"runtime_seed{rec['cell']['seed']}.png"
                plots.plot_runtime(
                    [k for k, _ in ok],
                    [s for _, s in ok],
                    out / png,
                    f"{suite.name}: median fusion time",
                )
                lines += [f"![runtime]({png})", ""]
    elif suite.kind == "compression":
        from neurofuse.bench.compression import compression_plot, compression_table

        keys = [r.key for r in suite.methods]
        lines += [
            "Test accuracy (%) on all 10 classes / on the student's classes, mean ± sample std "
            "over seeds. Every method produces a model of the student's architecture from the "
            "teacher, using only fusion samples of the student's third of the classes.",
            "",
            compression_table(records, keys),
            "",
        ]
        if records:
            compression_plot(records, keys, out / "compression.png")
            lines += ["![compression](compression.png)", ""]
    else:
        lines += [
            "Accuracy is test accuracy (%) as mean ± sample std over seeds; `*`: some seed "
            "errored; `n/a`: method not defined for this many models. EGR = (fused − best base) / "
            "(ensemble − best base) on seed-averaged accuracies.",
            "",
        ]
        for arch, group in summarise(records, [r.key for r in suite.methods]).items():
            seeds = {c: sorted(s) for c, s in group.seeds.items()}
            lines += [
                f"## {arch}",
                "",
                f"Seeds per column: `{seeds}`",
                "",
                "### Best neurofuse run per split",
                "",
                tables.best_table(group),
                "",
                "### Accuracy",
                "",
                tables.accuracy_table(group),
                "",
                "### EGR",
                "",
                tables.egr_table(group),
                "",
                "### Fusion wall time (s, mean over seeds)",
                "",
                tables.seconds_table(group),
                "",
            ]
            acc_png, n_png, rt_png = (
                f"{arch}_accuracy.png",
                f"{arch}_vs_models.png",
                f"{arch}_runtime.png",
            )
            plots.plot_accuracy(group, out / acc_png)
            lines += [f"![accuracy]({acc_png})", ""]
            if plots.model_counts(group.columns):
                plots.plot_vs_models(group, out / n_png)
                lines += [f"![vs models]({n_png})", ""]
            names, secs = plots.group_runtime(group)
            if names:
                plots.plot_runtime(names, secs, out / rt_png, f"{arch}: mean fusion time")
                lines += [f"![runtime]({rt_png})", ""]
        errors = sorted(
            {
                f"{k}: {e.get('error', '')[:160]}"
                for r in records
                for k, e in r["methods"].items()
                if e.get("status") == "error"
            }
        )
        if errors:
            lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
