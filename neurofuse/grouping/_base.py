"""Shared pieces of grouping: the ``Grouping`` result, input checks, weighted centroids, costs."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from neurofuse._sparse import sparse_matrix

_BLOCK_ELEMENTS = 1 << 18  # elementwise temporaries: 2 MiB in float64, cache-friendly
_MATMUL_ELEMENTS = 1 << 22  # operands/results of blocked matmuls
_FLOAT64_COORDS_MAX = 1 << 25  # keep working coordinates in float64 up to this many elements
_FLOAT64_CENTROIDS_MAX = 1 << 22  # sum output-space centroids in float64 up to this size
_GRAM_MAX_POINTS = 4096  # beyond this an n x n eigendecomposition costs more than it saves
_GRAM_ROWS = 128  # row-block size of the symmetric Gram product
_DEFAULT_MAX_SWAPS = 100
_DEFAULT_SWAP_EPS = 1e-2
_DEFAULT_CANDIDATES = 512
#: ``n_init="auto"``: this many k-means++ restarts for up to :data:`AUTO_RESTARTS_K` groups,
#: then ``ceil(AUTO_RESTARTS * AUTO_RESTARTS_K / k)`` (2 at 1024 groups, 1 from 2048). With many
#: groups the best of several seedings differs little from one (the seedings' randomness
#: averages out over the groups): two trained MLPs 784-W-W-10, 400 samples, 3 seeds, non-IID
#: and sharded splits, against the exact four-restart grouping: at most +0.3% grouping error
#: and -0.2 to +0.0 points at W = 1024 and 2048, for 0.18-0.34x the grouping time
#: (``benchmarks/results/kmeans_seeding.md``). Every committed suite groups at most 512
#: neurons per space, so its results are those of four restarts.
AUTO_RESTARTS = 4
AUTO_RESTARTS_K = 512
#: ``n_init="auto"`` also caps the restarts' total work, ``restarts x points x groups``, at
#: this, so that grouping many models costs about linearly in their number: 2 restarts for 8
#: models of width 512, 1 for 16. Measured on the ``scale`` suite's MLPs (3 seeds,
#: ``benchmarks/results/kmeans_restarts.md``) against four restarts: 8 models, 2 restarts:
#: 0.9997x the grouping error, the same accuracy, 0.58x the grouping time; 16 models, 1 restart:
#: 1.0011x, -0.2 points, 0.25x. Two models reach the cap before the rule on groups only
#: between 1449 and 2047 groups (1 restart instead of 2); no committed suite reaches it.
AUTO_RESTARTS_WORK = 1 << 22


def restarts(n_init: int | str, k: int, n: int | None = None) -> int:
    """The number of k-means++ restarts that ``n_init`` (a count or ``"auto"``) gives for
    ``k`` groups of ``n`` points (``None``: not known, the rule on groups alone)."""
    if isinstance(n_init, str) and n_init == "auto":
        k = max(k, 1)
        by_groups = math.ceil(AUTO_RESTARTS * AUTO_RESTARTS_K / k)
        by_work = math.ceil(AUTO_RESTARTS_WORK / (k * n)) if n else AUTO_RESTARTS
        return max(1, min(AUTO_RESTARTS, by_groups, by_work))
    if isinstance(n_init, bool | str):
        raise ValueError(f"n_init must be a number of restarts or 'auto'; got {n_init!r}")
    try:
        return operator.index(n_init)
    except TypeError:
        raise ValueError(f"n_init must be a number of restarts or 'auto'; got {n_init!r}") from None


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
        seeding: how k-means was started (``"k-means++"``, ``"random"``, ``"matching"``, or
            ``"matching+k-means++"``); empty for other methods.
    """

    labels: Tensor
    centroids: Tensor
    cost: float
    k: int
    weights: Tensor | None = None
    history: list[float] = field(default_factory=list)
    seeding: str = ""

    def members(self, i: int) -> Tensor:
        """Indices (int64, ascending) of the base neurons in group ``i``."""
        if not 0 <= int(i) < self.k:
            raise IndexError(f"group index {i} out of range; valid groups are 0..{self.k - 1}")
        return torch.nonzero(self.labels == int(i)).flatten()

    def assignment_matrix(self, weights: Tensor | None = None, sparse: bool = False) -> Tensor:
        """The ``(k, d_M)`` matrix ``A`` with ``A @ Z = T`` (targets from base outputs).

        ``A[i, j] = s_j / sum_{l in R_i} s_l`` when ``labels_j = i`` and 0 otherwise, so each
        row is a convex combination of its group's members. A group whose members all have
        zero weight gets uniform coefficients ``1 / |R_i|``. ``weights`` defaults to the
        grouping's own weights (uniform when it has none). Dtype and device of ``centroids``;
        ``sparse=True``: a coalesced sparse COO tensor with one entry per base neuron.
        """
        n = self.labels.shape[0]
        device = self.labels.device
        if weights is None:
            weights = self.weights
        w = _check_weights(weights, n, device)
        coef = _member_coefficients(w, self.labels, self.k)
        if sparse:
            index = torch.stack([self.labels, torch.arange(n, device=device)])
            values = coef.to(self.centroids.dtype)
            return sparse_matrix(index, values, (self.k, n))
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
