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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.alignment import Space, permutation_spaces, reestimate_batchnorm
from neurofuse.alignment.repair import StatsTarget, neuron_stats, repair_to
from neurofuse.fitting import GradientConfig, fit_gradient
from neurofuse.graph import GraphRunner, trace
from neurofuse.methods.kd import teacher_targets
from neurofuse.methods.registry import Capabilities, FusionContext, register_method
from neurofuse.optimizers import OptimizerName, check_optimizer
from neurofuse.surgery import neuron_view, resize, select

#: Modules whose statistics mix the neurons of a space: concatenating them is not exact.
_MIXING_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)

#: Logit gap that makes ``softmax`` exactly one-hot in float32/float64 (exp(-1e4) == 0).
_LABEL_GAP = 1e4


# --------------------------------------------------------------------------- spaces


def _output_space_names(gm: fx.GraphModule, spaces: Sequence[Space]) -> set[str]:
    """Names of the spaces that carry the model's output (the classes)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = {a.name for a in out.all_input_nodes}
    return {s.name for s in spaces if returned & set(s.nodes)}


def hidden_spaces(
    models: Sequence[nn.Module],
    example: Tensor | None = None,
    tracer: Callable[[nn.Module], fx.GraphModule] = trace,
) -> tuple[list[Space], list[list[Space]]]:
    """The hidden spaces of every model (one list per model, in the same order) and the
    output spaces of model 0, after checking that they can be concatenated.

    Raises a ValueError naming the space when a hidden space is fixed or normalised jointly,
    or when the models' spaces differ in anything but width."""
    per_model = [permutation_spaces(m, example=example, gm=tracer(m)) for m in models]
    outputs = _output_space_names(tracer(models[0]), per_model[0])
    ref = per_model[0]
    for k, spaces in enumerate(per_model[1:], start=1):
        sig0 = [(s.name, s.fixed, sorted(s.members)) for s in ref]
        sigk = [(s.name, s.fixed, sorted(s.members)) for s in spaces]
        if sig0 != sigk:
            raise ValueError(
                f"models[{k}] does not have the structure of models[0] (their permutation spaces "
                "differ); transplant needs models of one architecture (widths may differ)"
            )
    modules = dict(models[0].named_modules())
    for s in ref:
        if s.name in outputs:
            continue
        if s.heads > 1 or any(m.parts > 1 for m in s.members):
            raise ValueError(
                f"transplant cannot concatenate attention space {s.name!r} ({s.heads} heads): "
                "pruning single dimensions would split heads. Use kd, lp, kf_linear or "
                "kf_gradient for transformers"
            )
        if s.fixed:
            raise ValueError(
                f"transplant cannot concatenate the models: hidden space {s.name!r} (size "
                f"{s.size}, nodes {s.nodes[:4]}{' ...' if len(s.nodes) > 4 else ''}) is fixed, "
                "i.e. an operation that cannot be permuted uses it (e.g. a transformer's "
                "residual stream, split into heads and layer-normalised). Neuron Transplantation "
                "supports MLPs, CNNs and ResNets; for transformers use kd, lp or kf_gradient"
            )
        for key, *_ in s.members:
            owner = modules.get(key.rpartition(".")[0])
            if isinstance(owner, _MIXING_NORMS):
                raise ValueError(
                    f"transplant cannot concatenate hidden space {s.name!r} exactly: "
                    f"{key.rpartition('.')[0]!r} is a {type(owner).__name__}, whose statistics "
                    "would mix the models' neurons. Use kd, lp or kf_gradient for this model"
                )
    hidden = [[s for s in spaces if s.name not in outputs] for spaces in per_model]
    return [s for s in ref if s.name in outputs], hidden


# --------------------------------------------------------------------------- merge


def _axes(spaces: Sequence[Space]) -> dict[str, dict[int, tuple[int, str]]]:
    """key -> {axis: (repeat, space name)}."""
    out: dict[str, dict[int, tuple[int, str]]] = {}
    for s in spaces:
        for key, axis, repeat, *_ in s.members:
            out.setdefault(key, {})[axis] = (repeat, s.name)
    return out


def concatenate(
    models: Sequence[nn.Module], hidden: list[list[Space]] | None = None
) -> tuple[nn.Module, list[Space]]:
    """The wide model of Neuron Transplantation's merge step, and its hidden spaces.

    Each hidden space has width ``sum_k d_k`` (model k's neurons at offset ``sum_{i<k} d_i``);
    model k's tensors fill the diagonal blocks, every other entry is zero. A tensor whose axis 0
    is not a hidden space (the head's weight and bias) is the sum of the members' tensors,
    each times ``1/n`` and placed on its own hidden-input block, so in eval mode

        wide(x) = (1/n) sum_k model_k(x).

    The models are not modified; the wide model is a new module (built from ``models[0]``).
    ``hidden`` are the models' hidden spaces from :func:`hidden_spaces` (computed if omitted).
    """
    if len(models) < 1:
        raise ValueError("concatenate needs at least one model")
    if hidden is None:
        hidden = hidden_spaces(models)[1]
    widths = {s.name: sum(h[i].size for h in hidden) for i, s in enumerate(hidden[0])}
    wide = resize(models[0], widths, hidden[0])
    wide_spaces = [dataclasses.replace(s, size=widths[s.name]) for s in hidden[0]]
    axes = _axes(hidden[0])
    offsets = [dict.fromkeys(widths, 0) for _ in models]
    for k in range(1, len(models)):
        for s in hidden[k - 1]:
            offsets[k][s.name] = offsets[k - 1][s.name] + s.size
    states = [m.state_dict() for m in models]
    n = len(models)
    merged = {}
    for key, template in wide.state_dict().items():
        tensors = [st[key] for st in states]
        touched = axes.get(key, {})
        if not template.is_floating_point():
            merged[key] = tensors[0].clone()
            continue
        if not touched:  # shared by the members: the mean (exact for the head's bias)
            merged[key] = torch.stack([t.to(template) for t in tensors]).mean(0)
            continue
        scale = 1.0 if 0 in touched else 1.0 / n
        out = torch.zeros_like(template)
        for k, t in enumerate(tensors):
            _place_block(out, t.to(template) * scale, touched, offsets[k], hidden[k], key)
        merged[key] = out
    wide.load_state_dict(merged)
    return wide.eval(), wide_spaces


def _place_block(
    out: Tensor,
    block: Tensor,
    touched: dict[int, tuple[int, str]],
    offsets: dict[str, int],
    spaces: Sequence[Space],
    key: str,
) -> None:
    """Write ``block`` into ``out`` at the given space offsets, in place."""
    sizes = {s.name: s.size for s in spaces}
    view_out, view_in = out, block
    for axis in sorted(touched, reverse=True):  # split later axes first: earlier ones keep index
        repeat = touched[axis][0]
        view_out = neuron_view(view_out, axis, repeat)
        view_in = neuron_view(view_in, axis, repeat)
    index: list[slice] = [slice(None)] * view_out.dim()
    for axis, (_, name) in touched.items():
        pos = axis + sum(1 for a in touched if a < axis)
        index[pos] = slice(offsets[name], offsets[name] + sizes[name])
    target = view_out[tuple(index)]
    if target.shape != view_in.shape:
        raise ValueError(
            f"cannot place {key!r}: block {tuple(view_in.shape)} vs {tuple(target.shape)}"
        )
    target.copy_(view_in)


# --------------------------------------------------------------------------- prune


def _incoming(param: Tensor, axis: int) -> bool:
    return axis == 0 and param.dim() >= 2


def _group(param: Tensor, axis: int) -> bool:
    return True


#: Which parameters of a space count towards a neuron's L2 norm.
CRITERIA: dict[str, Callable[[Tensor, int], bool]] = {"incoming": _incoming, "group": _group}


def neuron_norms(model: nn.Module, space: Space, criterion: str = "incoming") -> Tensor:
    """``||w_j||_2`` of each neuron ``j`` of ``space``: the square root of the sum of squares of
    its entries in every *parameter* (not buffer) member that ``criterion`` selects."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(sorted(CRITERIA))}")
    params = dict(model.named_parameters())
    total = None
    for key, axis, repeat, *_ in space.members:
        p = params.get(key)
        if p is None or not CRITERIA[criterion](p, axis):
            continue
        v = neuron_view(p.detach(), axis, repeat).movedim(axis, 0)
        sq = v.reshape(v.shape[0], -1).double().pow(2).sum(1)
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError(
            f"space {space.name!r} has no parameter that criterion {criterion!r} counts; "
            f"try criterion='group'"
        )
    return total.sqrt()


def prune(
    wide: nn.Module, spaces: Sequence[Space], widths: dict[str, int], criterion: str = "incoming"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Keep the ``widths[name]`` largest-norm neurons of each space (in their original order).

    Returns the pruned state dict and the kept indices per space."""
    keep: dict[str, Tensor] = {}
    for s in spaces:
        norms = neuron_norms(wide, s, criterion)
        order = torch.argsort(norms.cpu(), descending=True, stable=True)
        keep[s.name] = torch.sort(order[: widths[s.name]]).values
    return select(wide.state_dict(), spaces, keep), keep


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
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int):
            raise ValueError(f"finetune_epochs must be an integer, got {self.finetune_epochs!r}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        check_optimizer(self.optimizer)
        if not self.temperature > 0 or not self.lr > 0:
            raise ValueError("temperature and lr must be positive")
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
    if opt.reset_bn:
        reestimate_batchnorm(ctx.target, ctx.inputs)
        ctx.report["reset_bn"] = True
    if opt.repair:
        with ctx.timer("repair"):
            ctx.report["repair_collapse"] = repair_to(
                ctx.target, ctx.inputs, kept_statistics(wide, spaces, keep, ctx.inputs)
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
    concatenated model, i.e. in the model it came from (pruning the others shifts them)."""
    runner = GraphRunner(trace(wide.eval()), inputs)
    space_of = {node: s.name for s in spaces for node in s.nodes}

    def target(end: fx.Node, axis: int) -> tuple[Tensor, Tensor] | None:
        name = space_of.get(end.name)
        if name is None:
            return None
        mu, sd = neuron_stats(runner.value(runner.node(end.name)), axis)
        idx = keep[name].to(mu.device)
        return mu[idx], sd[idx]

    return target


def _forward_classes(ctx: FusionContext) -> int:
    with torch.no_grad():
        return int(ctx.models[0](ctx.inputs[:1]).shape[-1])


def _count_per_model(kept: Tensor, sizes: list[int]) -> list[int]:
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    return [int(((kept >= bounds[i]) & (kept < bounds[i + 1])).sum()) for i in range(len(sizes))]
