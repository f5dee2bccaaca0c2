"""What sparse matching (``matching="sparse"``) saves and costs on wide models (issue 13).

    .venv/bin/python benchmarks/hungarian_sparse.py [--method hf_linear|git_rebasin]
        [--widths 1024,2048,4096,8192,16384] [--exact-max 8192] [--threads 2]
        [--out benchmarks/results]

HF Linear (or Git Re-Basin with ``--method git_rebasin``, whose assignments take the same
option) fuses the ``scale`` suite's pairs of MLPs 784-W-W-10 (each trained one epoch on
MNIST-5k's 4,000 training digits, cached under ``benchmarks/.cache/scale``; trained here when
missing) on 400 fusion samples, once with the exact linear assignment and once with the sparse
one (each neuron's 128 cheapest partners, :func:`neurofuse.grouping.hungarian.assign_pairs`),
widths above ``--exact-max`` with the sparse one only. Per run: wall time, for HF the grouping
phase (matching included) and the grouping cost (the weighted k-means cost of the pairs, summed
over the layers: what the matching minimises), and the fused model's accuracy on the 1,000 test
digits. Each run is a fresh process after a warm-up fusion of width-16 MLPs. Results accumulate
in ``hungarian_sparse.json`` (``git_rebasin_sparse.json``; a killed run resumes); the ``.md``
beside it has the table and the ``.png`` the times on log-log axes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scale  # noqa: E402  (the scale suite's models and fusion set)

MATCHINGS = ("exact", "sparse")
STEMS = {"hf_linear": "hungarian_sparse", "git_rebasin": "git_rebasin_sparse"}
LABELS = {"hf_linear": "HF Linear", "git_rebasin": "Git Re-Basin"}


def run_one(method: str, width: int, matching: str, threads: int) -> dict[str, Any]:
    """One fusion, in this (fresh) process."""
    import torch

    import neurofuse as nf
    from neurofuse.checkpoint import load_checkpoint
    from neurofuse.data import load
    from neurofuse.evaluate import evaluate

    torch.set_num_threads(threads)
    x = scale._fusion_inputs(400)
    scale._warm_up(method, 2, x[:32])
    models = [
        load_checkpoint(scale._model_path(width, k).with_suffix(""))[0].eval() for k in range(2)
    ]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer fusion samples than neurons at these widths
        fused = nf.fuse(models, x, method=method, matching=matching)
    seconds = time.perf_counter() - start
    data = load("mnist5k", seed=0)
    report = fused.neurofuse_report
    return {
        "seconds": seconds,
        "grouping_seconds": report.get("seconds", {}).get("grouping"),
        "grouping_cost": report.get("grouping_cost"),
        "accuracy": evaluate(fused, data.x_test, data.y_test).accuracy,
        "base_accuracy": [evaluate(m, data.x_test, data.y_test).accuracy for m in models],
    }


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} s"


def report(method: str, rows: dict[str, Any], widths: list[int], command: str, threads: int) -> str:
    label = LABELS[method]
    lines = [
        f"# {label}: exact against sparse matching on wide MLPs (issue 13)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {threads} torch threads, CPU only. Two MLPs 784-W-W-10 "
        f"of the `scale` suite (one epoch of training each), 400 fusion samples, {label} with "
        'uniform importance; `matching="sparse"` pairs each neuron among its 128 cheapest '
        "partners (both ways). *Grouping* (HF): the grouping phase, matching included. *Cost "
        "ratio* (HF): sparse grouping cost over exact (1 = the same optimum). Accuracy on the "
        "1,000 MNIST-5k test digits; one run per cell.",
        "",
        "| width | base models | exact: time | grouping | accuracy | sparse: time | grouping "
        "| accuracy | speed-up | cost ratio | accuracy change (pp) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in widths:
        ex, sp = rows.get(f"{w}|exact"), rows.get(f"{w}|sparse")
        if sp is None:
            continue
        bases = " / ".join(f"{100 * a:.1f}" for a in sp["base_accuracy"])
        cells = [str(w), bases]
        for r in (ex, sp):
            if r is None:
                cells += ["not run", "", ""]
            else:
                cells += [
                    _seconds(r["seconds"]),
                    _seconds(r.get("grouping_seconds")),
                    f"{100 * r['accuracy']:.1f}",
                ]
        if ex is None:
            cells += ["", "", ""]
        else:
            costs = (sp.get("grouping_cost"), ex.get("grouping_cost"))
            cells += [
                f"{ex['seconds'] / sp['seconds']:.2f}x",
                "" if None in costs else f"{costs[0] / costs[1]:.5f}",
                f"{100 * (sp['accuracy'] - ex['accuracy']):+.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![time against width]({STEMS[method]}.png)"]
    return "\n".join(lines)


def plot(method: str, rows: dict[str, Any], widths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for matching in MATCHINGS:
        pts = [(w, rows[f"{w}|{matching}"]["seconds"]) for w in widths if f"{w}|{matching}" in rows]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), marker="o", label=f"{LABELS[method]}, {matching} matching"
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width W (MLP 784-W-W-10, two models)")
    ax.set_ylabel("fusion time (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=sorted(STEMS), default="hf_linear")
    parser.add_argument("--widths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--exact-max", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        width, matching = args.one.split("|")
        print(json.dumps(run_one(args.method, int(width), matching, args.threads)))
        return

    from neurofuse.progress import progress_bar
    from neurofuse.utils import atomic_write_text

    widths = [int(w) for w in args.widths.split(",")]
    stem = STEMS[args.method]
    store = args.out / f"{stem}.json"
    rows: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    todo = [(w, m) for w in widths for m in MATCHINGS if m == "sparse" or w <= args.exact_max]
    with progress_bar(True, stem, len(todo)) as update:
        for i, (w, m) in enumerate(todo):
            key = f"{w}|{m}"
            if key not in rows:
                scale.ensure_models(w, 2, args.threads)
                done = subprocess.run(
                    [sys.executable, __file__, "--one", key, "--method", args.method]
                    + ["--threads", str(args.threads)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows[key] = json.loads(done.stdout.strip().splitlines()[-1])
                r = rows[key]
                print(f"  W={w} {m}: {r['seconds']:.1f} s, {100 * r['accuracy']:.1f}%", flush=True)
                atomic_write_text(store, json.dumps(rows, indent=1))
            update(i + 1)
    command = ".venv/bin/python benchmarks/hungarian_sparse.py " + " ".join(sys.argv[1:])
    text = report(args.method, rows, widths, command.strip(), args.threads)
    atomic_write_text(args.out / f"{stem}.md", text + "\n")
    plot(args.method, rows, widths, args.out / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
