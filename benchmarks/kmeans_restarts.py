"""K-means restarts against the number of models (issue 13: cost linear in the models).

    .venv/bin/python benchmarks/kmeans_restarts.py [--models 2,4,8,16] [--restarts 4,2,1]
        [--seeds 0,1,2] [--out benchmarks/results/kmeans_restarts]

The ``scale`` suite's MLPs (784-512-512-10, each trained one epoch on MNIST-5k with its own
seed, cached under ``benchmarks/.cache/scale``) are fused by KF Linear on 400 fusion samples,
M of them at a time, with a fixed number of k-means++ restarts and with ``n_init="auto"``
(``--seeds`` are the fusion seeds: the k-means draws). Each row: the grouping time, the grouping
error (the k-means cost summed over the levels, as in ``fused.neurofuse_report``), the fused
model's test accuracy, and the ratio of error and time to four restarts of the same seed. Rows
accumulate in ``<out>.json`` (a killed run resumes), the table in ``<out>.md``, a plot in
``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WIDTH = 512


def _key(m: int, restarts: str, seed: int) -> str:
    return f"M{m}_n{restarts}_s{seed}"


def measure(m: int, restarts: str, seed: int, x: torch.Tensor, test: tuple) -> dict:
    import scale

    import neurofuse as nf
    from neurofuse.checkpoint import load_checkpoint
    from neurofuse.evaluate import evaluate
    from neurofuse.grouping import restarts as auto_restarts

    scale.ensure_models(WIDTH, m, torch.get_num_threads())
    models = [
        load_checkpoint(scale._model_path(WIDTH, k).with_suffix(""))[0].eval() for k in range(m)
    ]
    n_init: int | str = restarts if restarts == "auto" else int(restarts)
    start = time.perf_counter()
    fused = nf.fuse(models, x, method="kf_linear", seed=seed, n_init=n_init)
    wall = time.perf_counter() - start
    report = fused.neurofuse_report  # type: ignore[union-attr]
    return {
        "models": m,
        "restarts": restarts,
        "used": auto_restarts(n_init, WIDTH, m * WIDTH),
        "seed": seed,
        "seconds": wall,
        "grouping_seconds": report["seconds"].get("grouping", 0.0),
        "grouping_error": float(report["grouping_cost"]),
        "accuracy": evaluate(fused, *test).accuracy,  # type: ignore[arg-type]
    }


def _against_four(paired: list, change, fmt: str) -> str:  # noqa: ANN001
    """Mean over seeds of ``change(row, the same seed's four-restart row)``, or ``-``."""
    return format(statistics.mean(change(r, b) for r, b in paired), fmt) if paired else "-"


def render(rows: dict, models: list[int], variants: list[str], command: str) -> str:
    lines = [
        "# K-means restarts against the number of models",
        "",
        f"KF Linear fusing M MLPs 784-512-512-10 (the `scale` suite's models) on 400 samples; "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Means over the fusion seeds; *error* and *time* ratios against four restarts of the same "
        "seed.",
        "",
        f"Command: `{command}`",
        "",
        "| models | restarts | used | fusion s | grouping s | grouping error x 4 restarts "
        "| grouping time x 4 restarts | test acc % | Δ acc vs 4 restarts (points) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        base = {r["seed"]: r for r in rows.values() if r["models"] == m and r["restarts"] == "4"}
        for v in variants:
            got = [r for r in rows.values() if r["models"] == m and r["restarts"] == v]
            if not got:
                continue
            mean = statistics.mean
            paired = [(r, base[r["seed"]]) for r in got if r["seed"] in base]
            err = _against_four(
                paired, lambda r, b: r["grouping_error"] / b["grouping_error"], ".4f"
            )
            tim = _against_four(
                paired, lambda r, b: r["grouping_seconds"] / b["grouping_seconds"], ".2f"
            )
            dacc = _against_four(paired, lambda r, b: 100 * (r["accuracy"] - b["accuracy"]), "+.2f")
            used = sorted({r["used"] for r in got})
            lines.append(
                f"| {m} | {v} | {'/'.join(map(str, used))} | {mean(r['seconds'] for r in got):.2f} "
                f"| {mean(r['grouping_seconds'] for r in got):.2f} | {err} | {tim} "
                f"| {100 * mean(r['accuracy'] for r in got):.2f} | {dacc} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: dict, models: list[int], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        pts = [
            (
                m,
                statistics.mean(
                    r["seconds"] for r in rows.values() if r["models"] == m and r["restarts"] == v
                ),
            )
            for m in models
            if any(r["models"] == m and r["restarts"] == v for r in rows.values())
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"n_init={v}")
    ax.plot(
        models,
        [rows_time_at(rows, models[0]) * m / models[0] for m in models],
        "k:",
        label="linear in M",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("models fused (M)")
    ax.set_ylabel("KF Linear fusion time (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rows_time_at(rows: dict, m: int) -> float:
    got = [r["seconds"] for r in rows.values() if r["models"] == m and r["restarts"] == "4"]
    return statistics.mean(got) if got else 1.0


def main(argv: list[str] | None = None) -> None:
    from neurofuse.data import load
    from neurofuse.utils import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="2,4,8,16")
    parser.add_argument("--restarts", default="4,2,1,auto")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "kmeans_restarts"))
    args = parser.parse_args(argv)
    command = "python benchmarks/kmeans_restarts.py " + " ".join(argv or sys.argv[1:])
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import scale

    models = [int(v) for v in args.models.split(",")]
    variants = args.restarts.split(",")
    seeds = [int(v) for v in args.seeds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Path(f"{out}.json")
    rows = json.loads(store.read_text()) if store.exists() else {}
    x = scale._fusion_inputs(400)
    splits = load("mnist5k", seed=0)
    test = (splits.x_test, splits.y_test)
    todo = [(m, v, s) for m in models for v in variants for s in seeds if _key(m, v, s) not in rows]
    for i, (m, v, s) in enumerate(todo, 1):
        row = measure(m, v, s, x, test)
        rows[_key(m, v, s)] = row
        atomic_write_text(store, json.dumps(rows, indent=1))
        print(
            f"[{i}/{len(todo)}] M={m} n_init={v} seed={s}: {row['seconds']:.2f} s, "
            f"error {row['grouping_error']:.4g}, acc {row['accuracy']:.4f}",
            flush=True,
        )
    text = render(rows, models, variants, command.strip())
    atomic_write_text(Path(f"{out}.md"), text)
    plot(rows, models, variants, Path(f"{out}.png"))
    print(text)


if __name__ == "__main__":
    main()
