"""Neuron Transplantation (NT): concatenate the models, prune back to one width, fine-tune.

Öz, Kiefer, Debus, Weiel, Götz & Götz (2025), "Model Fusion via Neuron Transplantation",
arXiv:2502.06849 (merge-then-prune variant, all models at once):

1. **Merge.** Every hidden space (a set of neurons permuted together, see
   :mod:`neurofuse.alignment`) of the wide model holds the neurons of all n models side by side,
   width ``sum_k d_k``. Weights are block-diagonal: model k's neurons read only model k's neurons
   (the "cross weights" start at zero), the first layers read the shared input, and every tensor
   writing to the shared output (the head) is the members' tensors times ``1/n`` placed side by
   side, so the head sums ``(1/n) W_k h_k`` and the wide model's output is *exactly* the mean of
   the members' logits (checked on the fusion set before pruning).
2. **Prune.** Each hidden space is cut back to the fused template's width (by default model 0's)
   by keeping the neurons with the largest L2 norm over the whole wide model (joint selection
   across models, the paper's better variant). The norm is set by ``criterion``:
   ``"incoming"``: ``||w_j||_2`` over the incoming weight rows of every producer of the space
   (the Linear/Conv layers whose axis 0 holds it; in a residual stream, all of them),
   ``"group"``: over every parameter of the space on either axis (producers' rows and biases,
   normalisation scales and shifts, consumers' incoming columns), like Torch-Pruning's group
   magnitude importance.
3. **Fine-tune** on the fusion set (``finetune_epochs``, 0 to skip): cross-entropy to the labels
   when the fusion set has them, else distillation to the models' mean soft predictions (KL, as
   in ``kd``); the cross weights are learned here.

Spaces that cannot be concatenated exactly are an error naming them: fixed hidden spaces (the
residual stream of a ViT, shared by attention and MLP through LayerNorm), and LayerNorm or
GroupNorm in a free space (their statistics would mix the members' neurons).

We write this ourselves rather than with a pruning library (Torch-Pruning): pruning libraries
only narrow one model, while NT's merge step, the block-diagonal concatenation across models, is
not something they do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.alignment import Space, repair
from neurofuse.alignment.repair import StatsTarget, neuron_stats, neuron_stats_in_chunks
from neurofuse.checks import integer, number
from neurofuse.fitting import GradientConfig, fit_gradient
from neurofuse.graph import GraphRunner, trace
from neurofuse.methods._averaging import finish
from neurofuse.methods._transplant_surgery import (
    CRITERIA,
    concatenate,
    hidden_spaces,
    neuron_norms,
    prune,
)
from neurofuse.methods.kd import teacher_targets
from neurofuse.methods.registry import Capabilities, FusionContext, register_method
from neurofuse.optimizers import OptimizerName, check_optimizer

#: Logit gap that makes ``softmax`` exactly one-hot in float32/float64 (exp(-1e4) == 0).
_LABEL_GAP = 1e4


# --------------------------------------------------------------------------- method


FINETUNE_TARGETS = ("auto", "labels", "ensemble")


@dataclass
class TransplantOptions:
    """Options of ``transplant`` (Neuron Transplantation).

    Attributes:
        criterion: neuron norm used for pruning: ``"incoming"`` (the producers' incoming weight
            rows) or ``"group"`` (every parameter of the space, both axes).
        finetune_epochs: maximum fine-tuning epochs on the fusion set; 0 returns the pruned
            model as is (the paper fine-tunes, the pruned model alone is much worse).
        finetune_target: ``"auto"``: cross-entropy to the fusion set's labels when it has
            them, else KL to the models' mean soft predictions; ``"labels"`` or
            ``"ensemble"`` force one (``"labels"`` needs labelled fusion data).
        optimizer, lr, weight_decay, batch_size, val_split, patience: of the fine-tuning
            (see ``kd``; the best validation weights are restored).
        temperature: of the KL loss when distilling (1 for labels).
        repair: after pruning (before fine-tuning), REPAIR every kept neuron's mean and
            standard deviation on the fusion set to those it had in its own model, which the
            pruned neurons' missing inputs shift (Jordan et al. 2022's correction, with the
            source model's statistics as targets).
        reset_bn: after pruning (before REPAIR and fine-tuning), re-estimate BatchNorm running
            statistics on the fusion set (the kept neurons' inputs changed with the pruning).
    """

    criterion: Literal["incoming", "group"] = "incoming"
    finetune_epochs: int = 20
    finetune_target: Literal["auto", "labels", "ensemble"] = "auto"
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    val_split: float = 0.1
    patience: int = 20
    temperature: float = 1.0
    repair: bool = False
    reset_bn: bool = False

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(
                f"unknown criterion {self.criterion!r}; valid: {', '.join(sorted(CRITERIA))}"
            )
        if self.finetune_target not in FINETUNE_TARGETS:
            raise ValueError(
                f"finetune_target must be one of {FINETUNE_TARGETS}, got {self.finetune_target!r}"
            )
        self.finetune_epochs = integer("finetune_epochs", self.finetune_epochs, 0)
        check_optimizer(self.optimizer)
        number("temperature", self.temperature, above=0)
        number("lr", self.lr, above=0)
        self.config(1.0)

    def config(self, temperature: float) -> GradientConfig:
        return GradientConfig(
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            epochs=max(self.finetune_epochs, 1),
            batch_size=self.batch_size,
            val_split=self.val_split,
            patience=self.patience,
            loss="kl",
            temperature=temperature,
        )


def label_logits(labels: Tensor, classes: int) -> Tensor:
    """Target logits whose softmax is exactly one-hot, so the KL loss is the cross-entropy."""
    labels = labels.long()
    if labels.dim() != 1 or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(
            f"fusion labels must be class indices in 0..{classes - 1} (one per sample) "
            "for fine-tuning with labels; use finetune_target='ensemble' otherwise"
        )
    out = torch.full((labels.shape[0], classes), -_LABEL_GAP, device=labels.device)
    out[torch.arange(labels.shape[0], device=labels.device), labels] = 0.0
    return out


def _merge_error(wide: nn.Module, models: Sequence[nn.Module], x: Tensor) -> float:
    with torch.no_grad():
        mean = torch.stack([m(x) for m in models]).mean(0)
        return float((wide(x) - mean).abs().max() / mean.abs().max().clamp_min(1e-12))


@register_method(
    "transplant",
    "Neuron Transplantation: concatenate the models, keep the largest-norm neurons, fine-tune",
    TransplantOptions,
    Capabilities(labels="optional", transformers=False),
)
def transplant(ctx: FusionContext) -> nn.Module:
    opt: TransplantOptions = ctx.options
    if opt.finetune_epochs > 0 and opt.finetune_target == "labels" and ctx.labels is None:
        raise ValueError(  # before any work
            "finetune_target='labels' needs labelled fusion data: pass (inputs, labels)"
        )
    hidden = hidden_spaces(ctx.models, ctx.inputs[:2], ctx.trace)[1]
    wide, spaces = concatenate(ctx.models, hidden)
    error = _merge_error(wide, ctx.models, ctx.inputs[:256])
    ctx.report["merge_relative_error"] = error
    if error > 1e-4:
        raise ValueError(
            f"the concatenated model's output differs from the mean of the models' logits by "
            f"{error:.2e} (relative): some layer of this architecture mixes neurons in a way "
            "transplant cannot concatenate. Use kd, lp or kf_gradient for this model"
        )
    _, target_hidden = hidden_spaces([ctx.target], ctx.inputs[:2], ctx.trace)
    widths = {s.name: s.size for s in target_hidden[0]}
    wide_widths = {s.name: s.size for s in spaces}
    if widths.keys() != wide_widths.keys() or any(widths[k] > wide_widths[k] for k in widths):
        raise ValueError(
            f"the fused template's hidden spaces {widths} do not fit the models' concatenated "
            f"spaces {wide_widths}: give a target of the models' architecture, no wider in "
            "total than all models together"
        )
    state, keep = prune(wide, spaces, widths, opt.criterion)
    ctx.target.load_state_dict(state)
    finish(
        ctx,
        ctx.target,
        opt.reset_bn,
        opt.repair,
        target=functools.partial(kept_statistics, wide, spaces, keep, ctx.inputs),
    )
    del wide
    sizes = [{s.name: s.size for s in h} for h in hidden]
    ctx.report["kept_per_model"] = {
        name: _count_per_model(idx, [sz[name] for sz in sizes]) for name, idx in keep.items()
    }
    if opt.finetune_epochs > 0:
        use_labels = opt.finetune_target == "labels" or (
            opt.finetune_target == "auto" and ctx.labels is not None
        )
        if use_labels:
            assert ctx.labels is not None  # checked before any work
            classes = _forward_classes(ctx)
            targets, temperature = label_logits(ctx.labels, classes), 1.0
        else:
            targets, temperature = teacher_targets(ctx), opt.temperature
        stats = fit_gradient(
            ctx.target,
            ctx.inputs,
            targets,
            opt.config(temperature),
            ctx.generator(),
            progress="transplant: fine-tuning epochs" if ctx.progress else None,
        )
        ctx.report["finetune"] = {"target": "labels" if use_labels else "ensemble", **stats}
    return ctx.target.eval()


def kept_statistics(
    wide: nn.Module, spaces: Sequence[Space], keep: dict[str, Tensor], inputs: Tensor
) -> StatsTarget:
    """REPAIR's targets after pruning: each kept neuron's mean and standard deviation in the
    concatenated model, i.e. in the model it came from (pruning the others shifts them). A
    fusion set of at most :data:`~neurofuse.alignment.repair.STATS_CHUNK` samples is evaluated
    once (every value kept); a larger one chunk by chunk for each unit, so that no value of the
    whole set is held (as REPAIR measures the fused side)."""
    gm = trace(wide.eval())
    runner = GraphRunner(gm, inputs) if len(inputs) <= repair.STATS_CHUNK else None
    space_of = {node: s.name for s in spaces for node in s.nodes}

    def target(end: fx.Node, axis: int) -> tuple[Tensor, Tensor] | None:
        name = space_of.get(end.name)
        if name is None:
            return None
        if runner is not None:
            mu, sd = neuron_stats(runner.value(runner.node(end.name)), axis)
        else:
            mu, sd = neuron_stats_in_chunks(gm, end.name, axis, inputs)
        idx = keep[name].to(mu.device)
        return mu[idx], sd[idx]

    return target


def _forward_classes(ctx: FusionContext) -> int:
    with torch.no_grad():
        return int(ctx.models[0](ctx.inputs[:1]).shape[-1])


def _count_per_model(kept: Tensor, sizes: list[int]) -> list[int]:
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    return [int(((kept >= bounds[i]) & (kept < bounds[i + 1])).sum()) for i in range(len(sizes))]


__all__ = [
    "CRITERIA",
    "TransplantOptions",
    "concatenate",
    "hidden_spaces",
    "kept_statistics",
    "label_logits",
    "neuron_norms",
    "prune",
    "transplant",
]
