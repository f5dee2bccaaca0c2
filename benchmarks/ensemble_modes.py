"""The two ensembles of a finished accuracy suite, cell by cell: the probability average (what
the reports call "ensemble") and the logit average (what a fusion that averages the models'
outputs in logit space aims at). Loads the suite's cached base models; evaluation only.

    .venv/bin/python benchmarks/ensemble_modes.py paper-vit --seeds 0,1,2 \\
        --cache benchmarks/.cache/paper-vit

Prints one line per cell and the mean per split; a cell whose result file is missing, or whose
cached models are not the ones its record was made from, is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from neurofuse.bench.basemodels import models_digest, prepare
from neurofuse.bench.command import parse_seeds
from neurofuse.bench.records import same_base_models
from neurofuse.bench.suites import get_suite
from neurofuse.evaluate import evaluate, evaluate_ensemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    ap.add_argument("--results", type=Path, default=None, help="default: benchmarks/results/SUITE")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suite = get_suite(args.suite)
    results = args.results or Path("benchmarks/results") / args.suite
    per_split: dict[str, list[tuple[float, float]]] = {}
    for cell in suite.cells(parse_seeds(args.seeds) or [0]):
        path = results / "cells" / f"{cell.cell_id}.json"
        if not path.exists():
            print(f"{cell.cell_id}: no result file, skipped")
            continue
        record = json.loads(path.read_text())
        setup = prepare(cell, args.cache, "cpu")
        x, y = setup.data.x_test, setup.data.y_test
        base = [evaluate(m, x, y).to_dict() for m in setup.models]
        if not same_base_models(record, models_digest(setup.models), base):
            print(f"{cell.cell_id}: cached models differ from the record's, skipped")
            continue
        prob = evaluate_ensemble(setup.models, x, y, mode="prob").accuracy
        logit = evaluate_ensemble(setup.models, x, y, mode="logit").accuracy
        per_split.setdefault(cell.split.label, []).append((prob, logit))
        print(
            f"{cell.cell_id}: probability average {100 * prob:.1f}, logit average {100 * logit:.1f}"
        )
    print("\nsplit | seeds | probability average | logit average")
    for split, rows in per_split.items():
        p = statistics.mean(r[0] for r in rows)
        q = statistics.mean(r[1] for r in rows)
        print(f"{split} | {len(rows)} | {100 * p:.1f} | {100 * q:.1f}")


if __name__ == "__main__":
    main()
