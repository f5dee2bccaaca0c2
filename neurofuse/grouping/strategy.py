"""The grouping strategy of a neuron-interpolation method: one object that the Linear and the
Gradient engines both call, so that Hungarian and K-means Fusion differ in this parameter only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from neurofuse.grouping import group
from neurofuse.grouping._base import Grouping
from neurofuse.grouping.heads import hungarian_heads, kmeans_heads
from neurofuse.grouping.hungarian import SPARSE_NEIGHBOURS

GroupingKind = Literal["kmeans", "hungarian"]
KMEANS_WEIGHTS = ("uniform", "importance")
PREFIX: dict[str, str] = {"kmeans": "kf", "hungarian": "hf"}


def check_kmeans_weights(value: object) -> None:
    """Raise a clear error unless ``value`` is one of :data:`KMEANS_WEIGHTS`."""
    if value not in KMEANS_WEIGHTS:
        raise ValueError(
            f"kmeans_weights must be 'uniform' (scores weigh the centroids only) or "
            f"'importance' (weighted k-means, the paper's rule), got {value!r}"
        )


@dataclass(frozen=True)
class NeuronGrouping:
    """Groups the base models' neurons of one space into the fused neurons.

    Args:
        kind: ``"kmeans"`` (K-means Fusion: any number of models, any fused width) or
            ``"hungarian"`` (Hungarian Fusion: two models of equal width, one-to-one pairs).
        variant: ``"linear"`` or ``"gradient"``: only named in error messages.
        seed, n_init, max_iter, local_search, seeding: k-means settings (ignored by
            Hungarian; ``seeding`` as in :func:`neurofuse.grouping.group`).
        matching: Hungarian only: ``"exact"`` (the linear assignment) or ``"sparse"`` (the
            best assignment among each neuron's ``SPARSE_NEIGHBOURS`` cheapest partners,
            :func:`neurofuse.grouping.hungarian.assign_pairs`). Spaces of attention heads are
            always matched exactly.
        kmeans_weights: what the importance scores weigh in K-means Fusion (Hungarian
            ignores it): ``"uniform"`` (default): the clustering is unweighted and the scores
            weigh each group's members in its centroid, the fit's target
            (:meth:`Grouping.assignment_matrix`); ``"importance"``: the scores weigh the
            k-means objective too (weighted k-means, the paper's rule). Why the default:
            with weighted k-means, KF Linear with conductance or DeepLIFT fell 2.3-3.7 points
            below uniform importance on the ViT weak-owner and 6-way sharded splits, where
            unweighted grouping is level with it (-0.3 to +0.4); over 78 split x score means the
            worst difference goes from -3.7 to -1.4 points, at the price of smaller gains
            where the weights helped (ViT sharded 2: +4.4 becomes +1.1;
            ``benchmarks/results/kmeans_weights/report.md``).
    """

    kind: GroupingKind
    variant: str = "linear"
    seed: int = 0
    n_init: int | Literal["auto"] = "auto"
    max_iter: int = 100
    local_search: bool = False
    seeding: str = "k-means++"
    matching: Literal["exact", "sparse"] = "exact"
    kmeans_weights: Literal["uniform", "importance"] = "uniform"

    def __post_init__(self) -> None:
        if self.matching not in ("exact", "sparse"):
            raise ValueError(f"matching must be 'exact' or 'sparse', got {self.matching!r}")
        check_kmeans_weights(self.kmeans_weights)

    def _clustered(self, weights: Tensor) -> Tensor:
        """The weights that the k-means objective sees."""
        return weights if self.kmeans_weights == "importance" else torch.ones_like(weights)

    def _keep(self, g: Grouping, points: Tensor, weights: Tensor) -> Grouping:
        """``g`` holding ``weights``, its centroids the weighted means of its groups."""
        if self.kmeans_weights == "importance" or bool((weights == weights[0]).all()):
            return replace(g, weights=weights)  # (its centroids are already these means)
        a = g.assignment_matrix(weights, sparse=True).to(points.dtype)
        return replace(g, weights=weights, centroids=(a @ points).to(g.centroids.dtype))

    @property
    def method(self) -> str:
        return f"{PREFIX[self.kind]}_{self.variant}"

    def _check_pair(self, widths: Sequence[int], k: int, where: str) -> None:
        if len(widths) != 2 or widths[0] != widths[1] or widths[0] != k:
            raise ValueError(
                f"Hungarian fusion needs two models of equal width fused into the same width; "
                f"{where} has base widths {list(widths)} and fused width {k}. "
                f"Use kf_{self.variant} instead."
            )

    def neurons(
        self,
        points: Tensor,
        weights: Tensor,
        k: int,
        widths: Sequence[int],
        where: str,
        offset: int = 0,
    ) -> Grouping:
        """Group ``points`` (``(d_M, D)``, model after model, ``widths`` each) into ``k``
        groups; ``offset`` is added to the seed (one stream of k-means restarts per level).
        The grouping keeps ``weights``: ``assignment_matrix()`` averages with them."""
        if self.kind == "hungarian":
            self._check_pair(widths, k, where)
            neighbours = SPARSE_NEIGHBOURS if self.matching == "sparse" else None
            g = group(points, weights, k, method="hungarian", sizes=widths, neighbours=neighbours)
            return replace(g, weights=weights)
        g = group(
            points,
            self._clustered(weights),
            k,
            method="kmeans",
            sizes=widths,
            seed=self.seed + offset,
            n_init=self.n_init,
            max_iter=self.max_iter,
            local_search=self.local_search,
            seeding=self.seeding,
        )
        return self._keep(g, points, weights)

    def heads(
        self,
        points: Tensor,
        weights: Tensor,
        widths: Sequence[int],
        heads: int,
        head_dim: int,
        where: str,
    ) -> Grouping:
        """Group an attention space's neurons with heads kept whole (``heads`` fused heads of
        ``head_dim`` neurons); the grouping keeps ``weights`` like :meth:`neurons`."""
        if self.kind == "hungarian":
            self._check_pair(widths, heads * head_dim, where)
            c = widths[0]
            g = hungarian_heads(points[:c], points[c:], heads, weights[:c], weights[c:])
            return replace(g, weights=weights)
        g = kmeans_heads(
            points,
            self._clustered(weights),
            head_dim,
            heads,
            n_init=self.n_init,
            max_iter=self.max_iter,
            seed=self.seed,
            first_centres=range(widths[0] // head_dim)[:heads],
        )
        return self._keep(g, points, weights)
