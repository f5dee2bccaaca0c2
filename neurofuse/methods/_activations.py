"""The base models' values on the fusion set as the activation-based alignments and merges read
them (OTFusion, Git Re-Basin, ZipIt!, CCA Merge): a permutation space's neuron features and
importance scores, and, for fusion sets larger than :data:`ACTS_CHUNK`, their second moments
and statistics summed over chunks of samples."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from neurofuse.alignment import Space
from neurofuse.alignment.repair import neuron_stats as _neuron_stats
from neurofuse.alignment.repair import neuron_stats_in_chunks
from neurofuse.graph import GraphRunner, neuron_axis, to_neurons
from neurofuse.methods.registry import FusionContext
from neurofuse.utils import even_chunks


def value_layout(out: Tensor, space: Space, i: int) -> tuple[int, int]:
    """Where the neurons of ``out``, the value of the space's ``i``-th node, lie: their axis
    and the number of parts of the space side by side."""
    axis = space.axes[i] if space.axes else neuron_axis(out, hint_size=space.size)
    return axis, space.node_parts[i] if space.node_parts else 1


def value_features(
    out: Tensor, space: Space, i: int, dtype: torch.dtype | None = torch.float64
) -> Tensor:
    """(d, N) in ``dtype`` (``None``: the values' own): ``out``, the value of the space's
    ``i``-th node, one row per neuron (a node that holds several parts of the space,
    ``[q | k | v]``, gives each neuron all its parts)."""
    axis, parts = value_layout(out, space, i)
    rows = to_neurons(out, axis)
    rows = rows if dtype is None else rows.to(dtype)
    if parts > 1:
        rows = rows.reshape(parts, space.size, -1).transpose(0, 1).reshape(space.size, -1)
    return rows


def channel_maps(out: Tensor, space: Space, i: int) -> Tensor | None:
    """``out``, the value of the space's ``i``-th node, as ``(B, C, positions)`` when its
    neurons are the channels of a channels-first map laid out contiguously (a convolution's
    output), else ``None``: products over samples and positions can then be batched over the
    maps as they lie, without copying them into neuron rows."""
    axis, parts = value_layout(out, space, i)
    if out.dim() < 3 or parts != 1 or axis != 1 or not out.is_contiguous():
        return None
    return out.reshape(out.shape[0], out.shape[1], -1)


def stream_against_reference(
    ctx: FusionContext, ref: int, k: int, names: set[str], chunk: int
) -> Iterator[tuple[str, Tensor, Tensor, int, bool]]:
    """Model ``k``'s and the reference's values at the nodes ``names``, in one pass over each
    chunk of ``chunk`` fusion samples (one when the set is no larger): the two models run side
    by side, node by node (:meth:`GraphRunner.stream`), each value dropped once the nodes that
    read it have run, so a pass holds about the two models' widest cuts (and each model's
    products are taken while its values are fresh). Yields ``(node name, the reference's
    value, model k's value, samples in the chunk, whether it is the last chunk)``, detached;
    read them before asking for the next step, which may drop them. One model at a time, so
    that what a caller sums per model is held for one model (the reference reruns for each: a
    forward pass costs less than the products). The two graphs must be the same (walked in
    lockstep; a node name that differs is an error)."""
    gms = [ctx.trace(ctx.models[ref]), ctx.trace(ctx.models[k])]
    x_all = ctx.inputs
    n = x_all.shape[0]
    pieces = [x_all] if n <= chunk else [x_all[rows] for rows in even_chunks(n, chunk)]
    for c, x in enumerate(pieces):
        for (node, y), (theirs, v) in zip(
            *(GraphRunner(gm, x).stream() for gm in gms), strict=True
        ):
            if theirs.name != node.name:
                raise RuntimeError(
                    f"model {k} computes node {theirs.name!r} where model {ref} computes "
                    f"{node.name!r}: the models' graphs differ"
                )
            if node.name in names:
                yield node.name, y.detach(), v.detach(), x.shape[0], c == len(pieces) - 1
            del y, v


def space_scores(
    ctx: FusionContext, k: int, runner: GraphRunner, space: Space, values: bool = True
) -> Tensor | None:
    """Model ``k``'s importance scores (float64, ``(size,)``) for ``space``, looked up at the
    node that names it; ``None`` for uniform importance. ``values=False``: the node's values
    on ``runner``'s inputs are not computed (a fusion set too large to hold them): a built-in
    score then comes from the inputs in batches, a score function that reads them is refused."""
    if ctx.importance.uniform:
        return None
    try:
        node = runner.node(space.name)
    except KeyError:
        raise ValueError(
            f"space {space.name!r} is not a node of model {k}'s graph; importance scores are "
            "looked up at the node that names each space"
        ) from None
    out = runner.value(node) if values else None
    parts = 1
    if space.node_parts and space.name in space.nodes:
        parts = space.node_parts[space.nodes.index(space.name)]
    scores = ctx.importance.scores(k, space.name, out, parts * space.size).to(torch.float64)
    return scores.reshape(parts, space.size).mean(0).cpu()  # [q | k | v]: one score per neuron


def logits_space(spaces: Sequence[Space], gm: fx.GraphModule) -> Space | None:
    """The space of the model's output (its classes), found by the node that returns it."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    name = getattr(out, "name", None)
    return next((s for s in spaces if name in s.nodes), None)


def scored_spaces(ctx: FusionContext, spaces: Sequence[Space]) -> list[Space]:
    """The spaces whose importance scores weigh an importance-weighted average: every
    permutable one and the classes (read on model 0's graph)."""
    logits = logits_space(spaces, ctx.trace(ctx.models[0]))
    return [s for s in spaces if not s.fixed or s is logits]


def importance_coefficients(
    spaces: Sequence[Space], scores: Sequence[dict[str, Tensor]]
) -> dict[str, list[Tensor]]:
    """Per-row averaging coefficients of every outgoing member of ``spaces`` (the reference's,
    for :func:`neurofuse.methods._averaging.average_states`) from each model's scores of each
    space's neurons, already carried into the reference's order (``scores[k][space.name]``,
    ``(size,)``): fused neuron ``i`` becomes ``sum_k s_{k,i} w_{k,i} / sum_k s_{k,i}`` over its
    outgoing parameters, as the neuron-interpolation paper weighs Git Re-Basin's average
    (appendix C). Spaces without scores are averaged with the model weights alone."""
    coeffs: dict[str, list[Tensor]] = {}
    for s in spaces:
        if not all(s.name in table for table in scores):
            continue
        for table in scores:
            for m in s.members:
                if m.axis == 0:
                    per_row = table[s.name].repeat_interleave(m.repeat).repeat(m.parts)
                    coeffs.setdefault(m.key, []).append(per_row)
    return coeffs


#: Samples per chunk of the activation-based merges (ZipIt!, CCA Merge): a fusion set of more
#: is evaluated chunk by chunk for every space (the models rerun up to it), so that one chunk's
#: values are held, not the whole set's; a set of at most this many is evaluated once.
ACTS_CHUNK = 512


class CovarianceSums:
    """``sum (z - mean)(z - mean)^T`` over the columns of neuron rows ``z`` (``(d, N)``) that
    arrive in chunks, float64, accumulated about the first chunk's means (so that a neuron whose
    mean is large against its spread does not cancel). Channel maps (``(B, d, P)``, the
    neurons' values over samples and positions) are added as they lie (:meth:`add_maps`);
    rows and maps may be mixed: the shift is kept as the maps' float32 holds it, so that every
    chunk subtracts the same."""

    def __init__(self) -> None:
        self.count = 0

    def _start(self, means: Tensor, device: torch.device) -> None:
        d = means.shape[0]
        self.shift = means.to(torch.float32).to(torch.float64)
        self.s1 = torch.zeros(d, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(d, d, dtype=torch.float64, device=device)

    def add(self, z: Tensor) -> None:
        z = z.to(torch.float64)
        if self.count == 0:
            self._start(z.mean(1), z.device)
        z = z - self.shift[:, None]
        self.s1 += z.sum(1)
        self.s2.addmm_(z, z.T)
        self.count += z.shape[1]

    def add_maps(self, z: Tensor) -> None:
        """Add the maps ``z`` (B, d, P): centred in their own dtype (at least float32), the
        products batched over samples and each sample's summed in float64 (float64 neuron rows
        cost several times as much on a CNN's maps)."""
        z = at_least_float32(z)
        if self.count == 0:
            self._start(channel_sums(z) / (z.shape[0] * z.shape[2]), z.device)
        z = z - self.shift.to(z.dtype).view(1, -1, 1)
        self.s1 += channel_sums(z)
        self.s2 += batched_gram(z)
        self.count += z.shape[0] * z.shape[2]

    def centred(self) -> Tensor:
        if self.count == 0:
            raise ValueError("no samples were added")
        return self.s2 - torch.outer(self.s1, self.s1) / self.count


def batched_gram(z: Tensor) -> Tensor:
    """``sum_b z_b z_b^T`` (float64, ``(d, d)``) of maps ``z`` (B, d, P): one batched product
    per group of samples whose ``(d, d)`` products fit in 2 MiB, each group summed in float64
    (a product of the whole batch at once wrote 20 MB of (d, d) blocks that the sum then read
    back: twice the time at d = 128)."""
    d = z.shape[1]
    step = max(1, (1 << 19) // (d * d))
    total = torch.zeros(d, d, dtype=torch.float64, device=z.device)
    for lo in range(0, z.shape[0], step):
        part = z[lo : lo + step]
        total += torch.bmm(part, part.transpose(1, 2)).sum(0, dtype=torch.float64)
    return total


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in a half-precision dtype (products and shifts of bfloat16
    maps lose the digits a correlation needs), else as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def channel_sums(x: Tensor) -> Tensor:
    """Sums of the maps ``x`` (B, C, P) per channel, in float64: over the contiguous
    positions first, then over samples (a float64 sum over dims (0, 2) at once reduces across
    strides, 100 times slower on a VGG-small map)."""
    return x.sum(2).sum(0, dtype=torch.float64)


class Activations:
    """The base models' values on the fusion set, as the activation-based merges read them:
    ``runners`` on the whole set (evaluated once, each node kept) when it holds at most
    :data:`ACTS_CHUNK` samples, else ``None`` and every question answered chunk by chunk."""

    def __init__(self, ctx: FusionContext) -> None:
        self.ctx = ctx
        self.gms = [ctx.trace(m) for m in ctx.models]
        self.chunks = list(even_chunks(len(ctx.inputs), ACTS_CHUNK))
        self.runners: list[GraphRunner] | None = (
            [GraphRunner(g, ctx.inputs) for g in self.gms] if len(self.chunks) == 1 else None
        )

    def covariance(self, models: Sequence[int], spaces: Sequence[Space]) -> tuple[Tensor, int]:
        """The centred second moments of the features of ``spaces[i]`` of model ``models[i]``
        stacked in that order (each model's rows: every node's values side by side), over every
        chunk; and the number of columns (samples x positions). Node by node: the models' maps
        side by side when every model's value is a channel map (:func:`channel_maps`), else
        their neuron rows."""
        sums = CovarianceSums()
        nodes = len(spaces[0].nodes)
        if not nodes:
            raise ValueError(f"space {spaces[0].name!r} has no graph node to measure")
        if any(len(s.nodes) != nodes for s in spaces):
            raise ValueError(
                f"space {spaces[0].name!r} is carried by {[len(s.nodes) for s in spaces]} graph "
                "nodes in the models: the models need the same architecture"
            )
        for rows in self.chunks:
            values = []
            for k, space in zip(models, spaces, strict=True):
                if self.runners is not None:
                    run = self.runners[k]
                    values.append([run.value(run.node(n)).detach() for n in space.nodes])
                else:
                    run = GraphRunner(self.gms[k], self.ctx.inputs[rows])
                    got = run.compute([run.node(n) for n in space.nodes], lean=True)
                    values.append([v.detach() for v in got])
                del run
            for t in range(nodes):
                maps = [channel_maps(v[t], s, t) for v, s in zip(values, spaces, strict=True)]
                if all(m is not None for m in maps):
                    sums.add_maps(torch.cat(maps, 1))  # type: ignore[arg-type]
                else:
                    sums.add(
                        torch.cat(
                            [
                                value_features(v[t], s, t)
                                for v, s in zip(values, spaces, strict=True)
                            ]
                        )
                    )
                del maps
            del values
        return sums.centred(), sums.count

    def scores(self, k: int, space: Space) -> Tensor | None:
        """:func:`space_scores` of model ``k`` (from the inputs in batches in chunks)."""
        runner = self.runners[k] if self.runners else GraphRunner(self.gms[k], self.ctx.inputs)
        return space_scores(self.ctx, k, runner, space, self.runners is not None)

    def neuron_stats(self, k: int, name: str, axis: int) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (float64) of model ``k``'s neurons at node ``name``."""
        if self.runners is not None:
            r = self.runners[k]
            return _neuron_stats(r.value(r.node(name)), axis)
        return neuron_stats_in_chunks(self.gms[k], name, axis, self.ctx.inputs, ACTS_CHUNK)


__all__ = [
    "ACTS_CHUNK",
    "at_least_float32",
    "batched_gram",
    "channel_maps",
    "channel_sums",
    "Activations",
    "CovarianceSums",
    "importance_coefficients",
    "logits_space",
    "scored_spaces",
    "space_scores",
    "stream_against_reference",
    "value_features",
    "value_layout",
]
