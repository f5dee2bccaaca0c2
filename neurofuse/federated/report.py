"""A federation's outputs: ``results.json``, ``report.md``, ``accuracy.png`` and the global model.

Every file is written atomically; the plot is drawn off-screen (Agg) like the library's other
figures.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neurofuse.utils import atomic_write_bytes, atomic_write_text, to_jsonable

RESULTS = "results.json"
REPORT = "report.md"
PLOT = "accuracy.png"
MODEL = "global"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def series(history: Sequence[dict[str, Any]], method: str) -> dict[str, list[tuple[int, float]]]:
    """Accuracy per round of every line the plot draws (round 0: the initial model)."""
    lines: dict[str, list[tuple[int, float]]] = {f"global model ({method})": []}
    for row in history:
        lines[f"global model ({method})"].append((row["round"], row["accuracy"]))
        for name, acc in row.get("compared", {}).items():
            lines.setdefault(f"{name} of the same client models", []).append((row["round"], acc))
        if "ensemble_accuracy" in row:
            lines.setdefault("ensemble of the client models", []).append(
                (row["round"], row["ensemble_accuracy"])
            )
            accs = row["client_accuracies"]
            lines.setdefault("mean client model", []).append((row["round"], sum(accs) / len(accs)))
    return lines


def plot(history: Sequence[dict[str, Any]], method: str, path: Path, title: str) -> Path:
    """Accuracy per round of every series (lines from round 1 on; the initial model's chance
    accuracy would only squash the axis), or, after a single round, one bar per model."""
    aggregated = [row for row in history if "client_accuracies" in row]
    if len(history) <= 2 and aggregated:
        from neurofuse.plotting import plot_accuracy

        row = aggregated[-1]
        bars = [
            {"method": f"global model ({method})", "accuracy": row["accuracy"], "kind": "fused"}
        ]
        bars += [
            {"method": f"{name} (same clients)", "accuracy": acc, "kind": "baseline"}
            for name, acc in row["compared"].items()
        ]
        bars.append(
            {"method": "ensemble", "accuracy": row["ensemble_accuracy"], "kind": "ensemble"}
        )
        bars += [
            {"method": f"client {i}", "accuracy": acc, "kind": "base"}
            for i, acc in enumerate(row["client_accuracies"])
        ]
        return plot_accuracy(bars, path, title=title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in series([r for r in history if r["round"] > 0], method).items():
        rounds, accs = zip(*points, strict=True)
        style = "-" if label.startswith("global") else "--"
        ax.plot(rounds, [100 * a for a in accs], style, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def markdown(result: Any) -> str:
    c = result.config
    lines = [
        f"# Federation: {c.method} on {c.dataset}, {c.clients} clients, {c.partition} split",
        "",
        f"{c.rounds} round(s) of {c.local_epochs} local epoch(s) (AdamW, lr {c.lr}, batch "
        f"{c.batch_size}); model `{c.model or c.arch}` {json.dumps(result.model_kw)}; "
        f"importance `{c.importance}`; seed {c.seed}.",
        f"Fusion set: {result.fusion_size} samples from {result.fusion_source}.",
        f"Wall time {result.seconds:.1f} s; payload sent to clients {_mib(result.bytes_down)}, "
        f"received {_mib(result.bytes_up)} (tensor and metric bytes, not protocol framing).",
        "",
        "## Last round, test accuracy (%)",
        "",
        "| model | accuracy |",
        "|---|---:|",
        f"| global model ({c.method}) | {_pct(result.fused_accuracy)} |",
    ]
    lines += [
        f"| {name} of the same client models | {_pct(a)} |" for name, a in result.compared.items()
    ]
    lines.append(
        f"| ensemble of the client models ({c.clients}x inference) | "
        f"{_pct(result.ensemble_accuracy)} |"
    )
    lines += [f"| client {i} | {_pct(a)} |" for i, a in enumerate(result.client_accuracies)]
    lines += [
        "",
        "## Per round",
        "",
        "| round | global | FedAvg (same clients) | ensemble | best client | left out |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.history:
        best = max(row["client_accuracies"]) if row.get("client_accuracies") else None
        lines.append(
            f"| {row['round']} | {_pct(row['accuracy'])} | "
            f"{_pct(row['accuracy'] if c.method == 'fedavg' and row['round'] else row.get('compared', {}).get('fedavg'))} | "
            f"{_pct(row.get('ensemble_accuracy'))} | {_pct(best)} | {len(row.get('left_out', []))} |"
        )
    if result.left_out:
        lines += ["", "## Left out", ""]
        lines += [f"- round {i['round']}, node {i['node']}: {i['reason']}" for i in result.left_out]
    lines += ["", f"![accuracy per round]({PLOT})", ""]
    return "\n".join(lines)


def write_outputs(result: Any, out: Path) -> Path:
    """Write the result's files into ``out`` (created) and return it."""
    from neurofuse.checkpoint import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    record = to_jsonable(result.to_dict())
    atomic_write_text(out / RESULTS, json.dumps(record, indent=2) + "\n")
    c = result.config
    title = f"{c.method}, {c.dataset}, {c.clients} clients ({c.partition}), {c.rounds} round(s)"
    plot(result.history, c.method, out / PLOT, title)
    atomic_write_text(out / REPORT, markdown(result))
    model = c.model_spec(result.model_kw).build()
    model.load_state_dict(result.state)
    save_checkpoint(
        model.eval(),
        out / MODEL,
        metadata={"federation": c.to_dict(), "test_accuracy": result.fused_accuracy},
    )
    return out
