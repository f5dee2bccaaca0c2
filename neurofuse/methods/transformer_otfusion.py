"""Transformer OTFusion: layer-wise optimal-transport alignment of transformers, then averaging.

Imfeld, Graldi, Giordano, Hofmann, Anagnostidis & Singh 2024, "Transformer Fusion with Optimal
Transport" (ICLR). Every model is aligned to a reference (anchor) model layer by layer, in
forward order, then the aligned models are averaged. For each layer's output neurons the
transport plan between model ``k``'s ``n`` neurons and the anchor's ``m`` is

    T = argmin_{T >= 0, T 1 = a, T^T 1 = b} <T, C>      (Sinkhorn with regularisation ``reg`` on
                                                        the max-normalised cost, or exact EMD)

with ``C[i, j]`` the (non-squared) Euclidean distance between the neurons' z-scored
pre-activation outputs on the fusion set (``ground_metric="acts"``, every token of the first
``n_samples`` samples), or between their L2-normalised weight rows after the layer's inputs were
mapped (``"wts"``). The marginals are uniform, or, with ``importance_in="marginals"``, the
neurons' importance scores (by default scores weigh the average instead: every linear unit's
fused output neuron is the score-weighted average of what the models mapped onto it). With
``Q = T diag(1/b)`` a layer's outgoing neurons become ``W' = Q^T W`` and its readers
``W' = W Q``.

What makes it a transformer method:

- **residual policy**: a residual stream is re-aligned at every addition. The branch that writes
  into it (attention ``proj``, MLP ``fc2``, the patch embedding) keeps its own map, and the map
  of the stream after the addition combines the skip's map and the branch's (``"mean"``, the
  paper's default: their average; ``"weighted_scalar"``: weighted by the anchor's mean absolute
  activation of each; ``"only_resid"``; ``"no_resid"``); LayerNorms, the next block's inputs
  and the classifier read the stream with its current map;
- **attention**: query, key and value are aligned each by its own transport over the whole
  width (``heads="cross"``, the reference implementation: neurons may move between heads, and
  query and key maps differ), or with heads as units (``heads="units"``: one hard,
  head-preserving matching of query, key and value together); the output projection reads the
  value's map;
- **embeddings**: the patch (or token) embedding is aligned on its outputs, the position
  embedding on its own columns (features over positions), and the stream map after the
  embedding is their combination by the residual policy; the class token is read with the
  stream map.

Fused widths are the anchor's. The classifier's outputs are never permuted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.graph import ADD_FUNCTIONS, GraphRunner, module_of, to_neurons, unit_end
from neurofuse.grouping.heads import block_assignment
from neurofuse.methods._averaging import (
    State,
    average_states,
    check_aligned_shapes,
    check_reference,
    check_same_graphs,
    check_same_layers,
    finish,
    model_weights,
    states_of,
    template_for,
    write_state,
)
from neurofuse.methods._plan import FusionPlan, map_axis
from neurofuse.methods.otfusion import SOLVERS, check_importance_in
from neurofuse.methods.registry import Capabilities, FusionContext, register_method

RESIDUAL_POLICIES = ("mean", "weighted_scalar", "only_resid", "no_resid")


@dataclass
class TransformerOTFusionOptions:
    """Options of ``transformer_otfusion``.

    Attributes:
        reference: index of the anchor model; the fused model has its widths.
        ground_metric: ``"acts"`` (z-scored pre-activation outputs on the fusion set) or
            ``"wts"`` (input-aligned weight rows).
        solver: ``"sinkhorn"`` (soft alignment, the paper's choice) or ``"emd"`` (exact).
        reg: Sinkhorn regularisation relative to the max-normalised cost (the reference uses
            0.08 with activations and 0.06 with weights; ``None`` picks those).
        sinkhorn_iters: maximum Sinkhorn iterations.
        residual: the residual policy (see the module docstring).
        heads: ``"cross"`` (query, key, value each aligned over the whole width, as the
            reference implementation) or ``"units"`` (heads matched as units, exactly).
        n_samples: fusion samples whose tokens give the activations (the paper uses 200).
        importance_in: where importance scores enter: ``"average"`` (default: uniform
            marginals; the rows of every linear unit's output neurons, weights and bias, are
            averaged with the scores of the neurons each model mapped onto them,
            ``s_j = sum_i Q[i, j] s_i``; other parameters with the model weights) or
            ``"marginals"`` (the transports' marginals, as the paper's baseline; see
            ``otfusion``).
        max_rows: at most this many (sample, token) rows per neuron (a fixed random subset).
        weights: model weights of the final average (default uniform).
        repair: REPAIR (Jordan et al. 2022) after averaging: every hidden neuron's mean and
            standard deviation on the fusion set set to the interpolation of the aligned base
            models' (as for ``otfusion`` and ``git_rebasin``; the aligned models are the
            transported ones, soft maps included).
    """

    reference: int = 0
    ground_metric: Literal["acts", "wts"] = "acts"
    solver: Literal["emd", "sinkhorn"] = "sinkhorn"
    reg: float | None = None
    sinkhorn_iters: int = 1000
    residual: Literal["mean", "weighted_scalar", "only_resid", "no_resid"] = "mean"
    heads: Literal["cross", "units"] = "cross"
    n_samples: int = 200
    max_rows: int = 20000
    importance_in: Literal["average", "marginals"] = "average"
    weights: list[float] | None = None
    repair: bool = False

    def __post_init__(self) -> None:
        check_importance_in(self.importance_in)
        if self.ground_metric not in ("acts", "wts"):
            raise ValueError(f"ground_metric must be 'acts' or 'wts', got {self.ground_metric!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {self.solver!r}")
        if self.residual not in RESIDUAL_POLICIES:
            raise ValueError(f"residual must be one of {RESIDUAL_POLICIES}, got {self.residual!r}")
        if self.heads not in ("cross", "units"):
            raise ValueError(f"heads must be 'cross' or 'units', got {self.heads!r}")
        if self.reg is not None and not self.reg > 0:
            raise ValueError(f"reg must be > 0, got {self.reg}")
        if self.n_samples < 2 or self.max_rows < 2 or self.sinkhorn_iters < 1:
            raise ValueError("n_samples and max_rows must be >= 2, sinkhorn_iters >= 1")

    @property
    def regularisation(self) -> float:
        if self.reg is not None:
            return self.reg
        return 0.08 if self.ground_metric == "acts" else 0.06


def _zscore(rows: Tensor) -> Tensor:
    rows = rows - rows.mean(1, keepdim=True)
    return rows / (rows.std(1, keepdim=True) + 1e-9)


def _cost(x: Tensor, y: Tensor) -> Tensor:
    """Non-squared Euclidean distances between rows, divided by their maximum."""
    c = torch.cdist(x.to(torch.float64), y.to(torch.float64))
    top = float(c.max())
    return c / top if top > 0 else c


class _Aligner:
    """Carries model ``k`` into the anchor's neurons, in forward order."""

    def __init__(
        self,
        ctx: FusionContext,
        k: int,
        ref: int,
        plan: FusionPlan,
        acts: dict,
        anchor_scores: dict[str, Tensor],
    ) -> None:
        self.ctx, self.opt = ctx, ctx.options
        self.k, self.ref, self.plan = k, ref, plan
        self.acts = acts  # model index -> GraphRunner on the activation samples
        self.state: State = dict(ctx.models[k].state_dict())
        self.ref_state: State = dict(ctx.models[ref].state_dict())
        self.sizes = [_size_of(ctx.models[k], plan, i) for i in range(len(plan.spaces))]
        self.current: dict[int, Tensor] = {}  # current map of each space (readers use it)
        self.row_maps: dict[str, list[Tensor]] = {}  # unit -> its outputs' map per part
        self.pending: dict[int, tuple[Tensor, fx.Node]] = {}  # stream -> branch map, its node
        self.head_maps: dict[int, Tensor] = {}  # attention space -> its one head matching
        self.deferred: dict[int, list[tuple[str, int]]] = {}  # read before the space had a map
        # importance_in="average": unit -> scores of its output neurons in the anchor's order,
        # this model's (carried by the unit's maps) and the anchor's own (shared by the
        # aligners of every model, computed by the first)
        self.averaging = not ctx.importance.uniform and self.opt.importance_in == "average"
        self.unit_scores: dict[str, Tensor] = {}
        self.anchor_scores = anchor_scores
        self.cost_total = 0.0

    # ------------------------------------------------------------------ transport
    def transport(
        self, x: Tensor, y: Tensor, a: Tensor | None = None, b: Tensor | None = None
    ) -> Tensor:
        """``Q = T diag(1/b)`` (``n x m``) from the cost between rows of ``x`` and ``y``; the
        marginals ``a``, ``b`` are importance scores (uniform when ``None``)."""
        cost = _cost(x, y)
        n, m = cost.shape
        pa = np.full(n, 1.0 / n) if a is None else (a / a.sum()).double().cpu().numpy()
        pb = np.full(m, 1.0 / m) if b is None else (b / b.sum()).double().cpu().numpy()
        solver = SOLVERS[self.opt.solver]
        shim = _SolverOptions(self.opt.regularisation, self.opt.sinkhorn_iters)
        plan = torch.as_tensor(solver(pa, pb, cost.cpu().numpy(), shim), dtype=torch.float64)
        self.cost_total += float((plan * cost.cpu()).sum())
        return plan / torch.as_tensor(pb)[None, :]

    def scores(self, model: int, node: str, width: int, parts: int) -> list[Tensor | None]:
        """Importance scores of a node's neurons per part (``None``: uniform marginals)."""
        if self.ctx.importance.uniform:
            return [None] * parts
        runner = self.acts[model]
        out = runner.value(runner.node(node))
        s = self.ctx.importance.scores(model, node, out, width).to("cpu", torch.float64)
        return list(s.chunk(parts))  # (on the CPU, as the maps)

    def features(self, model: int, node: str, axis: int, parts: int = 1) -> list[Tensor]:
        """Z-scored rows (one per neuron) of a node's output, split into its parts."""
        out = self.acts[model].value(self.acts[model].node(node)).detach()
        rows = to_neurons(out, axis).to(torch.float64)
        if rows.shape[1] > self.opt.max_rows:
            g = torch.Generator().manual_seed(self.ctx.seed)
            rows = rows[:, torch.randperm(rows.shape[1], generator=g)[: self.opt.max_rows]]
        return [_zscore(r) for r in rows.chunk(parts)]

    def unit_map(self, unit: fx.Node, space: int) -> list[Tensor]:
        """The map of a unit's (or an embedding's) outputs, one per part; with heads as units,
        one head-preserving matching per attention space, found on the features of all its
        units (a joint qkv projection, or separate query, key and value layers) together."""
        sp = self.plan.spaces[space]
        parts = self.parts(unit)
        if sp.heads > 1 and self.opt.heads == "units":
            if space not in self.head_maps:
                feats = [self.unit_features(u, space) for u in self.plan.units_of(space)]
                mine_all = torch.cat([torch.cat(f[0], 1) for f in feats], 1)
                theirs_all = torch.cat([torch.cat(f[1], 1) for f in feats], 1)
                self.head_maps[space] = self._head_units(mine_all, theirs_all, sp.heads)
            return [self.head_maps[space]] * parts
        mine, theirs = self.unit_features(unit, space)
        end = unit_end(self.plan.gm, unit)
        a: list[Tensor | None] = [None] * parts
        b: list[Tensor | None] = [None] * parts
        if not self.averaging:
            a = self.scores(self.k, end.name, parts * self.sizes[space], parts)
            b = self.scores(self.ref, end.name, parts * sp.size, parts)
        return [
            self.transport(x, y, sa, sb) for x, y, sa, sb in zip(mine, theirs, a, b, strict=True)
        ]

    def parts(self, unit: fx.Node) -> int:
        return self.plan.member_space[(self.out_key(unit), self.out_axis(unit))][1].parts

    def unit_features(self, unit: fx.Node, space: int) -> tuple[list[Tensor], list[Tensor]]:
        """Rows describing the unit's output neurons for model k and the anchor, per part."""
        parts, sp = self.parts(unit), self.plan.spaces[space]
        if self.opt.ground_metric == "acts":
            end = unit_end(self.plan.gm, unit)
            axis = self.plan.node_space[end.name].axis if end.name in self.plan.node_space else -1
            mine = self.features(self.k, end.name, axis, parts)
            theirs = self.features(self.ref, end.name, axis, parts)
        else:
            mine = self.weight_rows(unit, self.state, parts, self.sizes[space], aligned=True)
            theirs = self.weight_rows(unit, self.ref_state, parts, sp.size, aligned=False)
        return mine, theirs

    def _head_units(self, x: Tensor, y: Tensor, heads: int) -> Tensor:
        cost = _cost(x, y)
        p = block_assignment(cost.T, heads)  # anchor neuron j <- model neuron p[j]
        q = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64)
        q[p, torch.arange(y.shape[0])] = 1.0
        self.cost_total += float(cost[p, torch.arange(y.shape[0])].sum())
        return q

    def out_key(self, unit: fx.Node) -> str:
        return f"{unit.target}.weight"

    def out_axis(self, unit: fx.Node) -> int:
        return 1 if isinstance(module_of(self.plan.gm, unit), nn.Embedding) else 0

    def weight_rows(
        self, unit: fx.Node, state: State, parts: int, size: int, aligned: bool
    ) -> list[Tensor]:
        """L2-normalised outgoing rows (inputs mapped to the anchor's first, for model k)."""
        key, axis = self.out_key(unit), self.out_axis(unit)
        w = state[key].to(torch.float64)
        if aligned and axis == 0 and w.dim() > 1:  # (with heads as units, the head matching
            hit = self.plan.member_space.get((key, 1))  # is found on the layers' own rows)
            if hit is not None and hit[0] in self.current:
                q = self.current[hit[0]]
                w = map_axis(w, 1, q.T, hit[1], q.shape[0])
        rows = w.movedim(axis, 0).reshape(parts * size, -1)
        bias = state.get(f"{unit.target}.bias")
        if bias is not None and axis == 0:
            rows = torch.cat([rows, bias.to(torch.float64)[:, None]], 1)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return list(rows.chunk(parts))

    # ------------------------------------------------------------------ residual policy
    def combine(self, space: int, branch: Tensor, add: fx.Node, branch_node: fx.Node) -> None:
        skip = self.current.get(space)
        if skip is None or self.opt.residual == "no_resid":
            self.current[space] = branch
            return
        if self.opt.residual == "only_resid":
            return
        w = 0.5
        if self.opt.residual == "weighted_scalar":
            other = next(a for a in add.all_input_nodes if a is not branch_node)
            r = self.acts[self.ref]
            a_skip = float(r.value(r.node(other.name)).abs().mean())
            a_branch = float(r.value(r.node(branch_node.name)).abs().mean())
            w = a_skip / max(a_skip + a_branch, 1e-12)
        self.current[space] = w * skip + (1.0 - w) * branch

    # ------------------------------------------------------------------ the walk
    def run(self) -> State:
        gm = self.plan.gm
        maps: dict[tuple[str, int], list[Tensor]] = {}
        units = set(self.plan.units) | set(self.plan.embeddings)
        unit_ends = {unit_end(gm, u) for u in self.plan.units}
        for n in gm.graph.nodes:
            if n in units:
                self.visit_unit(n, maps)
            elif n.op == "call_module" and n not in unit_ends and _has_state(module_of(gm, n)):
                self.read_params(str(n.target), maps)
            elif n.op == "get_attr":
                self.visit_param(n, maps)
            elif n.op == "call_function" and n.target in ADD_FUNCTIONS:
                self.visit_add(n)
        return self.apply(maps)

    def visit_unit(self, n: fx.Node, maps: dict) -> None:
        target = str(n.target)
        # inputs: read with the current map of the input space
        hit = self.plan.member_space.get((f"{target}.weight", 1))
        if hit is not None and self.out_axis(n) == 0 and hit[0] in self.current:
            maps[(f"{target}.weight", 1)] = [self.current[hit[0]]]
        space = self.plan.output_space(n)
        if space is None or self.plan.spaces[space].fixed:
            return
        qs = self.unit_map(n, space)
        self.row_maps[target] = qs
        key, axis = self.out_key(n), self.out_axis(n)
        if self.averaging and axis == 0:
            self.weigh_rows(n, space, qs)
        maps[(key, axis)] = qs
        if axis == 0 and f"{target}.bias" in self.state:
            maps[(f"{target}.bias", 0)] = qs
        end = unit_end(self.plan.gm, n)
        if end is not n:
            self.read_params(str(end.target), maps, qs)
        if self.plan.spaces[space].stream:
            add = self.plan.sum_after(n)
            if add is None or space not in self.current:
                self.current[space] = qs[-1]  # the first writer of the stream
            else:
                self.pending[space] = (qs[-1], unit_end(self.plan.gm, n))
        else:
            self.current[space] = qs[-1]  # readers take the last part (the value)
        for key_axis in self.deferred.pop(space, []):  # e.g. a class token traced earlier
            maps[key_axis] = [self.current[space]]

    def weigh_rows(self, unit: fx.Node, space: int, qs: list[Tensor]) -> None:
        """The scores that weigh a unit's output rows in the average (``importance_in=
        "average"``): model k's carried by the unit's maps (columns of ``Q`` sum to 1), and the
        anchor's, per part, concatenated in the rows' order."""
        end, parts, target = unit_end(self.plan.gm, unit), len(qs), str(unit.target)
        mine = self.scores(self.k, end.name, parts * self.sizes[space], parts)
        self.unit_scores[target] = torch.cat(
            [q.T @ s for q, s in zip(qs, mine, strict=True)]  # type: ignore[operator]
        )
        if target not in self.anchor_scores:
            theirs = self.scores(self.ref, end.name, parts * self.plan.spaces[space].size, parts)
            self.anchor_scores[target] = torch.cat(theirs)  # type: ignore[arg-type]

    def read_params(self, module: str, maps: dict, qs: list[Tensor] | None = None) -> None:
        """A normalisation's parameters and statistics: its unit's map, or its input's."""
        for key, _ in list(self.plan.gm.get_submodule(module).state_dict().items()):
            full = f"{module}.{key}"
            hit = self.plan.member_space.get((full, 0))
            if hit is None:
                continue
            if qs is not None:
                maps[(full, 0)] = qs
            elif hit[0] in self.current:
                maps[(full, 0)] = [self.current[hit[0]]]

    def visit_param(self, n: fx.Node, maps: dict) -> None:
        """A raw parameter: a position embedding added to the stream is a branch aligned on
        its own columns; any other (a class token) is read with the current map."""
        key = str(n.target)
        for axis in range(self.state[key].dim() if key in self.state else 0):
            hit = self.plan.member_space.get((key, axis))
            if hit is None or self.plan.spaces[hit[0]].fixed:
                continue
            space = hit[0]
            if space not in self.current:  # read before any layer wrote the space
                self.deferred.setdefault(space, []).append((key, axis))
                continue
            operand = _operand_of_add(n)
            entries = self.state[key].numel() // self.state[key].shape[axis]
            if operand is None or entries < 2:  # read with the stream's map (a class token,
                maps[(key, axis)] = [self.current[space]]  # a bias-like vector)
                continue
            mine = self.state[key].to(torch.float64).movedim(axis, 0)
            theirs = self.ref_state[key].to(torch.float64).movedim(axis, 0)
            q = self.transport(
                _zscore(mine.reshape(self.sizes[space], -1)),
                _zscore(theirs.reshape(self.plan.spaces[space].size, -1)),
            )
            maps[(key, axis)] = [q]
            self.pending[space] = (q, operand)

    def visit_add(self, n: fx.Node) -> None:
        where = self.plan.node_space.get(n.name)
        if where is None or where.index not in self.pending:
            return
        branch, node = self.pending.pop(where.index)
        self.combine(where.index, branch, n, node)

    def apply(self, maps: dict[tuple[str, int], list[Tensor]]) -> State:
        out = dict(self.state)
        for (key, axis), qs in maps.items():
            _, member = self.plan.member_space[(key, axis)]
            t = out[key].to(torch.float64)
            if len(qs) == 1 or member.parts == 1:
                m = qs[-1].T
                t = map_axis(t, axis, m, member, m.shape[1])
            else:
                chunks = t.movedim(axis, 0).chunk(member.parts)
                one = member._replace(parts=1)
                mapped = [
                    map_axis(c.movedim(0, axis), axis, q.T, one, q.shape[0])
                    for c, q in zip(chunks, qs, strict=True)
                ]
                t = torch.cat(mapped, axis)
            out[key] = t.to(self.state[key].dtype)
        return out


@dataclass
class _SolverOptions:
    reg: float
    sinkhorn_iters: int


def _size_of(model: nn.Module, plan: FusionPlan, i: int) -> int:
    """Neurons of space ``i`` in ``model`` (from its first member's shape)."""
    state = model.state_dict()
    m = plan.spaces[i].members[0]
    return state[m.key].shape[m.axis] // (m.repeat * m.parts)


def _per_row(unit_scores: list[dict[str, Tensor]], anchor: State) -> dict[str, list[Tensor]]:
    """Per-row averaging coefficients of the units' weights and biases from every model's
    carried scores (none with uniform importance or ``importance_in="marginals"``)."""
    out: dict[str, list[Tensor]] = {}
    for unit in unit_scores[0]:
        for key in (f"{unit}.weight", f"{unit}.bias"):
            if key in anchor:
                out[key] = [table[unit] for table in unit_scores]
    return out


def _has_state(mod: nn.Module | None) -> bool:
    return mod is not None and bool(mod.state_dict())


def _operand_of_add(n: fx.Node) -> fx.Node | None:
    """The operand of a residual addition that a raw parameter becomes (through indexing),
    or ``None`` if the parameter is not added (a class token, concatenated)."""
    node = n
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_function" and user.target in ADD_FUNCTIONS:
            return node
        if user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem":
            node = user
            continue
        return None
    return None


@register_method(
    "transformer_otfusion",
    "Transformer OTFusion (Imfeld et al. 2024): layer-wise soft OT alignment with a residual "
    "policy, then averaging",
    TransformerOTFusionOptions,
    Capabilities(importance=True, target="same"),
)
def transformer_otfusion(ctx: FusionContext) -> nn.Module:
    opt: TransformerOTFusionOptions = ctx.options
    n = len(ctx.models)
    ref = check_reference(opt.reference, n)
    weights = model_weights(opt.weights, n)
    states = states_of(ctx.models)
    check_same_layers(states, "transformer_otfusion", same_shapes=False)
    check_same_graphs(ctx.models, "transformer_otfusion", ctx.trace)
    x = ctx.inputs[: opt.n_samples]
    plan = FusionPlan(ctx.trace(ctx.models[ref]), ctx.models[ref], x[:2])
    acts = {k: GraphRunner(ctx.trace(m), x) for k, m in enumerate(ctx.models)}
    aligned: list[State] = []
    costs: list[float] = []
    unit_scores: list[dict[str, Tensor]] = [{} for _ in range(n)]  # the anchor's: its own
    for k in range(n):
        if k == ref:
            aligned.append(states[k])
            costs.append(0.0)
            continue
        al = _Aligner(ctx, k, ref, plan, acts, unit_scores[ref])
        aligned.append(al.run())
        costs.append(al.cost_total)
        unit_scores[k] = al.unit_scores
    check_aligned_shapes(aligned, states[ref])
    ctx.report["transport_cost"] = costs
    fused = average_states(aligned, weights, _per_row(unit_scores, states[ref]))
    target = template_for(ctx, ref, "transformer_otfusion")
    fused_model = write_state(target, fused, "transformer_otfusion")
    return finish(ctx, fused_model, False, opt.repair, aligned, weights)
