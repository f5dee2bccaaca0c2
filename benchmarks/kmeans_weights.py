"""What should the importance scores weigh in K-means Fusion: the k-means objective too (the
paper's weighted k-means, ``kmeans_weights="importance"``) or only each group's centroid
(``kmeans_weights="uniform"``, the default)?

    .venv/bin/python benchmarks/kmeans_weights.py
        [--suites paper-mlp,mnist1d,paper-cnn,paper-vit] [--seeds 0,1,2]
        [--out benchmarks/results/kmeans_weights]

For every cell of the accuracy suites (base models from the suites' caches, ``benchmarks/.cache``
and ``benchmarks/.cache/paper-vit``; a cell whose models are not cached is skipped, never
trained here) this fuses the base models with KF Linear on the cell's fusion set: with uniform
importance, and with conductance and DeepLIFT under both rules, everything else at its default.
Test accuracy of each score minus uniform importance's, averaged over the seeds, is issue 11's
importance bar (no mean more than 1 point below uniform). Records accumulate in
``<out>/records.json`` (a killed run resumes); writes ``report.md`` and ``deltas.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCORES = ("conductance", "deeplift")
RULES = ("importance", "uniform")  # (the paper's, the default)
CACHES = {"paper-vit": HERE / ".cache" / "paper-vit"}
TOLERANCE = 1.0


def run(suites: list[str], seeds: str, out: Path, threads: int) -> dict[str, Any]:
    import torch

    import neurofuse as nf
    from neurofuse.bench.basemodels import models_cached, prepare
    from neurofuse.bench.command import parse_seeds
    from neurofuse.bench.suites import get_suite
    from neurofuse.evaluate import evaluate
    from neurofuse.utils import atomic_write_text

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    store = out / "records.json"
    records: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    runs = [("uniform", "uniform")] + [(s, r) for s in SCORES for r in RULES]
    for suite in suites:
        cache = CACHES.get(suite, HERE / ".cache")
        cells = get_suite(suite).cells(parse_seeds(seeds))
        for i, cell in enumerate(cells, 1):
            if not models_cached(cell, cache):
                print(f"[{suite} {i}/{len(cells)}] {cell.cell_id}: models not cached, skipped")
                continue
            setup = None
            for score, rule in runs:
                key = f"{suite}|{cell.cell_id}|{score}|{rule}"
                if key in records:
                    continue
                setup = setup or prepare(cell, cache, "cpu")
                fused = nf.fuse(
                    setup.models,
                    (setup.fusion_x, setup.fusion_y),
                    method="kf_linear",
                    importance=score,
                    kmeans_weights=rule,
                    seed=cell.seed,
                )
                records[key] = {
                    "arch": cell.arch_label,
                    "split": cell.split.label,
                    "seed": cell.seed,
                    "accuracy": 100
                    * evaluate(fused, setup.data.x_test, setup.data.y_test).accuracy,
                }
                atomic_write_text(store, json.dumps(records, indent=1, sort_keys=True))
            print(f"[{suite} {i}/{len(cells)}] {cell.cell_id} done", flush=True)
    return records


def table(records: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (suite, arch, split): uniform's mean and, per score and rule, the mean
    difference to uniform over the seeds both ran."""
    acc: dict[tuple[str, str, str], dict[tuple[str, str], dict[int, float]]] = defaultdict(dict)
    for key, r in records.items():
        suite, _, score, rule = key.split("|")
        acc[(suite, r["arch"], r["split"])].setdefault((score, rule), {})[r["seed"]] = r["accuracy"]
    rows = []
    for (suite, arch, split), runs in acc.items():
        uniform = runs.get(("uniform", "uniform"), {})
        if not uniform:
            continue
        row: dict[str, Any] = {"suite": suite, "arch": arch, "split": split}
        row["uniform"] = statistics.mean(uniform.values())
        row["seeds"] = len(uniform)
        for score in SCORES:
            for rule in RULES:
                got = runs.get((score, rule), {})
                both = sorted(set(got) & set(uniform))
                if both:
                    row[(score, rule)] = statistics.mean(got[s] - uniform[s] for s in both)
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# K-means Fusion: what the importance scores weigh",
        "",
        f"Command: `{command}`",
        "",
        "KF Linear, every other option at its default, on each suite's cached base models and "
        "fusion sets. Test accuracy (%) of uniform importance, and of each score minus "
        "uniform's (points, mean over the seeds) under the two rules: **weighted k-means** "
        '(`kmeans_weights="importance"`, the paper\'s rule: the scores weigh the k-means '
        'objective and the centroids) and **unweighted grouping** (`kmeans_weights="uniform"`, '
        "the default: the clustering ignores the scores, which weigh each group's members in "
        f"its centroid, the fit's target). Bold: more than {TOLERANCE:g} point below uniform "
        "(issue 11's importance bar).",
        "",
    ]
    head = "| suite | arch | split | seeds | uniform |" + "".join(
        f" {s}, weighted | {s}, unweighted |" for s in SCORES
    )
    lines += [head, "|---|---|---|---:|---:|" + "---:|" * (2 * len(SCORES))]

    def cell(v: float | None) -> str:
        if v is None:
            return "–"
        return f"**{v:+.2f}**" if v < -TOLERANCE else f"{v:+.2f}"

    for r in rows:
        vals = "".join(f" {cell(r.get((s, rule)))} |" for s in SCORES for rule in RULES)
        lines.append(
            f"| {r['suite']} | {r['arch']} | {r['split']} | {r['seeds']} | {r['uniform']:.1f} |{vals}"
        )
    lines += [
        "",
        "## Summary",
        "",
        "| rule | means | below -1 | worst | mean |",
        "|---|---:|---:|---|---:|",
    ]
    for rule, name in (("importance", "weighted k-means"), ("uniform", "unweighted grouping")):
        vals = [(r[(s, rule)], r, s) for r in rows for s in SCORES if (s, rule) in r]
        if not vals:
            continue
        worst = min(vals, key=lambda t: t[0])
        lines.append(
            f"| {name} | {len(vals)} | {sum(v < -TOLERANCE for v, _, _ in vals)} | "
            f"{worst[0]:+.2f} ({worst[1]['suite']} {worst[1]['arch']} {worst[1]['split']}, "
            f"{worst[2]}) | {statistics.mean(v for v, _, _ in vals):+.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marks = {"conductance": "o", "deeplift": "^"}
    suites = sorted({r["suite"] for r in rows})
    colours = dict(zip(suites, ("C0", "C1", "C2", "C3", "C4", "C5"), strict=False))
    for r in rows:
        for s in SCORES:
            if (s, "importance") in r and (s, "uniform") in r:
                ax.scatter(
                    r[(s, "importance")],
                    r[(s, "uniform")],
                    marker=marks[s],
                    color=colours[r["suite"]],
                    alpha=0.75,
                    s=28,
                )
    lim = [min(-4.0, *[v for r in rows for k, v in r.items() if isinstance(k, tuple)]) - 0.3]
    lim.append(max(4.5, *[v for r in rows for k, v in r.items() if isinstance(k, tuple)]) + 0.3)
    ax.plot(lim, lim, color="grey", lw=0.8)
    for f in (ax.axhline, ax.axvline):
        f(-TOLERANCE, color="red", lw=0.8, ls="--")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("weighted k-means (paper): score - uniform (points)")
    ax.set_ylabel("unweighted grouping (default): score - uniform (points)")
    for suite in suites:
        ax.scatter([], [], color=colours[suite], label=suite)
    for s, m in marks.items():
        ax.scatter([], [], color="grey", marker=m, label=s)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("KF Linear: importance score against uniform, per split", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    from neurofuse.utils import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", default="paper-mlp,mnist1d,paper-cnn,paper-vit")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "kmeans_weights")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    suites = [s for s in args.suites.split(",") if s]
    records = run(suites, args.seeds, args.out, args.threads)
    rows = table({k: v for k, v in records.items() if k.split("|")[0] in suites})
    command = "python benchmarks/kmeans_weights.py"
    if args.suites != "paper-mlp,mnist1d,paper-cnn,paper-vit" or args.seeds != "0,1,2":
        command += f" --suites {args.suites} --seeds {args.seeds}"
    from neurofuse.utils import atomic_write_text

    atomic_write_text(args.out / "report.md", render(rows, command))
    plot(rows, args.out / "deltas.png")
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
