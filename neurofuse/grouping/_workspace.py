"""Working coordinates for k-means: exact low-dimensional coordinates from the Gram matrix when
that is cheaper, and blocked squared-distance computations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from neurofuse.grouping._base import (
    _BLOCK_ELEMENTS,
    _FLOAT64_COORDS_MAX,
    _GRAM_MAX_POINTS,
    _GRAM_ROWS,
    _MATMUL_ELEMENTS,
    _column_blocks,
    _member_coefficients,
)


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
    """``(m, K)`` squared distances ``||y||^2 - 2 y.c + ||c||^2``, clamped at 0.

    Formed in place in the product's buffer (one ``(m, K)`` temporary instead of four); the
    same floating-point operations in the same order, so the same values bit for bit."""
    d = y @ c.T
    return d.mul_(-2.0).add_(ysq[:, None]).add_(csq[None, :]).clamp_min_(0)


def row_blocks(n: int, width: int) -> Iterator[slice]:
    """Row slices of at most :data:`_BLOCK_ELEMENTS` elements of an ``(n, width)`` array: the
    size of the per-point temporaries of centroid sums and costs, whatever ``n``."""
    step = max(1, _BLOCK_ELEMENTS // max(1, width))
    return (slice(s, s + step) for s in range(0, n, step))


def point_costs(ws: _Workspace, labels: Tensor, centres: Tensor) -> Tensor:
    """``(n,)`` float64 squared distance of every point to its centre, by row blocks."""
    n, p = ws.acc.shape
    out = torch.empty(n, dtype=torch.float64, device=ws.acc.device)
    for rows in row_blocks(n, p):
        diff = ws.acc[rows] - centres[labels[rows]]
        out[rows] = diff.square_().sum(1).to(torch.float64)
    return out


def _dists_to_points(ws: _Workspace, idx: Tensor) -> Tensor:
    """``(len(idx), n)`` float64 squared distances from points ``idx`` to every point."""
    return _dists(ws.mm[idx], ws.sq[idx], ws.mm, ws.sq).to(torch.float64)


def _fit(ws: _Workspace, labels: Tensor, k: int) -> tuple[Tensor, float]:
    """Weighted centroids ``(k, p)`` in the working coordinates and the cost they give (sums
    by row blocks: no ``(n, p)`` temporary)."""
    n, p = ws.acc.shape
    coef = _member_coefficients(ws.w, labels, k).to(ws.acc.dtype)
    centres = torch.zeros(k, p, dtype=ws.acc.dtype, device=ws.acc.device)
    for rows in row_blocks(n, p):
        centres.index_add_(0, labels[rows], ws.acc[rows] * coef[rows, None])
    return centres, float((ws.w * point_costs(ws, labels, centres)).sum())
