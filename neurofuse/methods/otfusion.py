"""OTFusion: align every model to a reference with optimal transport, then average.

Singh & Jaggi 2020, "Model Fusion via Optimal Transport" (NeurIPS). For each permutation space
(see :mod:`neurofuse.alignment`) in graph order, model ``k``'s ``n`` neurons are transported
onto the reference's ``m`` neurons by the plan

    T = argmin_{T >= 0, T 1 = a, T^T 1 = b} <T, C>        (exact EMD, or Sinkhorn with entropy
                                                         regularisation ``reg``)

where ``C[i, j]`` is the ground cost between model neuron ``i`` and reference neuron ``j``, and
the marginals ``a``, ``b`` are uniform, or, with ``importance_in="marginals"``, the neurons'
importance scores normalised to sum 1 (Singh & Jaggi's proposal). By default importance scores
weigh the average instead: fused neuron ``j`` is ``sum_k s_{k,j} w_{k,j} / sum_k s_{k,j}``,
where ``s_{k,j} = sum_i Q[i, j] s_{k,i}`` is the score of what model ``k`` mapped onto ``j``.
With ``Q = T diag(1/b)`` (``n x m``), every member of the space is mapped as
``t'[..., j, ...] = sum_i Q[i, j] t[..., i, ...]``: on the outgoing axis that is OTFusion's
``W' = diag(1/b) T^T W``, on a consumer's incoming axis ``W' = W T diag(1/b)``. With EMD, equal
widths and uniform marginals ``T`` is a permutation matrix divided by ``n`` and the map is an
exact permutation; with different widths model ``k`` is carried into the reference's widths.

Ground metrics: ``"acts"`` (squared distance of the neurons' activations on the fusion set, taken
from the aligned-so-far model, summed over every node that carries the space; residual streams
are aligned once for the whole stream; a fusion set of more than :data:`ACTS_CHUNK` samples is
evaluated chunk by chunk, the distances summed over the chunks; where the transports are
permutations, which leave every activation as it was, all the costs come from one pass of the
models, value by value) or ``"weights"`` (squared distance of the neurons'
incoming weight rows, after the earlier spaces' maps were applied to the incoming axes). The
aligned models are then averaged (``weights``: model weights, default uniform; times the
neurons' scores, as above).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.alignment import Space
from neurofuse.alignment.space import neuron_rows
from neurofuse.graph import GraphRunner, trace
from neurofuse.methods._activations import channel_maps as _channel_maps
from neurofuse.methods._activations import (
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
    check_aligned_shapes,
    finish,
    template_for,
    write_state,
)
from neurofuse.methods._plan import is_incoming, map_axis
from neurofuse.methods.registry import Capabilities, FusionContext, register_method
from neurofuse.progress import progress_bar
from neurofuse.utils import even_chunks

#: Samples per chunk of the activation costs: a fusion set of more is evaluated chunk by chunk
#: (squared distances add up over samples), so that memory holds one chunk's activations and
#: not the whole set's: in one pass per chunk where the transports are permutations, else both
#: models rerun for every space and chunk; a set of at most this many is evaluated at once.
ACTS_CHUNK = 512


def _pot() -> Any:
    try:
        import ot
    except ImportError as exc:  # pragma: no cover - POT is a declared extra
        raise ImportError(
            "otfusion needs the POT package: pip install 'neurofuse[ot]' (or pip install pot)"
        ) from exc
    return ot


def _emd(a: np.ndarray, b: np.ndarray, cost: np.ndarray, opt: OTFusionOptions) -> np.ndarray:
    # POT's network simplex stops after ``numItermax`` pivots, optimal or not (its default,
    # 100,000, left two width-4096 layers' plans 7% above the optimal transport cost); the
    # solver ends when the plan is optimal, so the cap only guards against a runaway
    with warnings.catch_warnings():  # POT's own note of an early end: ours below says more
        warnings.filterwarnings("ignore", message="numItermax reached")
        plan, log = _pot().emd(a, b, cost, numItermax=max(100_000, 10 * cost.size), log=True)
    if log["result_code"] != 1:  # 1: optimal
        warnings.warn(
            f"otfusion: the exact transport between {len(a)} and {len(b)} neurons ended "
            f"before optimality ({log['warning']}); the plan is feasible but not optimal. "
            "solver='sinkhorn' is an approximate alternative.",
            stacklevel=2,
        )
    return plan


def _sinkhorn(a: np.ndarray, b: np.ndarray, cost: np.ndarray, opt: OTFusionOptions) -> np.ndarray:
    # log-domain iterations stay finite for small reg (the cost is scaled to max 1)
    return _pot().sinkhorn(
        a, b, cost, opt.reg, method="sinkhorn_log", numItermax=opt.sinkhorn_iters
    )


#: Transport solvers: ``f(a, b, cost, options) -> plan (n, m)``.
SOLVERS: dict[str, Callable[..., np.ndarray]] = {"emd": _emd, "sinkhorn": _sinkhorn}


#: Where importance scores enter the OT alignments (``otfusion``, ``transformer_otfusion``).
IMPORTANCE_IN = ("average", "marginals")


def check_importance_in(value: str) -> None:
    if value not in IMPORTANCE_IN:
        raise ValueError(f"importance_in must be 'average' or 'marginals', got {value!r}")


@dataclass
class OTFusionOptions:
    """Options of ``otfusion``.

    Attributes:
        reference: index of the model the others are aligned to; the fused model has its
            widths.
        ground_metric: ``"acts"`` (activations on the fusion set) or ``"weights"`` (incoming
            weight rows).
        solver: ``"emd"`` (exact optimal transport) or ``"sinkhorn"`` (entropic).
        reg: Sinkhorn's entropic regularisation, relative to the ground cost (scaled to max 1).
        sinkhorn_iters: maximum Sinkhorn iterations.
        weights: model weights of the final average (default uniform).
        importance_in: where importance scores (``fuse(..., importance=...)``) enter:
            ``"average"`` (default): the transport has uniform marginals and each fused neuron
            is the importance-weighted average of the neurons mapped onto it (their scores
            carried by the map), as Git Re-Basin and Hungarian Fusion weigh theirs;
            ``"marginals"``: the scores are the transport's marginals, Singh & Jaggi's proposal
            (and the neuron-interpolation paper's OTFusion baseline), which splits neurons
            between partners: 1.6-9 points below uniform importance in most of the
            ``paper-mlp`` and ``paper-cnn`` splits (``benchmarks/REPORT.md``, claim 2).
        reset_bn: re-estimate BatchNorm running statistics on the fusion set after fusing.
        repair: REPAIR (Jordan et al. 2022): rescale every hidden neuron so that its mean and
            standard deviation on the fusion set are the interpolation of the aligned base
            models' (undoes the variance collapse of averaging; after ``reset_bn`` if both).
    """

    reference: int = 0
    ground_metric: Literal["acts", "weights"] = "acts"
    solver: Literal["emd", "sinkhorn"] = "emd"
    reg: float = 0.01
    sinkhorn_iters: int = 1000
    weights: list[float] | None = None
    importance_in: Literal["average", "marginals"] = "average"
    reset_bn: bool = False
    repair: bool = False

    def __post_init__(self) -> None:
        check_importance_in(self.importance_in)
        if self.ground_metric not in GROUND_METRICS:
            raise ValueError(
                f"ground_metric must be one of {sorted(GROUND_METRICS)}, got {self.ground_metric!r}"
            )
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {self.solver!r}")
        if not self.reg > 0 or self.sinkhorn_iters < 1:
            raise ValueError("reg must be > 0 and sinkhorn_iters >= 1")


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``C[i, j] = ||x_i - y_j||^2`` for rows of ``x`` (n, N) and ``y`` (m, N), in their dtype
    (norms by a reduction, not a squared copy: activation rows are long)."""
    xn = torch.linalg.vector_norm(x, dim=1).square()
    yn = torch.linalg.vector_norm(y, dim=1).square()
    c = xn[:, None] + yn[None, :]
    c.sub_(x @ y.T, alpha=2.0)  # in place: two (n, m) arrays at a time, not four
    return c.clamp_min_(0.0)


def map_space(state: State, space: Space, q: Tensor) -> State:
    """Apply the transport map ``q`` (``space.size x m``) to every member of ``space``:
    ``t'[..., j, ...] = sum_i q[i, j] t[..., i, ...]`` along the member's axis, where neuron
    ``i`` owns ``repeat`` consecutive entries in each of the member's ``parts``."""
    out = dict(state)
    for member in space.members:
        t = state[member.key]
        mapped = map_axis(t.to(torch.float64), member.axis, q.T, member, space.size)
        out[member.key] = mapped.to(t.dtype)
    return out


class _Aligner:
    """Carries one model into the reference's neuron spaces, space by space."""

    def __init__(
        self,
        ctx: FusionContext,
        k: int,
        spaces: list[Space],
        ref_spaces: list[Space],
        ref_runner: GraphRunner | None,
        ref_gm: fx.GraphModule | None = None,
    ) -> None:
        """``ref_runner``: the reference's values on the whole fusion set (activation costs on
        one chunk); ``ref_gm``: its graph, evaluated chunk by chunk (on more than one); both
        ``None``: weight costs."""
        self.ctx, self.opt = ctx, ctx.options
        self.spaces, self.ref_spaces, self.ref_runner = spaces, ref_spaces, ref_runner
        self.ref_gm = ref_gm
        self.k = k
        self.graph = ctx.trace(ctx.models[k])  # its structure (the model itself: read only)
        # the maps make new tensors: the state starts as the model's own, never changed
        self.state: State = dict(ctx.models[k].state_dict())
        self.ref_state: State = dict(ctx.models[self.opt.reference].state_dict())
        self.acts = ref_runner is not None or ref_gm is not None
        self._copy: fx.GraphModule | None = None
        self._runner: GraphRunner | None = None
        self.where = {(m.key, m.axis): s for s in spaces for m in s.members}
        self.aligned: set[str] = set()
        self.pending: set[str] = set()  # mapped keys not yet loaded into the runner's copy
        self.soft = False  # has a map other than a permutation been applied?

    @property
    def gm(self) -> fx.GraphModule:
        """The model copy that the activation costs evaluate and the soft maps are loaded
        into, made on first use (costs streamed from one pass and permutations need none)."""
        if self._copy is None:
            self._copy = trace(copy.deepcopy(self.ctx.models[self.k]))
        return self._copy

    @property
    def runner(self) -> GraphRunner | None:
        """The copy's values on the whole fusion set (activation costs on one chunk)."""
        if self._runner is None and self.ref_runner is not None:
            self._runner = GraphRunner(self.gm, self.ctx.inputs)
        return self._runner

    def cost(self, space: Space, ref: Space) -> Tensor:
        return GROUND_METRICS[self.opt.ground_metric](self, space, ref)

    def apply(self, space: Space, q: Tensor) -> None:
        self.state = map_space(self.state, space, q)
        self.aligned.add(space.name)
        if not self.acts:
            return
        self.pending.update(m.key for m in space.members)
        if not _is_permutation(q):
            self.soft = True
            # A permutation leaves the model's function, and the values of every space not
            # aligned yet, as they were: the copy that computes them is brought up to date
            # only when a map changes values (a soft or uneven transport).
            self._reload(sorted(self.pending))
            self.pending.clear()

    def _reload(self, keys: list[str]) -> None:
        """Put the mapped tensors into the model copy (their shapes may change) and forget the
        cached values of every node they influence."""
        paths = set()
        for key in keys:
            path, _, attr = key.rpartition(".")
            mod = self.gm.get_submodule(path)
            t = self.state[key]
            if attr in mod._parameters:
                mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[attr] = t
            if isinstance(mod, nn.LayerNorm) and attr == "weight":
                mod.normalized_shape = tuple(t.shape)
            paths.add(path)
        stale: set[fx.Node] = set()
        stack = [
            n
            for n in self.gm.graph.nodes
            if (n.op == "call_module" and n.target in paths)
            or (n.op == "get_attr" and n.target in keys)  # a class token, a position embedding
        ]
        while stack:
            n = stack.pop()
            if n not in stale:
                stale.add(n)
                stack.extend(n.users)
        if self._runner is not None:  # (chunks, and a runner made later, start afresh)
            self._runner.forget(stale)


def _is_permutation(q: Tensor, tol: float = 1e-9) -> bool:
    """Whether the transport map ``q`` (n x m) moves each neuron whole onto one other."""
    if q.shape[0] != q.shape[1]:
        return False
    nonzero = q.abs() > tol
    ones = (q[nonzero] - 1.0).abs() <= tol
    return bool((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all() and ones.all())


class _SpaceCost:
    """One space's activation cost, the sum over the nodes that carry it of each node's mean
    squared distance, accumulated over chunks of samples into one (n, m) float64 matrix: each
    chunk's distances are divided by the node's length over the whole set (``samples`` times
    its positions) as they arrive, so no node's sums are held apart."""

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.total: Tensor | None = None

    def add(self, i: int, x: Tensor, y: Tensor, space: Space, ref: Space, rows: int) -> None:
        """Add the distances between the values ``x`` (the model's) and ``y`` (the
        reference's) of the ``i``-th node of ``space`` / ``ref`` on a chunk of ``rows``
        samples (not always ``x.shape[0]``: a sequence-first value has them on axis 1)."""
        xm, ym = _channel_maps(x, space, i), _channel_maps(y, ref, i)
        if xm is not None and ym is not None:
            d, length = map_distances(xm, ym)
        else:
            # in the activations' dtype: a float64 copy of every activation would cost more
            # than the distances; the cost only ranks pairs of neurons
            xf = value_features(x, space, i, dtype=None)
            yf = value_features(y, ref, i, dtype=None)
            d, length = squared_distances(xf, yf), xf.shape[1]
        # squared distances add up over samples: this chunk's share of the node's mean
        d = d.to(torch.float64).cpu().div_(self.samples * (length // rows))
        self.total = d if self.total is None else self.total.add_(d)

    def cost(self) -> Tensor:
        assert self.total is not None
        return self.total


def _check_nodes(space: Space) -> None:
    if not space.nodes:
        raise ValueError(
            f"space {space.name!r} has no nodes to take activations from; use "
            "ground_metric='weights'"
        )


def _acts_cost(al: _Aligner, space: Space, ref: Space) -> Tensor:
    _check_nodes(space)
    x_all = al.ctx.inputs
    pieces: Iterable[tuple[GraphRunner, GraphRunner, int]]
    if al.runner is not None and al.ref_runner is not None:
        pieces = [(al.runner, al.ref_runner, x_all.shape[0])]
    else:  # chunk by chunk: each chunk's runners are made, read and dropped in turn
        ref_gm = al.ref_gm
        assert ref_gm is not None
        pieces = (
            (GraphRunner(al.gm, x), GraphRunner(ref_gm, x), x.shape[0])
            for x in (x_all[rows] for rows in even_chunks(x_all.shape[0], ACTS_CHUNK))
        )
    total = _SpaceCost(x_all.shape[0])
    for runner, ref_runner, rows in pieces:
        for i in range(len(space.nodes)):
            x = runner.value(runner.node(space.nodes[i])).detach()
            y = ref_runner.value(ref_runner.node(ref.nodes[i])).detach()
            total.add(i, x, y, space, ref, rows)
        del runner, ref_runner
    return total.cost()


#: Above this many bytes of cost matrices (``8 n m`` per free space) a fusion set of several
#: chunks is not streamed: its costs are all complete only after the last chunk, so a streamed
#: pass holds every space's at once (the space-by-space path holds one, and reruns the models
#: for each space).
STREAM_COST_BYTES = 1 << 30


class _StreamedCosts:
    """Model ``k``'s activation cost for every free space, from one pass over each chunk of
    the fusion set beside the reference
    (:func:`~neurofuse.methods._activations.stream_against_reference`: each node's distances
    taken while its values are fresh). The pass advances only as far as the space asked for
    (:meth:`take`): on a fusion set of one chunk a space's cost is complete once the pass is
    past its last node, so costs are made and taken one after the other, not all held; on
    several chunks every space's sums are held until the last. Equal to :func:`_acts_cost` on
    a model whose earlier spaces were mapped by permutations, which leave every activation as
    it was (the costs of a model after a soft map are computed afresh)."""

    def __init__(
        self, ctx: FusionContext, ref: int, k: int, spaces: list[list[Space]], free: list[int]
    ) -> None:
        self.wanted: dict[str, list[tuple[int, int]]] = {}  # node -> (free space, node index)
        for j, i in enumerate(free):
            _check_nodes(spaces[ref][i])
            for t, name in enumerate(spaces[ref][i].nodes):
                self.wanted.setdefault(name, []).append((j, t))
        self.pairs = [(spaces[k][i], spaces[ref][i]) for i in free]
        self.left = [len(spaces[ref][i].nodes) for i in free]  # nodes to come in the last chunk
        self.sums: list[_SpaceCost | None] = [_SpaceCost(ctx.inputs.shape[0]) for _ in free]
        self.done: dict[int, Tensor] = {}
        self.steps = stream_against_reference(ctx, ref, k, set(self.wanted), ACTS_CHUNK)

    def take(self, j: int) -> Tensor:
        """The cost of the ``j``-th free space (once)."""
        while j not in self.done:
            name, y, x, rows, last = next(self.steps)
            for jj, t in self.wanted[name]:
                sums = self.sums[jj]
                assert sums is not None
                sums.add(t, x, y, *self.pairs[jj], rows)
                self.left[jj] -= last
                if self.left[jj] == 0:
                    self.done[jj], self.sums[jj] = sums.cost(), None
            del y, x  # (not held while the next node is computed)
        return self.done.pop(j)


def _stream_costs(ctx: FusionContext, ref: int, spaces: list[list[Space]], free: list[int]) -> bool:
    """Whether to take the activation costs from one pass per model (:class:`_StreamedCosts`):
    where the transports will be permutations (exact EMD between equal widths with uniform
    marginals), which change no activation, and where a fusion set of several chunks would
    hold at most :data:`STREAM_COST_BYTES` of cost matrices. A map that turns out soft all the
    same sends only that model's later costs back to the space-by-space path."""
    opt: OTFusionOptions = ctx.options
    if opt.ground_metric != "acts" or opt.solver != "emd" or _marginal_scores(ctx):
        return False
    if any(spaces[k][i].size != spaces[ref][i].size for k in range(len(spaces)) for i in free):
        return False
    held = sum(8 * spaces[ref][i].size ** 2 for i in free)
    return ctx.inputs.shape[0] <= ACTS_CHUNK or held <= STREAM_COST_BYTES


def map_distances(x: Tensor, y: Tensor) -> tuple[Tensor, int]:
    """Squared distances between the channels of ``x`` (B, n, P) and of ``y`` (B, m, P) as
    vectors over samples and positions, and their length ``B P``: one batched product on the
    maps as they lie, instead of the ``(n, B P)`` copies that :func:`squared_distances` needs."""
    cross = torch.bmm(x, y.transpose(1, 2)).sum(0, dtype=torch.float64)
    # norms over the contiguous positions first, then over samples in float64 (a norm over
    # dims (0, 2) at once reduces across strides and took as long as the product itself)
    xn = torch.linalg.vector_norm(x, dim=2).square().sum(0, dtype=torch.float64)
    yn = torch.linalg.vector_norm(y, dim=2).square().sum(0, dtype=torch.float64)
    return (xn[:, None] + yn[None, :] - 2.0 * cross).clamp_min(0.0), x.shape[0] * x.shape[2]


def _weights_cost(al: _Aligner, space: Space, ref: Space) -> Tensor:
    """Incoming weight rows of the space's producers (Linear/Conv weights, embedding
    columns, class tokens and position embeddings); producers whose
    other axes belong to spaces not aligned yet (the far end of a residual stream) are left
    out while an aligned producer exists."""
    rows, rows_ref, ready = [], [], []
    for member in space.members:
        key, axis = member.key, member.axis
        t = al.state[key]
        if is_incoming(al.graph, key, axis) or t.dim() < 2:
            continue  # weight rows of producers (an embedding's columns), not readers
        x = neuron_rows(t, member, space.size).to(torch.float64)
        y = neuron_rows(al.ref_state[key], member, ref.size).to(torch.float64)
        if x.shape[1] != y.shape[1]:
            continue
        done = all(
            (s := al.where.get((key, ax))) is None or s.fixed or s.name in al.aligned
            for ax in range(t.dim())
            if ax != axis
        )
        rows.append(x)
        rows_ref.append(y)
        ready.append(done)
    if not rows:
        raise ValueError(
            f"space {space.name!r} has no weight rows comparable with the reference's; use "
            "ground_metric='acts'"
        )
    keep = [i for i, r in enumerate(ready) if r] or list(range(len(rows)))
    x = torch.cat([rows[i] for i in keep], dim=1)
    y = torch.cat([rows_ref[i] for i in keep], dim=1)
    return squared_distances(x, y).cpu()


#: Ground metrics: ``f(aligner, space of the model, space of the reference) -> cost (n, m)``, a
#: tensor of its own (otfusion scales it in place).
GROUND_METRICS: dict[str, Callable[[_Aligner, Space, Space], Tensor]] = {
    "acts": _acts_cost,
    "weights": _weights_cost,
}


def _marginal(scores: Tensor | None, size: int) -> np.ndarray:
    s = np.ones(size) if scores is None else scores.numpy().astype(np.float64)
    return s / s.sum()


def _marginal_scores(ctx: FusionContext) -> bool:
    """Whether importance scores are the transports' marginals (else they are uniform)."""
    return not ctx.importance.uniform and ctx.options.importance_in == "marginals"


def _scores(ctx: FusionContext, k: int, spaces: list[Space]) -> dict[str, Tensor]:
    """Model ``k``'s importance scores of the spaces that use them: the permutable ones as
    marginals, or, with ``importance_in="average"``, those and the classes as averaging
    weights; none for uniform importance."""
    if ctx.importance.uniform:
        return {}
    if _marginal_scores(ctx):
        wanted = [s for s in spaces if not s.fixed]
    else:
        wanted = scored_spaces(ctx, spaces)
    runner = GraphRunner(ctx.trace(ctx.models[k]), ctx.inputs)
    whole = ctx.inputs.shape[0] <= ACTS_CHUNK  # else: scores from the inputs, in batches
    out = {s.name: space_scores(ctx, k, runner, s, whole) for s in wanted}
    return {name: t for name, t in out.items() if t is not None}


@register_method(
    "otfusion",
    "OTFusion (Singh & Jaggi 2020): optimal-transport alignment to a reference, then averaging",
    OTFusionOptions,
    Capabilities(importance=True, target="same", tied_weights=True, exact=True),
)
def otfusion(ctx: FusionContext) -> nn.Module:
    opt: OTFusionOptions = ctx.options
    n = len(ctx.models)
    ref, weights, states, spaces = alignment_setup(
        ctx, "otfusion", opt.reference, opt.weights, equal_widths=False
    )
    free = [i for i, s in enumerate(spaces[ref]) if not s.fixed]
    ref_runner, ref_gm = None, None
    if opt.ground_metric == "acts":
        ref_gm = ctx.trace(ctx.models[ref])
        if ctx.inputs.shape[0] <= ACTS_CHUNK:  # one chunk: the reference's values kept
            ref_runner, ref_gm = GraphRunner(ref_gm, ctx.inputs), None
    ref_scores = _scores(ctx, ref, spaces[ref])
    marginals = _marginal_scores(ctx)
    # with importance_in="average": each model's scores carried into the reference's neurons
    moved: list[dict[str, Tensor]] = []
    stream = _stream_costs(ctx, ref, spaces, free)
    aligned: list[State] = []
    costs: list[float] = []
    with progress_bar(ctx.progress, "otfusion", n * len(free)) as advance:
        for k in range(n):
            if k == ref:
                aligned.append(states[k])
                costs.append(0.0)
                moved.append(ref_scores)
                continue
            al = _Aligner(ctx, k, spaces[k], spaces[ref], ref_runner, ref_gm)
            scores = _scores(ctx, k, spaces[k])
            mapped = {spaces[k][i].name for i in free}  # (filled as each is mapped)
            moved.append({name: t for name, t in scores.items() if name not in mapped})
            streamed = _StreamedCosts(ctx, ref, k, spaces, free) if stream else None
            total = 0.0
            for j, i in enumerate(free):
                space, target = spaces[k][i], spaces[ref][i]
                # the cost, the plan and the map are (n, m) float64 arrays: each is made once
                # and changed in place (two width-16384 layers: 2 GiB apiece)
                if streamed is not None:  # every earlier map a permutation
                    cost = streamed.take(j)
                else:
                    cost = al.cost(space, target).to(torch.float64)
                top = float(cost.max())
                if top > 0:
                    cost.div_(top)
                a = _marginal(scores.get(space.name) if marginals else None, space.size)
                b = _marginal(ref_scores.get(target.name) if marginals else None, target.size)
                plan = torch.as_tensor(
                    SOLVERS[opt.solver](a, b, cost.numpy(), opt), dtype=torch.float64
                )
                total += float(torch.vdot(plan.reshape(-1), cost.reshape(-1)))
                del cost
                q = plan.div_(torch.as_tensor(b)[None, :])  # columns sum to 1
                if not marginals and space.name in scores:  # the scores of the mapped neurons
                    moved[k][target.name] = q.T @ scores[space.name]
                al.apply(space, q)
                del plan, q
                if al.soft:  # the later costs are computed afresh
                    streamed = None
                advance(k * len(free) + j + 1)
            aligned.append(al.state)
            costs.append(total)
    check_aligned_shapes(aligned, states[ref])
    ctx.report["transport_cost"] = costs
    per_neuron = {} if marginals else importance_coefficients(spaces[ref], moved)
    fused = average_states(aligned, weights, per_neuron)
    template = template_for(ctx, ref, "otfusion")
    fused_model = write_state(template, fused, "otfusion")
    return finish(ctx, fused_model, opt.reset_bn, opt.repair, aligned, weights)
