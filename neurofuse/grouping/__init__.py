"""Grouping: partition base-model neurons into fused neurons (the grouping error of Theorem 1).

At one level, the ``d_M = sum_k d_k`` neurons of the base models are points ``z_j`` in ``R^D``
(their outputs over the fusion samples, or their coordinates in a projected space of dimension
``p``) with importance weights ``s_j >= 0``. Grouping chooses a partition ``R_1 .. R_K`` of the
neurons (one group per fused neuron) that minimises the grouping error of Theorem 1 (eq. 2 of
the neuron-interpolation fusion paper, appendix B.1)::

    min_R  sum_i sum_{j in R_i} s_j ||z_j - T_i||^2,     T_i = sum_{j in R_i} s_j z_j / sum_{j in R_i} s_j

The targets ``T_i`` are the importance-weighted centroids. Two solvers:

- weighted k-means (K-means Fusion, KF): Lloyd's algorithm with k-means++ seeding, optionally
  improved by swap-based local search (Kanungo et al. 2002);
- Hungarian matching (Hungarian Fusion, HF): for two models of equal width, groups are pairs
  and the problem is an exact linear assignment (Kuhn 1955).

Everything is a pure function on tensors: no knowledge of models, any device. Points may be
float32 on a GPU: distances use the ``||a||^2 - 2ab + ||b||^2`` expansion in blocked matmuls,
costs and centroids are accumulated in float64 where affordable. When ``D >= 2n`` (many
samples, few neurons) seeding and Lloyd run on exact ``n``-dimensional Gram coordinates, so
the ``D``-sized data is read only twice (Gram product, final centroids).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from neurofuse.grouping._base import (
    AUTO_RESTARTS,
    AUTO_RESTARTS_K,
    AUTO_RESTARTS_WORK,
    Grouping,
    _check_points,
    kmeans_cost,
    restarts,
    weighted_centroids,
)
from neurofuse.grouping.hungarian import (
    hungarian_matching,
)
from neurofuse.grouping.kmeans import (
    weighted_kmeans,
)
from neurofuse.grouping.local_search import (
    local_search_kmeans,
)
from neurofuse.grouping.seeding import matching_labels

SEEDINGS = ("k-means++", "matching", "both")


def _group_kmeans(
    points: Tensor,
    weights: Tensor | None,
    k: int,
    *,
    sizes: Sequence[int] | None = None,
    seeding: str = "k-means++",
    **options: Any,
) -> Grouping:
    """``seeding``: ``"k-means++"`` (``n_init`` restarts), ``"matching"`` (one start from
    :func:`matching_labels`, for models of equal width ``k``: about 10x faster at width 1024,
    but on trained models it converges to a 40% higher grouping error and 0.2-0.4 points less
    accuracy, ``benchmarks/results/kmeans_seeding.md``), or ``"both"`` (the better of all)."""
    if seeding not in SEEDINGS:
        raise ValueError(f"unknown seeding {seeding!r}; choose one of {', '.join(SEEDINGS)}")
    equal = sizes is not None and len(sizes) >= 2 and all(int(s) == k for s in sizes)
    if seeding in ("matching", "both") and not equal:
        raise ValueError(
            f"matching seeds need two or more models of width k={k} (got sizes {sizes}); "
            "use seeding='k-means++' or 'auto'"
        )
    if seeding in ("matching", "both"):
        assert sizes is not None
        options["init_labels"] = [matching_labels(points, sizes)]
        if seeding == "matching":
            options["n_init"] = 0
    return weighted_kmeans(points, weights, k, **options)


def _group_hungarian(
    points: Tensor,
    weights: Tensor | None,
    k: int,
    *,
    sizes: Sequence[int] | None = None,
    **options: Any,
) -> Grouping:
    neighbours = options.pop("neighbours", None)
    if options:
        raise TypeError(
            f"method='hungarian' takes only the option 'neighbours'; got {sorted(options)}"
        )
    if sizes is None or len(sizes) != 2:
        raise ValueError(
            "Hungarian matching (HF) needs two models of equal width: pass sizes=[d, d] "
            f"(got sizes={sizes}), or use method='kmeans' for any number of models."
        )
    d_a, d_b = (int(s) for s in sizes)
    if d_a != d_b:
        raise ValueError(
            f"Hungarian matching (HF) needs two models of equal width; got sizes {[d_a, d_b]}. "
            "Use the K-means method instead (method='kmeans')."
        )
    if k != d_a:
        raise ValueError(
            f"Hungarian matching fuses two width-{d_a} levels into width {d_a}, but k={k}; "
            f"set k={d_a} or use method='kmeans' for other fused widths."
        )
    w = None if weights is None else torch.as_tensor(weights)
    return hungarian_matching(
        points[:d_a],
        points[d_a:],
        None if w is None else w[:d_a],
        None if w is None else w[d_a:],
        neighbours=neighbours,
    )


GroupingMethod = Callable[..., Grouping]

GROUPING_METHODS: dict[str, GroupingMethod] = {
    "kmeans": _group_kmeans,
    "hungarian": _group_hungarian,
}
"""Grouping methods by name. Each is called as ``fn(points, weights, k, sizes=sizes, **options)``
and returns a :class:`Grouping`; add an entry to make a new method available to :func:`group`."""


def group(
    points: Tensor,
    weights: Tensor | None,
    k: int,
    *,
    method: str = "kmeans",
    sizes: Sequence[int] | None = None,
    **options: Any,
) -> Grouping:
    """Partition ``points`` (``(d_M, D)``, the base models' neurons stacked in model order) into
    ``k`` groups with the named method from :data:`GROUPING_METHODS`.

    ``sizes`` gives the number of neurons of each base model (``sum(sizes) == d_M``);
    ``method="hungarian"`` needs exactly two equal sizes and ``k`` equal to them. ``options``
    go to the method (e.g. ``seed``, ``n_init``, ``local_search`` for ``"kmeans"``;
    ``neighbours`` for ``"hungarian"``: :func:`hungarian_matching`).
    """
    if method not in GROUPING_METHODS:
        raise ValueError(
            f"unknown grouping method {method!r}; choose one of {sorted(GROUPING_METHODS)}"
        )
    points = _check_points(points)
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        if sum(sizes) != points.shape[0] or min(sizes, default=0) < 1:
            raise ValueError(
                f"sizes {sizes} must be positive and add up to the number of points "
                f"{points.shape[0]} (one entry per base model, in stacking order)"
            )
    return GROUPING_METHODS[method](points, weights, k, sizes=sizes, **options)


__all__ = [
    "AUTO_RESTARTS",
    "AUTO_RESTARTS_K",
    "AUTO_RESTARTS_WORK",
    "GROUPING_METHODS",
    "Grouping",
    "group",
    "hungarian_matching",
    "kmeans_cost",
    "local_search_kmeans",
    "matching_labels",
    "restarts",
    "weighted_centroids",
    "weighted_kmeans",
]
