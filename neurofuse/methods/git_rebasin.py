"""Git Re-Basin: permute every model onto a reference by linear assignment, then average.

Ainsworth, Hayase & Srinivasa 2022, "Git Re-Basin: Merging Models modulo Permutation
Symmetries" (ICLR 2023). For each permutation space (see :mod:`neurofuse.alignment`) the
permutation ``p`` of model ``k``'s neurons onto the reference's solves a linear assignment
problem (``scipy.optimize.linear_sum_assignment``):

- ``match="acts"`` (activation matching): maximise ``sum_i corr(z_ref_i, z_k_p(i))``, the
  Pearson correlation of the neurons' activations over the fusion set (every sample and
  position), summed over every node that carries the space (a residual stream is matched once
  for the whole stream). Activations of the original models are used: permutations do not
  change a network's function, so no re-evaluation is needed. The correlations are accumulated
  over chunks of the fusion set (:data:`ACTS_CHUNK` samples) in one pass of the models per
  chunk, each value dropped once read, so the activations held at once are a part of one
  chunk's, however large the fusion set; convolutions' maps are correlated as they lie
  (float32 products on centred maps, float64 sums).
- ``match="weights"`` (weight matching): maximise ``sum_members <W_ref, P W_k>`` over all spaces
  jointly, by coordinate descent over the spaces (each step is one assignment problem, taken
  in a random order seeded by ``seed``) until no permutation changes.

More than two models: each is matched to the reference. The permuted models are averaged with
importance weights per neuron, as the neuron-interpolation paper does for Git Re-Basin (appendix
C): fused neuron ``i`` is ``sum_k s_{k,i} w_{k,i} / sum_k s_{k,i}`` over its outgoing
parameters (weight rows, bias, BatchNorm parameters), where ``s_{k,i}`` is model ``k``'s score of
the neuron matched to ``i`` (times the model weight of ``weights``). The logits' rows use the
class scores the same way; other parameters are averaged with the model weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from neurofuse.alignment import Space, apply_permutation
from neurofuse.alignment.space import neuron_rows
from neurofuse.graph import GraphRunner
from neurofuse.grouping.heads import block_assignment
from neurofuse.grouping.hungarian import SPARSE_NEIGHBOURS, assign_pairs
from neurofuse.methods._activations import (
    at_least_float32,
    channel_maps,
    channel_sums,
    importance_coefficients,
    scored_spaces,
    space_scores,
    stream_against_reference,
    value_features,
)
from neurofuse.methods._averaging import (
    State,
    alignment_setup,
    average_states,
    finish,
    write_state,
)
from neurofuse.methods._plan import LazySequence
from neurofuse.methods.registry import Capabilities, FusionContext, register_method
from neurofuse.utils import tensor_sum


@dataclass
class GitRebasinOptions:
    """Options of ``git_rebasin``.

    Attributes:
        reference: index of the model the others are permuted onto.
        match: ``"acts"`` (activation matching, correlations on the fusion set) or
            ``"weights"`` (weight matching, no data needed for the alignment).
        max_iter: coordinate-descent sweeps of weight matching.
        matching: how each assignment is solved: ``"exact"`` (default, the linear assignment,
            cubic in the width) or ``"sparse"``, the best one among each neuron's 128 most
            similar partners (as HF's ``matching="sparse"``: exact whenever the optimal pairs
            are among them; two wide MLPs: 1.6-3.2x faster at widths 1024-8192, the same
            accuracy; ``benchmarks/results/git_rebasin_sparse.md``).
        weights: model weights of the final average (default uniform).
        reset_bn: re-estimate BatchNorm running statistics on the fusion set after fusing.
        repair: REPAIR (Jordan et al. 2022): rescale every hidden neuron so that its mean and
            standard deviation on the fusion set are the interpolation of the aligned base
            models' (undoes the variance collapse of averaging; after ``reset_bn`` if both).
    """

    reference: int = 0
    match: Literal["acts", "weights"] = "acts"
    max_iter: int = 100
    matching: Literal["exact", "sparse"] = "exact"
    weights: list[float] | None = None
    reset_bn: bool = False
    repair: bool = False

    def __post_init__(self) -> None:
        if self.match not in MATCHERS:
            raise ValueError(f"match must be one of {sorted(MATCHERS)}, got {self.match!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.matching not in ("exact", "sparse"):
            raise ValueError(f"matching must be 'exact' or 'sparse', got {self.matching!r}")


class CorrelationSums:
    """Pearson correlations ``C[i, j]`` between the rows ``x_i`` (n, N) and ``y_j`` (m, N) of
    two feature matrices whose columns arrive in chunks (``add``), so that no more than one
    chunk of activations is ever held. The sums are taken about a shift, the first chunk's row
    means, so that they do not cancel when a neuron's mean is large against its spread; a
    constant row (a dead neuron) correlates 0 with everything. Sums and results are float64
    (in float32 the one-pass variance of a nearly constant neuron cancels)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x.to(torch.float64), y.to(torch.float64)
        if self.count == 0:
            self.x0, self.y0 = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
            self.sx = x.new_zeros(len(x))
            self.sy = y.new_zeros(len(y))
            self.sxx, self.syy = torch.zeros_like(self.sx), torch.zeros_like(self.sy)
            self.sxy = x.new_zeros(len(x), len(y))
        x = x - self.x0  # new tensors: the inputs (a runner's values) stay intact
        y = y - self.y0
        self.sx += x.sum(1)
        self.sy += y.sum(1)
        self.sxx += x.square().sum(1)
        self.syy += y.square().sum(1)
        self.sxy.addmm_(x, y.T)
        self.count += x.shape[1]

    def add_maps(self, x: Tensor, y: Tensor) -> None:
        """:meth:`add` for channel maps ``x`` (B, n, P) and ``y`` (B, m, P) as they lie (the
        neurons' values over samples and positions): centred in their own dtype on the first
        chunk's channel means, the products batched over samples and each sample's summed in
        float64, instead of float64 neuron rows (three times the time on two VGG-small
        CNNs). The centring keeps the one-pass variance from cancelling; do not mix with
        :meth:`add` on one object. Half-precision maps are taken in float32."""
        x, y = at_least_float32(x), at_least_float32(y)
        if self.count == 0:
            # the shift as the maps' dtype holds it, so that every chunk subtracts the same
            length = x.shape[0] * x.shape[2]
            self.x0 = (channel_sums(x) / length).to(x.dtype).view(1, -1, 1)
            self.y0 = (channel_sums(y) / length).to(y.dtype).view(1, -1, 1)
            self.sx = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sy = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
            self.sxx, self.syy = torch.zeros_like(self.sx), torch.zeros_like(self.sy)
            self.sxy = self.sx.new_zeros(x.shape[1], y.shape[1])
        x = x - self.x0  # new tensors: the inputs (a runner's values) stay intact
        y = y - self.y0
        self.sx += channel_sums(x)
        self.sy += channel_sums(y)
        # norms over the contiguous positions first (see otfusion.map_distances)
        self.sxx += torch.linalg.vector_norm(x, dim=2).square().sum(0, dtype=torch.float64)
        self.syy += torch.linalg.vector_norm(y, dim=2).square().sum(0, dtype=torch.float64)
        self.sxy += torch.bmm(x, y.transpose(1, 2)).sum(0, dtype=torch.float64)
        self.count += x.shape[0] * x.shape[2]

    def correlation(self, eps: float = 1e-8) -> Tensor:
        if self.count == 0:
            raise ValueError("no samples were added")
        n = self.count
        cov = self.sxy - torch.outer(self.sx, self.sy) / n
        x_norm = (self.sxx - self.sx.square() / n).clamp_min(0).sqrt() + eps
        y_norm = (self.syy - self.sy.square() / n).clamp_min(0).sqrt() + eps
        return cov.div_(x_norm[:, None]).div_(y_norm[None, :])


def correlation(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation ``C[i, j]`` between rows ``x_i`` (n, N) and ``y_j`` (m, N) in one
    chunk (see :class:`CorrelationSums`)."""
    sums = CorrelationSums()
    sums.add(x, y)
    return sums.correlation(eps)


def assign(similarity: Tensor, heads: int = 1, neighbours: int | None = None) -> Tensor:
    """The permutation ``p`` maximising ``sum_i similarity[i, p[i]]`` (rows: reference); for a
    space of attention heads, the best one that moves whole heads onto heads. ``neighbours``:
    the best one among each neuron's ``neighbours`` most similar partners
    (:func:`neurofuse.grouping.hungarian.assign_pairs`; heads are always matched exactly)."""
    if heads > 1:
        return block_assignment(similarity, heads, maximize=True)
    return assign_pairs(-similarity, neighbours)  # maximising: the least negated similarity


def _neighbours(ctx: FusionContext) -> int | None:
    opt: GitRebasinOptions = ctx.options
    return SPARSE_NEIGHBOURS if opt.matching == "sparse" else None


#: Samples per chunk of activation matching: its memory is about the widest cut of every
#: model's graph on one chunk, not the whole fusion set's activations.
ACTS_CHUNK = 512


def _match_acts(ctx: FusionContext, ref: int, spaces: list[list[Space]]) -> list[dict[str, Tensor]]:
    """Every model's permutations onto model ``ref``, from activation correlations summed over
    the nodes that carry each space and accumulated over chunks of :data:`ACTS_CHUNK` samples:
    one model after the other (so only one model's sums are held), each in one pass over each
    chunk beside the reference, its correlation sums taken while the values are fresh and
    every value dropped once read
    (:func:`~neurofuse.methods._activations.stream_against_reference`)."""
    for k in range(len(ctx.models)):
        for space in spaces[k]:
            if k != ref and not space.fixed and not space.nodes:
                raise ValueError(f"space {space.name!r} has no nodes; use match='weights'")
    free = [i for i, s in enumerate(spaces[ref]) if not s.fixed]
    wanted: dict[str, list[tuple[int, int]]] = {}  # node name -> (space index, node index)
    for i in free:
        for t, name in enumerate(spaces[ref][i].nodes):
            wanted.setdefault(name, []).append((i, t))
    perms: list[dict[str, Tensor]] = []
    for k in range(len(ctx.models)):
        if k == ref:
            perms.append({})
            continue
        sums = {(i, t): CorrelationSums() for i in free for t in range(len(spaces[ref][i].nodes))}
        # each space's correlations summed in node order as the nodes are complete (seen on
        # the last chunk), each node's sums dropped then (held: those not complete yet)
        total: dict[int, Tensor] = {}
        done: dict[tuple[int, int], Tensor] = {}
        turn = dict.fromkeys(free, 0)
        for name, y, x, _, last in stream_against_reference(ctx, ref, k, set(wanted), ACTS_CHUNK):
            for i, t in wanted[name]:
                space, r_space = spaces[k][i], spaces[ref][i]
                xm, ym = channel_maps(x, space, t), channel_maps(y, r_space, t)
                if xm is not None and ym is not None:
                    sums[i, t].add_maps(ym, xm)
                else:
                    sums[i, t].add(value_features(y, r_space, t), value_features(x, space, t))
                del xm, ym
                if last:
                    done[i, t] = sums.pop((i, t)).correlation()
                    while (i, turn[i]) in done:
                        c = done.pop((i, turn[i]))
                        total[i] = c if i not in total else total[i].add_(c)
                        turn[i] += 1
            del y, x  # (not held while the next node is computed)
        assert not sums and not done
        perms.append(
            {
                spaces[k][i].name: assign(total.pop(i), spaces[k][i].heads, _neighbours(ctx))
                for i in free
            }
        )
    return perms


def _match_weights(
    ctx: FusionContext, ref: int, spaces: list[list[Space]]
) -> list[dict[str, Tensor]]:
    """Every model's permutations onto model ``ref`` by weight matching."""
    return [
        {} if k == ref else _match_weights_one(ctx, ref, k, spaces[k])
        for k in range(len(ctx.models))
    ]


def _match_weights_one(
    ctx: FusionContext, ref: int, k: int, spaces: list[Space]
) -> dict[str, Tensor]:
    """Coordinate descent on ``sum <W_ref, P W_k>``; ``state`` is kept permuted by the current
    permutations, so each step solves for a correction ``c`` and composes ``p <- p[c]``."""
    opt: GitRebasinOptions = ctx.options
    ref_state = dict(ctx.models[ref].state_dict())
    state = dict(ctx.models[k].state_dict())
    free = [s for s in spaces if not s.fixed]
    perms = {s.name: torch.arange(s.size) for s in free}
    g = ctx.generator(k)
    for _ in range(opt.max_iter):
        changed = False
        for i in torch.randperm(len(free), generator=g).tolist():
            s = free[i]
            sim = tensor_sum(
                neuron_rows(ref_state[m.key], m, s.size).to(torch.float64)
                @ neuron_rows(state[m.key], m, s.size).to(torch.float64).T
                for m in s.members
            ).cpu()
            c = assign(sim, s.heads, _neighbours(ctx))
            gain = float(sim[torch.arange(s.size), c].sum() - sim.diagonal().sum())
            if gain > 1e-9 * max(1.0, float(sim.abs().max())):
                state = apply_permutation(state, [s], {s.name: c})
                perms[s.name] = perms[s.name][c]
                changed = True
        if not changed:
            break
    return perms


#: Matchers: ``f(ctx, reference, every model's spaces) -> every model's permutations``.
MATCHERS: dict[str, Callable[[FusionContext, int, list[list[Space]]], list[dict[str, Tensor]]]] = {
    "acts": _match_acts,
    "weights": _match_weights,
}


def _per_neuron(
    ctx: FusionContext, spaces: list[Space], perms: list[dict[str, Tensor]]
) -> dict[str, list[Tensor]]:
    """Per-row averaging coefficients of every outgoing member: each model's importance
    scores, reordered by its permutation (uniform importance: none needed)."""
    if ctx.importance.uniform:
        return {}
    scored = scored_spaces(ctx, spaces)
    whole = ctx.inputs.shape[0] <= ACTS_CHUNK  # else: scores from the inputs, in batches
    tables: list[dict[str, Tensor]] = []
    for k, model in enumerate(ctx.models):
        runner = GraphRunner(ctx.trace(model), ctx.inputs)
        table = {}
        for s in scored:
            scores = space_scores(ctx, k, runner, s, whole)
            assert scores is not None
            table[s.name] = scores[perms[k][s.name]] if s.name in perms[k] else scores
        tables.append(table)
    return importance_coefficients(spaces, tables)


@register_method(
    "git_rebasin",
    "Git Re-Basin (Ainsworth et al. 2022): permutation by linear assignment, then averaging",
    GitRebasinOptions,
    Capabilities(
        importance=True,
        equal_widths=True,
        target="same",
        tied_weights=True,
        exact=True,
    ),
)
def git_rebasin(ctx: FusionContext) -> nn.Module:
    opt: GitRebasinOptions = ctx.options
    n = len(ctx.models)
    ref, weights, states, spaces = alignment_setup(
        ctx, "git_rebasin", opt.reference, opt.weights, equal_widths=True
    )
    perms = MATCHERS[opt.match](ctx, ref, spaces)
    ctx.report["moved_neurons"] = [
        sum(int((q != torch.arange(len(q))).sum()) for q in p.values()) for p in perms
    ]

    def aligned_state(k: int) -> State:
        return apply_permutation(states[k], spaces[k], perms[k])

    # REPAIR needs every aligned model afterwards; otherwise each permuted copy is made as the
    # average reads it and dropped (extra memory of one model's state, not one per model)
    aligned: Sequence[State] = (
        [aligned_state(k) for k in range(n)] if opt.repair else LazySequence(n, aligned_state)
    )
    fused = average_states(aligned, weights, _per_neuron(ctx, spaces[ref], perms))
    fused_model = write_state(ctx.target, fused, "git_rebasin")
    return finish(ctx, fused_model, opt.reset_bn, opt.repair, aligned, weights)
