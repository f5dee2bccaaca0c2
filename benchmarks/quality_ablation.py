"""What each of issue 11's changes does on a suite's own cells (same cached base models, same
fusion sets): the Linear variants with the paper's zero-centred ridge against the aligned prior,
and fuse-then-distill without and with its mixup copies.

    .venv/bin/python benchmarks/quality_ablation.py paper-mlp --seeds 0,1,2 \\
        --splits noniid2,noniid4,sharded2,sharded4,weakowner2 --out benchmarks/results/quality_ablation_mlp.md
    .venv/bin/python benchmarks/quality_ablation.py paper-cnn --archs vgg_bn --seeds 0 \\
        --splits noniid2,noniid4,sharded2,sharded4,weakowner2 --out benchmarks/results/quality_ablation_vgg_bn.md

Prints one line per cell and writes a markdown table (test accuracy, %, mean over the seeds run)
to ``--out``. Trains the base models the cache lacks, exactly as the suite would.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import neurofuse as nf
from neurofuse.bench.basemodels import prepare
from neurofuse.bench.command import parse_seeds
from neurofuse.bench.suites import get_suite
from neurofuse.evaluate import evaluate, evaluate_ensemble
from neurofuse.utils import atomic_write_text

#: (column, method, options)
RUNS = (
    ("KF Linear, zero prior", "kf_linear", {"prior": "zero"}),
    ("KF Linear, aligned prior", "kf_linear", {}),
    ("HF Linear, zero prior", "hf_linear", {"prior": "zero"}),
    ("HF Linear, aligned prior", "hf_linear", {}),
    ("KF Linear+KD, no mixup", "kf_linear+kd", {"kd_mixup": 0}),
    ("KF Linear+KD, 2 mixup copies", "kf_linear+kd", {}),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--splits", default="")
    ap.add_argument("--archs", default="", help="architecture labels, e.g. vgg_bn (default all)")
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = {s for s in args.splits.split(",") if s}
    archs = {a for a in args.archs.split(",") if a}
    cells = [
        c
        for c in get_suite(args.suite).cells(parse_seeds(args.seeds) or [0])
        if (not splits or c.split.key in splits) and (not archs or c.arch_label in archs)
    ]
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for i, cell in enumerate(cells, 1):
        setup = prepare(cell, args.cache, "cpu")
        x, y = setup.data.x_test, setup.data.y_test
        row = table.setdefault((cell.arch_label, cell.split.label), {})
        row.setdefault("best base", []).append(
            max(evaluate(m, x, y).accuracy for m in setup.models)
        )
        row.setdefault("ensemble", []).append(evaluate_ensemble(setup.models, x, y).accuracy)
        for column, method, options in RUNS:
            if method.startswith("hf_") and cell.split.n_models != 2:
                continue
            fused = nf.fuse(
                setup.models,
                (setup.fusion_x, setup.fusion_y),
                method=method,
                seed=cell.seed,
                **options,
            )
            row.setdefault(column, []).append(evaluate(fused, x, y).accuracy)
        print(
            f"[{i}/{len(cells)}] {cell.cell_id}: "
            + ", ".join(f"{k} {100 * v[-1]:.1f}" for k, v in row.items()),
            flush=True,
        )
    columns = ["best base", "ensemble", *(r[0] for r in RUNS)]
    lines = [
        f"# Issue 11's changes, one at a time: `{args.suite}`",
        "",
        "Command: `.venv/bin/python benchmarks/quality_ablation.py "
        f"{args.suite} --seeds {args.seeds}"
        + (f" --splits {args.splits}" if args.splits else "")
        + (f" --archs {args.archs}" if args.archs else "")
        + f" --out {args.out}`",
        "",
        "Test accuracy (%), mean over the seeds run; the suite's own cached base models and "
        "fusion sets.",
        "",
        "| arch | split | seeds | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (arch, split), row in table.items():
        cells_ = [f"{100 * statistics.mean(row[c]):.1f}" if c in row else "n/a" for c in columns]
        lines.append(f"| {arch} | {split} | {len(row['best base'])} | " + " | ".join(cells_) + " |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
