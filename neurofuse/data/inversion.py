"""Inputs synthesised from trained models for the classes a fusion set lacks (model inversion).

In a sharded split the fusion set, one owner's data, shows only the owner's classes; a
distillation on it has no input on which the models that know the other classes could teach
them. The models can make such inputs themselves: starting from noise, gradient steps on the
*input* (the models fixed) minimise

    -log p_bar(c | x) + tv * TV(x) + l2 * ||x - b||^2 + bn * sum_layers (||mu - mu_run||^2
                                                                     + ||var - var_run||^2),

with ``p_bar`` the models' probability ensemble, ``TV`` the total variation along the input's
trailing (spatial) dimensions, ``b`` the background value of the reference inputs, and the last
term matching, at every BatchNorm layer of every model, the batch statistics of the layer's
input to the running statistics the layer stored in training. This is DeepInversion (Yin et
al. 2020, "Dreaming to distill: data-free knowledge transfer via DeepInversion"); its
BatchNorm term pulls the inputs towards the statistics of the training data. Distilling on
them lifted fused VGG-small models in 16 of 20 sharded-4 / 6 cells (3.5 points on average,
with and without BatchNorm) and cost the MLPs of ``paper-mlp`` 3-4 points, whose inversions
are whatever excites the class (``benchmarks/results/class_probes`` and
``class_probes_seeds34``); with BatchNorm the gains came in 9 of 10 cells, so
:func:`neurofuse.finetune` makes them by default for BatchNorm models only
(``synthetic="auto"``).

Written here rather than taken from a library: the reference DeepInversion code is a research
script for ImageNet ResNets (multi-resolution, jitter, Adam schedules), not a package; the loop
below is its core on any input shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from neurofuse.checks import integer


def _batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers that keep running statistics (the prior's references)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]


def has_batch_norm(models: Sequence[nn.Module]) -> bool:
    """Whether every model has a BatchNorm layer with running statistics (DeepInversion's
    prior needs them)."""
    return all(_batch_norm_layers(model) for model in models)


def missing_classes(
    models: Sequence[nn.Module], inputs: Tensor, labels: Tensor | None = None
) -> list[int]:
    """The output classes ``inputs`` does not show: those absent from ``labels``, or, without
    labels, those that the models' probability ensemble predicts for none of the inputs."""
    from neurofuse.methods.ensemble import ensemble_log_probs

    with torch.no_grad():
        classes = int(models[0](inputs[:1]).shape[-1])
    if labels is None:
        labels = ensemble_log_probs(list(models), inputs).argmax(-1)
    present = set(labels.long().tolist())
    return [c for c in range(classes) if c not in present]


def synthesise(
    models: Sequence[nn.Module],
    like: Tensor,
    classes: Sequence[int],
    per_class: int,
    *,
    steps: int = 100,
    lr: float = 0.1,
    tv: float = 0.5,
    l2: float = 0.05,
    bn: float = 0.1,
    seed: int = 0,
) -> Tensor:
    """``per_class`` inputs for each of ``classes`` (class by class), shaped and scaled like
    ``like``.

    Args:
        models: the models whose probability ensemble should name each class (in eval mode;
            never modified: gradients are taken with respect to the inputs only).
        like: reference inputs (floating point): their shape, value range (the results are
            clamped to it), background (the median value) and spread (the starting noise).
        classes: the classes to make inputs for.
        per_class: inputs per class (>= 1).
        steps: Adam steps (>= 1).
        lr: Adam's step size, relative to the spread of ``like``.
        tv: weight of the total-variation prior (inputs with at least one trailing spatial
            dimension; ignored for flat feature vectors).
        l2: weight of the pull towards the background value.
        bn: weight of the BatchNorm-statistics prior (models with BatchNorm layers; 0 off).
        seed: seeds the starting noise.
    """
    from neurofuse.methods.ensemble import _mean_probs_log

    if not like.is_floating_point():
        raise ValueError(
            f"inputs are synthesised by gradient steps, so they must be floating point; the "
            f"reference inputs are {like.dtype} (token ids?): leave synthetic inputs off"
        )
    integer("per_class", per_class, 1)
    integer("steps", steps, 1)
    models = list(models)
    lo, hi = float(like.min()), float(like.max())
    background = float(like.flatten(1).median(1).values.median())
    spread = float(like.std()) or 1.0
    spatial = like.dim() >= 3  # (N, C, L) or (N, C, H, W): TV along the trailing dimensions
    layers = [m for model in models for m in _batch_norm_layers(model)]
    terms: list[Tensor] = []

    def record(module: nn.Module, inputs: tuple[Tensor, ...], _: Tensor) -> None:
        a = inputs[0]
        dims = [0, *range(2, a.dim())]
        mean, var = a.mean(dims), a.var(dims, unbiased=False)
        run_mean, run_var = module.running_mean, module.running_var
        # only layers with running statistics are hooked (_batch_norm_layers)
        assert isinstance(run_mean, Tensor) and isinstance(run_var, Tensor)
        terms.append(((mean - run_mean) ** 2).sum() + ((var - run_var) ** 2).sum())

    hooks = [m.register_forward_hook(record) for m in layers] if bn else []
    g = torch.Generator().manual_seed(seed + 3)
    out = []
    try:
        for c in classes:
            noise = torch.randn((per_class, *like.shape[1:]), generator=g).to(like)
            x = (background + 0.5 * spread * noise).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr * spread)
            target = torch.full((per_class, 1), int(c), device=like.device)
            n = x[0].numel()
            for _ in range(steps):
                terms.clear()
                log_p = _mean_probs_log([m(x) for m in models]).gather(1, target)
                loss = -log_p.sum() + l2 * ((x - background) ** 2).sum() / n
                if spatial and tv:
                    for d in range(2, x.dim()):
                        loss = loss + tv * x.diff(dim=d).abs().sum() / n
                if terms:
                    loss = loss + bn * per_class * torch.stack(terms).sum() / len(models)
                (x.grad,) = torch.autograd.grad(loss, x)
                opt.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
            out.append(x.detach())
    finally:
        for h in hooks:
            h.remove()
    if not out:
        return like[:0].clone()
    return torch.cat(out)


__all__ = ["has_batch_norm", "missing_classes", "synthesise"]
