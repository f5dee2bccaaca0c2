"""Closed-form least squares for the Linear variants (paper appendix B.2).

An affine layer computes ``Y = X W`` where each row of ``X`` is one input patch (a sample for
``Linear``, a sample x position for convolutions, with a column of ones for the bias). Given
targets ``T`` the fit is

    W* = argmin_W ||X W - T||_F^2 + lambda ||W||_F^2 = (X^T X + lambda I)^{-1} X^T T.

Two equivalent forms, chosen by the shape of the problem (:class:`LeastSquares`):

- **primal** (more rows than unknowns, the usual case for convolutions): the Gram matrix
  ``G = X^T X`` (p x p) and ``X^T Y`` are accumulated over chunks, so the (samples * positions)
  x p matrix ``X`` is never held whole (DESIGN.md section 5). With the Cholesky factor
  ``G + lambda I = L L^T``, the coordinates ``c_j = L^{-1} X^T y_j`` of every target column
  satisfy ``||c_i - c_j|| = ||P y_i - P y_j||`` where ``P = X (G + lambda I)^{-1} X^T``: the
  projected outputs are clustered in p dimensions instead of N.
- **dual** (at most as many rows as unknowns: a wide ``Linear`` layer fused on a few hundred
  samples): the rows are held (they take less memory than ``G``) and the N x N kernel
  ``K = X X^T = U diag(s) U^T`` replaces ``G``. By the push-through identity
  ``(X^T X + lambda I)^{-1} X^T = X^T (X X^T + lambda I)^{-1}`` both forms give the same
  weights, and ``P = U diag(s / (s + lambda)) U^T``, so the coordinates
  ``diag(sqrt(s / (s + lambda))) U^T y_j`` are isometric to the primal ones in at most N
  dimensions. Cost ``N^2 p`` instead of ``N p^2 + p^3``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from neurofuse._sparse import entries, matmul, matmul_t, mostly_zero
from neurofuse.patch_moments import Moments

BLOCK_ROWS = 16384
#: The dual form drops eigenvalues of ``K`` below this fraction of the largest (exact zeros up
#: to rounding: their eigenvectors are orthogonal to every column of ``X``).
RANK_TOL = 1e-12


@dataclass(frozen=True)
class Factor:
    """A factorisation of ``G + lambda I`` (:meth:`LeastSquares.factor`).

    Primal: ``chol``, the lower Cholesky factor ``L``; coordinates ``L^{-1} X^T Y``, weights
    ``L^{-T} C``. Dual: ``evecs`` ``U_r`` (N x r) and ``scale`` ``sqrt(s / (s + lambda))`` of the
    kernel's non-zero eigenvalues, and ``basis`` ``X^T U_r diag(1 / sqrt(s (s + lambda)))``
    (q x r); coordinates ``diag(scale) U_r^T Y``, weights ``basis @ C``.
    """

    chol: Tensor | None = None
    basis: Tensor | None = None
    scale: Tensor | None = None
    evecs: Tensor | None = None

    def weights(self, coords: Tensor) -> Tensor:
        """The weights ``(q, k)`` whose outputs are the projection with coordinates ``coords``
        (``(r, k)``: coordinates of targets, e.g. ``coordinates @ A^T`` for a grouping ``A``)."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol.T, coords, upper=True)
        assert self.basis is not None
        return self.basis @ coords.to(self.basis)


class LeastSquares:
    """One least-squares problem ``[X, 1] W ~ Y``, fed chunk by chunk with :meth:`add`.

    While the rows fed so far are at most the number of unknowns per column (``p``, plus one
    with ``bias``) they are held, and the problem is solved in the dual form (module
    docstring); the first chunk beyond turns it into the primal form for good: ``X^T X``,
    ``X^T Y`` (and with ``targets=True`` ``Y^T Y``, which only the cross-validated
    :meth:`solve_prior` reads) accumulated in ``dtype`` (float64). Primal products are taken
    block by block in ``product_dtype`` on rows shifted by the first block's means (the
    shifted-data trick: the rounding error of a float32 product then scales with the rows'
    spread, not with their mean, which is large after a ReLU); the exact uncentred sums are
    rebuilt in ``dtype``. ``dual=False`` always takes the primal form.
    """

    def __init__(
        self,
        p: int,
        d: int,
        bias: bool,
        device: torch.device,
        dtype: torch.dtype,
        product_dtype: torch.dtype | None = None,
        targets: bool = False,
        dual: bool = True,
    ) -> None:
        self.p, self.d, self.bias, self.dtype = p, d, bias, dtype
        self.device = device
        self.product_dtype = product_dtype or dtype
        self.targets = targets
        self.sxx: Tensor | None = None  # primal sums, allocated when the primal form starts
        self.sxy: Tensor | None = None
        self.sx: Tensor | None = None
        self.sy: Tensor | None = None
        self.syy: Tensor | None = None
        self.shift_x: Tensor | None = None
        self.shift_y: Tensor | None = None
        self._held: list[tuple[Tensor, Tensor]] | None = [] if dual else None
        self._cache: dict[str, object] = {}  # the dual form's rows and kernel, until add()
        self.rows = 0

    @property
    def unknowns(self) -> int:
        """Unknowns per target column: ``p``, plus one for the bias."""
        return self.p + int(self.bias)

    @property
    def dual(self) -> bool:
        """Whether the problem is solved in the dual form (its rows are held)."""
        return self._held is not None and self.rows > 0

    def add(self, x_rows: Tensor, y_rows: Tensor) -> None:
        """Add the rows ``x_rows`` (N, p) with their targets ``y_rows`` (N, d)."""
        n = x_rows.shape[0]
        self._cache.clear()
        if self._held is not None:
            if self.rows + n <= self.unknowns:
                self._held.append((x_rows.detach().to(self.dtype), y_rows.detach().to(self.dtype)))
                self.rows += n
                return
            self._to_primal()
        self._accumulate(x_rows, y_rows)
        self.rows += n

    def add_moments(self, m: Moments, shift_x: Tensor, shift_y: Tensor) -> None:
        """Add sums computed elsewhere (:func:`neurofuse.patch_moments.conv_moments`), centred
        on ``shift_x`` (p) and ``shift_y`` (d). The problem takes the primal form for good; the
        first call (or :meth:`add`) sets the shifts, which every later call must reuse."""
        self._cache.clear()
        if self._held:
            raise ValueError("add_moments: rows are already held for the dual form")
        if self.targets and m.yy is None:
            raise ValueError("add_moments: this problem accumulates Y^T Y; pass targets=True")
        self._held = None
        if self.shift_x is None or self.shift_y is None:
            self.shift_x, self.shift_y = shift_x.to(self.dtype), shift_y.to(self.dtype)
        elif not (
            torch.equal(self.shift_x, shift_x.to(self.dtype))
            and torch.equal(self.shift_y, shift_y.to(self.dtype))
        ):
            raise ValueError("add_moments: the sums must be centred on the problem's shifts")
        self._allocate()
        assert self.sxx is not None and self.sxy is not None
        assert self.sx is not None and self.sy is not None
        self.sxx += m.xx
        self.sxy += m.xy
        self.sx += m.x
        self.sy += m.y
        if self.syy is not None and m.yy is not None:
            self.syy += m.yy
        self.rows += m.rows

    def _allocate(self) -> None:
        if self.sxx is None:
            z = functools.partial(torch.zeros, device=self.device, dtype=self.dtype)
            self.sxx, self.sxy = z(self.p, self.p), z(self.p, self.d)
            self.sx, self.sy = z(self.p), z(self.d)
            self.syy = z(self.d, self.d) if self.targets else None

    def _to_primal(self) -> None:
        held, self._held = self._held or [], None
        for x, y in held:
            self._accumulate(x, y)

    def _accumulate(self, x_rows: Tensor, y_rows: Tensor) -> None:
        self._allocate()
        assert (
            self.sxx is not None
            and self.sxy is not None
            and self.sx is not None
            and self.sy is not None
        )
        if self.shift_x is None or self.shift_y is None:  # both set by the first call
            self.shift_x = x_rows[:BLOCK_ROWS].to(self.dtype).mean(0)
            self.shift_y = y_rows[:BLOCK_ROWS].to(self.dtype).mean(0)
        ax = self.shift_x.to(self.product_dtype)
        ay = self.shift_y.to(self.product_dtype)
        for lo in range(0, x_rows.shape[0], BLOCK_ROWS):
            x = x_rows[lo : lo + BLOCK_ROWS].to(self.product_dtype) - ax
            y = y_rows[lo : lo + BLOCK_ROWS].to(self.product_dtype) - ay
            self.sxx += (x.T @ x).to(self.dtype)
            self.sxy += (x.T @ y).to(self.dtype)
            if self.syy is not None:
                self.syy += (y.T @ y).to(self.dtype)
            self.sx += x.sum(0, dtype=self.dtype)
            self.sy += y.sum(0, dtype=self.dtype)

    # ------------------------------------------------------------------ the held rows (dual)
    def _x(self) -> Tensor:
        """The held rows ``[X, 1]`` (N, q) in ``dtype``."""
        if "x" not in self._cache:
            assert self._held
            x = torch.cat([h[0] for h in self._held])
            if self.bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
            self._cache["x"] = x
        return self._cache["x"]  # type: ignore[return-value]

    def _y(self) -> Tensor:
        if "y" not in self._cache:
            assert self._held
            self._cache["y"] = torch.cat([h[1] for h in self._held])
        return self._cache["y"]  # type: ignore[return-value]

    def _sums(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        if self.sxx is None:  # no rows at all
            self._accumulate(
                torch.zeros(0, self.p, dtype=self.dtype, device=self.device),
                torch.zeros(0, self.d, dtype=self.dtype, device=self.device),
            )
        assert self.sxx is not None and self.sxy is not None
        assert self.sx is not None and self.sy is not None
        a = self.shift_x if self.shift_x is not None else torch.zeros_like(self.sx)
        c = self.shift_y if self.shift_y is not None else torch.zeros_like(self.sy)
        return self.sxx, self.sxy, self.sx, self.sy, a, c

    # ------------------------------------------------------------------ normal equations
    @property
    def gram(self) -> Tensor:
        """``[X, 1]^T [X, 1]`` (or ``X^T X`` without bias), uncentred, in ``dtype``."""
        if self.dual:
            x = self._x()
            return x.T @ x
        sxx, _, sx, _, a, _ = self._sums()
        n = self.rows
        g = sxx + torch.outer(a, sx) + torch.outer(sx, a) + n * torch.outer(a, a)
        if not self.bias:
            return g
        col = (sx + n * a).unsqueeze(1)
        corner = torch.full((1, 1), float(n), dtype=self.dtype, device=g.device)
        return torch.cat([torch.cat([g, col], 1), torch.cat([col.T, corner], 1)], 0)

    @property
    def cross(self) -> Tensor:
        """``[X, 1]^T Y`` (or ``X^T Y``), uncentred, in ``dtype``."""
        if self.dual:
            return self._x().T @ self._y()
        _, sxy, sx, sy, a, c = self._sums()
        n = self.rows
        xy = sxy + torch.outer(sx, c) + torch.outer(a, sy) + n * torch.outer(a, c)
        if not self.bias:
            return xy
        return torch.cat([xy, (sy + n * c).unsqueeze(0)], 0)

    @property
    def target_gram(self) -> Tensor:
        """``Y^T Y``, uncentred, in ``dtype``."""
        if self.dual:
            y = self._y()
            return y.T @ y
        if self.syy is None:
            raise ValueError("Y^T Y was not accumulated: create the LeastSquares with targets=True")
        _, _, _, sy, _, c = self._sums()
        n = self.rows
        return self.syy + torch.outer(sy, c) + torch.outer(c, sy) + n * torch.outer(c, c)

    def _target_energy(self, project: Tensor | None) -> float:
        """``||Y P^T||_F^2`` (``||Y||_F^2`` without ``P``) from the primal sums: for a sparse
        ``P`` (a grouping) in ``O(d^2)`` instead of the ``O(k d^2)`` of ``P Y^T Y P^T``."""
        if self.syy is None:
            raise ValueError("Y^T Y was not accumulated: create the LeastSquares with targets=True")
        _, _, _, sy, _, c = self._sums()
        n = self.rows
        if project is None:
            return float(torch.trace(self.syy) + 2 * sy @ c + n * c @ c)
        pr = project.to(self.syy.dtype)
        pc, psy = matmul(pr, c), matmul(pr, sy)
        if not pr.is_sparse and mostly_zero(pr):
            pr = pr.to_sparse()
        ps = matmul(pr, self.syy)  # (k, d)
        rows, cols, vals = entries(pr)
        return float((ps[rows, cols] * vals).sum() + 2 * psy @ pc + n * pc @ pc)

    # ------------------------------------------------------------------ solving
    def factor(self, ridge: float = 1e-6) -> Factor:
        """A factorisation of ``G + lambda I`` with ``lambda = ridge * mean(diag G)``: the
        small ridge keeps rank-deficient inputs (dead neurons, constant channels) solvable."""
        if self.dual:
            return self._dual_factor(ridge)
        g = self.gram
        scale = float(torch.diagonal(g).mean().clamp_min(1e-12))
        eye = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
        lam = ridge * scale
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(g + lam * eye)
            if int(info) == 0:
                return Factor(chol=chol)
            lam = max(lam * 100, 1e-10 * scale)
        raise RuntimeError("least squares: Gram matrix is not positive definite even with ridge")

    def _kernel(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """Held rows ``[X, 1]``, the kernel's eigenvalues ``s`` and eigenvectors ``U`` on its
        range (``s > RANK_TOL * max s``), and ``mean(diag G) = trace(K) / q``."""
        if "kernel" not in self._cache:
            x = self._x()
            k = x @ x.T
            scale = max(float(torch.trace(k)) / x.shape[1], 1e-12)
            s, u = torch.linalg.eigh(k)
            keep = s > max(float(s[-1]), 0.0) * RANK_TOL
            self._cache["kernel"] = (x, s[keep], u[:, keep], scale)
        return self._cache["kernel"]  # type: ignore[return-value]

    def _dual_factor(self, ridge: float) -> Factor:
        x, s, u, scale = self._kernel()
        lam = ridge * scale
        basis = (x.T @ u) / (s.sqrt() * (s + lam).sqrt())
        return Factor(basis=basis, scale=(s / (s + lam)).sqrt(), evecs=u)

    def coordinates(self, factor: Factor) -> Tensor:
        """``(r, d)`` coordinates of the columns of ``Y`` projected on the column space of
        ``X``, in an orthonormal basis: ``L^{-1} X^T Y`` (primal, ``r = q``) or
        ``diag(scale) U_r^T Y`` (dual, ``r <= N``); distances between columns are the same."""
        if factor.chol is not None:
            return torch.linalg.solve_triangular(factor.chol, self.cross, upper=False)
        assert factor.scale is not None and factor.evecs is not None
        return factor.scale.unsqueeze(1) * (factor.evecs.T @ self._y())

    @staticmethod
    def weights_from_coordinates(factor: Factor, coords: Tensor) -> Tensor:
        """The weights whose output is the projection with coordinates ``coords``."""
        return factor.weights(coords)

    def solve(self, ridge: float = 1e-6) -> Tensor:
        f = self.factor(ridge)
        return f.weights(self.coordinates(f))

    def solve_prior(
        self,
        prior: Tensor,
        strength: float | None = None,
        project: Tensor | None = None,
        ridge: float = 1e-9,
    ) -> tuple[Tensor, float]:
        """Least squares regularised towards ``prior`` instead of towards zero:

            W = argmin ||X W - T||^2 + lam ||W - W0||^2 = W0 + (G + lam I)^{-1} (X^T T - G W0),

        with ``T = Y P^T`` (``P = project``, e.g. a grouping's averaging matrix; ``T = Y`` when
        None). Where ``X`` has fewer independent rows than columns the unregularised answer is
        only defined up to the null space of ``X``; this one takes ``W0``'s component there
        instead of zero, so a prior that already fits the rows exactly is returned unchanged.

        ``strength=None`` chooses ``lam`` by generalised cross-validation (Golub, Heath & Wahba
        1979): the ``lam`` on a log grid (relative to the mean eigenvalue of ``G``) minimising
        ``RSS(lam) / (1 - df(lam) / n)^2``, computed for the whole grid from one eigen-
        decomposition (of ``G``, or of ``K`` in the dual form, where
        ``W = W0 + X^T (K + lam I)^{-1} (T - X W0)``); a given ``strength`` is relative to
        ``mean(diag G)`` like ``ridge``, which is the floor of the grid. Returns the weights and
        ``lam`` used, relative to ``mean(diag G)``. (Hand-written: scikit-learn's ``RidgeCV``
        does GCV, but centred on zero, on explicit rows and in float64 NumPy; here the primal
        form never holds the rows, only ``G``.)
        """
        if self.dual:
            return self._solve_prior_dual(prior, strength, project, ridge)
        g = self.gram
        c = self.cross if project is None else matmul_t(self.cross, project.to(self.dtype))
        w0 = prior.to(g)
        if w0.shape != c.shape:
            raise ValueError(f"prior has shape {tuple(w0.shape)}, the weights {tuple(c.shape)}")
        scale = float(torch.diagonal(g).mean().clamp_min(1e-12))
        s, v = torch.linalg.eigh(g)
        s = s.clamp_min(0.0)
        gw0 = g @ w0
        z = v.T @ (c - gw0)
        if strength is not None:
            lam = max(strength, ridge) * scale
        else:
            energy = self._target_energy(project)  # ||T||^2
            rss0 = energy - 2 * float((w0 * c).sum()) + float((w0 * gw0).sum())
            # RSS(lam) = rss0 - 2 sum z^2 / (s + lam) + sum s z^2 / (s + lam)^2
            lam = _gcv_choice(s, (z * z).sum(1), rss0, energy, self.rows, scale, ridge, primal=True)
        return w0 + v @ (z / (s + lam).unsqueeze(1)), lam / scale

    def _solve_prior_dual(
        self, prior: Tensor, strength: float | None, project: Tensor | None, ridge: float
    ) -> tuple[Tensor, float]:
        x, s, u, scale = self._kernel()
        y = self._y()
        t = y if project is None else matmul_t(y, project.to(self.dtype))
        w0 = prior.to(x.device)  # its own dtype: a float32 prior is not copied to float64 whole
        if w0.shape != (x.shape[1], t.shape[1]):
            raise ValueError(
                f"prior has shape {tuple(w0.shape)}, the weights {(x.shape[1], t.shape[1])}"
            )
        r0 = t.clone()  # the prior's residual t - x w0, by column blocks
        for c in _column_blocks(w0.shape[1], w0.shape[0]):
            r0[:, c] -= x @ w0[:, c].to(x.dtype)
        z = u.T @ r0
        if strength is not None:
            lam = max(strength, ridge) * scale
        else:
            energy = float(t.square().sum())
            rss0 = float(r0.square().sum())
            # RSS(lam) = rss0 - sum (1 - (lam / (s + lam))^2) e,  e = ||U^T r0||^2 per row
            lam = _gcv_choice(
                s, (z * z).sum(1), rss0, energy, self.rows, scale, ridge, primal=False
            )
        coef = u @ (z / (s + lam).unsqueeze(1))  # (N, k)
        w = w0.clone()
        for c in _column_blocks(w.shape[1], w.shape[0]):
            w[:, c] += (x.T @ coef[:, c]).to(w.dtype)
        return w, lam / scale


def _column_blocks(k: int, rows: int, elements: int = 1 << 22) -> list[slice]:
    """Column slices of a ``(rows, k)`` matrix with at most ``elements`` entries each."""
    step = max(1, elements // max(1, rows))
    return [slice(lo, min(lo + step, k)) for lo in range(0, k, step)]


def _gcv_choice(
    s: Tensor,
    z2: Tensor,
    rss0: float,
    energy: float,
    n: int,
    scale: float,
    ridge: float,
    primal: bool,
) -> float:
    """The ``lam`` of the grid ``scale * 10^[log10(ridge) .. 4]`` (41 points) minimising
    ``RSS(lam) / (1 - df(lam) / n)^2`` with ``df = sum s / (s + lam)``. ``z2`` are the squared
    norms of the residual's components along the eigenvectors: of ``X^T r0`` (primal) or of
    ``r0`` (dual); both give the same ``RSS``."""
    grid = scale * torch.logspace(math.log10(max(ridge, 1e-12)), 4, 41, dtype=s.dtype)
    den = s.unsqueeze(0) + grid.unsqueeze(1)  # (grid, r)
    if primal:
        rss = rss0 - 2 * (z2 / den).sum(1) + (s * z2 / den**2).sum(1)
    else:
        rss = rss0 - (z2 * (1.0 - (grid.unsqueeze(1) / den) ** 2)).sum(1)
    df = (s / den).sum(1)
    gcv = rss.clamp_min(0.0) / (1.0 - df / n).clamp_min(1e-9) ** 2
    gcv = torch.where(df < n - 1e-6, gcv, torch.full_like(gcv, math.inf))
    if not torch.isfinite(gcv).any() or rss0 <= 1e-20 * max(energy, 1e-300):
        return float(grid[0])  # the prior fits already, or no valid grid point
    return float(grid[int(torch.argmin(gcv))])


def least_squares(x: Tensor, y: Tensor, bias: bool = True, ridge: float = 0.0) -> Tensor:
    """Closed-form ``argmin_W ||[X, 1] W - Y||^2 (+ ridge)`` for explicit matrices (reference)."""
    ls = LeastSquares(x.shape[1], y.shape[1], bias, x.device, torch.float64)
    ls.add(x, y)
    return ls.solve(ridge)
