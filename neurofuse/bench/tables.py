"""Markdown tables shaped like the paper's Tables 12-14 (rows: method | importance score,
columns: splits) plus the runtime table (Table 10 analogue)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from neurofuse.bench.aggregate import (
    BASE_ROWS,
    Group,
    Stat,
    best_baseline,
    best_neurofuse,
    mean_std,
)


def display(row: str) -> str:
    """``"KF Linear | conductance"`` -> ``"KF Linear (conductance)"`` (a pipe would split a
    Markdown cell)."""
    label, _, importance = row.partition(" | ")
    return f"{label} ({importance})" if importance else label


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[display(r[0]), *r[1:]] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_accuracy(stat: Stat | None) -> str:
    """``"93.1 ± 0.4"`` (percent; no ± for a single seed), ``n/a``, ``error`` or ``-``."""
    if stat is None:
        return "-"
    if not stat.values:
        return "n/a" if stat.status == "n/a" else stat.status
    mean, std = mean_std(stat.values)
    text = f"{100 * mean:.1f}"
    if len(stat.values) > 1:
        text += f" ± {100 * std:.1f}"
    return text + ("*" if stat.errors else "")


def format_egr(stat: Stat | None) -> str:
    if stat is None or not stat.values:
        return "-" if stat is None else ("n/a" if stat.status == "n/a" else stat.status)
    return "undef." if stat.egr is None else f"{stat.egr:.2f}"


def accuracy_table(group: Group) -> str:
    """Test accuracy (%) mean ± std over seeds; ``*`` marks an entry where some seed errored."""
    rows = [
        [row] + [format_accuracy(group.get(row, c)) for c in group.columns] for row in group.rows
    ]
    return _markdown(["method (importance)", *group.columns], rows)


def egr_table(group: Group) -> str:
    """EGR of every row (ratio of seed-averaged accuracies; see :mod:`.aggregate`)."""
    rows = [
        [row] + [format_egr(group.get(row, c)) for c in group.columns]
        for row in group.rows
        if row != BASE_ROWS[1]
    ]
    return _markdown(["method (importance)", *group.columns], rows)


def seconds_table(group: Group) -> str:
    """Mean fusion wall time (s) per method and split."""
    rows = []
    for row in group.rows[len(BASE_ROWS) :]:
        cells = []
        for c in group.columns:
            stat = group.get(row, c)
            cells.append(
                f"{sum(stat.seconds) / len(stat.seconds):.2f}" if stat and stat.seconds else "-"
            )
        rows.append([row, *cells])
    return _markdown(["method (importance)", *group.columns], rows)


def cost_table(group: Group) -> str | None:
    """Parameters of the rows that are not one network (the ensemble: one model per member;
    multi-head models), as a multiple of one base model's; ``None`` when every row is one."""
    rows = []
    for row in group.rows[len(BASE_ROWS) :]:
        stats = [group.get(row, c) for c in group.columns]
        if all(s is None or s.single_model for s in stats):
            continue
        rows.append(
            [row]
            + [
                f"{sum(s.parameters) / len(s.parameters):.2f}x" if s and s.parameters else "-"
                for s in stats
            ]
        )
    if not rows:
        return None
    members = [c.split()[1] if len(c.split()) > 1 else "-" for c in group.columns]
    rows.insert(0, [BASE_ROWS[2], *[f"{m}x" if m.isdigit() else m for m in members]])
    return _markdown(["method (importance)", *group.columns], rows)


def best_table(group: Group) -> str:
    """Per split: the best HF/KF row, its accuracy, EGR, and margin over the best base model."""
    rows = []
    for c in group.columns:
        found = best_neurofuse(group, c)
        rival = best_baseline(group, c)
        base, ens = group.get(BASE_ROWS[1], c), group.get(BASE_ROWS[2], c)
        if found is None or base is None:
            rows.append([c, *["-"] * 9])
            continue
        row, stat = found
        margin = 100 * (stat.mean - base.mean)  # type: ignore[operator]
        versus = ["-", "-", "-"]
        if rival is not None:
            gap = 100 * (stat.mean - rival[1].mean)  # type: ignore[operator]
            versus = [display(rival[0]), format_accuracy(rival[1]), f"{gap:+.1f}"]
        rows.append(
            [
                c,
                display(row),
                format_accuracy(stat),
                format_accuracy(base),
                format_accuracy(ens),
                format_egr(stat),
                f"{margin:+.1f}",
                *versus,
            ]
        )
    header = [
        "split",
        "best neurofuse run",
        "accuracy",
        "best base",
        "ensemble",
        "EGR",
        "vs best base (pp)",
        "strongest baseline",
        "its accuracy",
        "vs strongest baseline (pp)",
    ]
    return _markdown(header, rows)


def runtime_table(record: dict[str, Any]) -> str:
    """Median and warm median fusion time, the warm median against a forward pass of the base
    models, peak memory, ratio to OTFusion and accuracy, one row per method."""
    rows = []
    # every method's process times its own forward pass, and one slow measurement flatters that
    # method's ratio; the run's median forward pass is a steadier unit for comparing methods
    forwards = [
        e["forward_seconds"]
        for e in record["methods"].values()
        if e.get("status") == "ok" and e.get("forward_seconds")
    ]
    run_forward = statistics.median(forwards) if forwards else None
    for key, e in record["methods"].items():
        if e.get("status") != "ok":
            rows.append([key, e.get("status", "?"), *["-"] * 6, e.get("error", "")[:80]])
            continue
        ratio = e.get("ratio_to_otfusion")
        warm, forward = e.get("warm_median_seconds"), e.get("ratio_to_forward")
        rows.append(
            [
                key,
                f"{e['median_seconds']:.3f}",
                "-" if warm is None else f"{warm:.3f}",
                "-" if forward is None else f"{forward:.1f}×",
                "-" if warm is None or not run_forward else f"{warm / run_forward:.1f}×",
                f"{e['peak_memory_mib']:.0f}",
                "-" if ratio is None else f"{ratio:.2f}×",
                f"{100 * e['accuracy']:.1f}",
                ", ".join(f"{t:.3f}" for t in e["times"]),
            ]
        )
    header = [
        "method (importance)",
        "median s",
        "warm median s",
        "warm ÷ forward pass",
        "warm ÷ median forward pass of the run",
        "peak MiB",
        "÷ OTFusion",
        "acc %",
        "all times (s)",
    ]
    return _markdown(header, rows)
