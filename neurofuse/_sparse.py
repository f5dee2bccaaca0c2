"""Products with a grouping's averaging matrix ``A`` (``k x d_M``), dense or sparse.

A grouping has one non-zero per base neuron, so the Linear variants keep ``A`` as a sparse COO
tensor: dense it costs ``k x d_M`` float64 (1 GiB per space for two width-8192 models, kept for
the whole fusion), sparse ``d_M`` entries. These helpers take either form, so code that
receives ``A`` from elsewhere (ZipIt!, CCA Merge: dense) works unchanged. (``torch.sparse``
has the products but not column slicing or ``x @ A^T`` for every layout; hence the helpers.)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: A dense matrix with at most this fraction of non-zeros is treated as sparse.
SPARSE_FRACTION = 0.25


def mostly_zero(a: Tensor) -> bool:
    """Whether ``a`` is sparse, or dense with at most :data:`SPARSE_FRACTION` non-zeros."""
    return a.is_sparse or int(torch.count_nonzero(a)) <= SPARSE_FRACTION * a.numel()


def sparse_matrix(index: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A coalesced sparse COO matrix from ``(2, nnz)`` indices built by our own code (in range
    by construction: torch's invariant checks are skipped, explicitly, which also keeps torch
    from warning that they are off)."""
    return torch.sparse_coo_tensor(index, values, shape, check_invariants=False).coalesce()


def matmul(a: Tensor, x: Tensor) -> Tensor:
    """``a @ x`` for a dense or sparse ``a`` and a dense ``x`` (1-D or 2-D)."""
    if not a.is_sparse:
        return a @ x
    if x.dim() == 1:
        return torch.sparse.mm(a, x.unsqueeze(1)).squeeze(1)
    return torch.sparse.mm(a, x)


def matmul_t(x: Tensor, a: Tensor) -> Tensor:
    """``x @ a^T`` for a dense ``x`` and a dense or sparse ``a``."""
    if not a.is_sparse:
        return x @ a.T
    return torch.sparse.mm(a, x.T).T


def entries(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row indices, column indices and values of the stored entries of ``a`` (a dense ``a``:
    its non-zeros)."""
    if a.is_sparse:
        a = a.coalesce()
        rows, cols = a.indices()
        return rows, cols, a.values()
    rows, cols = a.nonzero(as_tuple=True)
    return rows, cols, a[rows, cols]


def columns(a: Tensor, lo: int, size: int) -> Tensor:
    """Columns ``lo .. lo + size - 1`` of ``a``, in ``a``'s layout."""
    if not a.is_sparse:
        return a[:, lo : lo + size]
    rows, cols, vals = entries(a)
    keep = (cols >= lo) & (cols < lo + size)
    index = torch.stack([rows[keep], cols[keep] - lo])
    return sparse_matrix(index, vals[keep], (a.shape[0], size))


def positive(a: Tensor) -> Tensor:
    """``(a > 0)`` as ``a``'s dtype, in ``a``'s layout."""
    if not a.is_sparse:
        return (a > 0).to(a)
    rows, cols, vals = entries(a)
    index = torch.stack([rows, cols])
    return sparse_matrix(index, (vals > 0).to(vals), (a.shape[0], a.shape[1]))


def by_column(
    rows: Tensor, cols: Tensor, vals: Tensor, size: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Entries of a ``(k, size)`` map with one entry per column (a grouping) reordered by
    column, with ``None`` for the columns: old neuron ``j`` goes to ``rows[j]`` with weight
    ``vals[j]``, no gather needed. Other maps keep their entries and columns."""
    if cols.numel() == size and bool((torch.bincount(cols, minlength=size) == 1).all()):
        order = torch.argsort(cols)
        return rows[order], None, vals[order]
    return rows, cols, vals
