"""PNG plots of a suite: accuracy per method, accuracy against number of models, and runtime
per method. matplotlib is imported lazily with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neurofuse.bench.aggregate import BASE_ROWS, Group


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best_per_label(group: Group, column: str) -> dict[str, float]:
    """Highest mean accuracy of each method label (over importance scores) in ``column``."""
    best: dict[str, float] = {}
    for row in group.rows:
        stat = group.get(row, column)
        if stat is None or stat.mean is None:  # None: no values
            continue
        label = row.split(" | ")[0]
        best[label] = max(best.get(label, -1.0), stat.mean)
    return best


def plot_accuracy(group: Group, path: Path) -> Path:
    """One horizontal bar panel per split: each method's best-importance accuracy."""
    plt = _pyplot()
    cols = group.columns
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 6), sharey=True, squeeze=False)
    labels = list(dict.fromkeys(r.split(" | ")[0] for r in group.rows))
    for ax, col in zip(axes[0], cols, strict=True):
        best = _best_per_label(group, col)
        values = [100 * best.get(lbl, float("nan")) for lbl in labels]
        ax.barh(range(len(labels)), values, color="tab:blue")
        ax.set_title(col, fontsize=9)
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy (%)")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{group.arch}: accuracy per method (best importance score)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_counts(columns: list[str]) -> set[int]:
    """The distinct numbers of models among non-IID/sharded columns named ``"<regime> <n>"``
    (columns with a variant, e.g. ``"non-IID 2 n100_aug0"``, do not count); empty when fewer
    than two, since a curve over the number of models needs two points."""
    ns = {
        int(c.split()[-1])
        for c in columns
        if c.startswith(("non-IID ", "sharded "))
        and len(c.split()) == 2
        and c.split()[-1].isdigit()
    }
    return ns if len(ns) > 1 else set()


def plot_vs_models(group: Group, path: Path) -> Path:
    """Accuracy against the number of models, one panel per regime (non-IID, sharded)."""
    plt = _pyplot()
    regimes = ["non-IID", "sharded"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), squeeze=False)
    labels = list(dict.fromkeys(r.split(" | ")[0] for r in group.rows))
    for ax, regime in zip(axes[0], regimes, strict=True):
        cols = [
            c
            for c in group.columns
            if c.startswith(regime + " ") and len(c.split()) == 2 and c.split()[-1].isdigit()
        ]
        ns = [int(c.split()[-1]) for c in cols]
        for lbl in labels:
            ys = [100 * _best_per_label(group, c).get(lbl, float("nan")) for c in cols]
            style = "--" if lbl in BASE_ROWS else "-"
            ax.plot(ns, ys, style, marker="o", label=lbl)
        ax.set_title(regime)
        ax.set_xlabel("number of models")
        ax.set_ylabel("test accuracy (%)")
    axes[0][1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runtime(names: list[str], seconds: list[float], path: Path, title: str) -> Path:
    """Horizontal bars of wall time per method (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.5))
    ax.barh(range(len(names)), seconds, color="tab:orange")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def group_runtime(group: Group) -> tuple[list[str], list[float]]:
    """Mean fusion time per row over every split and seed of ``group``."""
    names, secs = [], []
    for row in group.rows[len(BASE_ROWS) :]:
        values = [s for c in group.columns if (st := group.get(row, c)) for s in st.seconds]
        if values:
            names.append(row)
            secs.append(sum(values) / len(values))
    return names, secs
