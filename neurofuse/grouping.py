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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "GROUPING_METHODS",
    "Grouping",
    "group",
    "hungarian_matching",
    "kmeans_cost",
    "local_search_kmeans",
    "weighted_centroids",
    "weighted_kmeans",
]

_BLOCK_ELEMENTS = 1 << 18  # elementwise temporaries: 2 MiB in float64, cache-friendly
_MATMUL_ELEMENTS = 1 << 22  # operands/results of blocked matmuls
_FLOAT64_COORDS_MAX = 1 << 25  # keep working coordinates in float64 up to this many elements
_FLOAT64_CENTROIDS_MAX = 1 << 22  # sum output-space centroids in float64 up to this size
_GRAM_MAX_POINTS = 4096  # beyond this an n x n eigendecomposition costs more than it saves
_GRAM_ROWS = 128  # row-block size of the symmetric Gram product
_DEFAULT_MAX_SWAPS = 100
_DEFAULT_SWAP_EPS = 1e-2
_DEFAULT_CANDIDATES = 512


@dataclass(eq=False)
class Grouping:
    """A partition of ``d_M`` base neurons into ``k`` groups, with the groups' targets.

    Attributes:
        labels: ``(d_M,)`` int64 in ``[0, k)``: the group of each base neuron.
        centroids: ``(k, D)`` importance-weighted means of the groups' members, the targets
            ``T_i = sum_{j in R_i} s_j z_j / sum_{j in R_i} s_j`` (dtype of the points).
        cost: the grouping error ``sum_j s_j ||z_j - T_{labels_j}||^2``.
        k: the number of groups.
        weights: ``(d_M,)`` float64 importance weights the grouping was computed with
            (``None`` when unknown, read as uniform).
        history: the cost after each Lloyd iteration (and after each accepted local-search
            swap) of the returned solution; never increasing. Empty for Hungarian matching.
    """

    labels: Tensor
    centroids: Tensor
    cost: float
    k: int
    weights: Tensor | None = None
    history: list[float] = field(default_factory=list)

    def members(self, i: int) -> Tensor:
        """Indices (int64, ascending) of the base neurons in group ``i``."""
        if not 0 <= int(i) < self.k:
            raise IndexError(f"group index {i} out of range; valid groups are 0..{self.k - 1}")
        return torch.nonzero(self.labels == int(i)).flatten()

    def assignment_matrix(self, weights: Tensor | None = None) -> Tensor:
        """The ``(k, d_M)`` matrix ``A`` with ``A @ Z = T`` (targets from base outputs).

        ``A[i, j] = s_j / sum_{l in R_i} s_l`` when ``labels_j = i`` and 0 otherwise, so each
        row is a convex combination of its group's members. A group whose members all have
        zero weight gets uniform coefficients ``1 / |R_i|``. ``weights`` defaults to the
        grouping's own weights (uniform when it has none). Dtype and device of ``centroids``.
        """
        n = self.labels.shape[0]
        device = self.labels.device
        if weights is None:
            weights = self.weights
        w = _check_weights(weights, n, device)
        coef = _member_coefficients(w, self.labels, self.k)
        a = torch.zeros(self.k, n, dtype=self.centroids.dtype, device=device)
        a[self.labels, torch.arange(n, device=device)] = coef.to(a.dtype)
        return a


# --------------------------------------------------------------------------------------------
# Input checks


def _check_points(points: Tensor, name: str = "points") -> Tensor:
    if not isinstance(points, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (n_points, D); got {type(points).__name__}"
        )
    if points.dim() != 2:
        raise ValueError(
            f"{name} must have shape (n_points, D), one row per neuron; got shape "
            f"{tuple(points.shape)}. Move the neuron axis first and flatten the rest, "
            "e.g. z.movedim(axis, 0).reshape(n, -1)."
        )
    if not points.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor; got {points.dtype}. Use .float()."
        )
    if points.shape[0] == 0:
        raise ValueError(f"{name} has no rows; grouping needs at least one neuron")
    # one cheap reduction flags NaN/inf; the exact elementwise test runs only when it fires
    suspicious = not bool(torch.isfinite(torch.linalg.vector_norm(points.detach())))
    if suspicious and not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} contains NaN or inf; check the level outputs that produced them")
    return points.detach()


def _check_weights(
    weights: Tensor | Sequence[float] | None,
    n: int,
    device: torch.device,
    name: str = "weights",
    positive_total: bool = True,
) -> Tensor:
    """Validated float64 copy-or-view of ``weights`` on ``device`` (uniform ones when None)."""
    if weights is None:
        return torch.ones(n, dtype=torch.float64, device=device)
    w = torch.as_tensor(weights).detach()
    if w.dim() != 1 or w.shape[0] != n:
        raise ValueError(
            f"{name} must have shape ({n},), one importance score per point; got shape "
            f"{tuple(w.shape)}. Pass weights=None for uniform weights."
        )
    w = w.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contain NaN or inf; importance scores must be finite numbers")
    if bool((w < 0).any()):
        raise ValueError(
            f"{name} must be non-negative importance scores; got a minimum of {float(w.min()):.4g}. "
            "Use absolute values or clamp them, e.g. scores.abs() or scores.clamp_min(0)."
        )
    if positive_total and not float(w.sum()) > 0:
        raise ValueError(
            f"{name} sum to zero; at least one point needs a positive importance score "
            "(pass weights=None for uniform weights)."
        )
    return w


def _check_k(k: int, n: int | None) -> int:
    """``k`` as an int in ``[1, n]`` (``n=None``: any positive k, empty groups allowed)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int (the number of groups); got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1 (the number of groups); got k={k}")
    if n is not None and k > n:
        raise ValueError(
            f"cannot form k={k} non-empty groups from only {n} points; choose k <= {n} "
            "(a fused level at most as wide as all base levels together) or provide more neurons."
        )
    return k


def _check_labels(labels: Tensor, n: int, k: int, device: torch.device) -> Tensor:
    labels = torch.as_tensor(labels, device=device)
    if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor of shape ({n},); got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(
            f"labels must lie in [0, {k}); got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def _make_generator(
    seed: int, generator: torch.Generator | None, device: torch.device
) -> torch.Generator:
    """A local generator (the global RNG is never touched); a given one must live on ``device``."""
    if generator is None:
        return torch.Generator(device=device).manual_seed(int(seed))
    if generator.device.type != device.type:
        raise ValueError(
            f"generator lives on {generator.device} but the points on {device}; "
            f"create it with torch.Generator(device='{device.type}') or pass seed= instead."
        )
    return generator


# --------------------------------------------------------------------------------------------
# Centroids and costs


def _column_blocks(n: int, d: int, elements: int = _BLOCK_ELEMENTS) -> list[slice]:
    width = max(1, elements // max(n, 1))
    return [slice(s, min(s + width, d)) for s in range(0, d, width)]


def _member_coefficients(w: Tensor, labels: Tensor, k: int) -> Tensor:
    """``s_j / sum_{l in R_{labels_j}} s_l`` per point; ``1 / |R|`` in groups of zero weight."""
    total = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, labels, w)[labels]
    count = torch.bincount(labels, minlength=k).to(w.dtype)[labels]
    return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), 1.0 / count)


def _centroids(points: Tensor, w: Tensor, labels: Tensor, k: int) -> Tensor:
    """``(k, D)`` weighted centroids in the points' dtype, by column blocks.

    Sums run in float64 for float64 points and for small inputs; otherwise in float32 (each
    centroid is a convex combination of its members, so float32 sums stay accurate).
    """
    n, d = points.shape
    small = points.numel() <= _FLOAT64_CENTROIDS_MAX
    acc = torch.float64 if points.dtype == torch.float64 or small else torch.float32
    coef = _member_coefficients(w, labels, k).to(acc)[:, None]
    out = torch.empty(k, d, dtype=points.dtype, device=points.device)
    for cols in _column_blocks(n, d):
        block = torch.zeros(k, cols.stop - cols.start, dtype=acc, device=points.device)
        out[:, cols] = block.index_add_(0, labels, points[:, cols].to(acc) * coef)
    return out


def weighted_centroids(points: Tensor, weights: Tensor | None, labels: Tensor, k: int) -> Tensor:
    """Importance-weighted centroids of the groups given by ``labels``.

    .. math:: c_i = \\frac{\\sum_{j: l_j = i} s_j z_j}{\\sum_{j: l_j = i} s_j}

    Args:
        points: ``(n, D)`` floating point; one row per neuron.
        weights: ``(n,)`` non-negative importance scores, or None for uniform.
        labels: ``(n,)`` integers in ``[0, k)``.
        k: number of groups.

    Returns:
        ``(k, D)`` in the dtype of ``points``. An empty group's row is all zeros; a group
        whose members all weigh zero gets their plain mean.
    """
    points = _check_points(points)
    n = points.shape[0]
    k = _check_k(k, None)
    w = _check_weights(weights, n, points.device)
    labels = _check_labels(labels, n, k, points.device)
    with torch.no_grad():
        return _centroids(points, w, labels, k)


def kmeans_cost(points: Tensor, weights: Tensor | None, labels: Tensor, centroids: Tensor) -> float:
    """The weighted k-means cost ``sum_j s_j ||z_j - c_{l_j}||^2``, accumulated in float64.

    Args:
        points: ``(n, D)``; weights: ``(n,)`` or None for uniform; labels: ``(n,)`` in
        ``[0, k)``; centroids: ``(k, D)``, any centres (not necessarily the weighted means).
    """
    points = _check_points(points)
    centroids = _check_points(centroids, "centroids")
    n, d = points.shape
    if centroids.shape[1] != d:
        raise ValueError(
            f"centroids have {centroids.shape[1]} features but points have {d}; they must match"
        )
    w = _check_weights(weights, n, points.device)
    labels = _check_labels(labels, n, centroids.shape[0], points.device)
    per_point = torch.zeros(n, dtype=torch.float64, device=points.device)
    with torch.no_grad():
        for cols in _column_blocks(n, d):
            diff = points[:, cols].to(torch.float64) - centroids[labels, cols].to(torch.float64)
            per_point += diff.square_().sum(1)
    return float((w * per_point).sum())


# --------------------------------------------------------------------------------------------
# Working coordinates: an isometric copy of the points in which seeding and Lloyd run


@dataclass
class _Workspace:
    mm: Tensor  # (n, p) coordinates for distance matmuls: float32, or float64 for float64 input
    acc: Tensor  # (n, p) the same coordinates for centroid/cost sums (float64 when affordable)
    sq: Tensor  # (n,) squared row norms of mm
    w: Tensor  # (n,) float64 weights


def _gram(points: Tensor, dtype: torch.dtype) -> Tensor:
    """``Zc Zc^T`` (float64) of the column-centred points; products of row blocks ``i <= j``
    only (the matrix is symmetric), each column block centred so that cancellation stays small."""
    n, d = points.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=points.device)
    edges = [*range(0, n, _GRAM_ROWS), n]
    parts = list(zip(edges[:-1], edges[1:], strict=True))
    for cols in _column_blocks(n, d, _MATMUL_ELEMENTS):
        block = points[:, cols].to(dtype)
        block = block - block.mean(0)
        for i, (a0, a1) in enumerate(parts):
            for b0, b1 in parts[i:]:
                gram[a0:a1, b0:b1] += (block[a0:a1] @ block[b0:b1].T).to(torch.float64)
    for i, (a0, a1) in enumerate(parts):
        for b0, b1 in parts[i + 1 :]:
            gram[b0:b1, a0:a1] = gram[a0:a1, b0:b1].T
    return gram


def _gram_coordinates(points: Tensor, dtype: torch.dtype) -> Tensor:
    """``Y`` of shape ``(n, r)``, ``r <= n``, with ``||y_i - y_j|| = ||z_i - z_j||`` for all i, j.

    With the centred Gram matrix ``G = Zc Zc^T = U diag(lam) U^T``, ``Y = U diag(sqrt(lam))``
    has ``Y Y^T = G``. Centroids are weighted means of points, so they stay in the points'
    affine span and every distance seeding and Lloyd need is preserved: for ``D >> n`` one
    ``n^2 D`` product replaces ``n k D`` work per iteration and per k-means++ step.
    """
    evals, evecs = torch.linalg.eigh(_gram(points, dtype))
    keep = evals > max(float(evals[-1]), 0.0) * 1e-12
    if not bool(keep.any()):
        return torch.zeros(points.shape[0], 1, dtype=torch.float64, device=points.device)
    return evecs[:, keep] * evals[keep].sqrt()


def _workspace(points: Tensor, w: Tensor) -> _Workspace:
    n, d = points.shape
    mm_dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
    if d >= 2 * n and 1 < n <= _GRAM_MAX_POINTS:
        coords = _gram_coordinates(points, mm_dtype)
    else:
        acc_dtype = torch.float64 if n * d <= _FLOAT64_COORDS_MAX else mm_dtype
        coords = points.to(acc_dtype) - points.mean(0, dtype=torch.float64).to(acc_dtype)
    acc = coords if coords.numel() <= _FLOAT64_COORDS_MAX else coords.to(mm_dtype)
    mm = acc.to(mm_dtype)
    return _Workspace(mm=mm, acc=acc, sq=mm.square().sum(1), w=w)


def _dists(y: Tensor, ysq: Tensor, c: Tensor, csq: Tensor) -> Tensor:
    """``(m, K)`` squared distances ``||y||^2 - 2 y.c + ||c||^2``, clamped at 0."""
    return (ysq[:, None] - 2.0 * (y @ c.T) + csq[None, :]).clamp_min_(0)


def _dists_to_points(ws: _Workspace, idx: Tensor) -> Tensor:
    """``(len(idx), n)`` float64 squared distances from points ``idx`` to every point."""
    return _dists(ws.mm[idx], ws.sq[idx], ws.mm, ws.sq).to(torch.float64)


def _fit(ws: _Workspace, labels: Tensor, k: int) -> tuple[Tensor, float]:
    """Weighted centroids ``(k, p)`` in the working coordinates and the cost they give."""
    coef = _member_coefficients(ws.w, labels, k).to(ws.acc.dtype)
    centres = torch.zeros(k, ws.acc.shape[1], dtype=ws.acc.dtype, device=ws.acc.device)
    centres.index_add_(0, labels, ws.acc * coef[:, None])
    per_point = (ws.acc - centres[labels]).square_().sum(1).to(torch.float64)
    return centres, float((ws.w * per_point).sum())


# --------------------------------------------------------------------------------------------
# Seeding


def _sample(potential: Tensor, m: int, gen: torch.Generator) -> Tensor:
    """``(B, m)`` indices drawn with replacement, row ``b`` with probability ``∝ potential[b]``."""
    cum = potential.cumsum(1)
    u = torch.rand(cum.shape[0], m, generator=gen, device=cum.device, dtype=cum.dtype)
    idx = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    return idx.clamp_(max=cum.shape[1] - 1)


def _init_kmeanspp(ws: _Workspace, k: int, n_init: int, gen: torch.Generator) -> Tensor:
    """Greedy weighted k-means++ (Arthur & Vassilvitskii 2007), ``n_init`` seedings at once.

    The first centre is drawn ``∝ s_j``; each next one from ``2 + ln k`` candidates drawn
    ``∝ s_j D(z_j)^2`` (``D`` = distance to the nearest centre so far), keeping the candidate
    that lowers ``sum_j s_j D(z_j)^2`` most. The running minimum-distance vector makes a step
    cost ``O(n p)`` per candidate. When every point is covered (duplicates), untaken points
    are drawn uniformly so that ``k`` distinct points are always chosen.
    """
    n = ws.mm.shape[0]
    device = ws.mm.device
    rows = torch.arange(n_init, device=device)
    trials = 2 + int(math.log(k))
    chosen = torch.empty(n_init, k, dtype=torch.long, device=device)
    first = _sample(ws.w.expand(n_init, n), 1, gen).squeeze(1)
    chosen[:, 0] = first
    closest = _dists_to_points(ws, first)
    closest[rows, first] = 0.0
    taken = torch.zeros(n_init, n, dtype=torch.bool, device=device)
    taken[rows, first] = True
    for i in range(1, k):
        potential = ws.w * closest
        covered = potential.sum(1, keepdim=True) <= 0
        potential = torch.where(covered, (~taken).to(potential.dtype), potential)
        cand = _sample(potential, trials, gen)
        dist = _dists_to_points(ws, cand.flatten()).view(n_init, trials, n)
        dist = torch.minimum(dist, closest[:, None, :])
        best = (dist * ws.w).sum(-1).argmin(1)
        pick = cand[rows, best]
        closest = dist[rows, best]
        closest[rows, pick] = 0.0
        taken[rows, pick] = True
        chosen[:, i] = pick
    return ws.acc[chosen]


def _init_random(ws: _Workspace, k: int, n_init: int, gen: torch.Generator) -> Tensor:
    """``k`` distinct points drawn without replacement ``∝ s_j`` (Gumbel top-k), per restart."""
    n = ws.mm.shape[0]
    u = torch.rand(n_init, n, generator=gen, device=ws.mm.device, dtype=torch.float64)
    keys = ws.w.log() - (-u.log()).log()
    return ws.acc[keys.topk(k, dim=1).indices]


_INITS: dict[str, Callable[[_Workspace, int, int, torch.Generator], Tensor]] = {
    "k-means++": _init_kmeanspp,
    "random": _init_random,
}


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
    gain = ws.w * (ws.acc - centres[labels]).square().sum(1).to(torch.float64)
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


# --------------------------------------------------------------------------------------------
# Public solvers


def _singletons(points: Tensor, w: Tensor) -> Grouping:
    n = points.shape[0]
    labels = torch.arange(n, device=points.device)
    return Grouping(labels, points.clone(), 0.0, n, weights=w, history=[0.0])


def weighted_kmeans(
    points: Tensor,
    weights: Tensor | None,
    k: int,
    *,
    n_init: int = 4,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    init: str = "k-means++",
    local_search: bool | int = False,
    generator: torch.Generator | None = None,
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
        max_iter: Lloyd iterations per restart.
        tol: stop when the cost falls by at most ``tol`` relative to the previous iteration.
        seed: seed of a local ``torch.Generator`` (the global RNG is never used).
        init: seeding, one of ``"k-means++"``, ``"random"`` (distinct points ``∝ s_j``).
        local_search: True, or a maximum number of swaps, refines the winner with the swap
            heuristic of :func:`local_search_kmeans`.
        generator: draw from this generator (on the points' device) instead of ``seed``.

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
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}")
    if isinstance(n_init, bool) or int(n_init) < 1:
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
        runs = [
            _lloyd(ws, s, k, int(max_iter), float(tol))
            for s in _INITS[init](ws, k, int(n_init), gen)
        ]
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
    return Grouping(labels, centroids, cost, k, weights=w, history=history)


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
        _, match = linear_sum_assignment(cost_matrix.cpu().numpy())
        match = torch.as_tensor(match, dtype=torch.long, device=a.device)
        labels_b = torch.empty(d, dtype=torch.long, device=a.device)
        labels_b[match] = torch.arange(d, device=a.device)
        centroids, cost = _pair_centroids(a, b, wa, wb, match)
    labels = torch.cat([torch.arange(d, device=a.device), labels_b])
    return Grouping(labels=labels, centroids=centroids, cost=float(cost), k=d, weights=w)


# --------------------------------------------------------------------------------------------
# Dispatcher


def _group_kmeans(
    points: Tensor, weights: Tensor | None, k: int, *, sizes: Sequence[int] | None = None, **options
) -> Grouping:
    return weighted_kmeans(points, weights, k, **options)


def _group_hungarian(
    points: Tensor, weights: Tensor | None, k: int, *, sizes: Sequence[int] | None = None, **options
) -> Grouping:
    if options:
        raise TypeError(f"method='hungarian' takes no options; got {sorted(options)}")
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
        points[:d_a], points[d_a:], None if w is None else w[:d_a], None if w is None else w[d_a:]
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
    **options,
) -> Grouping:
    """Partition ``points`` (``(d_M, D)``, the base models' neurons stacked in model order) into
    ``k`` groups with the named method from :data:`GROUPING_METHODS`.

    ``sizes`` gives the number of neurons of each base model (``sum(sizes) == d_M``);
    ``method="hungarian"`` needs exactly two equal sizes and ``k`` equal to them. ``options``
    go to the method (e.g. ``seed``, ``n_init``, ``local_search`` for ``"kmeans"``).
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


if __name__ == "__main__":  # quick timing: python -m neurofuse.grouping
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n, dim, k in [(256, 300_000, 128), (1000, 600, 500), (512, 4096, 256)]:
        z = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
        s = torch.rand(n, generator=torch.Generator().manual_seed(1))
        weighted_kmeans(z[:16], s[:16], 4)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        g = weighted_kmeans(z, s, k, seed=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"n={n} D={dim} k={k}: {wall:.3f} s wall, {cpu:.3f} s cpu, cost {g.cost:.5g}")
