"""float32 against float64 products in the Linear fits, on the suites' cached model sets.

    .venv/bin/python benchmarks/precision_ab.py [--cache benchmarks/.cache]
        [--patterns "mnist5k_vgg*,mnist5k_mlp*"] [--out benchmarks/results/precision_ab.md]

For every cached model set of the accuracy suites whose file names match a pattern (the
suites' trained base models; nothing is trained here, a missing cache gives an empty report),
KF Linear (and HF Linear for pairs) fuses the models on the same 400 training digits (fixed by
seed 0) once with ``precision="float64"`` and once with ``precision="float32"`` (each with its
default ridge), and records the test accuracy of both, the relative difference of their
logits on the test set and the share of test digits on which they agree. The report gives the
mean, smallest and largest accuracy difference per method and model family, and every set.
Records accumulate in ``<out>.json`` (a killed run resumes).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def measure(models: list[Any], x: Any, x_test: Any, y_test: Any, method: str) -> dict[str, Any]:
    import torch

    import neurofuse as nf

    out: dict[str, Any] = {}
    logits = {}
    for precision in ("float64", "float32"):
        start = time.perf_counter()
        fused = nf.fuse(models, x, method=method, precision=precision)
        out[f"seconds_{precision}"] = time.perf_counter() - start
        with torch.no_grad():
            logits[precision] = fused(x_test)
        out[f"acc_{precision}"] = float((logits[precision].argmax(1) == y_test).float().mean())
    a, b = logits["float64"], logits["float32"]
    out["logit_rel_diff"] = float((a - b).norm() / a.norm())
    out["agree"] = float((a.argmax(1) == b.argmax(1)).float().mean())
    return out


def render(records: dict[str, dict[str, Any]], command: str) -> str:
    lines = [
        "# float32 against float64 products in the Linear fits",
        "",
        f"Command: `{command}`",
        "",
        "The suites' cached model sets, fused on 400 fixed training digits with each precision "
        "(each with its default ridge: 1e-9 / 1e-6); test accuracy in %, differences float32 "
        "minus float64 in points.",
        "",
        "| family | method | sets | mean difference | smallest | largest | time float32 / float64 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key, r in records.items():
        name, method = key.split("|")
        family = "vgg_bn" if "_vgg_bn_" in name else name.split("_")[1]  # mnist5k_<arch>_
        groups.setdefault((family, method), []).append(r)
    for (family, method), rs in sorted(groups.items()):
        d = [100 * (r["acc_float32"] - r["acc_float64"]) for r in rs]
        t = sum(r["seconds_float32"] for r in rs) / sum(r["seconds_float64"] for r in rs)
        lines.append(
            f"| {family} | {method} | {len(rs)} | {statistics.mean(d):+.2f} | {min(d):+.1f} | "
            f"{max(d):+.1f} | {t:.2f} |"
        )
    lines += [
        "",
        "## Every set",
        "",
        "| model set | method | float64 | float32 | logits, relative difference | agree |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, r in sorted(records.items()):
        name, method = key.split("|")
        lines.append(
            f"| {name} | {method} | {100 * r['acc_float64']:.1f} | {100 * r['acc_float32']:.1f} "
            f"| {r['logit_rel_diff']:.1e} | {r['agree']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--patterns", default="mnist5k_vgg*,mnist5k_mlp*")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "precision_ab.md")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from neurofuse.checkpoint import load_checkpoint
    from neurofuse.data import load
    from neurofuse.progress import progress_bar
    from neurofuse.utils import atomic_write_text

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = load("mnist5k", seed=0)
    g = torch.Generator().manual_seed(0)
    x = data.x_train[torch.randperm(len(data.x_train), generator=g)[:400]]
    sets = sorted(
        {
            p.rsplit("_model", 1)[0]
            for pattern in args.patterns.split(",")
            for p in glob.glob(str(args.cache / f"{pattern.strip()}_model0.safetensors"))
        }
    )
    store = args.out.with_suffix(".json")
    records: dict[str, dict[str, Any]] = json.loads(store.read_text()) if store.exists() else {}
    with progress_bar(True, "precision A/B", len(sets)) as advance:
        for done, prefix in enumerate(sets, 1):
            paths = sorted(glob.glob(prefix + "_model*.safetensors"))
            models = [load_checkpoint(p)[0].eval() for p in paths]
            for method in ("kf_linear", "hf_linear"):
                key = f"{Path(prefix).name}|{method}"
                if key in records or (method == "hf_linear" and len(models) != 2):
                    continue
                records[key] = measure(models, x, data.x_test, data.y_test, method)
                atomic_write_text(store, json.dumps(records, indent=1, sort_keys=True))
            advance(done)
    command = "python benchmarks/precision_ab.py"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, render(records, command))
    print(f"wrote {args.out} ({len(records)} model sets x methods)")


if __name__ == "__main__":
    main()
