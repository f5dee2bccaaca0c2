"""Hungarian pairing of two equal-width models' neurons (the grouping of Hungarian Fusion)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

from neurofuse.grouping._base import (
    _MATMUL_ELEMENTS,
    Grouping,
    _check_points,
    _check_weights,
    _column_blocks,
)


def _pairwise_sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """``(n_a, n_b)`` float64 squared distances, column blocks centred on their common mean."""
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    na, nb = a.shape[0], b.shape[0]
    cross = torch.zeros(na, nb, dtype=torch.float64, device=a.device)
    sq_a = torch.zeros(na, dtype=torch.float64, device=a.device)
    sq_b = torch.zeros(nb, dtype=torch.float64, device=a.device)
    for cols in _column_blocks(na + nb, a.shape[1], _MATMUL_ELEMENTS):
        x, y = a[:, cols].to(dtype), b[:, cols].to(dtype)
        mean = (x.sum(0) + y.sum(0)) / (na + nb)
        x, y = x - mean, y - mean
        cross += (x @ y.T).to(torch.float64)
        sq_a += x.square().sum(1).to(torch.float64)
        sq_b += y.square().sum(1).to(torch.float64)
    return (sq_a[:, None] + sq_b[None, :] - 2.0 * cross).clamp_min_(0)


#: Candidates per neuron of the sparse matching (``matching="sparse"``): each neuron of either
#: model may be paired with its this-many cheapest partners of the other.
SPARSE_NEIGHBOURS = 128


def _nearest(cost: Tensor, k: int, dim: int) -> Tensor:
    """Indices of the ``k`` smallest entries of every row (``dim=1``) or column (``dim=0``),
    ``(n, k)``, found by row blocks so that no ``(n, n)`` index array is made."""
    n = cost.shape[0]
    step = max(1, (1 << 24) // n)
    out = torch.empty(n, k, dtype=torch.long)
    for lo in range(0, n, step):
        block = cost[lo : lo + step] if dim == 1 else cost[:, lo : lo + step].T
        out[lo : lo + step] = torch.topk(block, k, dim=1, largest=False).indices.cpu()
    return out


def assign_pairs(cost: Tensor, neighbours: int | None = None) -> Tensor:
    """The permutation ``p`` minimising ``sum_i cost[i, p[i]]`` of a square cost matrix.

    ``neighbours=None``: the exact linear assignment (``scipy.optimize.linear_sum_assignment``,
    cubic in the width: 12 s at 4096 on 2 CPU cores). ``neighbours=k``: the optimal assignment
    among the candidate pairs in which ``j`` is one of ``i``'s ``k`` cheapest partners or ``i``
    one of ``j``'s (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``, LAPJVsp on
    about ``2 k n`` edges): exact whenever the optimal pairs are all candidates; when the
    candidates admit no perfect matching, the exact assignment is solved instead.
    ``benchmarks/results/hungarian_sparse.md`` measures its cost and speed on wide MLPs."""
    if neighbours is not None and (isinstance(neighbours, bool) or not neighbours >= 1):
        raise ValueError(f"neighbours must be a positive number of candidates, got {neighbours}")
    cost = cost.detach().to(torch.float64)
    n = cost.shape[0]
    if neighbours is None or neighbours >= n - 1:
        _, cols = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(cols, dtype=torch.long)
    rows = torch.arange(n).repeat_interleave(neighbours)
    near_cols = _nearest(cost, neighbours, 1).reshape(-1)
    near_rows = _nearest(cost, neighbours, 0).reshape(-1)
    pairs = torch.unique(torch.cat([rows * n + near_cols, near_rows * n + rows.reshape(-1)]))
    i, j = (pairs // n).numpy(), (pairs % n).numpy()
    c = cost.cpu().numpy()
    # every weight shifted by one constant (the same total change for every full matching) so
    # that all are positive: a sparse matrix drops a zero weight as a missing edge; the shift
    # is the costs' own range, so that their differences keep float64 precision
    low, high = float(c.min()), float(c.max())
    weights = c[i, j] + ((high - low if high > low else 1.0) - low)
    graph = csr_matrix((weights, (i, j)), shape=(n, n))
    try:
        r, cols = min_weight_full_bipartite_matching(graph)
    except ValueError:  # the candidate pairs hold no perfect matching
        _, cols = linear_sum_assignment(c)
        return torch.as_tensor(cols, dtype=torch.long)
    p = np.empty(n, dtype=np.int64)
    p[r] = cols
    return torch.as_tensor(p)


def _pair_centroids(
    a: Tensor, b: Tensor, wa: Tensor, wb: Tensor, match: Tensor
) -> tuple[Tensor, Tensor]:
    """Weighted means of the pairs ``(a_i, b_match_i)`` and their cost, in one float64 pass."""
    wb = wb[match]
    d, dim = a.shape
    total = wa + wb
    ca = torch.where(total > 0, wa / torch.where(total > 0, total, 1.0), 0.5)
    cb = 1.0 - ca
    centroids = torch.empty(d, dim, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    per_pair = torch.zeros(d, 2, dtype=torch.float64, device=a.device)
    for cols in _column_blocks(2 * d, dim):
        x, y = a[:, cols].to(torch.float64), b[match, cols].to(torch.float64)
        c = ca[:, None] * x + cb[:, None] * y
        centroids[:, cols] = c.to(centroids.dtype)
        per_pair[:, 0] += (x - c).square_().sum(1)
        per_pair[:, 1] += (y - c).square_().sum(1)
    return centroids, (wa * per_pair[:, 0] + wb * per_pair[:, 1]).sum()


def hungarian_matching(
    points_a: Tensor,
    points_b: Tensor,
    weights_a: Tensor | None = None,
    weights_b: Tensor | None = None,
    neighbours: int | None = None,
) -> Grouping:
    """Optimal one-to-one matching of two equal-width levels (Hungarian Fusion's grouping).

    Each group is a pair ``{a_i, b_pi(i)}``; its weighted k-means cost is
    ``s_i t_j / (s_i + t_j) ||a_i - b_j||^2`` (``s``, ``t`` the weights of A and B), so the
    grouping error of Theorem 1 is minimised exactly by the linear assignment

    .. math:: \\min_{\\pi \\in S_d} \\sum_{i=1}^{d} \\frac{s_i t_{\\pi(i)}}{s_i + t_{\\pi(i)}} \\|a_i - b_{\\pi(i)}\\|^2

    solved with ``scipy.optimize.linear_sum_assignment`` (Kuhn 1955; Theorem 2(a) of the
    paper). With uniform weights this is the squared-distance matching.

    Args:
        points_a, points_b: ``(d, D)`` the two models' neurons, on one device.
        weights_a, weights_b: ``(d,)`` non-negative importance scores, or None for uniform.
        neighbours: ``None`` (default) for the exact assignment; ``k`` for the optimal one
            among each neuron's ``k`` cheapest partners (:func:`assign_pairs`: exact when the
            optimal pairs are among them, several times faster at widths of 4096 and more).

    Returns:
        A :class:`Grouping` over the concatenated points ``[A; B]`` (``2d`` labels): neuron
        ``i`` of A is in group ``i``, together with its match in B; centroids are the
        weighted pair means, ``weights`` the concatenated scores.
    """
    a = _check_points(points_a, "points_a")
    b = _check_points(points_b, "points_b")
    d = a.shape[0]
    if b.shape[0] != d:
        raise ValueError(
            f"Hungarian matching (HF) needs two models of equal width; got {d} and {b.shape[0]} "
            "neurons. Use the K-means method instead (method='kmeans'), which takes any number of "
            "models of any widths."
        )
    if b.shape[1] != a.shape[1] or b.device != a.device:
        raise ValueError(
            f"points_a {tuple(a.shape)} on {a.device} and points_b {tuple(b.shape)} on {b.device} "
            "must have the same feature dimension (the same fusion samples) and device"
        )
    wa = _check_weights(weights_a, d, a.device, "weights_a", positive_total=False)
    wb = _check_weights(weights_b, d, a.device, "weights_b", positive_total=False)
    w = torch.cat([wa, wb])
    if not float(w.sum()) > 0:
        raise ValueError(
            "weights_a and weights_b sum to zero; pass positive importance scores or None"
        )
    with torch.no_grad():
        pair = wa[:, None] * wb[None, :] / (wa[:, None] + wb[None, :])
        cost_matrix = torch.nan_to_num(pair, nan=0.0) * _pairwise_sq_dists(a, b)
        match = assign_pairs(cost_matrix, neighbours).to(a.device)
        labels_b = torch.empty(d, dtype=torch.long, device=a.device)
        labels_b[match] = torch.arange(d, device=a.device)
        centroids, cost = _pair_centroids(a, b, wa, wb, match)
    labels = torch.cat([torch.arange(d, device=a.device), labels_b])
    return Grouping(labels=labels, centroids=centroids, cost=float(cost), k=d, weights=w)
