"""What the Linear variants' speed options cost in time and in accuracy (issue 13).

Two ``vgg_small`` CNNs trained on the halves of a sharded MNIST-5k split (the pair of
``fusion_speed.py``, cached under ``benchmarks/.cache``) are fused on 400 samples by KF and HF
Linear with each option, in one process: the median of ``--repeats`` warm fusions (after one
that is not timed), its split into forward passes, grouping and fitting, the ratio to one
forward pass of both base models on the fusion set (timed in the same process), and the fused
model's test accuracy. Rows:

- ``default``: the normal equations of stride-1 convolutions from shifted products of the
  input map (``neurofuse.patch_moments``), float64 products (the default on a CPU);
- ``patch products``: the same sums from explicit patch rows (what the default did before;
  the path is switched off in this process by replacing ``patch_moments.applies``);
- ``precision=float32``: float32 products (sums in float64);
- ``row_budget=R``: a uniform sketch of about ``R x fan-in`` rows per layer (explicit patches).

    python benchmarks/fit_options.py --out benchmarks/results/fit_options_cpu
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

from neurofuse.utils import atomic_write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS: list[tuple[str, dict]] = [
    ("default", {}),
    ("patch products", {}),
    ("precision=float32", {"precision": "float32"}),
    ("row_budget=64", {"row_budget": 64}),
    ("row_budget=16", {"row_budget": 16}),
    ("row_budget=4", {"row_budget": 4}),
]
METHODS = ["kf_linear", "hf_linear"]


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # not timed: first-call costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(args: argparse.Namespace) -> dict:
    import fusion_speed

    import neurofuse as nf
    from neurofuse import patch_moments
    from neurofuse.checkpoint import load_checkpoint
    from neurofuse.data import load
    from neurofuse.evaluate import evaluate

    torch.set_num_threads(args.threads)
    setup = fusion_speed.prepare(4, 400, 0)
    models = [load_checkpoint(p)[0].eval() for p in setup["paths"]]
    data = load("mnist5k", seed=0)
    idx = torch.tensor(setup["fusion_idx"])
    x, y = data.x_train[idx], data.y_train[idx]
    out_json = Path(f"{args.out}.json")
    done = json.loads(out_json.read_text()) if out_json.exists() and args.resume else {}
    rows = done.get("rows", [])
    seen = {(r["method"], r["variant"]) for r in rows}

    def forward() -> None:
        with torch.no_grad():
            for m in models:
                m(x)

    # the ratios of resumed rows were taken against the saved forward time: keep it
    fwd = done["forward_seconds"] if rows else _timed(forward, args.repeats)[0]
    applies = patch_moments.applies
    warnings.simplefilter("ignore")
    for method in METHODS:
        for name, options in VARIANTS:
            if (method, name) in seen:
                continue
            print(f"{method} {name} ...", flush=True)
            if name == "patch products":
                patch_moments.applies = lambda layer: False  # type: ignore[assignment]
            try:
                t, fused = _timed(
                    lambda: nf.fuse(models, (x, y), method=method, seed=0, **options),  # noqa: B023
                    args.repeats,
                )
            finally:
                patch_moments.applies = applies
            report = fused.neurofuse_report  # type: ignore[union-attr]
            acc = evaluate(fused, data.x_test, data.y_test).accuracy  # type: ignore[arg-type]
            rows.append(
                {
                    "method": method,
                    "variant": name,
                    "seconds": t,
                    "ratio_to_forward": t / fwd,
                    "phases": report.get("seconds", {}),
                    "accuracy": acc,
                }
            )
            print(f"  {t:.3f} s ({t / fwd:.1f} forward passes), test accuracy {acc:.4f}")
            result = {"forward_seconds": fwd, "rows": rows, "meta": _meta(args)}
            atomic_write_text(out_json, json.dumps(result, indent=2))
    return {"forward_seconds": fwd, "rows": rows, "meta": _meta(args)}


def _meta(args: argparse.Namespace) -> dict:
    return {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d"),
    }


def render(result: dict, command: str) -> str:
    fwd = result["forward_seconds"]
    meta = result["meta"]
    lines = [
        "# Speed options of the Linear variants: time and accuracy",
        "",
        f"Two vgg_small CNNs (sharded MNIST-5k halves), 400 fusion samples, CPU, torch "
        f"{meta['torch']}, {meta['threads']} threads, median of {meta['repeats']} warm fusions "
        f"({meta['date']}). One forward pass of both base models on the fusion set: "
        f"{fwd * 1000:.0f} ms.",
        "",
        f"Command: `{command}`",
        "",
        "| method | option | warm s | ÷ forward | forward s | grouping s | fitting s | test acc % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        p = r["phases"]
        lines.append(
            f"| {r['method']} | {r['variant']} | {r['seconds']:.3f} | {r['ratio_to_forward']:.1f} "
            f"| {p.get('forward', 0):.3f} | {p.get('grouping', 0):.3f} | {p.get('fitting', 0):.3f} "
            f"| {100 * r['accuracy']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, marker in zip(METHODS, "os^v", strict=False):
        rows = [r for r in result["rows"] if r["method"] == method]
        ax.scatter(
            [r["ratio_to_forward"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            marker=marker,
            label=method,
        )
        for r in rows:
            ax.annotate(
                r["variant"],
                (r["ratio_to_forward"], 100 * r["accuracy"]),
                fontsize=7,
                xytext=(3, 3 if marker == "o" else -10),  # HF below its points, KF above
                textcoords="offset points",
                rotation=20,
            )
    ax.set_xlabel("warm fusion time / forward pass of both base models")
    ax.set_ylabel("test accuracy of the fused model (%)")
    ax.set_title("Linear variants: speed options on two VGG-small CNNs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "results" / "fit_options_cpu"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="measure every row again instead of keeping the saved ones",
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/fit_options.py " + " ".join(argv or sys.argv[1:])
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(f"{args.out}.md"), render(result, command.strip()))
    plot(result, Path(f"{args.out}.png"))
    print(render(result, command.strip()))


if __name__ == "__main__":
    main()
