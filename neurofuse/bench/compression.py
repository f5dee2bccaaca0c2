"""The ``compression`` cell (Table 7 analogue, paper section 5.5.2): fuse one large model into a
small one with KF, using data from a third of the classes, against distillation on that data.

The *teacher* (the cell's ``arch``, wide or deep) trains on the whole training split. The
*student* (``cell.student``, narrow or shallow) trains on one third of the classes only: the
first part of a 3-way sharded partition (classes permuted by the seed, then split). The fusion
set is ``cell.fusion_samples`` class-balanced samples from that same third. Every method turns
the teacher into the student's architecture: ``nf.fuse([teacher], fusion_set, target=student)``
(KF Gradient and KD start from the trained student's weights, ``init_model=None``; KF Linear
refits every level in closed form). The cell's ``levels`` go only to methods that use levels
(KF Gradient), the importance score only to methods that use one. Accuracy is measured on the whole test set (all classes)
and on the test samples of the student's classes. Its report section is one table of both
accuracies and one bar plot.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neurofuse as nf
from neurofuse.bench.aggregate import mean_std
from neurofuse.bench.basemodels import dataset, load_or_train, models_digest
from neurofuse.bench.plots import _pyplot
from neurofuse.bench.records import finished_methods, partial_path, write_record
from neurofuse.bench.spec import Cell, MethodRun
from neurofuse.bench.suites import Suite
from neurofuse.bench.tables import display
from neurofuse.data import DataSplits, fusion_indices, partition
from neurofuse.evaluate import evaluate


def _scores(model: nn.Module, data: DataSplits, seen: torch.Tensor, device: Any) -> dict:
    metrics = evaluate(model, data.x_test, data.y_test, device=device).to_dict()
    mask = torch.isin(data.y_test, seen)
    metrics["accuracy_seen_classes"] = evaluate(
        model, data.x_test[mask], data.y_test[mask], device=device
    ).accuracy
    return metrics


def run_compression_cell(
    suite: Suite,
    cell: Cell,
    runs: Sequence[MethodRun],
    out: Path,
    cache: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Train the teacher and the student, then turn the teacher into the student's
    architecture with every run (see the module)."""
    if cell.student is None:
        raise ValueError(f"compression cell {cell.cell_id} has no student architecture")
    start = time.perf_counter()
    data = dataset(cell.dataset)
    part = partition(data.y_train, 3, "sharded", seed=cell.seed, num_classes=data.num_classes)
    own = part.indices[0]
    seen = torch.unique(data.y_train[own])
    cache.mkdir(parents=True, exist_ok=True)
    teacher, t_info = load_or_train(
        cache / f"{cell.models_id}_teacher",
        cell.arch,
        data,
        torch.arange(data.num_train),
        1000 * cell.seed,
        device,
    )
    student, s_info = load_or_train(
        cache / f"{cell.models_id}_student", cell.student, data, own, 1000 * cell.seed + 1, device
    )
    idx = fusion_indices(data.y_train, part, cell.fusion_samples, seed=cell.seed, from_part=0)
    fusion = (data.x_train[idx], data.y_train[idx])
    digest = models_digest([teacher, student])
    record: dict[str, Any] = {
        "cell": cell.describe(),
        "base_digest": digest,
        "train": {"teacher": t_info, "student": s_info},
        "teacher": _scores(teacher, data, seen, device),
        "student": _scores(student, data, seen, device),
        "seen_classes": seen.tolist(),
        "fusion_set": {"n": len(idx), "classes": sorted(set(fusion[1].tolist()))},
        "methods": {},
    }
    partial = partial_path(out, cell)
    # resume: keep what a killed run finished with these same models
    record["methods"] = finished_methods(out, cell, digest)
    for run in runs:
        if run.key in record["methods"]:
            continue
        entry: dict[str, Any] = run.entry()
        if run.archs and cell.arch_label not in run.archs:
            record["methods"][run.key] = {**entry, "status": "n/a"}
            continue
        t0 = time.perf_counter()
        try:
            fused = nf.fuse(
                [teacher],
                fusion,
                method=run.method,
                seed=cell.seed,
                device=device,
                **run.fuse_arguments(levels=cell.levels, target=copy.deepcopy(student)),
                **run.kwargs(),
            )
            entry.update(status="ok", seconds=time.perf_counter() - t0)
            entry.update(_scores(fused, data, seen, device))
        except Exception as exc:  # one failing method must not stop the suite
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
            entry["seconds"] = time.perf_counter() - t0
        record["methods"][run.key] = entry
        write_record(partial, record)
    record["seconds"] = time.perf_counter() - start
    record["device"] = str(device)
    record["torch_threads"] = torch.get_num_threads()
    return record


def compression_report(suite: Suite, records: list[dict[str, Any]], out: Path) -> list[str]:
    """The report section of a compression suite: :func:`compression_table` and
    :func:`compression_plot` (written into ``out``)."""
    keys = [r.key for r in suite.methods]
    lines = [
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
    return lines


def compression_table(records: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """Rows: student, teacher, then every method run; columns: each cell's architecture pair,
    test accuracy on all classes / on the student's classes (%, mean ± std over seeds)."""
    pairs = list(dict.fromkeys(r["cell"]["arch"] for r in records))

    def fmt(values: list[float]) -> str:
        if not values:
            return "-"
        m, s = mean_std(values)
        return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if len(values) > 1 else "")

    def entry(rec: dict[str, Any], row: str) -> dict[str, Any] | None:
        if row in ("Student (trained on a third of the classes)", "Teacher (all classes)"):
            return rec["student" if row.startswith("Student") else "teacher"]
        e = rec["methods"].get(row)
        return e if e and e.get("status") == "ok" else None

    header = ["model"] + [f"{p}: all / seen classes" for p in pairs]
    rows = ["Student (trained on a third of the classes)", "Teacher (all classes)", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = []
        for p in pairs:
            recs = [r for r in records if r["cell"]["arch"] == p]
            es = [e for r in recs if (e := entry(r, row))]
            if not es:
                na = any(r["methods"].get(row, {}).get("status") == "n/a" for r in recs)
                cells.append("n/a" if na else "-")
                continue
            all_ = fmt([e["accuracy"] for e in es])
            seen = fmt([e["accuracy_seen_classes"] for e in es])
            cells.append(f"{all_} / {seen}")
        lines.append("| " + " | ".join([display(row), *cells]) + " |")
    return "\n".join(lines)


def compression_plot(records: list[dict[str, Any]], keys: Sequence[str], path: Path) -> Path:
    """One bar panel per architecture pair: accuracy on all classes of the student, the
    teacher and every method run (mean over seeds)."""
    plt = _pyplot()
    pairs = list(dict.fromkeys(r["cell"]["arch"] for r in records))
    rows = ["student", "teacher", *keys]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 5), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        recs = [r for r in records if r["cell"]["arch"] == pair]
        values = []
        for row in rows:
            if row in ("student", "teacher"):
                accs = [r[row]["accuracy"] for r in recs]
            else:
                accs = [
                    e["accuracy"]
                    for r in recs
                    if (e := r["methods"].get(row)) and e.get("status") == "ok"
                ]
            values.append(100 * sum(accs) / len(accs) if accs else float("nan"))
        colors = ["tab:gray", "tab:gray"] + ["tab:blue"] * len(keys)
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), [display(r) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy, all classes (%)")
        ax.set_title(pair, fontsize=9)
    fig.suptitle("compression: teacher fused into the student's architecture")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
