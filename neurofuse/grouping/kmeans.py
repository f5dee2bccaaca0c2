"""Importance-weighted k-means (Lloyd from the seeds of :mod:`.seeding`, restarts,
empty-cluster repair, swap local search)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from neurofuse.grouping._base import (
    _DEFAULT_CANDIDATES,
    _DEFAULT_MAX_SWAPS,
    _DEFAULT_SWAP_EPS,
    _MATMUL_ELEMENTS,
    Grouping,
    _centroids,
    _check_k,
    _check_labels,
    _check_points,
    _check_weights,
    _make_generator,
    restarts,
)
from neurofuse.grouping._workspace import (
    _dists,
    _dists_to_points,
    _fit,
    _Workspace,
    _workspace,
    point_costs,
)
from neurofuse.grouping.seeding import _INITS, _sample

# --------------------------------------------------------------------------------------------
# Lloyd iterations


def _assign(
    ws: _Workspace, centres: Tensor, labels: Tensor | None = None, moved: Tensor | None = None
) -> Tensor:
    """Nearest-centre labels ``(n,)`` for centres ``(k, p)``.

    Given current ``labels``, a point moves only when another centre is closer by more than
    the rounding error of the distance expansion: ties never shuffle points between equal
    centres (duplicates), and rounding cannot raise the objective. ``moved`` ``(k,)`` marks
    the centres that changed since ``labels`` were last assigned: a point whose own centre did
    not move can only be won by a moved centre, so only those distances are computed for it.
    """
    k = centres.shape[0]
    c = centres.to(ws.mm.dtype)
    csq = c.square().sum(1)
    n = ws.mm.shape[0]
    step = max(1, _MATMUL_ELEMENTS // k)
    if labels is None:
        out = torch.empty(n, dtype=torch.long, device=ws.mm.device)
        for s in range(0, n, step):
            out[s : s + step] = _dists(ws.mm[s : s + step], ws.sq[s : s + step], c, csq).argmin(1)
        return out
    out = labels.clone()
    # rows per block: the block's distances (k) and its three (rows, p) temporaries within
    # _MATMUL_ELEMENTS, so memory stays bounded however many points there are
    step = max(1, _MATMUL_ELEMENTS // (k + 3 * c.shape[1]))
    moved = torch.ones(k, dtype=torch.bool, device=c.device) if moved is None else moved
    own = moved[labels]
    eps = torch.finfo(ws.mm.dtype).eps
    for rows, cols in (
        (own.nonzero().flatten(), None),
        ((~own).nonzero().flatten(), moved.nonzero().flatten()),
    ):
        if rows.numel() == 0 or (cols is not None and cols.numel() == 0):
            continue
        cand, cand_sq = (c, csq) if cols is None else (c[cols], csq[cols])
        for block in rows.split(step):
            y, ysq, cur = ws.mm[block], ws.sq[block], labels[block]
            best_d, best = _dists(y, ysq, cand, cand_sq).min(1)
            if cols is not None:
                best = cols[best]
            cur_d = (ysq - 2.0 * (y * c[cur]).sum(1) + csq[cur]).clamp_min_(0)
            margin = 8 * eps * (ysq + csq[cur])
            out[block] = torch.where(best_d < cur_d - margin, best, cur)
    return out


def _repair_empty(ws: _Workspace, labels: Tensor, centres: Tensor, k: int) -> Tensor:
    """Give every empty cluster the point that contributes most to the cost.

    For each empty cluster, the point with the largest ``s_j ||z_j - c_{l_j}||^2`` among
    clusters that keep at least one member moves there (it becomes a singleton whose centroid
    is the point itself, so the cost cannot rise). Requires ``k <= n``.
    """
    counts = torch.bincount(labels, minlength=k)
    if bool((counts > 0).all()):
        return labels
    labels = labels.clone()
    gain = ws.w * point_costs(ws, labels, centres)
    gain = torch.where(counts[labels] > 1, gain, -math.inf)
    for e in (counts == 0).nonzero().flatten().tolist():
        j = int(gain.argmax())
        a = int(labels[j])
        labels[j] = e
        counts[a] -= 1
        counts[e] += 1
        gain[j] = -math.inf
        if int(counts[a]) == 1:
            gain[labels == a] = -math.inf
    return labels


def _lloyd(
    ws: _Workspace, seeds: Tensor, k: int, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, float, list[float]]:
    """Weighted Lloyd from ``seeds`` ``(k, p)``: labels, centres, cost and cost history.

    Each iteration assigns points to their nearest centre, repairs empty clusters and moves
    centres to the weighted means; each step can only lower ``sum_j s_j ||z_j - c_{l_j}||^2``.
    Stops when the labels no longer change, when the relative decrease is at most ``tol``, or
    when rounding would make the cost rise (that step is then discarded).
    """
    labels = _repair_empty(ws, _assign(ws, seeds), seeds, k)
    centres, cost = _fit(ws, labels, k)
    moved = (centres != seeds).any(1)
    history = [cost]
    for _ in range(max_iter):
        new_labels = _repair_empty(ws, _assign(ws, centres, labels, moved), centres, k)
        if torch.equal(new_labels, labels):
            break
        new_centres, new_cost = _fit(ws, new_labels, k)
        if new_cost > cost:
            break
        moved = (new_centres != centres).any(1)
        converged = cost - new_cost <= tol * cost
        labels, centres, cost = new_labels, new_centres, new_cost
        history.append(cost)
        if converged:
            break
    return labels, centres, cost, history


# --------------------------------------------------------------------------------------------
# Local search (swaps)


def _singletons(points: Tensor, w: Tensor) -> Grouping:
    n = points.shape[0]
    labels = torch.arange(n, device=points.device)
    return Grouping(labels, points.clone(), 0.0, n, weights=w, history=[0.0])


def weighted_kmeans(
    points: Tensor,
    weights: Tensor | None,
    k: int,
    *,
    n_init: int | str = "auto",
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    init: str = "k-means++",
    local_search: bool | int = False,
    generator: torch.Generator | None = None,
    init_labels: Sequence[Tensor] = (),
) -> Grouping:
    """Importance-weighted k-means (K-means Fusion's grouping).

    Solves, approximately (the problem is NP-hard),

    .. math:: \\min_{l \\in [k]^n,\\ c \\in \\mathbb{R}^{k \\times D}}
              \\sum_{j=1}^{n} s_j \\|z_j - c_{l_j}\\|^2

    by Lloyd's algorithm (Lloyd 1982) from greedy weighted k-means++ seeds (Arthur &
    Vassilvitskii 2007), keeping the best of ``n_init`` restarts. For fixed labels the best
    ``c_i`` is the weighted centroid of group ``i``: the targets ``T`` of the paper (appendix
    B.1). Empty clusters are repaired by moving the point with the largest weighted distance
    into them, so all ``k`` groups are non-empty whenever ``k <= n``, duplicates included.
    When ``D >= 2n`` the work runs on isometric ``n``-dimensional Gram coordinates of the
    points (exact distances at the price of one ``n^2 D`` product).

    Args:
        points: ``(n, D)`` floating point, one row per neuron (any device).
        weights: ``(n,)`` non-negative importance scores with a positive sum; None = uniform.
        k: number of groups, ``1 <= k <= n``; ``k == n`` gives singletons (cost 0).
        n_init: independent seedings (drawn as one batch); the lowest final cost wins.
            ``"auto"``: 4 up to 512 groups, fewer beyond (:data:`AUTO_RESTARTS_K`) and
            fewer for many points (:data:`AUTO_RESTARTS_WORK`).
        max_iter: Lloyd iterations per restart.
        tol: stop when the cost falls by at most ``tol`` relative to the previous iteration.
        seed: seed of a local ``torch.Generator`` (the global RNG is never used).
        init: seeding, one of ``"k-means++"``, ``"random"`` (distinct points ``∝ s_j``).
        local_search: True, or a maximum number of swaps, refines the winner with the swap
            heuristic of :func:`local_search_kmeans`.
        generator: draw from this generator (on the points' device) instead of ``seed``.
        init_labels: partitions (``(n,)`` labels in ``[0, k)``) to start Lloyd from as well,
            one restart each, e.g. :func:`matching_labels`; with them ``n_init`` may be 0 (no
            seeded restart).

    Returns:
        A :class:`Grouping`. ``cost`` is evaluated in float64 in the working coordinates;
        ``history`` is the non-increasing cost trajectory of the winning restart, then the
        cost after each accepted swap.

    Example:
        >>> g = weighted_kmeans(torch.randn(100, 20), torch.rand(100), 10, seed=0)
        >>> g.centroids.shape
        torch.Size([10, 20])
    """
    points = _check_points(points)
    n = points.shape[0]
    k = _check_k(k, n)
    n_init = restarts(n_init, k, n)
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}")
    if isinstance(n_init, bool) or int(n_init) < (0 if init_labels else 1):
        raise ValueError(f"n_init must be a positive number of restarts; got {n_init}")
    if int(max_iter) < 0 or not tol >= 0:
        raise ValueError(
            f"max_iter and tol must be non-negative; got max_iter={max_iter}, tol={tol}"
        )
    if int(local_search) < 0:
        raise ValueError(
            f"local_search must be True/False or a number of swaps >= 0; got {local_search}"
        )
    w = _check_weights(weights, n, points.device)
    if k == n:
        return _singletons(points, w)
    gen = _make_generator(seed, generator, points.device)
    with torch.no_grad():
        ws = _workspace(points, w)
        starts = [_fit(ws, _check_labels(lab, n, k, points.device), k)[0] for lab in init_labels]
        if int(n_init) > 0:
            starts += list(_INITS[init](ws, k, int(n_init), gen))
        runs = [_lloyd(ws, s, k, int(max_iter), float(tol)) for s in starts]
        labels, _, cost, history = min(runs, key=lambda run: run[2])
        if int(local_search) > 0:
            max_swaps = _DEFAULT_MAX_SWAPS if local_search is True else int(local_search)
            labels, cost, more = _swap_search(
                ws,
                labels,
                k,
                max_swaps=max_swaps,
                eps=_DEFAULT_SWAP_EPS,
                n_candidates=_DEFAULT_CANDIDATES,
                gen=gen,
                max_iter=int(max_iter),
                tol=float(tol),
            )
            history = history + more
        centroids = _centroids(points, w, labels, k)
    seeding = "+".join((["matching"] if init_labels else []) + ([init] if int(n_init) > 0 else []))
    return Grouping(labels, centroids, cost, k, weights=w, history=history, seeding=seeding)


def _nearest_two(ws: _Workspace, centres: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Squared distance to the nearest centre, its index, and to the second nearest (float64)."""
    n, k = ws.mm.shape[0], centres.shape[0]
    c = centres.to(ws.mm.dtype)
    csq = c.square().sum(1)
    d1 = torch.empty(n, dtype=torch.float64, device=c.device)
    d2 = torch.full_like(d1, math.inf)
    a1 = torch.empty(n, dtype=torch.long, device=c.device)
    step = max(1, _MATMUL_ELEMENTS // k)
    for s in range(0, n, step):
        rows = slice(s, s + step)
        top = _dists(ws.mm[rows], ws.sq[rows], c, csq).topk(min(2, k), dim=1, largest=False)
        d1[rows], a1[rows] = top.values[:, 0].to(torch.float64), top.indices[:, 0]
        if k > 1:
            d2[rows] = top.values[:, 1].to(torch.float64)
    return d1, a1, d2


def _swap_search(
    ws: _Workspace,
    labels: Tensor,
    k: int,
    *,
    max_swaps: int,
    eps: float,
    n_candidates: int,
    gen: torch.Generator,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, float, list[float]]:
    """Single-swap local search with Lloyd after each accepted swap (Kanungo et al. 2002).

    Each round prices, for every centre ``i`` and candidate point ``q`` at once, the cost of
    replacing ``c_i`` by ``z_q`` (every point keeps its nearest remaining centre)::

        cost(i, q) = sum_j s_j min(d1_j, dq_j)
                     + sum_{j: a_j = i} s_j [min(d2_j, dq_j) - min(d1_j, dq_j)]

    with ``d1, d2`` the squared distances to the nearest and second-nearest centres and ``a_j``
    the nearest. The best swap is taken if it lowers the cost by a factor ``(1 - eps/k)``,
    then Lloyd runs from the new centres; its result is kept only if its cost is lower.
    Candidates: every point when ``n <= n_candidates``, otherwise ``n_candidates`` points
    drawn ``∝ s_j d1_j``. Stops at a round without an improving swap or after ``max_swaps``.
    Returns the labels, their cost and the cost after each accepted swap.
    """
    centres, cost = _fit(ws, labels, k)
    history: list[float] = []
    n = ws.mm.shape[0]
    for _ in range(max_swaps):
        d1, a1, d2 = _nearest_two(ws, centres)
        current = float((ws.w * d1).sum())
        if n <= n_candidates:
            cand = torch.arange(n, device=ws.mm.device)
        else:
            cand = _sample((ws.w * d1)[None], n_candidates, gen)[0].unique()
        dq = _dists_to_points(ws, cand).T  # (n, m)
        near = torch.minimum(d1[:, None], dq)
        delta = torch.zeros(k, cand.numel(), dtype=torch.float64, device=dq.device)
        delta.index_add_(0, a1, ws.w[:, None] * (torch.minimum(d2[:, None], dq) - near))
        swap = (ws.w @ near)[None, :] + delta
        i, q = divmod(int(swap.argmin()), cand.numel())
        if not float(swap[i, q]) < (1.0 - eps / k) * current:
            break
        trial = centres.clone()
        trial[i] = ws.acc[cand[q]]
        new_labels, new_centres, new_cost, _ = _lloyd(ws, trial, k, max_iter, tol)
        if not new_cost < cost:
            break
        labels, centres, cost = new_labels, new_centres, new_cost
        history.append(cost)
    return labels, cost, history
