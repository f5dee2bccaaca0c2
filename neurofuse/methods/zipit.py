"""ZipIt! (Stoica et al. 2024): merge the models' features within and across models.

Alignment methods pair each neuron of one model with one neuron of another. ZipIt! instead
pools the neurons of every model at a space (``d_M = sum_k d_k``) and greedily merges the most
correlated ones on the fusion set's activations, whichever models they come from, until the
fused width is reached: two redundant neurons of one model may merge with each other while a
feature only one model has survives on its own. With ``n`` models a merged feature holds at most
``n`` neurons (for two models, pairs: the paper's greedy matching); ``within=False`` forbids two
neurons of the same model in one feature (pure cross-model matching).

The merge of a space is an averaging matrix ``M`` (fused feature ``i`` is the mean of its
members, importance-weighted if scores are given); the "unmerge" sends the fused feature back to
every member. Every parameter is then ``M_out [W_1 ... W_n] U_in``: rows (and biases,
normalisation parameters) averaged over each feature's members, input columns summed over each
model's members and averaged over models (:func:`neurofuse.methods._plan.aligned_average`).
The spaces come from the graph analysis, so any model it handles is zipped, not only the
architectures the authors wrote graphs for. A permuted copy merges each neuron with its twin
(correlation 1) and is recovered exactly.

**Partial zipping** (``merge_layers=m``): only the first ``m`` affine layers (in execution
order; ``m < 0`` counts from the end: ``-1`` keeps the classifier per model) are merged; the rest of every model is kept as one head per model, fed with the unmerged
trunk features, and the heads' outputs are combined like the ensemble's
(:mod:`neurofuse.methods._multihead`). ``merge_layers=0`` is the ensemble itself; the report's
``inference_cost`` gives the parameters against one model's.

**REPAIR** (``repair=True``): every merged feature's mean and standard deviation on the fusion
set are set to the (importance-)weighted mean of its members' statistics in their own models,
the same weights that merge its parameters; a neuron alone in its feature keeps its own
statistics. (Jordan et al.'s targets interpolate one neuron per model; a ZipIt! feature may hold
two neurons of one model and none of another, and this is the interpolation that covers both.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.alignment import Space
from neurofuse.alignment.repair import StatsTarget
from neurofuse.graph import GraphRunner, affine_nodes
from neurofuse.methods._activations import (
    Activations,
)
from neurofuse.methods._averaging import (
    alignment_setup,
    finish,
)
from neurofuse.methods._multihead import build_multihead, inference_cost
from neurofuse.methods._plan import FusionPlan, aligned_average
from neurofuse.methods.registry import Capabilities, FusionContext, register_method


@dataclass
class ZipItOptions:
    """Options of ``zipit``.

    Attributes:
        within: allow two neurons of the same model in one merged feature (ZipIt!'s
            within-model merging); ``False`` matches across models only.
        reset_bn: re-estimate BatchNorm running statistics on the fusion set after merging.
        repair: REPAIR every merged feature's statistics to its members' (see the module).
        merge_layers: merge only the first this many affine layers (negative: all but the
            last ``-merge_layers``) and keep the rest per model (partial zipping: a multi-head
            model); ``None`` merges all of them.
        combine: how the heads' outputs are combined after partial zipping, as in
            ``ensemble``: ``"prob"`` (log of the mean probabilities) or ``"logit"``.
    """

    within: bool = True
    reset_bn: bool = False
    repair: bool = False
    merge_layers: int | None = None
    combine: Literal["prob", "logit"] = "prob"


def correlation_matrix(z: Tensor) -> Tensor:
    """Pearson correlation (float64, ``(d, d)``) of the rows of ``z`` (``(d, N)``)."""
    z = z.to(torch.float64)
    z = z - z.mean(1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return z @ z.T


def zip_groups(corr: Tensor, owners: Tensor, k: int, max_size: int, within: bool) -> Tensor:
    """Greedy merging (average linkage on ``corr``) of ``d_M`` neurons into ``k`` features of
    at most ``max_size`` neurons; ``owners[j]`` is neuron ``j``'s model. When no merge is
    allowed any more before ``k`` features are reached (features of 3 and 3 when 4 is the
    limit), the most correlated remaining pair merges anyway. Returns the feature label of
    every neuron, features numbered by their lowest neuron."""
    d = corr.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"cannot zip {d} neurons into {k} features")
    n_models = int(owners.max()) + 1
    link = corr.clone()
    size = torch.ones(d, dtype=torch.float64)
    models = torch.nn.functional.one_hot(owners, n_models).bool()
    label = torch.arange(d)
    alive = torch.ones(d, dtype=torch.bool)
    allowed = ~torch.eye(d, dtype=torch.bool)
    if not within:
        allowed &= owners[:, None] != owners[None, :]
    for _ in range(d - k):
        scores = link.masked_fill(~allowed, float("-inf"))
        flat = int(torch.argmax(scores))
        if scores.view(-1)[flat] == float("-inf"):  # no allowed merge left: relax the limits
            live = alive[:, None] & alive[None, :] & ~torch.eye(d, dtype=torch.bool)
            flat = int(torch.argmax(link.masked_fill(~live, float("-inf"))))
        a, b = divmod(flat, d)
        a, b = min(a, b), max(a, b)
        merged = (size[a] * link[a] + size[b] * link[b]) / (size[a] + size[b])
        size[a] += size[b]
        models[a] |= models[b]
        alive[b] = False
        label[label == b] = a
        link[a], link[:, a] = merged, merged
        allowed[b], allowed[:, b] = False, False
        ok = alive & (size + size[a] <= max_size)
        if not within:
            ok &= ~(models & models[a]).any(1)
        ok[a] = False
        allowed[a], allowed[:, a] = ok, ok
    roots = torch.unique(label)
    return torch.searchsorted(roots, label)


def _averaging(labels: Tensor, weights: Tensor, k: int) -> Tensor:
    """``(k, d_M)``: each feature the ``weights``-weighted mean of its members."""
    a = torch.zeros(k, labels.numel(), dtype=torch.float64)
    a[labels, torch.arange(labels.numel())] = weights.to(torch.float64)
    return a / a.sum(1, keepdim=True).clamp_min(1e-300)


@register_method(
    "zipit",
    "ZipIt! (Stoica et al. 2024): features merged greedily by correlation within and across "
    "models, then every parameter merged and unmerged through the spaces",
    ZipItOptions,
    Capabilities(
        importance=True,
        equal_widths=True,
        target="same",
        transformers=False,
        tied_weights=True,
        exact=True,
    ),
)
def zipit(ctx: FusionContext) -> nn.Module:
    opt: ZipItOptions = ctx.options
    n = len(ctx.models)
    # checks the layers and graphs and derives the matched spaces
    _, _, states, spaces = alignment_setup(ctx, "zipit", 0, None, equal_widths=True)
    fused = ctx.target
    fgm = ctx.trace(fused)
    plan = FusionPlan(fgm, fused, ctx.inputs[:2])
    acts = Activations(ctx)
    groupings: dict[int, Tensor] = {}
    merged_within: dict[str, int] = {}
    for i, space in enumerate(plan.spaces):
        sizes = [spaces[k][i].size for k in range(n)]
        if space.fixed:
            eye = torch.eye(space.size, dtype=torch.float64) / n
            groupings[i] = torch.cat([eye] * n, dim=1)
            continue
        groupings[i] = _zip_space(ctx, opt, acts, [spaces[k][i] for k in range(n)], space)
        owners = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))
        per_feature = (groupings[i] > 0).to(torch.float64) @ torch.nn.functional.one_hot(
            owners, n
        ).to(torch.float64)
        merged_within[space.name] = int((per_feature > 1).any(1).sum())
    ctx.report["features_merged_within_a_model"] = merged_within

    def grouping(index: int) -> tuple[Tensor, list[int]]:
        return groupings[index], [spaces[k][index].size for k in range(n)]

    state = fused.state_dict()
    for key, t in state.items():
        if not t.is_floating_point():
            continue
        axes = plan.spaces_of_key(key, t.dim())
        value = aligned_average(fgm, key, [s[key] for s in states], axes, grouping)
        with torch.no_grad():
            t.copy_(value.to(t))
    fused = finish(
        ctx,
        fused,
        opt.reset_bn,
        opt.repair,
        target=lambda: _feature_statistics(plan, groupings, acts),
    )
    units = len(affine_nodes(fgm))
    merged = opt.merge_layers
    if merged is not None and merged < 0:
        if merged < -units:
            raise ValueError(
                f"merge_layers={merged} asks to keep more layers per model than the {units} "
                f"affine layers these models have; use -{units} .. {units} (or None)"
            )
        merged += units
    if merged is None or merged >= units:
        return fused
    bridge = _bridge(
        plan, groupings, [spaces[k] for k in range(n)], GraphRunner(fgm, ctx.inputs[:2])
    )
    model = build_multihead(fused, fgm, ctx.models, merged, bridge, opt.combine)
    ctx.report["partial"] = {
        "merged_layers": merged,
        "affine_layers": units,
        "heads": n,
        "inference_cost": inference_cost(model, ctx.models[0]),
    }
    return model.eval()


def _feature_statistics(
    plan: FusionPlan, groupings: dict[int, Tensor], acts: Activations
) -> StatsTarget:
    """REPAIR's targets for zipped features: each feature's grouping applied to its members'
    means and standard deviations (the base models' neurons stacked like the grouping's
    columns)."""

    def target(end: fx.Node, axis: int) -> tuple[Tensor, Tensor] | None:
        where = plan.node_space.get(end.name)
        if where is None:
            return None
        stats = [acts.neuron_stats(k, end.name, axis) for k in range(len(acts.gms))]
        grouping = groupings[where.index].to(torch.float64).cpu()
        mu = torch.cat([m.cpu() for m, _ in stats])
        sd = torch.cat([s.cpu() for _, s in stats])
        return grouping @ mu, grouping @ sd

    return target


def _bridge(
    plan: FusionPlan,
    groupings: dict[int, Tensor],
    spaces: list[list[Space]],
    runner: GraphRunner,
) -> Callable[[fx.Node, int], tuple[Tensor, int] | None]:
    """How head ``k`` reads a trunk value: unmerged on its neuron axis when it carries a zipped
    space, as it is when it is the input, a fixed space or not a tensor."""

    def bridge(node: fx.Node, k: int) -> tuple[Tensor, int] | None:
        if node.op == "placeholder":
            return None
        where = plan.node_space.get(node.name)
        if where is None:
            if not isinstance(runner.value(runner.node(node.name)), Tensor):
                return None
            raise ValueError(
                f"partial zipping cannot cut at node {node.name!r}: its value crosses into the "
                "unmerged layers but carries no neuron space the zip could unmerge (a reshaped "
                "or mixed value); choose another merge_layers"
            )
        if plan.spaces[where.index].fixed:
            return None
        if where.parts != 1:
            raise ValueError(
                f"partial zipping cannot cut at node {node.name!r}: it holds {where.parts} "
                "copies of its space side by side; choose another merge_layers"
            )
        offset = sum(spaces[j][where.index].size for j in range(k))
        size = spaces[k][where.index].size
        members = groupings[where.index][:, offset : offset + size] > 0
        return members.T.to(torch.float32), where.axis

    return bridge


def _zip_space(
    ctx: FusionContext,
    opt: ZipItOptions,
    acts: Activations,
    spaces: list[Space],
    fused_space: Space,
) -> Tensor:
    n = len(spaces)
    if any(s.heads > 1 for s in spaces):
        raise ValueError(
            f"space {fused_space.name!r} is split into attention heads; zipit merges single "
            "neurons and would split heads. Use git_rebasin or transformer_otfusion."
        )
    # the correlations of every model's neurons (over the whole set, or summed over chunks)
    cov, _ = acts.covariance(range(n), spaces)
    norm = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    corr = cov / norm[:, None] / norm[None, :]
    sizes = [s.size for s in spaces]
    owners = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))
    labels = zip_groups(corr.cpu(), owners, fused_space.size, n, opt.within)
    scores = [acts.scores(k, spaces[k]) for k in range(n)]
    weights = torch.cat(
        [
            torch.ones(sizes[k], dtype=torch.float64) if s is None else s
            for k, s in enumerate(scores)
        ]
    )
    return _averaging(labels, weights, fused_space.size).to(ctx.inputs.device)
