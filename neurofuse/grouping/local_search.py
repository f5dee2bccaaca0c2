"""Swap local search for weighted k-means (Kanungo et al. 2002)."""

from __future__ import annotations

import torch
from torch import Tensor

from neurofuse.grouping._base import (
    _DEFAULT_CANDIDATES,
    _DEFAULT_MAX_SWAPS,
    _DEFAULT_SWAP_EPS,
    Grouping,
    _centroids,
    _check_k,
    _check_labels,
    _check_points,
    _check_weights,
    _make_generator,
)
from neurofuse.grouping._workspace import (
    _fit,
    _workspace,
)
from neurofuse.grouping.kmeans import (
    _repair_empty,
    _singletons,
    _swap_search,
    weighted_kmeans,
)


def local_search_kmeans(
    points: Tensor,
    weights: Tensor | None,
    k: int,
    grouping: Grouping | None = None,
    *,
    max_swaps: int = _DEFAULT_MAX_SWAPS,
    eps: float = _DEFAULT_SWAP_EPS,
    n_candidates: int = _DEFAULT_CANDIDATES,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> Grouping:
    """Swap-based local search for weighted k-means (Kanungo et al. 2002, "hybrid" variant).

    Minimises the objective of :func:`weighted_kmeans`. From a starting solution (default:
    :func:`weighted_kmeans` with the same seed) it repeatedly swaps one centre for a data
    point when that lowers the cost by a factor ``(1 - eps/k)`` or more, then runs Lloyd from
    the swapped centres; it stops at a solution that no single swap improves (among the
    candidates tried) or after ``max_swaps`` accepted swaps. The returned cost is never above
    that of the starting labels with their weighted centroids.

    Guarantee (Kanungo, Mount, Netanyahu, Piatko, Silverman, Wu: "A local search
    approximation algorithm for k-means clustering", SoCG 2002 / CGTA 2004): with centres
    restricted to a candidate set, a solution stable under swaps of ``p`` centres costs at
    most ``(3 + 2/p)^2 + eps`` times the optimum: ``25 + eps`` for single swaps, tending to
    the ``9 + eps`` quoted by the paper's Theorem 2(b) as ``p`` grows. This implementation
    swaps one centre at a time and keeps Lloyd's centroids as the other centres, which is in
    practice at least as good as the discrete search; its formal factor is the single-swap one.

    Args:
        points: ``(n, D)``; weights: ``(n,)`` or None for uniform; k: number of groups.
        grouping: starting solution over the same points (its labels are used).
        max_swaps: maximum number of accepted swaps.
        eps: a swap must lower the cost by the factor ``1 - eps/k``.
        n_candidates: candidate points per round (all points when there are not more).
        max_iter, tol: Lloyd settings after each swap (and for the default start).
        seed, generator: randomness for candidate sampling and the default start.

    Returns:
        A :class:`Grouping` whose ``history`` starts with the starting cost, followed by the
        cost after each accepted swap.
    """
    points = _check_points(points)
    n = points.shape[0]
    k = _check_k(k, n)
    w = _check_weights(weights, n, points.device)
    if int(max_swaps) < 0 or not eps >= 0 or int(n_candidates) < 1:
        raise ValueError(
            "need max_swaps >= 0, eps >= 0 and n_candidates >= 1; got "
            f"max_swaps={max_swaps}, eps={eps}, n_candidates={n_candidates}"
        )
    gen = _make_generator(seed, generator, points.device)
    if grouping is None:
        grouping = weighted_kmeans(points, w, k, max_iter=max_iter, tol=tol, generator=gen)
    if grouping.k != k:
        raise ValueError(
            f"the starting grouping has k={grouping.k} but k={k} was asked; "
            f"pass a grouping with {k} groups or k={grouping.k}"
        )
    start = _check_labels(grouping.labels, n, k, points.device)
    if k == n:
        return _singletons(points, w)
    with torch.no_grad():
        ws = _workspace(points, w)
        start = _repair_empty(ws, start, _fit(ws, start, k)[0], k)
        start_cost = _fit(ws, start, k)[1]
        labels, cost, history = _swap_search(
            ws,
            start,
            k,
            max_swaps=int(max_swaps),
            eps=float(eps),
            n_candidates=int(n_candidates),
            gen=gen,
            max_iter=int(max_iter),
            tol=float(tol),
        )
        centroids = _centroids(points, w, labels, k)
    return Grouping(labels, centroids, cost, k, weights=w, history=[start_cost, *history])
