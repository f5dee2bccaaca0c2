"""Does ``auto`` given an importance score stay at its uniform answer where the score hurts?
(issue 11's importance bar: "or ``auto`` picks uniform where it would not")

    .venv/bin/python benchmarks/auto_importance.py --suite paper-vit --splits weakowner2,sharded6
        --seeds 0,1,2 --cache benchmarks/.cache/paper-vit
        [--results benchmarks/results/paper-vit-quality] [--out benchmarks/results/auto_importance]

For every cell of the suite's listed splits and seeds (base models from the suite's cache; a
cell whose models are not cached is skipped, never trained here) this runs
``nf.fuse(models, fusion set, method="auto", importance=score)`` for conductance and DeepLIFT
(``auto`` then tries its portfolio with uniform importance and with the score) and compares its
test accuracy with the suite's own ``auto`` row (uniform importance) and KF Linear's rows, read
from the suite's committed cell records. Records accumulate in ``<out>/records.json`` (a
killed run resumes); the table is ``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCORES = ("conductance", "deeplift")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="paper-vit")
    ap.add_argument("--splits", default="weakowner2,sharded6")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "paper-vit")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "paper-vit-quality")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "auto_importance")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    import neurofuse as nf
    from neurofuse.bench.basemodels import models_cached, prepare
    from neurofuse.bench.command import parse_seeds
    from neurofuse.bench.suites import get_suite
    from neurofuse.evaluate import evaluate
    from neurofuse.utils import atomic_write_text

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    splits = {s for s in args.splits.split(",") if s}
    cells = [
        c for c in get_suite(args.suite).cells(parse_seeds(args.seeds)) if c.split.key in splits
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "records.json"
    records: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    for i, cell in enumerate(cells, 1):
        if not models_cached(cell, args.cache):
            print(f"[{i}/{len(cells)}] {cell.cell_id}: base models not cached, skipped")
            continue
        setup = None
        for score in SCORES:
            key = f"{cell.cell_id}|{score}"
            if key in records:
                continue
            setup = setup or prepare(cell, args.cache, "cpu")
            fused = nf.fuse(
                setup.models,
                (setup.fusion_x, setup.fusion_y),
                method="auto",
                importance=score,
                seed=cell.seed,
            )
            choice = fused.neurofuse_report.get("auto", {})
            records[key] = {
                "accuracy": evaluate(fused, setup.data.x_test, setup.data.y_test).accuracy,
                "chosen": choice.get("chosen") if isinstance(choice, dict) else str(choice),
            }
            atomic_write_text(store, json.dumps(records, indent=1, sort_keys=True))
            print(f"[{i}/{len(cells)}] {key}: {records[key]}", flush=True)
    lines = [
        "# `auto` with an importance score against `auto` with uniform importance",
        "",
        f"Command: `python benchmarks/auto_importance.py --suite {args.suite} --splits "
        f"{args.splits} --seeds {args.seeds} --cache {args.cache.resolve().relative_to(HERE.parent)}`",
        "",
        "Test accuracy (%); `auto` and KF Linear with uniform importance and KF Linear with each "
        f"score from the suite's committed cells (`{args.results.resolve().relative_to(HERE.parent)}`).",
        "",
        "| cell | auto, uniform | KF Linear, uniform | score | KF Linear, score | auto, score | auto chose |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for cell in cells:
        path = args.results / "cells" / f"{cell.cell_id}.json"
        if not path.exists():
            continue
        methods = json.loads(path.read_text())["methods"]
        for score in SCORES:
            r = records.get(f"{cell.cell_id}|{score}")
            if r is None:
                continue
            lines.append(
                f"| {cell.cell_id} | {100 * methods['auto | uniform']['accuracy']:.1f} | "
                f"{100 * methods['KF Linear | uniform']['accuracy']:.1f} | {score} | "
                f"{100 * methods[f'KF Linear | {score}']['accuracy']:.1f} | "
                f"{100 * r['accuracy']:.1f} | {r['chosen']} |"
            )
    atomic_write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
