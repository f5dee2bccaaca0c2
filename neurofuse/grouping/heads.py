"""Grouping neurons that come in attention heads: heads are the units.

An attention layer's query, key and value dimensions live in heads of ``h`` dimensions each;
a head computes ``softmax(q k^T) v`` from its own dimensions only, so a fused head must be made
of whole base heads, their dimensions matched one to one. The groupings here keep that
structure: every group takes the same-numbered dimension of its heads after each head's
dimensions are put in the group's order.

- :func:`block_assignment`: the best one-to-one matching of two spaces of ``H`` heads that
  maps heads onto heads: for every pair of heads the best matching of their dimensions
  (``H^2`` assignments of size ``h``), then the best matching of heads on those totals. It is
  optimal among head-preserving matchings, since their cost is a sum over matched head pairs.
- :func:`hungarian_heads`: Hungarian Fusion's pairing with that structure.
- :func:`kmeans_heads`: K-means Fusion's grouping with heads as points: Lloyd's algorithm in
  which the distance of a head to a centre head is the cost of the best matching of their
  dimensions, and the centre is the weighted mean of its heads, each aligned to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from neurofuse.grouping._base import (
    Grouping,
    _centroids,
    _check_points,
    _check_weights,
    _make_generator,
    restarts,
)
from neurofuse.grouping.hungarian import _pairwise_sq_dists


def block_assignment(score: Tensor, heads: int, maximize: bool = False) -> Tensor:
    """Head-preserving one-to-one matching of the rows of ``score`` to its columns.

    .. math:: \\min_{\\sigma \\in S_H,\\ \\pi_1..\\pi_H \\in S_h}
              \\sum_{a=1}^{H} \\sum_{d=1}^{h} S[(a, d), (\\sigma(a), \\pi_a(d))]

    (or the maximum). Rows and columns are ``H`` blocks of ``h`` consecutive indices.

    Returns:
        ``p`` (``(H h,)`` int64): row ``i`` is matched to column ``p[i]``; ``p`` maps every
        row block onto one column block.
    """
    n = score.shape[0]
    if score.shape != (n, n) or heads < 1 or n % heads:
        raise ValueError(f"score must be square with a multiple of heads={heads} rows")
    h = n // heads
    s = score.detach().to(torch.float64).cpu().numpy()
    blocks = s.reshape(heads, h, heads, h).transpose(0, 2, 1, 3)
    total = np.empty((heads, heads))
    inner: dict[tuple[int, int], np.ndarray] = {}
    for a in range(heads):
        for b in range(heads):
            rows, cols = linear_sum_assignment(blocks[a, b], maximize=maximize)
            total[a, b] = blocks[a, b][rows, cols].sum()
            inner[a, b] = cols
    rows, cols = linear_sum_assignment(total, maximize=maximize)
    p = np.empty(n, dtype=np.int64)
    for a, b in zip(rows, cols, strict=True):
        p[a * h : (a + 1) * h] = b * h + inner[a, b]
    return torch.as_tensor(p)


def _pair_cost(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """``s_i t_j / (s_i + t_j) ||a_i - b_j||^2``: the weighted k-means cost of the pair."""
    pair = wa[:, None] * wb[None, :] / (wa[:, None] + wb[None, :])
    return torch.nan_to_num(pair, nan=0.0) * _pairwise_sq_dists(a, b)


def hungarian_heads(
    points_a: Tensor,
    points_b: Tensor,
    heads: int,
    weights_a: Tensor | None = None,
    weights_b: Tensor | None = None,
) -> Grouping:
    """Hungarian Fusion's pairing of two equal attention spaces, heads kept whole.

    Like :func:`neurofuse.grouping.hungarian_matching` (groups are pairs ``{a_i, b_p(i)}``,
    fused neuron ``i`` in A's order) with ``p`` restricted to head-preserving matchings
    (:func:`block_assignment` on the pair costs).
    """
    a = _check_points(points_a, "points_a")
    b = _check_points(points_b, "points_b")
    d = a.shape[0]
    if b.shape != a.shape:
        raise ValueError(f"points_a {tuple(a.shape)} and points_b {tuple(b.shape)} differ")
    wa = _check_weights(weights_a, d, a.device, "weights_a", positive_total=False)
    wb = _check_weights(weights_b, d, a.device, "weights_b", positive_total=False)
    with torch.no_grad():
        match = block_assignment(_pair_cost(a, b, wa, wb), heads).to(a.device)
        labels_b = torch.empty(d, dtype=torch.long, device=a.device)
        labels_b[match] = torch.arange(d, device=a.device)
        labels = torch.cat([torch.arange(d, device=a.device), labels_b])
        w = torch.cat([wa, wb])
        points = torch.cat([a, b])
        centroids = _centroids(points, w, labels, d)
        cost = float((w * (points.to(torch.float64) - centroids[labels]).square().sum(1)).sum())
    return Grouping(labels=labels, centroids=centroids, cost=cost, k=d, weights=w)


def _head_to_centre(dist: Tensor, w: Tensor, h: int) -> tuple[float, np.ndarray]:
    """Best matching of one head's dimensions (rows of ``dist``) to a centre's: cost, cols."""
    cost = (w[:, None] * dist).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum()), cols


def kmeans_heads(
    points: Tensor,
    weights: Tensor | None,
    head_dim: int,
    k_heads: int,
    *,
    n_init: int | str = "auto",
    max_iter: int = 50,
    seed: int = 0,
    first_centres: Sequence[int] | None = None,
) -> Grouping:
    """Importance-weighted k-means over attention heads.

    .. math:: \\min \\sum_{\\text{heads } i} \\min_{\\pi_i \\in S_h}
              \\sum_{d=1}^{h} s_{i,d} \\|z_{i,d} - c_{l_i, \\pi_i(d)}\\|^2

    over head labels ``l``, dimension matchings ``pi`` and centre heads ``c`` (each centre
    dimension the weighted mean of the dimensions matched to it). Lloyd's algorithm from
    k-means++ seeds drawn with the matched distances; the best of ``n_init`` restarts.

    Args:
        points: ``(n_heads * head_dim, D)``: every base head's dimensions, head after head.
        weights: per neuron, or None for uniform.
        head_dim: dimensions per head (equal across models).
        k_heads: heads of the fused layer.
        first_centres: heads to start one restart from (e.g. the heads of the model whose
            weights the fused layer resembles), completed by k-means++ if fewer than
            ``k_heads``; the other restarts use k-means++.

    Returns:
        A :class:`Grouping` of the neurons into ``k_heads * head_dim`` groups: group
        ``j * head_dim + e`` holds dimension ``e`` of fused head ``j``.
    """
    device = points.device
    # a few hundred heads at most: the assignments run in scipy, so the work stays on the CPU
    z = _check_points(points).detach().to("cpu", torch.float64)
    n = z.shape[0]
    if head_dim < 1 or n % head_dim:
        raise ValueError(f"{n} neurons are not whole heads of {head_dim} dimensions")
    n_heads = n // head_dim
    if not 1 <= k_heads <= n_heads:
        raise ValueError(f"k_heads={k_heads} must be between 1 and the {n_heads} base heads")
    w = _check_weights(weights, n, z.device).to(torch.float64).cpu()
    gen = _make_generator(seed, None, torch.device("cpu"))
    heads_z = z.reshape(n_heads, head_dim, -1)
    heads_w = w.reshape(n_heads, head_dim)
    best: tuple[float, Tensor] | None = None
    for run in range(restarts(n_init, k_heads, n_heads)):
        start = list(first_centres)[:k_heads] if run == 0 and first_centres is not None else []
        centres = _seed(heads_z, heads_w, k_heads, gen, start)
        cost, labels = _lloyd(heads_z, heads_w, centres, int(max_iter))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, labels)
    assert best is not None
    cost, labels = best
    centroids = _centroids(z, w, labels, k_heads * head_dim).to(device, points.dtype)
    return Grouping(labels.to(device), centroids, cost, k_heads * head_dim, weights=w.to(device))


def _distances(heads_z: Tensor, centre: Tensor) -> Tensor:
    """``(n_heads, h, h)``: squared distance of every head dimension to every centre one."""
    diff = heads_z[:, :, None, :] - centre[None, None, :, :]
    return diff.square().sum(-1)


def _seed(
    heads_z: Tensor, heads_w: Tensor, k: int, gen: torch.Generator, start: Sequence[int] = ()
) -> Tensor:
    """k-means++ over heads (matched distances), continuing from the heads ``start``."""
    n_heads, h, _ = heads_z.shape
    mass = heads_w.sum(1)
    if start:
        centres = [heads_z[i] for i in start]
    else:
        centres = [heads_z[int(torch.multinomial(mass / mass.sum(), 1, generator=gen))]]
    best = torch.full((n_heads,), float("inf"), dtype=torch.float64)
    for centre in centres[:-1]:
        dist = _distances(heads_z, centre)
        for i in range(n_heads):
            best[i] = min(float(best[i]), _head_to_centre(dist[i], heads_w[i], h)[0])
    while len(centres) < k:
        dist = _distances(heads_z, centres[-1])
        for i in range(n_heads):
            best[i] = min(float(best[i]), _head_to_centre(dist[i], heads_w[i], h)[0])
        p = best.clamp_min(0)
        if float(p.sum()) <= 0:  # every head is at a centre already: any unused one
            chosen = int(torch.randint(n_heads, (1,), generator=gen))
        else:
            chosen = int(torch.multinomial(p / p.sum(), 1, generator=gen))
        centres.append(heads_z[chosen])
    return torch.stack(centres).clone()


def _lloyd(
    heads_z: Tensor, heads_w: Tensor, centres: Tensor, max_iter: int
) -> tuple[float, Tensor]:
    """Lloyd's iterations over heads; returns the cost and the per-neuron group labels."""
    n_heads, h, _ = heads_z.shape
    k = centres.shape[0]
    prev: Tensor | None = None
    cost = float("inf")
    for _ in range(max(1, max_iter)):
        costs = torch.empty(n_heads, k, dtype=torch.float64)
        cols: dict[tuple[int, int], np.ndarray] = {}
        for j in range(k):
            dist = _distances(heads_z, centres[j])
            for i in range(n_heads):
                costs[i, j], cols[i, j] = _head_to_centre(dist[i], heads_w[i], h)
        head_label = costs.argmin(1)
        for j in range(k):  # an empty centre takes the worst-served head
            if not bool((head_label == j).any()):
                served = costs[torch.arange(n_heads), head_label].clone()
                counts = torch.bincount(head_label, minlength=k)
                served[counts[head_label] <= 1] = -1.0
                head_label[int(served.argmax())] = j
        labels = torch.empty(n_heads * h, dtype=torch.long)
        for i in range(n_heads):
            j = int(head_label[i])
            labels[i * h : (i + 1) * h] = j * h + torch.as_tensor(cols[i, j])
        cost = float(costs[torch.arange(n_heads), head_label].sum())
        flat_w = heads_w.reshape(-1)
        centres = _centroids(heads_z.reshape(n_heads * h, -1), flat_w, labels, k * h).reshape(
            k, h, -1
        )
        if prev is not None and torch.equal(prev, labels):
            break
        prev = labels
    return cost, prev if prev is not None else labels
