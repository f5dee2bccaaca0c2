"""Engine of the Linear variants (HF Linear, KF Linear): closed-form neuron interpolation.

Every affine unit (a Linear or Conv layer with the BatchNorm right after it, which in eval mode is
affine and is folded into the fit) is fitted in forward order, each from the input that the
*already fused* network gives it (paper section 4, appendix A/B):

1. the base models' unit outputs ``Y`` (one column per base neuron) are projected onto the
   column space of the fused input ``X``; the projection is represented by its coordinates in
   an orthonormal basis, in ``min(p, N)`` dimensions (:class:`neurofuse.closed_form.LeastSquares`:
   ``L^{-1} X^T Y`` from the Gram matrix, or from the N x N kernel when a layer has fewer
   fusion rows ``N`` than inputs ``p``);
2. the projected neurons are grouped (Hungarian matching or importance-weighted k-means);
3. the weights whose outputs are the importance-weighted group centroids are solved in closed
   form: ``W = (X^T X)^{-1} X^T T``.

Which neurons belong together comes from the model's permutation spaces
(:mod:`neurofuse.alignment`, through :class:`neurofuse.methods._plan.FusionPlan`), so any
fx-traceable model is covered:

- a space is grouped once, where its first unit is fitted, and every later unit writing into it
  inherits that grouping. Residual additions ``out = unit(h) + skip`` tie the unit's neurons to
  the skip's (a residual stream is one space): the unit is fitted to ``T_sum - skip_fused``,
  which also absorbs the drift of the fused skip;
- a space of attention heads (a joint ``qkv`` projection, or separate query/key/value layers) is
  grouped with heads as units (:mod:`neurofuse.grouping.heads`): whole base heads form a fused
  head, their dimensions matched alike for query, key and value;
- a space that cannot be permuted (the classes of the logits, anything an unsupported op
  touches) keeps its neurons aligned across models: each fused neuron is the
  importance-weighted mean of the same neuron of every model (for the head: the mean logits);
- a LayerNorm (or BatchNorm) read only by affine units is folded: set to the identity, its
  scale and shift absorbed by the least-squares fit of the units after it;
- every other parameter (class tokens, position embeddings, token embeddings, the remaining
  normalisations) is the aligned, importance-weighted average of the base models' through the
  groupings of its spaces; for a token embedding that is exactly the least-squares answer
  (its input, the token ids, is the same for every model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse._sparse import matmul, matmul_t
from neurofuse.fitting import Factor, LeastSquares, affine_inputs, affine_output_rows
from neurofuse.graph import (
    ADD_FUNCTIONS,
    AFFINE_TYPES,
    NORM_TYPES,
    module_of,
    to_neurons,
    unit_end,
)
from neurofuse.grouping.strategy import GroupingKind, NeuronGrouping
from neurofuse.methods._linear_parts import (
    FitPiece,
    LinearOptions,
    check_batchnorms,
    check_untied,
    effective_unit,
    expand_parts,
    identity_norm,
    normal_equations,
    set_unit,
    weight_rows,
)
from neurofuse.methods._linear_values import GramPoints, Piece, Values
from neurofuse.methods._plan import FusionPlan, LazySequence, aligned_average
from neurofuse.methods.registry import FusionContext
from neurofuse.progress import progress_bar
from neurofuse.utils import tensor_attr

#: The aligned prior of a layer with more weights than this is averaged in float32 (its
#: temporaries are the largest memory of wide fusions: 2 GiB per float64 copy of a
#: 16384 x 16384 layer); smaller ones in float64. A prior is only the centre of the fit: the
#: fit corrects it on the rows it sees, and float32 keeps it to 1e-7 relative elsewhere.
FLOAT64_PRIOR_MAX = 1 << 25


def _units_upstream(node: fx.Node, plan: FusionPlan) -> list[fx.Node]:
    """The affine units (and embeddings) that ``node``'s value depends on."""
    units = set(plan.units) | set(plan.embeddings)
    seen, stack, out = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in units:
            out.append(n)
        stack.extend(n.all_input_nodes)
    return out


def _row_slicer(y: Tensor) -> Callable[[int, int], Tensor]:
    """The target rows ``lo:hi`` of ``y`` (what the normal equations accumulate chunk by chunk)."""
    return lambda lo, hi: y[lo:hi]


@dataclass
class _Seen:
    """What a fit's first piece shows of the base models: their widths at the unit, and their
    values there when the piece is the whole fusion set (for the importance scores)."""

    widths: list[int] = field(default_factory=list)
    ys: list[Tensor] | None = None


class _LinearFusion:
    def __init__(self, ctx: FusionContext, grouping: GroupingKind) -> None:
        self.ctx = ctx
        self.opt: LinearOptions = ctx.options.resolved(ctx.inputs.device)
        ctx.report["precision"] = self.opt.precision  # (what "auto" became)
        self.grouper = NeuronGrouping(
            grouping,
            "linear",
            seed=ctx.seed,
            n_init=self.opt.n_init,
            max_iter=self.opt.max_iter,
            local_search=self.opt.local_search,
            seeding=self.opt.kmeans_seeding,
            matching=self.opt.matching,
            kmeans_weights=self.opt.kmeans_weights,
        )
        self.fused = ctx.target
        self.fgm = ctx.trace(self.fused)
        self.bgms = [ctx.trace(m) for m in ctx.models]
        names = [n.name for n in self.fgm.graph.nodes]
        for i, g in enumerate(self.bgms):
            other = [n.name for n in g.graph.nodes]
            if other != names:
                diff = next(
                    (a, b) for a, b in zip(names + [None], other + [None], strict=False) if a != b
                )
                raise ValueError(
                    f"model {i} does not have the architecture of the fused model (graphs differ "
                    f"at {diff}); the Linear variants need models with the same layers (widths "
                    "may differ)"
                )
        # Every affine unit is fitted as its own level (a Linear-variant level must be affine in
        # its weights); explicit level names are still checked so that a typo is an error.
        ctx.levels.cut_nodes(self.fgm)
        example = ctx.inputs[:2]
        self.plan = FusionPlan(self.fgm, self.fused, example)
        self.bplans = [
            FusionPlan(g, m, example) for g, m in zip(self.bgms, ctx.models, strict=True)
        ]
        self._check_spaces()
        check_batchnorms(self.fgm)
        check_untied(self.fused)
        self.fnode = {n.name: n for n in self.fgm.graph.nodes}
        self.values = Values(
            self.fgm, self.bgms, ctx.inputs, self.opt.sample_chunk, lambda: ctx.timer("forward")
        )
        # space index -> (k, d_M) averaging matrix, sparse (neurofuse._sparse)
        self.groupings: dict[int, Tensor] = {}
        for name in self.plan.folded:
            identity_norm(self.fgm.get_submodule(name))
        self.pending = self.plan.settled_keys()
        self.n = ctx.inputs.shape[0]
        self.stats: dict[str, float] = {}
        self.prior_strengths: dict[str, float] = {}

    def _check_spaces(self) -> None:
        ref = self.plan.spaces
        for i, bp in enumerate(self.bplans):
            mine = [(s.name, s.fixed, len(s.members)) for s in bp.spaces]
            if mine != [(s.name, s.fixed, len(s.members)) for s in ref]:
                raise ValueError(
                    f"model {i}'s neuron spaces differ from the fused model's; the Linear "
                    "variants need models with the same layers (widths may differ)"
                )
            for s, b in zip(ref, bp.spaces, strict=True):
                if s.heads > 1 and b.size % b.heads == 0 and b.size // b.heads != s.head_dim:
                    raise ValueError(
                        f"attention space {s.name!r}: model {i} has heads of {b.size // b.heads} "
                        f"dimensions, the fused model {s.head_dim}; heads must have equal widths"
                    )

    # ------------------------------------------------------------------ helpers
    def sizes(self, space: int) -> list[int]:
        return [bp.spaces[space].size for bp in self.bplans]

    def base_rows(
        self, node: fx.Node, layer: nn.Module, piece: Piece
    ) -> tuple[Tensor, list[int], list[Tensor]]:
        ys = piece.bases(node.name)
        rows = [affine_output_rows(layer, y.detach()) for y in ys]
        return torch.cat(rows, dim=1), [r.shape[1] for r in rows], ys

    def scores(self, node: fx.Node, ys: list[Tensor] | None, widths: list[int]) -> Tensor:
        """Importance of the base models' neurons at ``node``; ``ys`` their values on the whole
        fusion set, ``None`` when the engine works in chunks (the score is then computed from
        the inputs in batches, or read from a table)."""
        outs = ys if ys is not None else [None] * len(widths)
        return torch.cat(
            [
                self.ctx.importance.scores(i, node.name, y, w).to(self.ctx.inputs.device)
                for i, (y, w) in enumerate(zip(outs, widths, strict=True))
            ]
        ).to(torch.float64)

    def unit_data(
        self,
        end: fx.Node,
        layer: nn.Module,
        units: list[fx.Node],
        seen: _Seen,
        target: Callable[[Tensor, Piece], Callable[[int, int], Tensor]] | None = None,
        extra: Sequence[fx.Node] = (),
    ) -> Iterator[tuple[list[Tensor], Callable[[int, int], Tensor]]]:
        """The pieces of a fit: the fused inputs of ``units`` and the target rows, the base
        models' outputs at ``end`` as ``layer`` writes them (or ``target(y, piece)`` of them).
        ``seen`` receives the models' widths and, on the whole set, their values (scores);
        ``extra``: fused-model nodes that ``target`` reads, computed with the inputs."""
        for piece in self.values.pieces():
            y, widths, ys = self.base_rows(end, layer, piece)
            # the inputs and the fused values ``target`` reads (``extra``) in one pass
            xs = piece.fused_at([u.args[0] for u in units] + list(extra))[: len(units)]  # type: ignore[arg-type]
            if not seen.widths:
                seen.widths = widths
                seen.ys = None if self.values.chunked else ys
            yield xs, (target(y, piece) if target is not None else _row_slicer(y))
            del xs, y, ys  # (not alive while the next piece is computed)

    def layer(self, unit: fx.Node) -> nn.Module:
        """The fused model's module that ``unit`` calls."""
        mod = module_of(self.fgm, unit)
        assert mod is not None, f"{unit.name} is not a module call"
        return mod

    def accumulate(
        self, layers: list[nn.Module], pieces: Iterable[FitPiece], bias: bool
    ) -> LeastSquares:
        it = iter(pieces)
        first = next(it)
        n = self.values.rows(first[0][0].shape[0])  # the input's rows over the whole set
        return normal_equations(layers, chain([first], it), bias, self.opt, self.ctx.seed, n)

    def group(self, coords: Tensor, s: Tensor, k: int, widths: list[int], where: str) -> Tensor:
        with self.ctx.timer("grouping"):
            g = self.grouper.neurons(coords, s, k, widths, f"space {where!r}")
        self.stats["grouping_cost"] = self.stats.get("grouping_cost", 0.0) + float(g.cost)
        if g.seeding:
            self.ctx.report.setdefault("kmeans_seeding", {})[where] = g.seeding
        return g.assignment_matrix(sparse=True).to(torch.float64)

    def grouping(self, space: int) -> tuple[Tensor, list[int]]:
        """The grouping of a space (found earlier; for a space that cannot be permuted, each
        neuron with the same neuron of the other models) and the base models' sizes."""
        if space not in self.groupings:
            if not self.plan.spaces[space].fixed:
                raise KeyError(space)
            self.groupings[space] = self._identity_grouping(space)
        return self.groupings[space], self.sizes(space)

    def _identity_grouping(self, space: int) -> Tensor:
        s = self.plan.spaces[space]
        sizes = self.sizes(space)
        if any(c != s.size for c in sizes):
            raise ValueError(
                f"the models' neurons at {s.name!r} cannot be permuted (an operation that the "
                f"analysis cannot see through uses them) and their widths differ ({sizes}, fused "
                f"{s.size}); fusing them needs equal widths. Use kf_gradient for this model."
            )
        scores = torch.ones(len(sizes), s.size, dtype=torch.float64)
        named = [i for i, p in enumerate(s.node_parts or [1] * len(s.nodes)) if p == 1]
        if named and not self.ctx.importance.uniform:
            node = s.nodes[named[0]]
            if self.values.chunked:  # (the scores come from the inputs, not from the values)
                outs: list[Tensor | None] = [None] * len(sizes)
            else:
                outs = self.values.whole.bases(node)  # type: ignore[union-attr]
            scores = torch.stack(
                [
                    self.ctx.importance.scores(i, node, y, c).to(torch.float64).cpu()
                    for i, (y, c) in enumerate(zip(outs, sizes, strict=True))
                ]
            )
        scores = scores / scores.sum(0, keepdim=True)  # per neuron, a convex combination
        a = torch.cat([torch.diag(scores[i]) for i in range(len(sizes))], dim=1)
        return a.to(self.ctx.inputs.device).to_sparse().coalesce()

    def ready(self, space: int) -> bool:
        return space in self.groupings or self.plan.spaces[space].fixed

    def settle(self) -> None:
        """Set every parameter that is not a unit's (normalisations, class tokens, position and
        token embeddings) whose spaces are all grouped, to the aligned average."""
        state = [dict(m.state_dict()) for m in self.ctx.models]
        own = dict(self.fused.state_dict())
        left = []
        for key in self.pending:
            t = own[key]
            axes = self.plan.spaces_of_key(key, t.dim())
            if not all(self.ready(space) for _, space, _ in axes):
                left.append(key)
                continue
            if not t.is_floating_point():
                continue  # e.g. num_batches_tracked
            value = aligned_average(self.fgm, key, [s[key] for s in state], axes, self.grouping)
            if value.shape != t.shape:
                raise ValueError(
                    f"{key!r}: the fused model has shape {tuple(t.shape)} but the aligned average "
                    f"of the models' has {tuple(value.shape)}"
                )
            with torch.no_grad():
                t.copy_(value.to(t))
        self.pending = left

    def write(self, units: list[fx.Node], ls: LeastSquares, w: Tensor) -> None:
        start = 0
        intercept = w[-1] if ls.bias else None
        for j, u in enumerate(units):
            layer = module_of(self.fgm, u)
            p = affine_inputs(layer, self.values.example(u.args[0])).shape[1]  # type: ignore[arg-type]
            end = unit_end(self.fgm, u)
            bn = module_of(self.fgm, end) if end is not u else None
            set_unit(layer, bn, w[start : start + p], intercept if j == 0 else None)  # type: ignore[arg-type]
            start += p

    def can_carry_bias(self, u: fx.Node) -> bool:
        return module_of(self.fgm, u).bias is not None or unit_end(self.fgm, u) is not u  # type: ignore[union-attr]

    def parts(self, u: fx.Node) -> int:
        space = self.plan.output_space(u)
        hit = self.plan.member_space.get((f"{u.target}.weight", 0))
        return hit[1].parts if hit is not None and space is not None else 1

    def prior(self, units: list[fx.Node], space: int, bias: bool) -> Tensor:
        """Rows ``(p [+ 1], k)`` of the joint fit of ``units`` (writing into ``space``) that the
        base models' own weights give: each unit's effective affine map (normalisations folded
        as the fused model folds them) averaged through the groupings of its spaces; the
        intercept is the sum of the units' grouped biases."""
        a_space, sizes = self.grouping(space)
        blocks, intercept = [], None
        for u in units:
            a = expand_parts(a_space, self.parts(u), sizes)
            end = unit_end(self.fgm, u)
            bs: list[Tensor] = [torch.empty(0)] * len(self.ctx.models)
            key = f"{u.target}.weight"
            weight = tensor_attr(self.ctx.models[0].get_submodule(str(u.target)), "weight")
            axes = self.plan.spaces_of_key(key, weight.dim())
            dtype = torch.float64 if weight.numel() <= FLOAT64_PRIOR_MAX else torch.float32
            ws = self._effective_weights(u, end, self.plan.folded_before(u), bs, dtype)
            prior = aligned_average(self.fgm, key, ws, axes, self.grouping, dtype)
            blocks.append(weight_rows(prior))
            b = matmul(a, torch.cat(bs).to(a.dtype))
            intercept = b if intercept is None else intercept + b
        if bias:
            blocks.append(intercept.unsqueeze(0).to(blocks[0].dtype))  # type: ignore[union-attr]
        return torch.cat(blocks)

    def _effective_weights(
        self, u: fx.Node, end: fx.Node, before: str | None, bs: list[Tensor], dtype: torch.dtype
    ) -> LazySequence:
        """The base models' effective weights of unit ``u`` in ``dtype``, made one at a time as
        :func:`aligned_average` walks them (one copy alive instead of one per model); each
        model's effective bias is stored into ``bs``."""

        def make(i: int) -> Tensor:
            m = self.ctx.models[i]
            w, bs[i] = effective_unit(
                m.get_submodule(str(u.target)),
                m.get_submodule(before) if before is not None else None,
                m.get_submodule(str(end.target)) if end is not u else None,
                dtype,
            )
            return w

        return LazySequence(len(self.ctx.models), make)

    def solve(
        self,
        ls: LeastSquares,
        units: list[fx.Node],
        space: int,
        project: Tensor | None = None,
        factor: Factor | None = None,
        coords: Tensor | None = None,
    ) -> Tensor:
        """The units' weights fitted to ``T = Y project^T`` (or ``Y``), regularised towards
        the aligned prior (``prior="aligned"``) or towards zero."""
        if self.opt.prior == "aligned":
            prior = self.prior(units, space, ls.bias)
            w, lam = ls.solve_prior(prior, self.opt.prior_strength, project, self.opt.ridge_value)
            self.prior_strengths[str(units[0].target)] = lam
            return w
        if project is None:
            return ls.solve(self.opt.ridge_value)
        if factor is None or coords is None:
            factor = ls.factor(self.opt.ridge_value)
            coords = ls.coordinates(factor)
        return factor.weights(matmul_t(coords, project))

    # ------------------------------------------------------------------ the kinds of unit
    def fit_unit(self, u: fx.Node, space: int) -> None:
        """A unit whose space is grouped here (its projected outputs), or was grouped before."""
        layer = module_of(self.fgm, u)
        assert layer is not None
        end = unit_end(self.fgm, u)
        seen = _Seen()
        ls = self.accumulate([layer], self.unit_data(end, layer, [u], seen), self.can_carry_bias(u))
        factor = ls.factor(self.opt.ridge_value)
        coords = ls.coordinates(factor)  # (q, d_M)
        parts = self.parts(u)
        if not self.ready(space):
            if parts != 1:
                raise ValueError(
                    f"{u.target!r} computes {parts} parts of a space that is not attention; "
                    "the Linear variants cannot group it. Use kf_gradient."
                )
            k = self.plan.spaces[space].size
            s = self.scores(end, seen.ys, seen.widths)
            points = coords.T.contiguous()
            if self.opt.stream == "all" and self.plan.spaces[space].stream:
                points = self.stream_points(space)
            name = self.plan.spaces[space].name
            self.groupings[space] = self.group(points, s, k, seen.widths, name)
        a = expand_parts(self.grouping(space)[0], parts, self.sizes(space))
        self.write([u], ls, self.solve(ls, [u], space, a, factor, coords))

    def fit_heads(self, space: int, done: set[fx.Node]) -> list[fx.Node]:
        """The query/key/value units of an attention space: heads grouped as units on the
        units' projected outputs, then each unit refitted to its part of the targets."""
        sp = self.plan.spaces[space]
        units = self.plan.units_of(space)
        for u in units:  # their inputs must be final (not so in cross-attention after q)
            waiting = [v for v in _units_upstream(u.args[0], self.plan) if v not in done]  # type: ignore[arg-type]
            if waiting:
                raise ValueError(
                    f"attention space {sp.name!r}: {u.target!r} reads {waiting[0].target!r}, "
                    "which is fitted later; the Linear variants fit query, key and value "
                    "together and need their inputs first (cross-attention). Use kf_gradient."
                )
        sizes = self.sizes(space)
        fits, feats, weights = [], [], []
        for u in units:
            layer = self.layer(u)
            end = unit_end(self.fgm, u)
            seen = _Seen()
            ls = self.accumulate(
                [layer], self.unit_data(end, layer, [u], seen), self.can_carry_bias(u)
            )
            factor = ls.factor(self.opt.ridge_value)
            coords = ls.coordinates(factor)
            parts = self.parts(u)
            fits.append((u, ls, factor, coords, parts))
            s = self.scores(end, seen.ys, seen.widths)
            per_model, lo = [], 0
            w_model = []
            for c in sizes:
                block = coords[:, lo : lo + parts * c].reshape(-1, parts, c)
                per_model.append(block.permute(2, 1, 0).reshape(c, -1))
                w_model.append(s[lo : lo + parts * c].reshape(parts, c).mean(0))
                lo += parts * c
            feats.append(torch.cat(per_model))
            weights.append(torch.cat(w_model))
        points = torch.cat(feats, dim=1)
        w = torch.stack(weights).mean(0)
        with self.ctx.timer("grouping"):
            g = self.grouper.heads(
                points, w, sizes, sp.heads, sp.head_dim, f"attention space {sp.name!r}"
            )
        self.stats["grouping_cost"] = self.stats.get("grouping_cost", 0.0) + float(g.cost)
        self.groupings[space] = g.assignment_matrix(sparse=True).to(torch.float64)
        for u, ls, factor, coords, parts in fits:
            a = expand_parts(self.groupings[space], parts, sizes)
            self.write([u], ls, self.solve(ls, [u], space, a, factor, coords))
        return units

    def sum_operands(self, add: fx.Node, done: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        """The units (not fitted yet) a residual addition sums, and its other operands."""
        unit_of_end = {unit_end(self.fgm, u): u for u in self.plan.units if u not in done}
        operands = add.all_input_nodes
        sources = [self.plan.through_identity(a) for a in operands]
        units = [unit_of_end[a] for a in sources if a in unit_of_end]
        fixed = [o for o, a in zip(operands, sources, strict=True) if a not in unit_of_end]
        return units, fixed

    def sum_waits(self, add: fx.Node, done: set[fx.Node]) -> bool:
        """Whether a unit summed at ``add`` reads a unit that is not fitted yet (a projection
        shortcut computed before the block's first layer): the sum is then fitted when its last
        unit is reached, so that every unit's input is final."""
        units, _ = self.sum_operands(add, done)
        return any(
            v not in done and v not in units
            for u in units
            for v in _units_upstream(u.args[0], self.plan)  # type: ignore[arg-type]
        )

    def fit_sum(self, add: fx.Node, space: int, done: set[fx.Node]) -> list[fx.Node]:
        """Units summed at a residual addition, fitted jointly to the grouped sum; the other
        operands (the skip, units fitted before) are taken as the fused model gives them."""
        units, fixed = self.sum_operands(add, done)
        layer0 = self.layer(units[0])
        layers = [self.layer(u) for u in units]
        bias = self.can_carry_bias(units[0])
        seen = _Seen()
        if self.ready(space):
            a = self.grouping(space)[0]

            def grouped(y: Tensor, piece: Piece) -> Callable[[int, int], Tensor]:
                skip = torch.zeros((), dtype=torch.float64, device=y.device)
                for f in fixed:
                    skip = skip + affine_output_rows(layer0, piece.fused(f)).to(torch.float64)
                return lambda lo, hi: (
                    matmul_t(y[lo:hi].to(a.dtype), a) - (skip[lo:hi] if skip.dim() else 0.0)
                )

            data = self.unit_data(add, layer0, units, seen, grouped, extra=fixed)
            ls = self.accumulate(layers, data, bias)
            w = self.solve(ls, units, space)
        elif fixed:
            raise ValueError(
                f"residual addition {add.name!r} adds a value whose neurons the Linear variants "
                "cannot trace back to a fitted layer; use kf_gradient"
            )
        else:
            k = self.plan.spaces[space].size
            ls = self.accumulate(layers, self.unit_data(add, layer0, units, seen), bias)
            factor = ls.factor(self.opt.ridge_value)
            coords = ls.coordinates(factor)
            self.groupings[space] = a = self.group(
                coords.T.contiguous(),
                self.scores(add, seen.ys, seen.widths),
                k,
                seen.widths,
                add.name,
            )
            w = self.solve(ls, units, space, a, factor, coords)
        self.write(units, ls, w)
        return units

    def stream_points(self, space: int) -> Tensor:
        """The base models' neurons of a residual stream as points: their values at every
        residual addition of the stream, each addition's block scaled to unit norm."""
        sp = self.plan.spaces[space]
        adds = [
            (name, axis)
            for name, axis in zip(sp.nodes, sp.axes or [-1] * len(sp.nodes), strict=True)
            if self.fnode[name].op == "call_function" and self.fnode[name].target in ADD_FUNCTIONS
        ]
        if self.values.chunked:  # the same geometry from each addition's Gram matrix
            blocks_g = [GramPoints() for _ in adds]
            for piece in self.values.pieces():
                per_model = piece.bases_at([name for name, _ in adds])  # one pass per model
                for j, ((_, axis), block) in enumerate(zip(adds, blocks_g, strict=True)):
                    ys = [values[j] for values in per_model]
                    block.add(torch.cat([to_neurons(y.detach(), axis) for y in ys]).T)
                del per_model
            total = GramPoints()
            for block in blocks_g:
                assert block.gram is not None
                total.add_gram(block.gram, 1.0 / float(block.gram.trace().clamp_min(1e-24)))
            return total.points()
        blocks = []
        for name, axis in adds:
            ys = [y.detach() for y in self.values.whole.bases(name)]  # type: ignore[union-attr]
            rows = torch.cat([to_neurons(y, axis).to(torch.float64) for y in ys])
            blocks.append(rows / rows.norm().clamp_min(1e-12))
        return torch.cat(blocks, dim=1)

    def group_embedding(self, u: fx.Node, space: int) -> None:
        """A token embedding opening a space: grouped on its outputs (the same input, the token
        ids, feeds every model, so its aligned average is the exact fit)."""
        if self.ready(space):
            return
        if self.values.chunked:  # the same geometry from the Gram matrix of the outputs
            gram = GramPoints()
            for piece in self.values.pieces():
                ys = [y.detach() for y in piece.bases(u.name)]
                widths = [y.shape[-1] for y in ys]
                gram.add(torch.cat([y.reshape(-1, y.shape[-1]) for y in ys], dim=1))
            points, outs = gram.points(), None
        else:
            ys = [y.detach() for y in self.values.whole.bases(u.name)]  # type: ignore[union-attr]
            rows = [y.reshape(-1, y.shape[-1]).to(torch.float64) for y in ys]
            widths = [r.shape[1] for r in rows]
            points, outs = torch.cat(rows, dim=1).T.contiguous(), ys
        k = self.plan.spaces[space].size
        self.groupings[space] = self.group(points, self.scores(u, outs, widths), k, widths, u.name)

    def run(self) -> nn.Module:
        done: set[fx.Node] = set()
        order = {n: i for i, n in enumerate(self.fgm.graph.nodes)}
        units = sorted(self.plan.units + self.plan.embeddings, key=order.__getitem__)
        self.settle()
        with progress_bar(self.ctx.progress, "linear fusion", len(units)) as advance:
            for u in units:
                if u in done:
                    continue
                space = self.plan.output_space(u)
                assert space is not None
                add = self.plan.sum_after(u)
                with self.ctx.timer("fitting"):
                    if isinstance(module_of(self.fgm, u), nn.Embedding):
                        self.group_embedding(u, space)
                        done.add(u)
                    elif add is not None and self.plan.node_space.get(add.name) is not None:
                        if self.sum_waits(add, done):
                            continue
                        space = self.plan.node_space[add.name].index
                        done.update(self.fit_sum(add, space, done))
                    elif self.plan.spaces[space].heads > 1 and not self.ready(space):
                        done.update(self.fit_heads(space, done))
                    else:
                        self.fit_unit(u, space)
                        done.add(u)
                    self.settle()
                self.values.release()  # (values whose readers all ran are not read again)
                advance(len(done))
        left = [u.target for u in units if u not in done]
        if left:  # a residual sum that waited for a unit that never came
            raise ValueError(
                f"the Linear variants could not fit {left} (a residual sum whose units read one "
                "another); use kf_gradient"
            )
        for key in self.pending:  # parameters of spaces no unit opened
            raise ValueError(f"no grouping was found for the neurons of {key!r}; use kf_gradient")
        self.ctx.report.update(self.stats)
        if self.prior_strengths:
            self.ctx.report["prior_strength"] = self.prior_strengths
        return self.fused.eval()


def fuse_linear(ctx: FusionContext, grouping: GroupingKind) -> nn.Module:
    """The Linear variant with ``grouping`` (``"kmeans"``: KF Linear, ``"hungarian"``: HF)."""
    return _LinearFusion(ctx, grouping).run()


__all__ = ["LinearOptions", "fuse_linear", "expand_parts", "AFFINE_TYPES", "NORM_TYPES"]
