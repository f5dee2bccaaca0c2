"""Engine of the Gradient variants (HF Gradient, KF Gradient): any differentiable level.

Level by level from the input (paper section 4.2.2(b), appendix B.2 and F.1): the base models'
level outputs are grouped (Hungarian matching or importance-weighted k-means over the neurons'
values on the fusion set), the group centroids become the targets, and the fused level is trained
with plain MSE to reach them from the input that the *already fused* levels give it. The last
level (the classifier head) targets the importance-weighted mean of the base logits, by MSE or by
KL to the averaged soft predictions.

Where training starts is the preset's choice:

- ``"closed_form"`` (the default): from the Linear variant's fit of the same level (every affine
  unit solved in closed form, attention heads and residual streams grouped as units, see
  :mod:`neurofuse.methods._linear`), with the Linear variant's groupings as the targets, so the
  training refines a solution that is already consistent with them; the starting weights are
  kept when training does not lower the loss on held-out fusion samples;
- ``"setting1"`` / ``"setting2"`` (the paper's Table 9): from a base model's level plus relative
  noise ``eps``, each level grouped on its own outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from neurofuse._sparse import matmul
from neurofuse.fitting import GradientConfig, LazyRows, fit_gradient, perturb_
from neurofuse.graph import (
    from_neurons,
    layer_width,
    neuron_axis,
    producing_layer,
    split,
    to_neurons,
)
from neurofuse.grouping.strategy import GroupingKind, NeuronGrouping, check_kmeans_weights
from neurofuse.methods._linear import (
    AFFINE_TYPES,
    NORM_TYPES,
    LinearOptions,
    _LinearFusion,
    expand_parts,
)
from neurofuse.methods._linear_parts import check_sample_chunk
from neurofuse.methods.registry import FusionContext
from neurofuse.optimizers import OptimizerName
from neurofuse.progress import progress_bar

#: Hyperparameter sets: the paper's two (Table 9) and ``closed_form`` (start from the Linear fit).
PRESETS: dict[str, dict[str, object]] = {
    "closed_form": dict(
        init="linear",
        optimizer="adamw",
        lr=1e-3,
        epochs=60,
        weight_decay=0.0,
        eps=0.0,
        last_optimizer="adamw",
        last_lr=1e-3,
        last_epochs=60,
        batch_size=32,
        val_split=0.1,
        patience=10,
    ),
    "setting1": dict(
        init="model",
        optimizer="adamw",
        lr=1e-3,
        epochs=100,
        weight_decay=1e-4,
        eps=1.0,
        last_optimizer="adamw",
        last_lr=1e-3,
        last_epochs=100,
        batch_size=32,
        val_split=0.1,
        patience=20,
    ),
    "setting2": dict(
        init="model",
        optimizer="sgd",
        lr=1e-4,
        epochs=50,
        weight_decay=1e-4,
        eps=0.1,
        last_optimizer="adam",
        last_lr=1e-3,
        last_epochs=100,
        batch_size=32,
        val_split=0.1,
        patience=20,
    ),
}
INITS = ("linear", "model")


@dataclass
class GradientOptions:
    """Options of the Gradient variants; ``None`` takes the value of ``preset``.

    Attributes:
        preset: ``"closed_form"`` (the default: start each level from the Linear variant's fit,
            AdamW lr 1e-3, at most 60 epochs, stop after 10 without a better held-out loss; a
            level that is one affine layer keeps its closed-form solution, which already
            minimises its loss, unless an earlier level was retrained (its input moved) or the
            head is fitted with the KL loss),
            ``"setting1"`` (AdamW, lr 1e-3, 100 epochs, eps 1.0: moves far from the
            initialisation) or ``"setting2"`` (SGD, lr 1e-4, 50 epochs, eps 0.1: stays near it),
            the paper's Table 9.
        init: ``"linear"`` (start from the Linear variant's fit and use its groupings as
            targets) or ``"model"`` (start from ``init_model``'s level plus noise ``eps``).
        optimizer, lr, epochs, weight_decay: for every level but the last.
        last_optimizer, last_lr, last_epochs: for the last level (the head).
        eps: relative noise added to the initial weights (``eps * std(param) * N(0, 1)``).
        batch_size, val_split, patience: mini-batches, held-out fraction for early stopping, and
            epochs without improvement before stopping (best validation weights are restored).
        head_loss: ``"mse"`` to the mean logits, or ``"kl"`` to the averaged soft predictions.
        temperature: softmax temperature of the KL head loss.
        init_model: index of the base model whose levels initialise the fused levels, or
            ``None`` to start from the template's own weights (``nf.fuse(..., target=...)``;
            e.g. compressing a large model into a trained small one, paper section 5.5.2). A
            base level whose shapes differ from the template's also leaves the template's.
        n_init, max_iter: k-means restarts (``"auto"``: 4 up to 512 fused neurons per space,
            fewer beyond) and iterations (KF only).
        kmeans_seeding: how k-means starts (KF only): ``"k-means++"`` (default, ``n_init``
            restarts), ``"matching"`` (one start from a Hungarian matching of equal-width
            models: faster on wide layers, a higher grouping error on trained ones) or
            ``"both"`` (:func:`neurofuse.grouping.group`).
        kmeans_weights: what the importance scores weigh (KF only): ``"uniform"`` (default,
            the centroids only) or ``"importance"`` (weighted k-means, the paper's rule), as
            for the Linear variants (:class:`~neurofuse.methods._linear_parts.LinearOptions`).
        matching: how HF pairs the neurons (HF only): ``"exact"`` or ``"sparse"``, as for
            the Linear variants (:class:`~neurofuse.methods._linear_parts.LinearOptions`).
        sample_chunk: if set, no level's values are held for the whole fusion set: the closed-
            form start works in chunks of this many samples (as the Linear variants'
            ``sample_chunk``), and a level's inputs and targets are recomputed from the fusion
            inputs for every mini-batch (through the fused levels before it and the base
            models' levels up to it), at most this many samples at a time. Peak memory then
            follows the chunk instead of the fusion set; time grows with depth, since training
            level ``l`` reruns the ``l`` levels before it each epoch. Needs the closed-form
            start (preset ``"closed_form"``, ``init="linear"``): the paper presets group every
            level over its values on the whole set.
    """

    preset: Literal["closed_form", "setting1", "setting2"] = "closed_form"
    init: Literal["linear", "model"] | None = None
    optimizer: OptimizerName | None = None
    lr: float | None = None
    epochs: int | None = None
    weight_decay: float | None = None
    eps: float | None = None
    last_optimizer: OptimizerName | None = None
    last_lr: float | None = None
    last_epochs: int | None = None
    batch_size: int | None = None
    val_split: float | None = None
    patience: int | None = None
    head_loss: Literal["mse", "kl"] = "mse"
    temperature: float = 1.0
    init_model: int | None = 0
    n_init: int | Literal["auto"] = "auto"
    max_iter: int = 100
    kmeans_seeding: Literal["k-means++", "matching", "both"] = "k-means++"
    kmeans_weights: Literal["uniform", "importance"] = "uniform"
    matching: Literal["exact", "sparse"] = "exact"
    sample_chunk: int | None = None

    def __post_init__(self) -> None:
        check_kmeans_weights(self.kmeans_weights)
        check_sample_chunk(self.sample_chunk)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {sorted(PRESETS)}")
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in PRESETS[self.preset]:
                setattr(self, f.name, PRESETS[self.preset][f.name])
        if self.head_loss not in ("mse", "kl"):
            raise ValueError(f"head_loss must be 'mse' or 'kl', got {self.head_loss!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.matching not in ("exact", "sparse"):
            raise ValueError(f"matching must be 'exact' or 'sparse', got {self.matching!r}")
        self.level_config(last=False)  # validates optimizer names and ranges
        self.level_config(last=True)

    def level_config(self, last: bool) -> GradientConfig:
        return GradientConfig(
            optimizer=self.last_optimizer if last else self.optimizer,  # type: ignore[arg-type]
            lr=self.last_lr if last else self.lr,  # type: ignore[arg-type]
            epochs=self.last_epochs if last else self.epochs,  # type: ignore[arg-type]
            weight_decay=self.weight_decay,  # type: ignore[arg-type]
            batch_size=self.batch_size,  # type: ignore[arg-type]
            val_split=self.val_split,  # type: ignore[arg-type]
            patience=self.patience,  # type: ignore[arg-type]
            loss=self.head_loss if last else "mse",
            temperature=self.temperature,
        )


def _forward(level: nn.Module, x: Tensor, chunk: int = 1024) -> Tensor:
    with torch.no_grad():
        return torch.cat([level(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def fuse_gradient(ctx: FusionContext, grouping: GroupingKind) -> nn.Module:
    opt: GradientOptions = ctx.options
    n = len(ctx.models)
    if opt.init_model is not None and not 0 <= opt.init_model < n:
        raise ValueError(
            f"init_model={opt.init_model} is not a model index: give 0..{n - 1}, or None to "
            "start from the target template's weights"
        )
    fgm = ctx.trace(ctx.target)
    bgms = [ctx.trace(m) for m in ctx.models]
    cut_names = [c.name for c in ctx.levels.cut_nodes(fgm)]
    # each model's own node names (importance is looked up by them); with levels named by
    # module, models of other depth inside a level (e.g. ResNet-34 stages into ResNet-18's)
    # correspond level by level even though their fx node names differ
    b_cuts = [[c.name for c in ctx.levels.cut_nodes(g)] for g in bgms]
    for i, theirs in enumerate(b_cuts):
        named = ctx.levels.names is not None
        if len(theirs) != len(cut_names) or (not named and theirs != cut_names):
            raise ValueError(
                f"model {i} splits into levels {theirs}, the fused model into {cut_names}: "
                "models must have the same number of levels, ending at the same layers "
                "(for models of different depth, name the modules that end each level, "
                "e.g. levels=['layer1', 'layer2', 'layer3', 'layer4', 'fc'])"
            )
    f_levels = split(ctx.target, ctx.levels, gm=fgm)
    b_levels = [split(m, ctx.levels, gm=g) for m, g in zip(ctx.models, bgms, strict=True)]
    producers = [producing_layer(fgm, c) for c in ctx.levels.cut_nodes(fgm)]
    linear = _linear_start(ctx, grouping) if opt.init == "linear" else None
    chunk = opt.sample_chunk
    if chunk is not None and linear is None:
        why = ctx.report.get("init", f"init={opt.init!r}")
        raise ValueError(
            f"sample_chunk needs the closed-form start (preset 'closed_form', init='linear'); "
            f"this fusion starts from {why}, whose levels are grouped over their values on the "
            "whole fusion set: drop sample_chunk or use the closed_form preset"
        )
    grouper = NeuronGrouping(
        grouping,
        "gradient",
        seed=ctx.seed,
        n_init=opt.n_init,
        max_iter=opt.max_iter,
        seeding=opt.kmeans_seeding,
        matching=opt.matching,
        kmeans_weights=opt.kmeans_weights,
    )
    gen = ctx.generator()
    f_in: Tensor | LazyRows = ctx.inputs if chunk is None else LazyRows(_same, ctx.inputs, chunk)
    b_in: list[Tensor] = [ctx.inputs] * n
    b_lazy: list[LazyRows] = [f_in] * n if isinstance(f_in, LazyRows) else []
    target: Tensor | LazyRows
    last = len(f_levels) - 1
    history = []
    trained = False  # has a level been retrained (so later levels' inputs moved)?
    with progress_bar(ctx.progress, "gradient fusion", len(f_levels)) as advance:
        for li, f_level in enumerate(f_levels):
            if not isinstance(f_in, LazyRows):
                with ctx.timer("forward"):
                    b_out = [_forward(b_levels[k][li], b_in[k]) for k in range(n)]
                    probe = _forward(f_level, f_in[:2])
            if isinstance(f_in, LazyRows):  # sample_chunk: values made batch by batch
                assert linear is not None
                b_lazy = [r.then(b_levels[k][li]) for k, r in enumerate(b_lazy)]
                names = [c[li] for c in b_cuts]
                target = _lazy_target(ctx, linear, cut_names[li], names, b_lazy, li == last)
            elif li == last:
                target = _mean_logits(ctx, [c[li] for c in b_cuts], b_out)
            elif (
                linear is not None
                and (found := _linear_target(linear, cut_names[li], b_out)) is not None
            ):
                target = found
            else:
                hint, channels_first = layer_width(producers[li])
                axis = ctx.levels.neuron_axes.get(li, neuron_axis(probe, hint, channels_first))
                rows = [to_neurons(o, axis) for o in b_out]
                s = torch.cat(
                    [
                        ctx.importance.scores(k, b_cuts[k][li], b_out[k], r.shape[0])
                        for k, r in enumerate(rows)
                    ]
                )
                points = torch.cat(rows)
                if opt.init_model is None or linear is not None:
                    # order the groups like the neurons of the level we start from
                    with ctx.timer("forward"):
                        reference = to_neurons(_forward(f_level, f_in), axis)
                else:
                    reference = rows[opt.init_model]
                with ctx.timer("grouping"):
                    a = _group_level(grouper, li, rows, s, probe.shape[axis])
                    a = _order_like(a, points, reference)
                target = from_neurons(a @ points, b_out[0], axis)
            if linear is None:
                source = None if opt.init_model is None else b_levels[opt.init_model][li]
                if source is not None and _same_shapes(source, f_level):
                    f_level.load_state_dict(source.state_dict())
            perturb_(f_level, float(opt.eps), gen)  # type: ignore[arg-type]
            mse = li != last or opt.head_loss == "mse"
            if linear is not None and not trained and mse and _is_affine(f_level):
                # least squares already minimised this level's loss on the input it still gets
                # (no earlier level was retrained); training cannot lower it
                stats = {"val_loss": float("nan"), "train_loss": float("nan"), "closed_form": 1.0}
            else:
                with ctx.timer("fitting"):
                    stats = fit_gradient(f_level, f_in, target, opt.level_config(li == last), gen)
                trained = True
            history.append({"level": cut_names[li], **stats})
            if isinstance(f_in, LazyRows):
                f_in = f_in.then(f_level)
            else:
                with ctx.timer("forward"):
                    f_in = _forward(f_level, f_in)
                b_in = b_out
            advance(li + 1)
    ctx.report["levels"] = history
    return ctx.target.eval()


def _is_affine(level: nn.Module) -> bool:
    """The level's parameters are those of one Linear/Conv layer (and BatchNorms in eval mode):
    its output is affine in them, so the Linear variant's fit is its least-squares optimum."""
    owners = [m for m in level.modules() if any(True for _ in m.parameters(recurse=False))]
    affine = [m for m in owners if isinstance(m, AFFINE_TYPES)]
    return len(affine) == 1 and all(m in affine or isinstance(m, NORM_TYPES) for m in owners)


def _linear_start(ctx: FusionContext, grouping: GroupingKind) -> _LinearFusion | None:
    """Fit ``ctx.target`` with the Linear variant (the starting point of every level) and keep
    the engine for its groupings; ``None`` (and the paper's initialisation) when the Linear
    variant cannot fuse these models (e.g. levels that span layers of other depths)."""
    opt: GradientOptions = ctx.options
    lctx = dataclasses.replace(
        ctx,
        options=LinearOptions(
            n_init=opt.n_init,
            max_iter=opt.max_iter,
            kmeans_seeding=opt.kmeans_seeding,
            kmeans_weights=opt.kmeans_weights,
            matching=opt.matching,
            sample_chunk=opt.sample_chunk,
        ),
    )
    saved = {k: v.clone() for k, v in ctx.target.state_dict().items()}
    try:
        engine = _LinearFusion(lctx, grouping)
        engine.run()
    except (ValueError, NotImplementedError) as exc:
        ctx.target.load_state_dict(saved)
        ctx.report["init"] = f"model {opt.init_model} (no closed-form start: {exc})"
        return None
    ctx.report["init"] = "linear"
    return engine


def _linear_grouping(
    engine: _LinearFusion, cut: str, b_out: list[Tensor]
) -> tuple[Tensor, int] | None:
    """The Linear variant's averaging matrix of the space of node ``cut`` (in the dtype of the
    base outputs ``b_out``) and the neuron axis there; ``None`` if the node has none or the
    models' neurons there are not the space's."""
    where = engine.plan.node_space.get(cut)
    if where is None or not engine.ready(where.index):
        return None
    a, sizes = engine.grouping(where.index)
    a = expand_parts(a, where.parts, sizes).to(b_out[0].dtype)
    if sum(o.shape[where.axis] for o in b_out) != a.shape[1]:  # (to_neurons' row count)
        return None
    return a, where.axis


def _grouped(a: Tensor, axis: int, b_out: list[Tensor]) -> Tensor:
    """The base outputs averaged over the groups of ``a`` (neurons along ``axis``)."""
    points = torch.cat([to_neurons(o, axis) for o in b_out])
    return from_neurons(matmul(a, points), b_out[0], axis)


def _linear_target(engine: _LinearFusion, cut: str, b_out: list[Tensor]) -> Tensor | None:
    """The targets of the level ending at node ``cut``: the base outputs averaged over the
    Linear variant's grouping of that node's space (``None`` if the node has none)."""
    found = _linear_grouping(engine, cut, b_out)
    return None if found is None else _grouped(*found, b_out)


def _same(x: Tensor) -> Tensor:
    return x


def _lazy_target(
    ctx: FusionContext,
    engine: _LinearFusion,
    cut: str,
    names: list[str],
    b_out: list[LazyRows],
    last: bool,
) -> LazyRows:
    """The targets of a level as :class:`LazyRows` (``sample_chunk``): the mean logits for the
    head, else the base outputs averaged over the Linear variant's grouping."""
    fns = [r.fn for r in b_out]
    inputs, chunk = b_out[0].inputs, b_out[0].chunk
    with torch.no_grad():
        probe = [f(inputs[:2]) for f in fns]
    if last:
        widths = [o.shape[-1] for o in probe]
        weights = [
            w.to(inputs.device) for w in _logit_weights(ctx, names, [None] * len(fns), widths)
        ]

        def head(x: Tensor) -> Tensor:
            out = weights[0] * fns[0](x)
            for w, f in zip(weights[1:], fns[1:], strict=True):
                out = out + w * f(x)
            return out

        return LazyRows(head, inputs, chunk)
    found = _linear_grouping(engine, cut, probe)
    if found is None:
        raise ValueError(
            f"sample_chunk: the level ending at {cut!r} has no grouping from the closed-form "
            "start, and grouping it afresh needs its values on the whole fusion set; drop "
            "sample_chunk for this model"
        )
    a, axis = found
    return LazyRows(lambda x: _grouped(a, axis, [f(x) for f in fns]), inputs, chunk)


def _group_level(
    grouper: NeuronGrouping, li: int, rows: list[Tensor], s: Tensor, d_f: int
) -> Tensor:
    """The (d_f, d_M) averaging matrix of level ``li``'s groups (in arbitrary order)."""
    widths = [r.shape[0] for r in rows]
    points = torch.cat(rows)
    g = grouper.neurons(points, s, d_f, widths, f"level {li}", offset=li)
    return g.assignment_matrix().to(points)


def _order_like(a: Tensor, points: Tensor, reference: Tensor) -> Tensor:
    """Reorder the groups so that group j is the one closest to neuron j of the model that
    initialises the level (a Hungarian matching of centroids to its neurons). The order of
    k-means clusters is arbitrary; this makes "initialise from a base model" meaningful, since
    the next level's input neurons then come in that model's order too."""
    if a.shape[0] != reference.shape[0]:
        return a
    centroids = a @ points
    cost = torch.cdist(centroids.to(torch.float64), reference.to(torch.float64)).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = torch.as_tensor(rows[np.argsort(cols)], device=a.device)
    return a[order]


def _logit_weights(
    ctx: FusionContext, names: list[str], outs: list[Tensor] | list[None], widths: list[int]
) -> list[Tensor]:
    """Each model's per-class weight in the mean logits (its importance scores of the classes,
    normalised over the models); ``outs`` the logits on the whole set, or ``None`` each (the
    scores then come from the inputs, :meth:`ImportanceProvider.scores`)."""
    if any(w != widths[0] for w in widths):
        raise ValueError(f"the models have different numbers of classes {widths}")
    s = torch.stack([ctx.importance.scores(k, names[k], o, widths[k]) for k, o in enumerate(outs)])
    s = s / s.sum(0, keepdim=True)
    return [s[k] for k in range(len(widths))]


def _mean_logits(ctx: FusionContext, names: list[str], outs: list[Tensor]) -> Tensor:
    weights = _logit_weights(ctx, names, outs, [o.shape[-1] for o in outs])
    return sum(o * w for o, w in zip(outs, weights, strict=True))  # type: ignore[return-value]
