"""Speed benchmark: fuse two VGG-style CNNs with every registered method.

Two ``vgg_small`` CNNs ([16, M, 32, M, 64, 64, M] on 28x28 inputs) are trained on the two halves of
a sharded MNIST-5k split (cached under ``benchmarks/.cache``); each method then fuses them on the
same 400 fusion samples drawn from model 0's data. Every method runs in its own process, so its
peak memory is its own. The table gives wall time, the split between forward passes, grouping and
fitting (core methods), peak memory, the ratio to OTFusion, and the fused model's test accuracy.

    python benchmarks/fusion_speed.py                 # every method, CPU
    python benchmarks/fusion_speed.py --methods kf_linear,otfusion --repeats 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
ARCH = {"config": "vgg_small", "in_channels": 1, "num_classes": 10, "input_size": 28}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(train_epochs: int, samples: int, seed: int) -> dict:
    """Train (or reuse) the two base models; return paths and the fusion-set indices."""
    from neurofuse.checkpoint import load_checkpoint, save_checkpoint
    from neurofuse.data import fusion_indices, load, partition
    from neurofuse.models import build
    from neurofuse.train import TrainConfig, train_model

    data = load("mnist5k", seed=seed)
    parts = partition(data.y_train, 2, "sharded", seed=seed, num_classes=data.num_classes)
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(parts.indices):
        path = CACHE / f"vgg_small_sharded_seed{seed}_e{train_epochs}_model{i}.safetensors"
        try:
            load_checkpoint(path)
        except Exception:
            torch.manual_seed(seed + i)
            model = build("vgg", **ARCH)
            cfg = TrainConfig(epochs=train_epochs, lr=2e-3, seed=seed + i, progress=True)
            train_model(model, data.x_train[idx], data.y_train[idx], cfg, num_classes=10)
            save_checkpoint(model, path, metadata={"partition": parts.scheme, "part": i})
        paths.append(str(path))
    fuse_idx = fusion_indices(data.y_train, parts, samples, seed=seed, from_part=0)
    counts = [int(len(i)) for i in parts.indices]
    return {"paths": paths, "fusion_idx": fuse_idx.tolist(), "sample_counts": counts, "seed": seed}


def method_options(method: str, setup: dict) -> dict:
    if method == "fedavg":
        return {"sample_counts": setup["sample_counts"]}
    return {}


def run_one(method: str, setup: dict, device: str, queue: mp.Queue) -> None:
    """Child process: fuse once and report time, phases, peak memory and accuracy."""
    try:
        import neurofuse as nf
        from neurofuse.checkpoint import load_checkpoint
        from neurofuse.data import load
        from neurofuse.evaluate import evaluate

        dev = _device(device)
        models = [load_checkpoint(p)[0] for p in setup["paths"]]
        data = load("mnist5k", seed=setup["seed"])
        idx = torch.tensor(setup["fusion_idx"])
        x = data.x_train[idx].to(dev)
        y = data.y_train[idx].to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        fused = nf.fuse(models, (x, y), method=method, seed=0, **method_options(method, setup))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        if dev.type == "cuda":
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_mb = (rss_after - rss_before) / 1024  # ru_maxrss is in KiB on Linux
        acc = evaluate(fused.cpu(), data.x_test, data.y_test).accuracy
        report = getattr(fused, "neurofuse_report", {})
        queue.put(
            {
                "method": method,
                "wall": wall,
                "peak_mb": peak_mb,
                "accuracy": acc,
                "phases": report.get("seconds", {}),
            }
        )
    except Exception as exc:  # reported in the table, the benchmark goes on
        queue.put({"method": method, "error": f"{type(exc).__name__}: {exc}"})


def measure(method: str, setup: dict, device: str, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    runs = []
    for _ in range(repeats):
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(method, setup, device, queue))
        proc.start()
        result = queue.get()
        proc.join()
        if "error" in result:
            return result
        runs.append(result)
    best = dict(runs[0])
    best["wall"] = statistics.median(r["wall"] for r in runs)
    best["peak_mb"] = max(r["peak_mb"] for r in runs)
    phases = {}
    for key in runs[0]["phases"]:
        phases[key] = statistics.median(r["phases"].get(key, 0.0) for r in runs)
    best["phases"] = phases
    return best


def render(results: list[dict], device: str) -> str:
    ot = next((r["wall"] for r in results if r["method"] == "otfusion" and "wall" in r), None)
    lines = [
        "| method | wall s | forward s | grouping s | fitting s | (grouping+fitting)/forward "
        "| peak MB | x OTFusion | test acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        p = r["phases"]
        fwd, grp, fit = p.get("forward"), p.get("grouping"), p.get("fitting")
        ratio = (
            f"{(grp or 0) + (fit or 0):.2f}/{fwd:.2f} = {((grp or 0) + (fit or 0)) / fwd:.2f}"
            if fwd
            else "-"
        )

        def fmt(v):
            return f"{v:.3f}" if v is not None else "-"

        vs_ot = f"{r['wall'] / ot:.2f}" if ot else "-"
        lines.append(
            f"| {r['method']} | {r['wall']:.3f} | {fmt(fwd)} | {fmt(grp)} | {fmt(fit)} | {ratio} "
            f"| {r['peak_mb']:.0f} | {vs_ot} | {r['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (median)")
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the Markdown table and JSON here")
    args = parser.parse_args(argv)

    import neurofuse as nf
    from neurofuse.progress import progress_bar
    from neurofuse.utils import atomic_write_text

    methods = list(nf.available_methods()) if args.methods == "all" else args.methods.split(",")
    setup = prepare(args.train_epochs, args.samples, args.seed)
    results = []
    with progress_bar(sys.stderr.isatty(), "methods", len(methods)) as advance:
        for i, m in enumerate(methods):
            results.append(measure(m, setup, args.device, args.repeats))
            r = results[-1]
            done = f"{r['wall']:.2f} s, acc {r['accuracy']:.3f}" if "wall" in r else r["error"]
            print(f"[{i + 1}/{len(methods)}] {m}: {done}", file=sys.stderr, flush=True)
            advance(i + 1)
    device = _device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"fusion_speed: 2 x vgg_small on sharded MNIST-5k, {args.samples} fusion samples, "
        f"device {device.type} ({name}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    table = render(results, device.type)
    print(header)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/fusion_speed.py " + " ".join(argv or sys.argv[1:])
        atomic_write_text(out.with_suffix(".md"), f"{header}\n\nCommand: `{cmd}`\n\n{table}\n")
        payload = json.dumps({"header": header, "command": cmd, "results": results}, indent=2)
        atomic_write_text(out.with_suffix(".json"), payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
