"""How fusion cost grows with width, fusion samples and models (issue 13's ``scale`` suite).

    .venv/bin/python benchmarks/scale.py [--axes width,samples,models]
        [--methods kf_linear,hf_linear,otfusion,git_rebasin] [--budget 600] [--threads 2]
        [--out benchmarks/results/scale]

Three sweeps of MLPs 784-W-W-10, each model trained for one epoch on MNIST-5k's 4,000 training
digits (its own seed; cached under ``benchmarks/.cache/scale``):

- ``width``: W = 256 ... 16384, two models, 400 fusion samples;
- ``samples``: 100 ... 10,000 fusion samples, W = 512, two models (beyond the 4,000 digits the
  set is the digits tiled with N(0, 0.1^2) jitter: this sweep measures cost, not accuracy);
- ``models``: 2 ... 16 models, W = 512, 400 samples (HF Linear takes two models only).

A method may carry options after a colon: ``kf_linear:sample_chunk=1000`` is KF Linear
evaluating the models on 1,000 fusion samples at a time (bounded memory in the samples).

Every point runs in a fresh process (``--point``), on ``--threads`` torch threads, so that its
peak memory is its own: the process first fuses width-16 MLPs with the same method (so that
no timed call pays first-call costs), loads the models, records its resident memory, fuses
(median of 3 calls when one takes under 2 s, else one), times the models' forward pass on the
fusion set (median of 3 warm calls; after the fusions, so that the memory it frees cannot
serve them unseen), and reports the wall time, the peak resident memory during the fusions
(the kernel's high-water mark, reset just before them) and that peak above what it held
before fusing. A point that runs past
``--budget`` seconds is stopped and recorded as such, and the larger points of its sweep are
skipped. Results accumulate in ``scale.json`` (a killed run resumes); ``scale.md`` has the
tables, the fitted growth exponents (least-squares slope of log time and log extra memory
against log size) and ``scale.png`` the log-log curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "scale"
CACHE = Path(__file__).parent / ".cache" / "scale"
METHODS = ("kf_linear", "hf_linear", "otfusion", "git_rebasin")
SWEEPS: dict[str, list[int]] = {
    "width": [256, 512, 1024, 2048, 4096, 8192, 16384],
    "samples": [100, 300, 1000, 3000, 10000, 30000],
    "models": [2, 4, 8, 16],
}
FIXED = {"width": 512, "samples": 400, "models": 2}


def point_of(axis: str, x: int) -> dict[str, int]:
    return {**FIXED, axis: x}


def _model_path(width: int, k: int) -> Path:
    return CACHE / f"mlp_w{width}_model{k}.safetensors"


def ensure_models(width: int, count: int, threads: int) -> None:
    """Train (one epoch) and cache the models a point needs, in a child process."""
    missing = [k for k in range(count) if not _model_path(width, k).exists()]
    if not missing:
        return
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import scale; "
        f"torch.set_num_threads({threads}); scale._train({width}, {missing})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def _train(width: int, indices: list[int]) -> None:
    import torch

    from neurofuse.checkpoint import save_checkpoint
    from neurofuse.data import load
    from neurofuse.models import build
    from neurofuse.train import TrainConfig, train_model

    splits = load("mnist5k", seed=0)
    for k in indices:
        torch.manual_seed(1000 + k)
        model = build("mlp", in_features=784, num_classes=10, hidden=(width, width))
        cfg = TrainConfig(
            epochs=1,
            lr=1e-3,
            batch_size=128,
            seed=k,
            val_fraction=0.0,
            warmup_epochs=0.0,
            progress=False,
        )
        start = time.perf_counter()
        train_model(model, splits.x_train, splits.y_train, cfg, num_classes=10)
        save_checkpoint(model, _model_path(width, k).with_suffix(""))
        print(f"  trained W={width} model {k} in {time.perf_counter() - start:.0f} s", flush=True)


def _fusion_inputs(n: int) -> Any:
    import torch

    from neurofuse.data import load

    x = load("mnist5k", seed=0).x_train
    if n <= len(x):
        return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]
    reps = math.ceil(n / len(x))
    tiled = x.repeat(reps, *([1] * (x.ndim - 1)))[:n].clone()
    jitter = torch.randn(tiled[len(x) :].shape, generator=torch.Generator().manual_seed(0))
    tiled[len(x) :] += 0.1 * jitter
    return tiled


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _reset_peak() -> bool:
    """Reset the kernel's resident-memory high-water mark (``VmHWM``) to the current size, so
    that the peak read after the fusions is theirs and not the forward pass's before them
    (Linux's ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> the method's name and its options (integers and
    ``true`` / ``false`` where the value is one)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"method option {item!r} of {spec!r} is not key=value")
        if value.lower() in ("true", "false"):
            options[key] = value.lower() == "true"
        else:
            options[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, options


def run_point(spec: str, point: dict[str, int], threads: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch

    from neurofuse.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    method, options = parse_method(spec)
    x = _fusion_inputs(point["samples"])
    _warm_up(method, point["models"], x[:32])
    models = [
        load_checkpoint(_model_path(point["width"], k).with_suffix(""))[0].eval()
        for k in range(point["models"])
    ]
    out, _ = measure_fusions(models, x, method, options, once_above=2.0, forward_calls=4)
    return out


def measure_fusions(
    models: list[Any],
    x: Any,
    method: str,
    options: dict[str, Any],
    once_above: float,
    forward_calls: int,
) -> tuple[dict[str, Any], Any]:
    """Fuse ``models`` on ``x`` up to 3 times (once when the first call takes ``once_above``
    seconds or more) and time the models' forward pass on ``x`` afterwards (the median of
    ``forward_calls`` calls but the first): the median wall time, the fusions' own peak
    resident memory and that peak above what the process held before; and the last fused
    model."""
    import torch

    import neurofuse as nf

    before = _rss_mib()
    own_peak = _reset_peak()
    times = []
    fused = None
    for _ in range(3):
        fused = None  # (the previous result is not held during the next fusion)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-fusion-set warning at large widths
            fused = nf.fuse(models, x, method=method, **options)
        times.append(time.perf_counter() - start)
        if times[0] >= once_above:
            break
    if own_peak:
        peak = _status_mib("VmHWM")
    else:  # the process's lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the forward pass after the fusions: the memory it leaves to the allocator would
    # otherwise serve the fusion without showing in its peak
    forward = []
    with torch.no_grad():
        for _ in range(forward_calls):
            start = time.perf_counter()
            for m in models:
                m(x)
            forward.append(time.perf_counter() - start)
    result = {
        "seconds": statistics.median(times),
        "forward_seconds": statistics.median(forward[1:]),
        "peak_mib": peak,
        "extra_mib": peak - before,
        "calls": len(times),
        "peak": "fusion" if own_peak else "process",
    }
    return result, fused


def run_in_subprocess(script: str, spec: dict[str, Any], threads: int, budget: int) -> dict:
    """Run ``script --point spec`` in a fresh process and return its measurement, or a row
    whose ``status`` says it ran past ``budget`` seconds or failed (printed)."""
    try:
        done = subprocess.run(
            [sys.executable, script, "--point", json.dumps(spec), "--threads", str(threads)],
            capture_output=True,
            text=True,
            timeout=budget,
            check=True,
        )
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        print(f"  over the budget of {budget} s", flush=True)
        return {"status": f"> {budget} s"}
    except subprocess.CalledProcessError as err:
        reason = (err.stderr or "").strip().splitlines()[-1:] or ["failed"]
        print(f"  failed: {reason[0]}", flush=True)
        return {"status": f"failed: {reason[0][:80]}"}


def _warm_up(method: str, count: int, x: Any) -> None:
    """Fuse ``count`` width-16 MLPs once, so that the timed calls pay no first-call costs
    (imports, first use of a solver: about 2 s for OTFusion) whatever their size."""
    import torch

    import neurofuse as nf
    from neurofuse.models import build

    tiny = []
    for k in range(count):
        torch.manual_seed(k)
        tiny.append(build("mlp", in_features=784, num_classes=10, hidden=(16, 16)).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nf.fuse(tiny, x, method=method)


def _slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def sweep_cells(
    rows: dict[str, Any], keys: list[tuple[int, str]], cell: Callable[[dict[str, Any]], str]
) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """A method's row of a sweep table: for each ``(size, key)`` of ``keys`` the cell of its
    point in ``rows`` (``cell(record)`` when measured, its status when it stopped, empty when
    not run), and the ``(size, record)`` of the measured points (what the plots and fits use)."""
    cells, measured = [], []
    for x, key in keys:
        r = rows.get(key)
        if r is None:
            cells.append("")
        elif "seconds" not in r:
            cells.append(r["status"])
        else:
            cells.append(cell(r))
            measured.append((x, r))
    return cells, measured


def _key(axis: str, x: int, method: str) -> str:
    return f"{axis}|{x}|{method}"


def report(rows: dict[str, Any], axes: list[str], methods: list[str], args: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [k.split("|") for k in rows]
    axes = [a for a in SWEEPS if a in axes or any(s[0] == a for s in seen)]
    methods = list(dict.fromkeys([*METHODS, *methods, *(s[2] for s in seen)]))
    methods = [m for m in methods if any(s[2] == m for s in seen)]
    groups: dict[tuple[str, ...], list[str]] = {}  # the axes a method was measured on
    for m in methods:
        groups.setdefault(
            tuple(a for a in axes if any(s[:3:2] == [a, m] for s in seen)), []
        ).append(m)
    commands = [
        f"`.venv/bin/python benchmarks/scale.py --axes {','.join(ax)} --methods {','.join(ms)} "
        f"--budget {args.budget} --threads {args.threads}`"
        for ax, ms in groups.items()
    ]
    lines = [
        "# Scale: fusion cost against width, fusion samples and models (issue 13)",
        "",
        "Commands (a run resumes from `scale.json`): " + "; ".join(commands),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
        "CPU only. MLPs 784-W-W-10 trained one epoch each; every point in a fresh process. "
        "*× forward*: fusion time over the forward pass of all the base models on the fusion "
        "set, measured in the same process. Each process first fuses width-16 MLPs once "
        "(first-call costs out of the timings; points of width 4096 and more measured before "
        "2026-12-06 evening were timed without it, once: their first call includes up to about "
        "2 s of them). *Extra MiB*: peak resident memory during the fusions above what the "
        "process held with the models and data loaded (points measured from 2026-12-07 on, the "
        "samples and models sweeps and OTFusion's and Git Re-Basin's width points: the "
        "kernel's high-water mark reset just before the fusions, the forward pass timed after "
        "them; earlier ones, the Linear variants' width points: the "
        "process's lifetime peak over what it held after timing the forward pass on the "
        "fusion set, which the allocator may have kept for the fusion to reuse; small at 400 "
        "samples). *Exponent*: least-squares slope of log "
        "time (log extra memory) against log size over the measured points; extra memory "
        "below 1 MiB counts as 1 MiB. *Time, last step*: the same slope between the two largest "
        "sizes only, where fixed costs weigh least (a law a + b (M - 1), linear in the models "
        "but for the reference, fits 1.30 over 2-16 models and 1.10 over the last step).",
        "",
    ]
    fig, grid = plt.subplots(2, len(axes), figsize=(4.6 * len(axes), 7.5), squeeze=False)
    for col, axis in enumerate(axes):
        lines += [
            f"## {axis} (fixed: "
            + ", ".join(f"{k} {v}" for k, v in FIXED.items() if k != axis)
            + ")",
            "",
            "| method | " + " | ".join(str(x) for x in SWEEPS[axis]) + " | exponent time | "
            "exponent memory | time, last step |",
            "|---|" + "---:|" * (len(SWEEPS[axis]) + 3),
        ]
        for method in methods:
            cells, measured = sweep_cells(
                rows,
                [(x, _key(axis, x, method)) for x in SWEEPS[axis]],
                lambda r: (
                    f"{r['seconds']:.2f} s, {r['seconds'] / r['forward_seconds']:.0f}× fwd, "
                    f"+{r['extra_mib']:.0f} MiB"
                ),
            )
            xs = [x for x, _ in measured]
            ts = [r["seconds"] for _, r in measured]
            ms = [max(r["extra_mib"], 1.0) for _, r in measured]
            if not xs and all(c == "" for c in cells):
                continue
            et, em = _slope(xs, ts), _slope(xs, ms)
            last = _slope(xs[-2:], ts[-2:]) if len(xs) >= 2 else None
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {'-' if et is None else f'{et:.2f}'}"
                f" | {'-' if em is None else f'{em:.2f}'}"
                f" | {'-' if last is None else f'{last:.2f}'} |"
            )
            if xs:
                grid[0][col].loglog(xs, ts, marker="o", label=method)
                grid[1][col].loglog(xs, ms, marker="o", label=method)
        lines.append("")
        grid[0][col].set_title(f"time against {axis}", fontsize=10)
        grid[1][col].set_title(f"extra peak memory against {axis}", fontsize=10)
        grid[0][col].set_ylabel("seconds")
        grid[1][col].set_ylabel("MiB")
        for row in (0, 1):
            grid[row][col].set_xlabel(axis)
            grid[row][col].grid(alpha=0.3, which="both")
            grid[row][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "scale.png", dpi=110)
    plt.close(fig)
    lines += ["![log-log growth](scale.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--axes", default="width,samples,models")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budget", type=int, default=600, help="seconds per point")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--first", type=int, help="only the first N sizes of each sweep (a smoke test)"
    )
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        spec = json.loads(args.point)
        print(json.dumps(run_point(spec["method"], spec["point"], args.threads)))
        return

    from neurofuse.utils import atomic_write_text

    axes = args.axes.split(",")
    methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "scale.json"
    rows: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    for axis in axes:
        for method in methods:
            over = False
            for x in SWEEPS[axis][: args.first]:
                key = _key(axis, x, method)
                point = point_of(axis, x)
                if parse_method(method)[0] == "hf_linear" and point["models"] != 2:
                    continue
                if key in rows and rows[key].get("status") != "skipped":
                    # measured, or over the budget / failed before: resume after it
                    over = rows[key].get("seconds", math.inf) > args.budget
                    continue
                if over:
                    rows[key] = {"status": "skipped"}
                    continue
                ensure_models(point["width"], point["models"], args.threads)
                print(f"[{axis}={x}] {method} ...", flush=True)
                spec = {"method": method, "point": point}
                r = rows[key] = run_in_subprocess(__file__, spec, args.threads, args.budget)
                if "seconds" in r:
                    print(
                        f"  {r['seconds']:.2f} s ({r['seconds'] / r['forward_seconds']:.1f}x the "
                        f"forward pass), peak {r['peak_mib']:.0f} MiB (+{r['extra_mib']:.0f})",
                        flush=True,
                    )
                else:  # over the budget, or out of memory (killed) / an error: larger fail too
                    over = True
                atomic_write_text(store, json.dumps(rows, indent=1))
    text = report(rows, axes, methods, args)
    atomic_write_text(args.out / "scale.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
