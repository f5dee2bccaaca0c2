"""Fusing ViTs on large fusion sets: time, memory and accuracy against the number of fusion
samples (issue 13: "the paper's ViT experiments use 5,000 fusion samples; nothing has measured
us there").

    .venv/bin/python benchmarks/vit_fusion_set.py [--sizes 400,1000,2000,4000]
        [--methods kf_linear,hf_linear,kf_linear:sample_chunk=500,...] [--threads 2]
        [--out benchmarks/results/vit_fusion_set]

The two ViTs of ``paper-vit``'s full-2 split, seed 0 (28x28 digits in 16 patches, width 64, 4
blocks of 4 heads, each trained on all 4,000 MNIST-5k training digits; cached under
``benchmarks/.cache/paper-vit`` by ``neurofuse bench paper-vit``; trained here if missing) are
fused on the first N digits of a seeded permutation of the training set (4,000 at most: every
digit once), each (method, N) in a fresh process like ``scale.py``: the median wall time of up
to 3 fusions, the fusions' own peak resident memory above what the process held with the
models and data loaded (the kernel's high-water mark reset just before them), the forward pass
of both models on the fusion set timed after them, and the fused model's accuracy on the 1,000
test digits. Methods take options after a colon (``kf_linear:sample_chunk=500``). Results
accumulate in ``vit_fusion_set.json`` (a killed run resumes); ``.md`` has the table and
``.png`` the curves.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OUT = HERE / "results" / "vit_fusion_set"
CACHE = HERE / ".cache" / "paper-vit"
SIZES = [400, 1000, 2000, 4000]
METHODS = [
    "kf_linear",
    "hf_linear",
    "kf_linear:sample_chunk=500",
    "hf_linear:sample_chunk=500",
    "transformer_otfusion",
]


def _pair() -> list[Any]:
    """The seed-0 full-2 ViTs of ``paper-vit`` (trained and cached if missing)."""
    from neurofuse.bench.basemodels import prepare
    from neurofuse.bench.suites import get_suite

    suite = get_suite("paper-vit")
    cell = next(
        c
        for c in suite.cells([0])
        if c.split.regime == "full" and c.split.n_models == 2 and not c.variant
    )
    return prepare(cell, CACHE, "cpu").models


def run_point(spec: str, n: int, threads: int) -> dict[str, Any]:
    import scale
    import torch

    import neurofuse as nf
    from neurofuse.data import load

    torch.set_num_threads(threads)
    method, options = scale.parse_method(spec)
    data = load("mnist5k", seed=0)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    x = data.x_train[order[:n]]
    models = [m.eval() for m in _pair()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nf.fuse(models, x[:64], method=method, **options)  # first-call costs out of the timings
    out, fused = scale.measure_fusions(models, x, method, options, once_above=5.0, forward_calls=3)
    with torch.no_grad():
        out["accuracy"] = float((fused(data.x_test).argmax(1) == data.y_test).float().mean())
    return out


def report(rows: dict[str, Any], sizes: list[int], methods: list[str], args: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scale

    lines = [
        "# ViTs on large fusion sets: time, memory and accuracy against fusion samples",
        "",
        f"Command: `.venv/bin/python benchmarks/vit_fusion_set.py --sizes "
        f"{','.join(map(str, sizes))} --methods {','.join(methods)} --threads {args.threads}`",
        "",
        f"Machine: {platform.machine()}, CPU only, torch threads {args.threads}. The two ViTs of "
        "`paper-vit`'s full-2 split (seed 0), fused on the first N digits of a seeded "
        "permutation of MNIST-5k's 4,000 training digits; each point in a fresh process. "
        "*× fwd*: fusion time over the forward pass of both models on the fusion set, same "
        "process. *+MiB*: the fusions' peak resident memory above what the process held with "
        "the models and data loaded. *acc*: the fused model's accuracy on the 1,000 test digits.",
        "",
        "| method | " + " | ".join(f"N = {n}" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method in methods:
        cells, measured = scale.sweep_cells(
            rows,
            [(n, f"{n}|{method}") for n in sizes],
            lambda r: (
                f"{r['seconds']:.1f} s, {r['seconds'] / r['forward_seconds']:.0f}× fwd, "
                f"+{r['extra_mib']:.0f} MiB, acc {100 * r['accuracy']:.1f}"
            ),
        )
        xs = [n for n, _ in measured]
        ts = [r["seconds"] for _, r in measured]
        ms = [max(r["extra_mib"], 1.0) for _, r in measured]
        accs = [100 * r["accuracy"] for _, r in measured]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if xs:
            axes[0].loglog(xs, ts, marker="o", label=method)
            axes[1].loglog(xs, ms, marker="o", label=method)
            axes[2].semilogx(xs, accs, marker="o", label=method)
    for ax, title, unit in zip(
        axes,
        ("time", "extra peak memory", "test accuracy"),
        ("seconds", "MiB", "%"),
        strict=True,
    ):
        ax.set_title(f"{title} against fusion samples", fontsize=10)
        ax.set_xlabel("fusion samples")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "vit_fusion_set.png", dpi=110)
    plt.close(fig)
    lines += ["", "![curves](vit_fusion_set.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=int, default=600, help="seconds per point")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        spec = json.loads(args.point)
        print(json.dumps(run_point(spec["method"], spec["n"], args.threads)))
        return

    import scale

    from neurofuse.utils import atomic_write_text

    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > 4000:
        raise SystemExit("MNIST-5k has 4,000 training digits: sizes up to 4000")
    methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "vit_fusion_set.json"
    rows: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    _pair()  # train and cache the models once, outside the timed points
    for method in methods:
        for n in sizes:
            key = f"{n}|{method}"
            if key in rows:
                continue
            print(f"[N={n}] {method} ...", flush=True)
            spec = {"method": method, "n": n}
            r = rows[key] = scale.run_in_subprocess(__file__, spec, args.threads, args.budget)
            if "seconds" in r:
                print(
                    f"  {r['seconds']:.1f} s, +{r['extra_mib']:.0f} MiB, "
                    f"acc {100 * r['accuracy']:.1f}",
                    flush=True,
                )
            atomic_write_text(store, json.dumps(rows, indent=1))
    text = report(rows, sizes, methods, args)
    atomic_write_text(args.out / "vit_fusion_set.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
