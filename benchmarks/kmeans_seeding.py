"""K-means seeding and restarts at width (issue 13): exact k-means++, k-means++ on principal
coordinates with four restarts or with ``n_init="auto"``, and one Hungarian matching.

    .venv/bin/python benchmarks/kmeans_seeding.py [--widths 256,512,1024,2048] [--seeds 0]

Two MLPs 784-W-W-10 are trained briefly (4 epochs) on a 2-way split of MNIST-5k (non-IID
Dirichlet and sharded), then fused by KF Linear on 400 samples of model 0's data with the
k-means started four ways: ``exact`` (4 k-means++ restarts with distances in the full working
coordinates in float64: the grouping before issue 13), ``k-means++`` (the same 4 restarts with
the seeding's distances on 64 principal coordinates in float32), ``auto`` (the same seeding
with ``n_init="auto"``: 4 restarts up to 512 groups, 2 at 1024, 1 from 2048; the default now)
and ``matching`` (one start from a Hungarian matching of the two models, ``kmeans_seeding=
"matching"``). Printed and written to ``benchmarks/results/kmeans_seeding.md`` with a log-log
plot: grouping time, total fusion time, the grouping error (k-means cost summed over levels) and
test accuracy, with the ratios to ``exact`` measured in the same run. Finished rows are kept in
``benchmarks/results/kmeans_seeding.json``: a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import neurofuse as nf
from neurofuse import data
from neurofuse.evaluate import evaluate
from neurofuse.models import build
from neurofuse.train import TrainConfig, train_model
from neurofuse.utils import atomic_write_text

OUT = Path(__file__).parent / "results"
SEEDINGS = ("exact", "k-means++", "auto", "matching")
REFERENCE = "exact"
SPLITS = ("dirichlet", "sharded")


def _models(width: int, scheme: str, seed: int, splits: data.DataSplits):
    part = data.partition(splits.y_train, 2, scheme, seed=seed, num_classes=10)
    models = []
    for k, idx in enumerate(part.indices):
        torch.manual_seed(seed * 10 + k)
        model = build("mlp", in_features=784, num_classes=10, hidden=(width, width))
        cfg = TrainConfig(epochs=4, lr=2e-3, batch_size=64, seed=seed * 10 + k, progress=False)
        train_model(model, splits.x_train[idx], splits.y_train[idx], cfg, num_classes=10)
        models.append(model.eval())
    fusion = data.fusion_indices(splits.y_train, part, 400, seed=seed, from_part=0)
    return models, (splits.x_train[fusion], splits.y_train[fusion])


def _row(models, fusion, seeding: str, splits: data.DataSplits) -> dict:
    from neurofuse.grouping import seeding as kmeans

    dims = kmeans.SEED_DIMS
    kmeans.SEED_DIMS = None if seeding == "exact" else dims  # the seeding before issue 13
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fusion-set size warning at widths above 400
            fused = nf.fuse(
                models,
                fusion,
                method="kf_linear",
                kmeans_seeding="matching" if seeding == "matching" else "k-means++",
                n_init="auto" if seeding == "auto" else 4,
            )
    finally:
        kmeans.SEED_DIMS = dims
    seconds = time.perf_counter() - start
    report = fused.neurofuse_report
    return {
        "seconds": seconds,
        "grouping_seconds": report["seconds"].get("grouping", 0.0),
        "grouping_cost": report.get("grouping_cost"),
        "accuracy": evaluate(fused, splits.x_test, splits.y_test).accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="256,512,1024,2048")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "kmeans_seeding.json"
    rows: dict[str, dict] = json.loads(store.read_text()) if store.exists() else {}
    splits = data.load("mnist5k", seed=0)
    for seed in seeds:
        for scheme in SPLITS:
            for width in widths:
                keys = {s: f"{scheme}|{width}|{seed}|{s}" for s in SEEDINGS}
                if all(k in rows for k in keys.values()):
                    continue
                print(f"[{scheme} W={width} seed {seed}] training two MLPs", flush=True)
                models, fusion = _models(width, scheme, seed, splits)
                for seeding, key in keys.items():
                    if key in rows:
                        continue
                    rows[key] = _row(models, fusion, seeding, splits)
                    r = rows[key]
                    print(
                        f"  {seeding:>9}: grouping {r['grouping_seconds']:.2f} s, total "
                        f"{r['seconds']:.2f} s, cost {r['grouping_cost']:.4g}, accuracy "
                        f"{100 * r['accuracy']:.1f}%",
                        flush=True,
                    )
                    atomic_write_text(store, json.dumps(rows, indent=1))
    _report(rows, widths, seeds, args.out)


def _report(rows: dict, widths: list[int], seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# K-means seeding and restarts at width (issue 13)",
        "",
        "Command: `.venv/bin/python benchmarks/kmeans_seeding.py "
        f"--widths {','.join(map(str, widths))} --seeds {','.join(map(str, seeds))}`",
        "",
        f"Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU. Two MLPs 784-W-W-10 (4 epochs on a 2-way "
        "split of MNIST-5k), KF Linear on 400 samples of model 0's data. Ratios are to "
        "the exact k-means++ seeding of the same models (the grouping before issue 13); grouping "
        "error is the k-means cost summed over the two hidden levels.",
        "",
        "| split | W | seeding | grouping s | total s | grouping time / exact | grouping "
        "error / exact | accuracy % | vs exact (pp) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for scheme in SPLITS:
        for seeding in SEEDINGS:
            xs, ys = [], []
            for width in widths:
                got = [rows.get(f"{scheme}|{width}|{s}|{seeding}") for s in seeds]
                ref = [rows.get(f"{scheme}|{width}|{s}|{REFERENCE}") for s in seeds]
                if any(g is None for g in got) or any(r is None for r in ref):
                    continue

                def mean(key: str, items: list) -> float:
                    return sum(i[key] for i in items) / len(items)

                g_s, r_s = mean("grouping_seconds", got), mean("grouping_seconds", ref)
                acc, racc = mean("accuracy", got), mean("accuracy", ref)
                cost, rcost = mean("grouping_cost", got), mean("grouping_cost", ref)
                lines.append(
                    f"| {scheme} | {width} | {seeding} | {g_s:.2f} | {mean('seconds', got):.2f} "
                    f"| {g_s / r_s:.2f} | {cost / rcost:.3f} | {100 * acc:.1f} | "
                    f"{100 * (acc - racc):+.1f} |"
                )
                xs.append(width)
                ys.append(g_s)
            if xs:
                ax.loglog(xs, ys, marker="o", label=f"{scheme}, {seeding}")
    ax.set_xlabel("width W")
    ax.set_ylabel("grouping seconds (two levels)")
    ax.set_title("KF Linear grouping time against width")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kmeans_seeding.png", dpi=120)
    plt.close(fig)
    lines += ["", "![grouping time](kmeans_seeding.png)", ""]
    atomic_write_text(out / "kmeans_seeding.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
