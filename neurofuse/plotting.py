"""Bar charts of fusion results, drawn off-screen (Agg) so they work on headless machines.

The figure is built with ``matplotlib.figure.Figure`` and an Agg canvas instead of ``pyplot``:
no global backend is switched and no window is opened, so calling this from a notebook or a
GUI session leaves the user's matplotlib state alone.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from neurofuse.utils import atomic_write_bytes

__all__ = ["KIND_COLORS", "plot_accuracy"]

KIND_COLORS: dict[str, str] = {
    "base": "#9e9e9e",
    "ensemble": "#5c6bc0",
    "baseline": "#ef8a62",
    "fused": "#1b9e77",
}
"""Bar colour of each row kind: base models, the prediction ensemble, baselines, fused models."""

_KIND_LABELS = {
    "base": "base model",
    "ensemble": "ensemble (n× inference cost)",
    "baseline": "baseline",
    "fused": "neuron-interpolation fusion",
}


def plot_accuracy(
    rows: Sequence[Mapping[str, object]],
    path: str | Path,
    *,
    title: str = "Test accuracy",
    subtitle: str | None = None,
) -> Path:
    """Write a horizontal bar chart of each row's test accuracy to ``path`` (PNG) and return it.

    Args:
        rows: one mapping per bar with ``"method"`` (label), ``"accuracy"`` (in [0, 1]) and
            ``"kind"`` (a key of :data:`KIND_COLORS`; colours the bar and the legend).
        path: output file; its parent folder is created, and the file is written atomically.
        title: figure title.
        subtitle: a smaller line under the title (e.g. the data regime).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("plot_accuracy needs at least one row to draw")
    for row in rows:
        if row.get("kind") not in KIND_COLORS:
            raise ValueError(
                f"row {row.get('method')!r} has kind {row.get('kind')!r}; "
                f"use one of {sorted(KIND_COLORS)}"
            )
    labels = [str(row["method"]) for row in rows]
    accuracy = [100.0 * float(row["accuracy"]) for row in rows]  # type: ignore[arg-type]
    colors = [KIND_COLORS[str(row["kind"])] for row in rows]

    fig = Figure(figsize=(9.0, 0.5 * len(rows) + 1.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(rows)))[::-1]  # first row on top
    bars = ax.barh(positions, accuracy, color=colors, height=0.65)
    ax.set_yticks(positions, labels)
    ax.set_xlim(0, 105)
    ax.set_xlabel("test accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for bar, value in zip(bars, accuracy, strict=True):
        ax.text(
            bar.get_width() + 1,
            bar.get_y() + bar.get_height() / 2,
            f"{value:.1f}%",
            va="center",
            fontsize=9,
        )
    kinds = [kind for kind in KIND_COLORS if any(row["kind"] == kind for row in rows)]
    fig.legend(
        handles=[Patch(color=KIND_COLORS[k], label=_KIND_LABELS[k]) for k in kinds],
        loc="outside lower center",
        ncols=min(len(kinds), 2),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title, fontsize=12, fontweight="bold")
    if subtitle:
        ax.set_title(textwrap.fill(subtitle, 100), fontsize=9, color="#444444")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
