"""Where the Linear variants' engine reads the models' values: the whole fusion set at once
(each value computed once and kept until every node reading it has run), or, with
``LinearOptions.sample_chunk``, chunk by chunk, recomputed for every unit so that no level's
outputs are ever held for the whole set (issue 13: memory bounded in the number of fusion
samples)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from neurofuse.graph import GraphRunner


class Piece:
    """The base models' and the fused model's values on some consecutive fusion samples.

    A ``lean`` piece (a chunk, read once and dropped) keeps only the values asked for: every
    intermediate value is dropped as soon as the pass no longer needs it."""

    def __init__(
        self,
        fgm: fx.GraphModule,
        bgms: list[fx.GraphModule],
        inputs: Tensor,
        timer: Callable[[], AbstractContextManager[Any]],
        lean: bool = False,
    ) -> None:
        self.fused_run = GraphRunner(fgm, inputs)
        self.base_runs = [GraphRunner(g, inputs) for g in bgms]
        self.nodes = [{n.name: n for n in g.graph.nodes} for g in bgms]
        self.size = inputs.shape[0]
        self.lean = lean
        self._timer = timer

    def bases(self, name: str) -> list[Any]:
        """Every base model's value at its node ``name`` (one timer: one device sync)."""
        return [values[0] for values in self.bases_at([name])]

    def bases_at(self, names: Sequence[str]) -> list[list[Any]]:
        """Per base model, its values at the nodes ``names``, computed in one pass."""
        with self._timer():
            return [
                r.compute([nodes[n] for n in names], self.lean)
                for r, nodes in zip(self.base_runs, self.nodes, strict=True)
            ]

    def fused(self, node: fx.Node) -> Any:
        """The fused model's value at ``node`` (as fitted so far)."""
        return self.fused_at([node])[0]

    def fused_at(self, nodes: Sequence[fx.Node]) -> list[Any]:
        """The fused model's values at ``nodes``, computed in one pass (values computed before
        on this piece are reused)."""
        with self._timer():
            return self.fused_run.compute(nodes, self.lean)

    def release(self) -> None:
        """Drop the values that no node still to be computed reads."""
        for r in (*self.base_runs, self.fused_run):
            r.release_consumed()


class Values:
    """The pieces of the fusion set the engine evaluates the models on: one that lives through
    the fusion (``chunk=None``), or fresh chunks of ``chunk`` samples on every pass."""

    def __init__(
        self,
        fgm: fx.GraphModule,
        bgms: list[fx.GraphModule],
        inputs: Tensor,
        chunk: int | None,
        timer: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.fgm, self.bgms, self.inputs, self.timer = fgm, bgms, inputs, timer
        self.chunk = chunk if chunk is not None and chunk < inputs.shape[0] else None
        self.whole = Piece(fgm, bgms, inputs, timer) if self.chunk is None else None
        self._probe = GraphRunner(fgm, inputs[:1])  # shapes only: one sample

    @property
    def chunked(self) -> bool:
        return self.whole is None

    def rows(self, first_piece_rows: int) -> int:
        """The rows a value has over the whole fusion set, from its rows in the first piece
        (a layer may read several rows per sample: positions, tokens, a reshape)."""
        first = self.chunk if self.chunk is not None else self.inputs.shape[0]
        return first_piece_rows * self.inputs.shape[0] // first

    def pieces(self) -> Iterator[Piece]:
        """The whole set, or its chunks in order (each chunk's values dropped after it)."""
        if self.whole is not None:
            yield self.whole
            return
        assert self.chunk is not None
        for lo in range(0, self.inputs.shape[0], self.chunk):
            yield Piece(
                self.fgm, self.bgms, self.inputs[lo : lo + self.chunk], self.timer, lean=True
            )

    def example(self, node: fx.Node) -> Any:
        """The fused model's value at ``node`` on one sample (for shapes)."""
        if self.whole is not None:
            return self.whole.fused(node)[:1]
        with self.timer():
            return self._probe.value(node)

    def release(self) -> None:
        if self.whole is not None:
            self.whole.release()


class GramPoints:
    """Points with the geometry of the columns of a matrix fed row block by row block.

    k-means and matching only see the distances between points (and weighted means of them),
    which the Gram matrix ``G = R^T R`` of the columns of ``R`` determines: the rows of
    ``V diag(sqrt(lambda))`` from ``G = V diag(lambda) V^T`` are the columns of ``R`` up to a
    rotation, in at most as many dimensions as there are columns. So a grouping of neurons by
    their values over every fusion sample needs ``G``, accumulated chunk by chunk, and never
    the values themselves."""

    def __init__(self) -> None:
        self.gram: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        """Add the rows ``rows`` (samples x points): ``G += rows^T rows``."""
        r = rows.detach().to(torch.float64)
        self.add_gram(r.T @ r)

    def add_gram(self, gram: Tensor, scale: float = 1.0) -> None:
        """Add ``scale * gram``: the points of another :class:`GramPoints` (scaled) joined to
        these as further coordinates."""
        g = gram * scale if scale != 1.0 else gram
        self.gram = g if self.gram is None else self.gram + g

    def points(self) -> Tensor:
        """``(points, dims)`` coordinates whose pairwise distances are those of the columns."""
        assert self.gram is not None, "GramPoints: nothing was added"
        lam, v = torch.linalg.eigh(self.gram)
        keep = lam > lam.max().clamp_min(0) * 1e-13
        keep[-1] = True  # (all-zero values: one coordinate of zeros)
        return (v[:, keep] * lam[keep].clamp_min(0).sqrt()).contiguous()


__all__ = ["GramPoints", "Piece", "Values"]
