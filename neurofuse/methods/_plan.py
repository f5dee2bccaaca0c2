"""What the neuron-interpolation engines know of a model's graph, read from its permutation
spaces (:mod:`neurofuse.alignment`): which space each node and each parameter axis carries,
its affine units (Linear/Conv with the BatchNorm right after them, embeddings), the
normalisations whose affine part the next unit absorbs, and the aligned average of any
parameter through the groupings of its spaces.

A *grouping* of a space is its ``(k, d_M)`` averaging matrix ``A``: fused neuron ``i`` is the
importance-weighted mean ``sum_j A[i, j] z_j`` of the base neurons ``j`` of its group (the base
models' neurons stacked model after model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse._sparse import by_column, columns, entries, mostly_zero, positive
from neurofuse.alignment import Space, permutation_spaces
from neurofuse.alignment.space import Member
from neurofuse.graph import AFFINE_TYPES, module_of, unit_end
from neurofuse.graph.ops import FOLDABLE_NORMS, is_identity, is_reshape, is_residual_add

T = TypeVar("T")


@dataclass(frozen=True)
class NodeSpace:
    """A node's space: its index in the plan, the node's neuron axis, and the parts it holds."""

    index: int
    axis: int
    parts: int


class FusionPlan:
    """Spaces, units and parameter roles of one model (all the base models share them).

    Args:
        gm: the model's fx graph (parameters shared with the model).
        model: the model.
        example: an input batch for the space analysis.
    """

    def __init__(self, gm: fx.GraphModule, model: nn.Module, example: Tensor) -> None:
        self.gm = gm
        self.spaces: list[Space] = permutation_spaces(model, example=example, gm=gm)
        self.node_space: dict[str, NodeSpace] = {}
        self.member_space: dict[tuple[str, int], tuple[int, Member]] = {}
        for i, s in enumerate(self.spaces):
            parts = s.node_parts or [1] * len(s.nodes)
            axes = s.axes or [-1] * len(s.nodes)
            for name, axis, p in zip(s.nodes, axes, parts, strict=True):
                self.node_space.setdefault(name, NodeSpace(i, axis, p))
            for m in s.members:
                self.member_space[(m.key, m.axis)] = (i, m)
        self.units = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), AFFINE_TYPES)]
        self.embeddings = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), nn.Embedding)]
        self.unit_modules = {id(module_of(gm, u)) for u in self.units}
        for u in self.units:
            end = unit_end(gm, u)
            if end is not u:
                self.unit_modules.add(id(module_of(gm, end)))
        self.folded = self._foldable_norms()

    # ------------------------------------------------------------------ spaces
    def output_space(self, unit: fx.Node) -> int | None:
        """The space of a unit's output neurons (its weight rows; an embedding's columns)."""
        axis = 1 if isinstance(module_of(self.gm, unit), nn.Embedding) else 0
        hit = self.member_space.get((f"{unit.target}.weight", axis))
        return hit[0] if hit is not None else None

    def units_of(self, space: int) -> list[fx.Node]:
        """The affine units whose outputs are (parts of) ``space``, in graph order."""
        return [u for u in self.units if self.output_space(u) == space]

    def sum_after(self, unit: fx.Node) -> fx.Node | None:
        """The residual addition a unit's output reaches through identity ops, if any."""
        node = unit_end(self.gm, unit)
        while True:
            users = list(node.users)
            if len(users) != 1:
                return None
            user = users[0]
            if is_identity(self.gm, user):
                node = user
                continue
            return user if is_residual_add(user) else None

    def through_identity(self, node: fx.Node) -> fx.Node:
        """Back from ``node`` through identity ops (dropout) to what produced its value."""
        while is_identity(self.gm, node):
            node = node.all_input_nodes[0]
        return node

    def folded_before(self, unit: fx.Node) -> str | None:
        """The folded normalisation that feeds ``unit`` through linear per-neuron ops, if any."""
        node = unit.args[0]
        while isinstance(node, fx.Node):
            if str(node.target) in self.folded and isinstance(
                module_of(self.gm, node), FOLDABLE_NORMS
            ):
                return str(node.target)
            if not is_reshape(self.gm, node) or not node.all_input_nodes:
                return None
            node = node.all_input_nodes[0]
        return None

    # ------------------------------------------------------------------ normalisations
    def _foldable_norms(self) -> set[str]:
        """Normalisations (not right after a unit) whose output reaches only affine units, as
        their input, through linear per-neuron ops: their scale and shift are absorbed by the
        least-squares fit of those units, so they can be set to the identity."""
        out = set()
        for n in self.gm.graph.nodes:
            mod = module_of(self.gm, n)
            if not isinstance(mod, FOLDABLE_NORMS) or id(mod) in self.unit_modules:
                continue
            if isinstance(mod, nn.LayerNorm) and not mod.elementwise_affine:
                continue
            if self._reaches_only_units(n):
                out.add(str(n.target))
        return out

    def _reaches_only_units(self, node: fx.Node) -> bool:
        stack, seen = list(node.users), set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if isinstance(module_of(self.gm, u), AFFINE_TYPES):
                if u.args[0] is not node and not self._linear_chain(u.args[0], node):  # type: ignore[arg-type]
                    return False
                continue
            if not is_reshape(self.gm, u):
                return False
            stack.extend(u.users)
        return True

    def _linear_chain(self, start: fx.Node, node: fx.Node) -> bool:
        while start is not node:
            if not is_reshape(self.gm, start):
                return False
            start = start.all_input_nodes[0]
        return True

    # ------------------------------------------------------------------ parameters
    def settled_keys(self) -> list[str]:
        """Parameters and buffers the engines set by aligned averaging: everything but the
        affine units' own tensors and the folded normalisations."""
        keys = []
        for name, mod in self.gm.named_modules():
            own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            if not own or id(mod) in self.unit_modules or name in self.folded:
                continue
            keys += [f"{name}.{p}" if name else p for p, _ in own]
        return keys

    def spaces_of_key(self, key: str, ndim: int) -> list[tuple[int, int, Member]]:
        """``(axis, space index, member)`` for every axis of ``key`` that a space permutes."""
        out = []
        for axis in range(ndim):
            hit = self.member_space.get((key, axis))
            if hit is not None:
                out.append((axis, hit[0], hit[1]))
        return out


def is_incoming(gm: fx.GraphModule, key: str, axis: int) -> bool:
    """Whether ``axis`` of ``key`` reads neurons (a layer's input columns) instead of writing
    or describing them (weight rows, biases, normalisation parameters, embeddings)."""
    path, _, attr = key.rpartition(".")
    mod = gm.get_submodule(path) if path else gm
    return isinstance(mod, AFFINE_TYPES) and attr == "weight" and axis == 1


#: A mapping that is mostly zero is applied entry by entry, in column chunks whose temporaries hold at most this many elements (32 MiB in float64).
_CHUNK_ELEMENTS = 1 << 22


def map_axis(t: Tensor, axis: int, m: Tensor, member: Member, size: int) -> Tensor:
    """``t`` with the ``size`` neurons on ``axis`` (``parts`` x ``repeat`` layout of ``member``)
    mapped through ``m`` (``(k, size)``): new neuron ``i`` is ``sum_j m[i, j]`` old ``j``."""
    sparse = mostly_zero(m)
    if sparse and member.parts == 1 and member.repeat == 1:
        return _map_sparse(t, axis, m.to(t.dtype))
    moved = t.movedim(axis, 0)
    rest = moved.shape[1:]
    blocks = moved.reshape(member.parts, size, member.repeat, -1)
    m = m.to(blocks.dtype)
    if sparse:
        # a grouping (one non-zero per column): a sparse product costs size x rest, not k x
        # size x rest (the dense form was a third of KF Linear's time at width 2048)
        p, _, r, x = blocks.shape
        flat = blocks.permute(1, 0, 2, 3).reshape(size, p * r * x)
        mapped = flat.new_zeros(m.shape[0], p * r * x)
        rows, gather, vals = by_column(*entries(m), size)
        step = max(1, _CHUNK_ELEMENTS // max(1, rows.numel()))  # bounded temporaries
        for lo in range(0, flat.shape[1], step):
            part = flat[:, lo : lo + step] if gather is None else flat[gather, lo : lo + step]
            mapped[:, lo : lo + step].index_add_(0, rows, part * vals.unsqueeze(1))
        mapped = mapped.reshape(-1, p, r, x).permute(1, 0, 2, 3)
    else:
        mapped = torch.einsum("ij,pjrx->pirx", m, blocks)
    return mapped.reshape(member.parts * m.shape[0] * member.repeat, *rest).movedim(0, axis)


def _map_sparse(t: Tensor, axis: int, m: Tensor) -> Tensor:
    """:func:`map_axis` of a plain axis (one part, no repeat) through a sparse ``m``, in
    place along ``axis``: no moved copies, temporaries of one chunk (wide layers' memory)."""
    rows, cols, vals = by_column(*entries(m), t.shape[axis])
    shape = list(t.shape)
    shape[axis] = m.shape[0]
    mapped = t.new_zeros(shape)
    source = t if cols is None else t.index_select(axis, cols)
    view = [1] * t.dim()
    view[axis] = -1
    scale = vals.view(view)
    other = 1 if axis == 0 and t.dim() > 1 else 0
    if other == axis:  # a vector
        return mapped.index_add_(axis, rows, source * scale)
    step = max(1, _CHUNK_ELEMENTS * source.shape[other] // max(1, source.numel()))
    for lo in range(0, source.shape[other], step):
        n = min(step, source.shape[other] - lo)
        chunk = source.narrow(other, lo, n) * scale
        mapped.narrow(other, lo, n).index_add_(axis, rows, chunk)
    return mapped


class LazySequence(Sequence[T]):
    """``n`` items (tensors, states) made on demand by ``make(i)``: a caller that walks them
    in order holds one at a time (:func:`aligned_average` of wide layers, the aligned states of
    Git Re-Basin's average)."""

    def __init__(self, n: int, make: Callable[[int], T]) -> None:
        self._n, self._make = n, make

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[T]:
        for i in range(self._n):
            yield self._make(i)  # not bound to a local: the caller's reference is the only one

    def __getitem__(self, i: int) -> T:  # type: ignore[override]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._make(i % self._n)


def aligned_average(
    gm: fx.GraphModule,
    key: str,
    tensors: Sequence[Tensor],
    axes: Sequence[tuple[int, int, Member]],
    grouping: Callable[[int], tuple[Tensor, list[int]]],
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The fused value of parameter ``key`` from the base models' ``tensors``, in ``dtype``.

    Along an axis that writes or describes neurons (a normalisation's scale, a class token),
    fused neuron ``i`` takes ``sum_j A[i, j] t_j`` over its group (``A`` already averages
    across models); along an axis that reads neurons it takes, per model, the sum over the
    group's members (their inputs are replaced by the group's mean), then the models' mean.
    Axes in no space must agree across models and are averaged.

    Args:
        grouping: ``space index -> (A, base sizes)``.
    """
    out = None
    n = len(tensors)
    writes = any(not is_incoming(gm, key, axis) for axis, _, _ in axes)
    for k in range(n):  # (not enumerate: its cached result tuple keeps the last tensor alive)
        t = tensors[k].detach().to(dtype)
        for axis, space, member in axes:
            a, sizes = grouping(space)
            lo = sum(sizes[:k])
            block = columns(a, lo, sizes[k])
            if is_incoming(gm, key, axis):
                block = positive(block)
            t = map_axis(t, axis, block, member, sizes[k])
        scale = 1.0 if writes else 1.0 / n
        if out is None:  # mapped along an axis, t is a new tensor; otherwise it may be the caller's
            out = t.mul_(scale) if axes else t * scale
        else:
            out.add_(t, alpha=scale)
        del t
    assert out is not None
    return out
