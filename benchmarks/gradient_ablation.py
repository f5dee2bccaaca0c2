"""Why might our Gradient variants trail the paper's reference code? Ablate, one at a time, the
differences found by reading the reference implementation (AndrewSpano/neuron-interpolation-
model-fusion, fusion_algorithms/alf.py and fuse_all_vggs.py) on the paper-cnn cells:
no initial noise (its VGG script copies model 0 without noise), Adam with L2 weight decay
instead of AdamW, a 20% validation split with patience 15 and a 150-epoch head.

    python benchmarks/gradient_ablation.py vgg:sharded2,vgg_bn:sharded2 0

trains (or loads from benchmarks/.cache/ablation) the cells' base models exactly as the
paper-cnn suite does, prints every variant's test accuracy and writes
benchmarks/results/gradient_ablation.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import neurofuse as nf
from neurofuse.bench.basemodels import prepare
from neurofuse.bench.suites import get_suite
from neurofuse.evaluate import evaluate

ADAM = {"eps": 0.0, "optimizer": "adam", "last_optimizer": "adam"}
VARIANTS = [
    ("kf_linear", {}),
    ("kf_gradient", {"preset": "setting1"}),
    ("kf_gradient", {"preset": "setting1", "eps": 0.0}),
    ("kf_gradient", {"preset": "setting1", **ADAM}),
    (
        "kf_gradient",
        {"preset": "setting1", **ADAM, "val_split": 0.2, "patience": 15, "last_epochs": 150},
    ),
    ("hf_gradient", {"preset": "setting1"}),
    ("hf_gradient", {"preset": "setting1", **ADAM}),
]


def main() -> None:
    torch.set_num_threads(1)
    want = (sys.argv[1] if len(sys.argv) > 1 else "vgg:sharded2,vgg_bn:sharded2").split(",")
    seeds = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0").split(",")]
    cells = [
        c for c in get_suite("paper-cnn").cells(seeds) if f"{c.arch_label}:{c.split.key}" in want
    ]
    out: dict[str, list] = {}
    for cell in cells:
        setup = prepare(cell, Path("benchmarks/.cache/ablation"), "cpu")

        def acc(model: torch.nn.Module, data=setup.data) -> float:
            return evaluate(model, data.x_test, data.y_test).accuracy

        print(cell.cell_id, "bases", [round(acc(m) * 100, 1) for m in setup.models], flush=True)
        for method, options in VARIANTS:
            start = time.perf_counter()
            fused = nf.fuse(
                setup.models,
                (setup.fusion_x, setup.fusion_y),
                method=method,
                seed=cell.seed,
                **options,
            )
            seconds = time.perf_counter() - start
            print(f"  {method} {options}: {acc(fused) * 100:.1f} ({seconds:.1f}s)", flush=True)
            out.setdefault(cell.cell_id, []).append([method, options, acc(fused), seconds])
    path = Path("benchmarks/results/gradient_ablation.json")
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
