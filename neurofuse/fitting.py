"""Fitting a fused level to its targets by gradient descent (the Gradient variants, paper
appendix B.3) and the training options shared with distillation and fine-tuning.

The closed form of the Linear variants lives in :mod:`neurofuse.closed_form` and the affine
view of a layer in :mod:`neurofuse.affine`; their names are re-exported here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurofuse.affine import affine_inputs, affine_output_rows, set_affine_weights
from neurofuse.checks import integer, number
from neurofuse.closed_form import BLOCK_ROWS, Factor, LeastSquares, least_squares
from neurofuse.optimizers import OptimizerName, check_optimizer, make_optimizer
from neurofuse.progress import progress_bar

__all__ = [
    "BLOCK_ROWS",
    "Factor",
    "GradientConfig",
    "LazyRows",
    "LeastSquares",
    "TrainingOptions",
    "affine_inputs",
    "affine_output_rows",
    "fit_gradient",
    "least_squares",
    "perturb_",
    "set_affine_weights",
]

# --------------------------------------------------------------------------- gradient fitting


@dataclass
class GradientConfig:
    """How one level is fitted by gradient descent (paper Table 9)."""

    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 100
    batch_size: int = 32
    val_split: float = 0.1
    patience: int = 20
    loss: Literal["mse", "kl", "ce"] = (
        "mse"  # "mse", "kl" (KL to soft predictions) or "ce" (targets are labels)
    )
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if self.loss not in ("mse", "kl", "ce"):
            raise ValueError(f"loss must be 'mse', 'kl' or 'ce', got {self.loss!r}")
        if not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {self.val_split}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")


@dataclass
class TrainingOptions:
    """Options of a training loop over the fusion set, shared by the distillation baselines
    (``kd``, ``lp``: :class:`neurofuse.methods.kd.DistillOptions`) and fine-tuning
    (:class:`neurofuse.finetuning.FinetuneOptions`), which change only the defaults.

    Attributes:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        lr, weight_decay: of the optimizer.
        epochs: maximum passes over the training part of the data.
        batch_size: mini-batch size.
        val_split: fraction of the data held out for early stopping; the weights with the best
            held-out loss are restored at the end (no hold-out below 10 samples).
        patience: epochs without a better held-out loss before training stops.
        temperature: ``T`` of the distillation loss ``T^2 KL(softmax(t/T) || softmax(s/T))``.
    """

    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 100
    batch_size: int = 32
    val_split: float = 0.1
    patience: int = 20
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        for name in ("lr", "temperature"):
            number(name, getattr(self, name), above=0)
        number("weight_decay", self.weight_decay, at_least=0)
        for name in ("epochs", "batch_size", "patience"):
            setattr(self, name, integer(name, getattr(self, name), 1))
        self.config()  # validates val_split

    def config(
        self,
        loss: Literal["mse", "kl", "ce"] = "kl",
        epochs: int | None = None,
        temperature: float | None = None,
    ) -> GradientConfig:
        """The :class:`GradientConfig` of a fit with these options and ``loss``."""
        return GradientConfig(
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            epochs=self.epochs if epochs is None else epochs,
            batch_size=self.batch_size,
            val_split=self.val_split,
            patience=self.patience,
            loss=loss,
            temperature=self.temperature if temperature is None else temperature,
        )


class LazyRows:
    """Rows of ``fn(inputs)`` computed only when asked for, at most ``chunk`` samples at a time:
    a stand-in for that tensor in :func:`fit_gradient`, which reads ``shape[0]``, ``device``
    and rows by index. What it saves: the tensor itself (a level's inputs or targets over the
    whole fusion set), at the price of running ``fn`` again for every mini-batch of every
    epoch.

    ``fn`` maps a batch of inputs to its values (no gradient is recorded) and must act on each
    sample alone (no batch statistics), so that rows do not depend on how they are batched.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], inputs: Tensor, chunk: int) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of samples, got {chunk}")
        self.fn, self.inputs, self.chunk = fn, inputs, chunk
        self.shape = torch.Size([inputs.shape[0]])
        self.device = inputs.device

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: Tensor | slice) -> Tensor:
        x = self.inputs[index]
        with torch.no_grad():
            return torch.cat(
                [self.fn(x[i : i + self.chunk]) for i in range(0, x.shape[0], self.chunk)]
            )

    def then(self, fn: Callable[[Tensor], Tensor]) -> LazyRows:
        """The rows of ``fn`` applied to these rows."""
        first = self.fn
        return LazyRows(lambda x: fn(first(x)), self.inputs, self.chunk)


def perturb_(module: nn.Module, eps: float, generator: torch.Generator) -> None:
    """Add ``eps * std(p) * N(0, 1)`` noise to every parameter of ``module`` and all its
    submodules (relative noise, so one ``eps`` suits layers of any scale)."""
    if eps <= 0:
        return
    with torch.no_grad():
        for p in module.parameters():
            scale = float(p.std()) if p.numel() > 1 else float(p.abs().mean())
            noise = torch.randn(p.shape, generator=generator, device="cpu", dtype=torch.float32)
            p.add_(eps * max(scale, 1e-3) * noise.to(p))


def _level_loss(out: Tensor, target: Tensor, cfg: GradientConfig) -> Tensor:
    if cfg.loss == "ce":
        return F.cross_entropy(out, target)
    if cfg.loss == "kl":
        t = cfg.temperature
        return (
            F.kl_div(
                F.log_softmax(out / t, dim=-1),
                F.log_softmax(target / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )
    return F.mse_loss(out, target)


def fit_gradient(
    level: nn.Module,
    inputs: Tensor | LazyRows,
    targets: Tensor | LazyRows,
    cfg: GradientConfig,
    generator: torch.Generator,
    parameters: Sequence[nn.Parameter] | None = None,
    penalty: Callable[[], Tensor] | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """Minimise the loss between ``level(inputs)`` and ``targets`` over the level's parameters.

    ``progress``, when given, is the label of a bar of epochs shown on stderr. ``inputs`` and
    ``targets`` may be :class:`LazyRows`, computed mini-batch by mini-batch.

    ``penalty()``, when given, is added to every training step's loss (e.g. an anchor to the
    starting weights); validation and the returned losses are the data loss alone.

    A ``val_split`` fraction of the samples is held out; training stops after ``patience``
    epochs without a better validation loss and the best validation weights are restored.
    The level runs in eval mode (BatchNorm as a fixed affine map, dropout off); its
    parameters are trained. Returns the best validation and final train losses.
    """
    n = inputs.shape[0]
    perm = torch.randperm(n, generator=generator).to(inputs.device)
    n_val = int(round(cfg.val_split * n)) if n >= 10 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    params = list(parameters) if parameters is not None else [p for p in level.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)
    was_training = level.training
    level.eval()

    def evaluate(idx: Tensor) -> float:
        with torch.no_grad():
            total = 0.0
            for s in range(0, len(idx), 512):
                b = idx[s : s + 512]
                total += float(_level_loss(level(inputs[b]), targets[b], cfg)) * len(b)
            return total / max(len(idx), 1)

    # The starting weights are a candidate too: training that only makes things worse returns
    # them unchanged (matters for a good initialisation, e.g. Setting 2 or fine-tuning).
    best = evaluate(val_idx) if n_val else evaluate(tr_idx)
    best_state = copy.deepcopy(level.state_dict())
    stale = 0
    train_loss = math.nan
    with progress_bar(progress is not None, progress or "", cfg.epochs) as advance:
        for epoch in range(cfg.epochs):
            order = tr_idx[torch.randperm(len(tr_idx), generator=generator).to(tr_idx.device)]
            running, count = 0.0, 0
            for s in range(0, len(order), cfg.batch_size):
                b = order[s : s + cfg.batch_size]
                loss = _level_loss(level(inputs[b]), targets[b], cfg)
                total = loss if penalty is None else loss + penalty()
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                running += float(loss.detach()) * len(b)
                count += len(b)
            train_loss = running / max(count, 1)
            score = evaluate(val_idx) if n_val else train_loss
            advance(epoch + 1)
            if score < best - 1e-12:
                best, stale = score, 0
                best_state = copy.deepcopy(level.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    level.load_state_dict(best_state)
    level.train(was_training)
    for p in params:
        p.requires_grad_(False)
    return {"val_loss": best, "train_loss": train_loss}
