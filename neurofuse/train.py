"""Supervised training of the base models that neurofuse later fuses.

One plain loop: AdamW, Adam or SGD, linear warm-up then cosine decay (stepped per batch), label
smoothing, optional augmentation and CutMix, and model selection by validation accuracy. The
validation split is carved from the training data (stratified, seeded) unless one is given; a
test set never enters this module.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from torch import nn

from neurofuse.evaluate import predict_logits
from neurofuse.optimizers import OptimizerName, check_optimizer, make_optimizer
from neurofuse.utils import resolve_device, to_jsonable

__all__ = [
    "EpochStats",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "train_model",
    "train_models",
]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_model`.

    Attributes:
        optimizer: a key of :data:`neurofuse.optimizers.OPTIMIZERS` (``"adamw"``, ``"adam"``
            or ``"sgd"``).
        lr: peak learning rate, reached at the end of warm-up.
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD) weight decay.
        momentum: SGD momentum (ignored by AdamW).
        epochs: passes over the training split.
        batch_size: samples per optimisation step.
        warmup_epochs: length of the linear warm-up, in epochs (may be fractional).
        min_lr: learning rate at the end of the cosine decay.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 turns CutMix off.
        cutmix_prob: probability that a batch is CutMixed (when ``cutmix_alpha > 0``).
        augment: ``augment(x, generator) -> x`` applied to every training batch, or None.
        val_fraction: share of each class held out for model selection when no validation set
            is passed; 0 trains on everything and keeps the last epoch.
        seed: seeds the validation split, shuffling, augmentation and CutMix (not the model's
            initialisation, which is the caller's).
        device: where to train (``None``/``"auto"``: CUDA if available).
        progress: show a transient rich progress bar over epochs.
    """

    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    epochs: int = 30
    batch_size: int = 128
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    cutmix_alpha: float = 0.0
    cutmix_prob: float = 0.5
    augment: Augment | None = None
    val_fraction: float = 0.1
    seed: int = 0
    device: str | torch.device | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                0 <= self.warmup_epochs <= self.epochs,
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}",
            ),
            (
                0 <= self.min_lr <= self.lr,
                f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}",
            ),
            (
                0 <= self.label_smoothing < 1,
                f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (self.cutmix_alpha >= 0, f"cutmix_alpha must be >= 0, got {self.cutmix_alpha}"),
            (0 <= self.cutmix_prob <= 1, f"cutmix_prob must be in [0, 1], got {self.cutmix_prob}"),
            (
                0 <= self.val_fraction < 1,
                f"val_fraction must be in [0, 1), got {self.val_fraction}",
            ),
            (
                self.augment is None or callable(self.augment),
                "augment must be a callable augment(x, generator) -> x, or None",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    r"""Learning-rate multiplier for ``LambdaLR``: linear warm-up, then cosine decay.

    With :math:`W` warm-up steps, :math:`T` total steps and floor :math:`m = \mathrm{min\_lr}/\mathrm{lr}`:

    .. math::
        f(s) = \begin{cases}
            (s + 1) / W & s < W \\
            m + (1 - m)\,\tfrac12\bigl(1 + \cos(\pi \min(1, (s - W)/(T - W)))\bigr) & s \ge W
        \end{cases}

    so the rate climbs linearly to the peak over the first W steps and reaches ``min_lr``
    exactly after the last of the T steps.
    """

    total_steps: int
    warmup_steps: int
    min_factor: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return make_optimizer(config.optimizer, params, config.lr, config.weight_decay, config.momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :class:`WarmupCosine` schedule for ``config.epochs`` epochs."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    schedule = WarmupCosine(total, warmup, config.min_lr / config.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """One epoch: mean training loss, validation accuracy (None without validation), and the
    learning rate of its last step. Epochs are numbered from 1."""

    epoch: int
    train_loss: float
    val_accuracy: float | None
    lr: float


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train_model` did: per-epoch history and the epoch whose weights were kept."""

    history: list[EpochStats]
    best_epoch: int
    best_val_accuracy: float | None
    num_train: int
    num_val: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig | None = None,
    *,
    num_classes: int | None = None,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` and restore its best-validation weights.

    Args:
        model: the network to train; it is moved to ``config.device`` and updated in place.
        x: training inputs ``(N, ...)``; y: integer labels ``(N,)``.
        config: hyper-parameters (defaults: :class:`TrainConfig`).
        num_classes: number of classes; inferred as ``max(label) + 1`` when omitted.
        x_val, y_val: a validation set. Without it, ``config.val_fraction`` of every class
            is held out of ``(x, y)`` by a seeded stratified split.
        description: label of the progress bar.

    Returns:
        :class:`TrainResult`. The model ends with the weights of ``best_epoch``, the first
        epoch of highest validation accuracy (the last epoch when there is no validation).
    """
    config = config or TrainConfig()
    num_classes = _check_data(x, y, x_val, y_val, num_classes)
    device = resolve_device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    if x_val is None:
        train_idx, val_idx = _stratified_holdout(y, config.val_fraction, generator)
        x_val, y_val = (x[val_idx], y[val_idx]) if val_idx.numel() else (None, None)
        x, y = x[train_idx], y[train_idx]

    model.to(device)
    steps_per_epoch = len(_batches(torch.arange(len(x)), config.batch_size))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    history: list[EpochStats] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    start = time.perf_counter()

    with _progress_bar(config.progress) as bar:
        task = bar.add_task(description, total=config.epochs, stats="")
        for epoch in range(1, config.epochs + 1):
            loss, lr = _train_epoch(
                model, x, y, config, num_classes, optimizer, scheduler, generator, device
            )
            val_acc = None
            if x_val is not None:
                assert y_val is not None  # both or neither (_check_data)
                logits = predict_logits(model, x_val, device=device)
                val_acc = float((logits.argmax(1) == y_val.cpu()).double().mean())
                if best is None or val_acc > best[0]:
                    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best = (val_acc, epoch, state)
            history.append(EpochStats(epoch, loss, val_acc, lr))
            stats = f"loss {loss:.4f}" + ("" if val_acc is None else f"  val acc {val_acc:.2%}")
            bar.update(task, advance=1, stats=stats)

    if best is not None:
        model.load_state_dict(best[2])
    return TrainResult(
        history=history,
        best_epoch=config.epochs if best is None else best[1],
        best_val_accuracy=None if best is None else best[0],
        num_train=len(x),
        num_val=0 if x_val is None else len(x_val),
        seconds=time.perf_counter() - start,
    )


def train_models(
    build_fn: Callable[[int], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    parts: Sequence[torch.Tensor],
    config: TrainConfig | None = None,
    *,
    num_classes: int | None = None,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
) -> list[tuple[nn.Module, TrainResult]]:
    """Train one fresh model per index set in ``parts`` (e.g. the clients of a partition).

    Model ``i`` is built by ``build_fn(i)`` under ``torch.manual_seed(config.seed + i)`` (the
    global RNG is restored afterwards) and trained on ``(x[parts[i]], y[parts[i]])`` with
    ``seed = config.seed + i``. Its validation set is carved from its own part unless
    ``x_val``/``y_val`` are given, in which case all models share them. ``num_classes``
    defaults to ``max(y) + 1`` over the whole of ``y``, so every model agrees on it.
    """
    config = config or TrainConfig()
    num_classes = _check_data(x, y, x_val, y_val, num_classes)
    for i, idx in enumerate(parts):
        _check_part(idx, len(x), i)
    results = []
    for i, idx in enumerate(parts):
        member = dataclasses.replace(config, seed=config.seed + i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member.seed)
            model = build_fn(i)
        idx = idx.to(x.device)
        result = train_model(
            model,
            x[idx],
            y[idx],
            member,
            num_classes=num_classes,
            x_val=x_val,
            y_val=y_val,
            description=f"model {i + 1}/{len(parts)}",
        )
        results.append((model, result))
    return results


def _train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    num_classes: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[float, float]:
    """One pass over shuffled batches; returns (sample-weighted mean loss, last step's lr)."""
    model.train()
    total = torch.zeros((), device=device)
    seen = 0
    lr = float(scheduler.get_last_lr()[0])
    for idx in _batches(torch.randperm(len(x), generator=generator), config.batch_size):
        idx = idx.to(x.device)
        xb, target = x[idx], y[idx]
        if config.augment is not None:
            xb = config.augment(xb, generator)
        if config.cutmix_alpha > 0 and torch.rand((), generator=generator) < config.cutmix_prob:
            xb, target = _load_cutmix()(xb, target, config.cutmix_alpha, num_classes, generator)
        logits = model(xb.to(device, non_blocking=True))
        if logits.ndim != 2 or logits.shape[1] < num_classes:
            raise ValueError(
                f"model output has shape {tuple(logits.shape)} but the labels need "
                f"(batch, >= {num_classes}) logits; build the model with num_classes={num_classes}"
            )
        loss = F.cross_entropy(
            logits, target.to(device, non_blocking=True), label_smoothing=config.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = float(scheduler.get_last_lr()[0])
        scheduler.step()
        total += loss.detach().float() * len(idx)
        seen += len(idx)
    return float(total) / seen, lr


def _load_cutmix() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``neurofuse.data.augment.cutmix``, imported only when CutMix is switched on."""
    from neurofuse.data.augment import cutmix

    return cutmix


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split a permutation into batches; a trailing batch of one sample joins no step, since
    BatchNorm cannot normalise a single sample (it is reshuffled into the next epoch)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def _stratified_holdout(
    y: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(len(y))`` holding out ``round(fraction * n_c)`` of each class c.

    Returns sorted (train, validation) index tensors on the CPU.
    """
    labels = y.cpu()
    if fraction == 0:
        return torch.arange(len(labels)), torch.empty(0, dtype=torch.long)
    held = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held.append(members[: round(fraction * len(members))])
    val = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    train = mask.nonzero().flatten()
    if val.numel() == 0 or train.numel() == 0:
        raise ValueError(
            f"val_fraction={fraction} of {len(labels)} samples leaves an empty "
            f"{'validation' if val.numel() == 0 else 'training'} split; change val_fraction "
            "(0 disables validation) or pass x_val/y_val"
        )
    return train, val


def _check_data(
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    num_classes: int | None,
) -> int:
    """Validate training (and validation) tensors; return the number of classes."""
    pairs = [("x", "y", x, y)]
    if (x_val is None) != (y_val is None):
        raise ValueError("pass both x_val and y_val, or neither")
    if x_val is not None and y_val is not None:  # both or neither, as just checked
        pairs.append(("x_val", "y_val", x_val, y_val))
    for x_name, y_name, xs, ys in pairs:
        if not isinstance(xs, torch.Tensor) or not isinstance(ys, torch.Tensor):
            raise TypeError(f"{x_name} and {y_name} must be torch.Tensors")
        if xs.ndim == 0 or len(xs) == 0:
            raise ValueError(
                f"{x_name} is empty (shape {tuple(xs.shape)}); pass at least one sample"
            )
        if ys.ndim != 1 or len(ys) != len(xs):
            raise ValueError(
                f"{y_name} must be 1-D with one label per row of {x_name}: got {y_name} "
                f"{tuple(ys.shape)} and {x_name} {tuple(xs.shape)}"
            )
        if ys.dtype.is_floating_point or ys.dtype == torch.bool or ys.is_complex():
            raise ValueError(f"{y_name} must hold integer class indices, got dtype {ys.dtype}")
    labels = [ys for *_, ys in pairs]
    low = min(int(ys.min()) for ys in labels)
    high = max(int(ys.max()) for ys in labels)
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, got "
            f"range [{low}, {high}]; relabel to 0..C-1 or pass the right num_classes"
        )
    return num_classes


def _check_part(idx: torch.Tensor, n: int, i: int) -> None:
    integer = isinstance(idx, torch.Tensor) and not (
        idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex()
    )
    if not integer or idx.ndim != 1:
        raise ValueError(f"parts[{i}] must be a 1-D integer index tensor")
    if idx.numel() == 0:
        raise ValueError(f"parts[{i}] is empty; every model needs at least one training sample")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(
            f"parts[{i}] holds indices in [{int(idx.min())}, {int(idx.max())}] but x has {n} rows"
        )


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        transient=True,
        disable=not enabled,
        console=Console(stderr=True),  # a command's own output stays clean when piped
    )
