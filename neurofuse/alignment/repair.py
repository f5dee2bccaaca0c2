"""REPAIR (Jordan et al. 2022): undo the variance collapse of averaged neurons.

Averaging two aligned networks shrinks each hidden neuron's spread (its inputs no longer
agree), and the shrinkage compounds with depth. REPAIR rescales every hidden neuron of the
merged network so that its mean and standard deviation over the data are the interpolation of
the same neuron's in the aligned base models::

    y'_j = (y_j - mu_fused_j) * sigma_target_j / sigma_fused_j + mu_target_j

The correction is applied at the end of every affine unit (the Linear/Conv layer, or the
BatchNorm right after it, whose affine part then carries it) in graph order, each unit measured
after the units before it are corrected, so that every unit's statistics are exact on the data.
It is folded into the weights: the model keeps its architecture. A unit without a bias (and no
BatchNorm after it) gets the rescaling only. The classifier (whose outputs are the model's
outputs) is left alone.

Written by hand: no maintained library offers REPAIR on an arbitrary graph (the authors' code
hooks a fixed list of layers of their own models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.graph import (
    NORM_TYPES,
    GraphRunner,
    affine_nodes,
    layer_width,
    module_of,
    neuron_axis,
    release,
    to_neurons,
    trace,
    unit_end,
)
from neurofuse.utils import even_chunks, tensor_attr

_EPS = 1e-8
#: Samples per chunk when the aligned base models' statistics are gathered: REPAIR holds one
#: chunk of one base model's values at a time, not every base model's values on all the data.
STATS_CHUNK = 512


def neuron_stats(value: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (float64) of each neuron of ``value`` over every sample and
    position."""
    rows = to_neurons(value.detach(), axis).to(torch.float64)
    return rows.mean(1), rows.std(1, unbiased=False)


def neuron_stats_in_chunks(
    gm: fx.GraphModule, name: str, axis: int, inputs: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`neuron_stats` of the node ``name`` of ``gm`` on ``inputs``, gathered over chunks
    of ``chunk`` samples (default :data:`STATS_CHUNK`), the graph run up to the node on each (a
    lean pass: only one chunk's value of the node is held, not the whole set's)."""
    sums = MomentSums()
    for rows in even_chunks(len(inputs), STATS_CHUNK if chunk is None else chunk):
        run = GraphRunner(gm, inputs[rows])
        (value,) = run.compute([run.node(name)], lean=True)
        sums.add(to_neurons(value.detach(), axis).to(torch.float64))
        del run, value
    return sums.stats()


class MomentSums:
    """Each neuron's mean and standard deviation (float64) over columns that arrive in chunks,
    summed about the first chunk's means so that the variance does not cancel."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, rows: Tensor) -> None:
        if self.count == 0:
            self.shift = rows.mean(1)
            self.s1, self.s2 = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
        r = rows - self.shift[:, None]
        self.s1 += r.sum(1)
        self.s2 += r.square().sum(1)
        self.count += rows.shape[1]

    def stats(self) -> tuple[Tensor, Tensor]:
        m = self.s1 / self.count
        return self.shift + m, (self.s2 / self.count - m.square()).clamp_min(0).sqrt()


def _repair_points(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """``(unit, end)`` of every affine unit whose output is not the model's output."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = set(out.all_input_nodes)
    return [(u, unit_end(gm, u)) for u in affine_nodes(gm) if unit_end(gm, u) not in returned]


def _downstream(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node computed from it."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _axis(gm: fx.GraphModule, unit: fx.Node, end: fx.Node, value: Tensor) -> int:
    width, channels_first = layer_width(module_of(gm, unit))
    return neuron_axis(value, width, channels_first)


#: ``target(end, axis)``: the mean and standard deviation (float64, one per neuron) that the
#: unit ending at node ``end`` of the fused graph should have on the data (its neurons on
#: ``axis`` of the node's value), or ``None`` to leave that unit alone.
StatsTarget = Callable[[fx.Node, int], tuple[Tensor, Tensor] | None]


@torch.no_grad()
def repair(
    fused: nn.Module,
    aligned: Sequence[nn.Module],
    inputs: Tensor,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Rescale ``fused``'s hidden units in place so that each neuron's mean and standard
    deviation on ``inputs`` are the ``weights``-interpolation of those of the ``aligned`` base
    models (the models averaged into ``fused``, each with its neurons in ``fused``'s order).

    Returns, per repaired unit, the mean ratio of the fused neurons' standard deviation to the
    target before the repair (how much variance had collapsed).
    """
    if not aligned:
        raise ValueError("repair needs the aligned base models")
    w = torch.tensor(
        [1.0 / len(aligned)] * len(aligned) if weights is None else list(weights),
        dtype=torch.float64,
    )
    if w.numel() != len(aligned):
        raise ValueError(f"{len(aligned)} aligned models but {w.numel()} weights")
    w = w / w.sum()
    points = [(u.name, e.name) for u, e in _repair_points(trace(fused))]
    # each base model is read once, in order (``aligned`` may make them on demand), and
    # dropped before the next is made
    stats = []
    for model in aligned:
        stats.append(_unit_stats(model, points, inputs))
        del model

    def interpolated(end: fx.Node, axis: int) -> tuple[Tensor, Tensor]:
        per_model = [s[end.name] for s in stats]
        wk = w.to(per_model[0][0].device)
        return (
            torch.stack([m for m, _ in per_model]).T @ wk,
            torch.stack([s for _, s in per_model]).T @ wk,
        )

    return repair_to(fused, inputs, interpolated)


def _unit_stats(
    model: nn.Module, points: list[tuple[str, str]], inputs: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """``end name -> (mean, std)`` of the neurons at the end of every unit of ``points``
    (``(unit, end)`` node names) of ``model`` on ``inputs``, gathered over chunks of
    :data:`STATS_CHUNK` samples."""
    gm = trace(model.eval())
    try:
        return _unit_stats_of(gm, points, inputs)
    finally:
        release(gm)  # this trace is private: its parameters go with the model


def _unit_stats_of(
    gm: fx.GraphModule, points: list[tuple[str, str]], inputs: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = sorted({name for pair in points for name in pair} - set(nodes))
    if missing:
        raise ValueError(
            f"an aligned model's graph has no node(s) {missing} of the fused model's graph; "
            "REPAIR needs base models of the fused model's architecture"
        )
    sums = {end: MomentSums() for _, end in points}
    axes: dict[str, int] = {}
    for rows in even_chunks(len(inputs), STATS_CHUNK):
        run = GraphRunner(gm, inputs[rows])
        for unit, end in points:
            value = run.value(nodes[end])
            if end not in axes:
                axes[end] = _axis(gm, nodes[unit], nodes[end], value)
            sums[end].add(to_neurons(value.detach(), axes[end]).to(torch.float64))
            run.release_consumed()
        del run
    return {end: s.stats() for end, s in sums.items()}


@torch.no_grad()
def repair_to(fused: nn.Module, inputs: Tensor, target: StatsTarget) -> dict[str, float]:
    """Rescale ``fused``'s hidden units in place, in graph order, so that each neuron's mean and
    standard deviation on ``inputs`` are what ``target`` asks (the general form of
    :func:`repair`, for merges whose targets are not one neuron per base model: ZipIt!'s merged
    features, Neuron Transplantation's kept neurons). Returns the collapse ratios of
    :func:`repair` for the units ``target`` gave statistics for.

    A fusion set of at most :data:`STATS_CHUNK` samples is evaluated once (each value kept until
    a repair changes it); a larger one chunk by chunk for every unit, the fused model rerun up
    to the unit, so that no value of the whole set is held."""
    fused.eval()
    gm = trace(fused)
    chunks = list(even_chunks(len(inputs), STATS_CHUNK))
    fused_run = GraphRunner(gm, inputs) if len(chunks) == 1 else None
    collapse: dict[str, float] = {}
    for unit, end in _repair_points(gm):
        if fused_run is not None:
            value = fused_run.value(end)  # after the units before it are repaired
            axis = _axis(gm, unit, end, value)
            wanted = target(end, axis)
            if wanted is None:
                continue
            mu_f, sd_f = neuron_stats(value, axis)
        else:
            found = _chunked_stats(gm, unit, end, inputs, chunks, target)
            if found is None:
                continue
            wanted, (mu_f, sd_f) = found
        mu_t, sd_t = (t.to(mu_f.device, torch.float64) for t in wanted)
        scale = sd_t / sd_f.clamp_min(_EPS)
        shift = mu_t - mu_f * scale
        _fold(module_of(gm, unit), module_of(gm, end) if end is not unit else None, scale, shift)
        if fused_run is not None:
            fused_run.forget(_downstream(unit))  # the values the repaired unit changes
        collapse[str(end.target if end.op == "call_module" else end.name)] = float(
            (sd_f / sd_t.clamp_min(_EPS)).mean()
        )
    return collapse


def _chunked_stats(
    gm: fx.GraphModule,
    unit: fx.Node,
    end: fx.Node,
    inputs: Tensor,
    chunks: list[slice],
    target: StatsTarget,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """``target``'s statistics for the unit ending at ``end`` and the fused neurons' own, over
    ``chunks`` of ``inputs`` (the model run afresh up to ``end`` on each); ``None`` when
    ``target`` leaves the unit alone (seen on the first chunk)."""
    sums, axis = MomentSums(), -1
    wanted: tuple[Tensor, Tensor] | None = None
    for c, rows in enumerate(chunks):
        run = GraphRunner(gm, inputs[rows])
        value = run.value(end)
        if c == 0:
            axis = _axis(gm, unit, end, value)
            wanted = target(end, axis)
            if wanted is None:
                return None
        sums.add(to_neurons(value.detach(), axis).to(torch.float64))
        del run, value
    assert wanted is not None
    return wanted, sums.stats()


def _fold(layer: nn.Module | None, norm: nn.Module | None, scale: Tensor, shift: Tensor) -> None:
    """Make the unit compute ``y * scale + shift`` per neuron: in the BatchNorm's affine part
    when there is one, else in the layer's weight rows and bias."""
    if norm is not None and isinstance(norm, NORM_TYPES) and norm.affine:
        w, b = tensor_attr(norm, "weight"), tensor_attr(norm, "bias")
        b.copy_((b.to(torch.float64) * scale + shift).to(b))
        w.copy_((w.to(torch.float64) * scale).to(w))
        return
    if norm is not None:  # a BatchNorm without affine part: nothing to carry the correction
        return
    if not isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
        return
    view = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.copy_((layer.weight.to(torch.float64) * scale.view(view)).to(layer.weight))
    if layer.bias is not None:
        layer.bias.copy_((layer.bias.to(torch.float64) * scale + shift).to(layer.bias))
