"""The ``runtime`` cell: every method fuses the same base models ``repeats`` times in its own
fresh process, so its peak memory is its own and no warm cache from another method helps it.

Reported per method: the median and all wall times of ``nf.fuse`` (models already loaded), the
warm median (every call but the first: what a process that fuses repeatedly pays), the time of
one forward pass of every base model on the fusion set measured in the same process (median of
``repeats``) and the warm median's ratio to it, peak memory (CUDA: ``max_memory_allocated``;
CPU: growth of the process's peak RSS over its value just before the first fusion), the test
accuracy of the last fused model, and the ratio of the median time to OTFusion's. Its report
section gives one table and one plot per seed.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neurofuse.bench import plots, tables
from neurofuse.bench.basemodels import models_digest, prepare
from neurofuse.bench.records import finished_methods, partial_path, write_record
from neurofuse.bench.spec import Cell, MethodRun
from neurofuse.bench.suites import Suite


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(
    cell: Cell, run: MethodRun, cache: str, device: str, repeats: int, threads: int, queue: Any
) -> None:
    try:
        import neurofuse as nf
        from neurofuse.evaluate import evaluate

        torch.set_num_threads(threads)
        dev = torch.device(device)
        setup = prepare(cell, Path(cache), dev)
        options = run.kwargs()
        if run.needs_counts:
            options["sample_counts"] = [int(len(p)) for p in setup.parts]
        data = (setup.fusion_x.to(dev), setup.fusion_y.to(dev))
        models = [m.to(dev) for m in setup.models]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        forward = _forward_seconds(models, data[0], repeats, dev)
        base_rss = _peak_rss_mib()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fused = nf.fuse(
                models,
                data,
                method=run.method,
                seed=cell.seed,
                device=dev,
                **run.fuse_arguments(),
                **options,
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            peak = _peak_rss_mib() - base_rss
        acc = evaluate(fused, setup.data.x_test, setup.data.y_test, device=dev).accuracy
        queue.put(
            {
                "status": "ok",
                "times": times,
                "median_seconds": statistics.median(times),
                "warm_median_seconds": statistics.median(times[1:] or times),
                "forward_seconds": forward,
                "ratio_to_forward": statistics.median(times[1:] or times) / max(forward, 1e-9),
                "peak_memory_mib": peak,
                "accuracy": acc,
                "memory_kind": "cuda_max_allocated" if dev.type == "cuda" else "cpu_rss_growth",
            }
        )
    except Exception as exc:
        queue.put(
            {
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=4),
            }
        )


def _forward_seconds(models: list[Any], x: torch.Tensor, repeats: int, dev: torch.device) -> float:
    """Median over ``repeats`` (after one warm-up) of one forward pass of every model on ``x``:
    the unit the fusion time is compared with."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            for m in models:
                m.eval()(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_method(
    cell: Cell,
    run: MethodRun,
    cache: Path,
    device: torch.device,
    repeats: int,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Fuse ``repeats`` times with ``run`` in a fresh (spawned) process; return its timings."""
    entry: dict[str, Any] = run.entry()
    if run.pairwise and cell.split.n_models != 2:
        return {**entry, "status": "n/a"}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_child,
        args=(cell, run, str(cache), str(device), repeats, torch.get_num_threads(), queue),
    )
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"status": "error", "error": f"no result within {timeout:.0f}s"}
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    return {**entry, **result}


def run_runtime_cell(
    suite: Suite,
    cell: Cell,
    runs: Sequence[MethodRun],
    out: Path,
    cache: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Time every run on the cell's base models, each in its own process (see the module)."""
    start = time.perf_counter()
    # trains and caches once, before the timed children
    digest = models_digest(prepare(cell, cache, device).models)
    partial = partial_path(out, cell)
    methods = finished_methods(out, cell, digest)  # only runs timed on these base models
    for run in runs:
        if methods.get(run.key, {}).get("status") == "ok":
            continue
        methods[run.key] = time_method(cell, run, cache, device, suite.repeats)
        write_record(partial, {"cell": cell.describe(), "base_digest": digest, "methods": methods})
    ot = methods.get("OTFusion | uniform", {}).get("median_seconds")
    for entry in methods.values():
        if ot and entry.get("status") == "ok":
            entry["ratio_to_otfusion"] = entry["median_seconds"] / ot
    return {
        "cell": cell.describe(),
        "base_digest": digest,
        "methods": methods,
        "repeats": suite.repeats,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }


def runtime_report(suite: Suite, records: list[dict[str, Any]], out: Path) -> list[str]:
    """The report section of a runtime suite: per seed, the timing table and a plot of the
    median times (written into ``out``)."""
    lines: list[str] = []
    for rec in records:
        lines += [
            f"## seed {rec['cell']['seed']} ({rec['cell']['split']}, {rec['repeats']} repeats)",
            "",
            tables.runtime_table(rec),
            "",
        ]
        ok = [
            (k, e["median_seconds"]) for k, e in rec["methods"].items() if e.get("status") == "ok"
        ]
        if ok:
            png = f"runtime_seed{rec['cell']['seed']}.png"
            plots.plot_runtime(
                [k for k, _ in ok],
                [s for _, s in ok],
                out / png,
                f"{suite.name}: median fusion time",
            )
            lines += [f"![runtime]({png})", ""]
    return lines
