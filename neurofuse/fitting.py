"""Fitting a fused level to its targets: closed-form least squares and gradient descent.

Closed form (Linear variants, paper appendix B.2). An affine layer computes ``Y = X W`` where each
row of ``X`` is one input patch (a sample for ``Linear``, a sample x position for convolutions,
with a column of ones for the bias). Given targets ``T`` the fit is

    W* = argmin_W ||X W - T||_F^2 + lambda ||W||_F^2 = (X^T X + lambda I)^{-1} X^T T.

It is computed from the Gram matrix ``G = X^T X`` (p x p) and ``X^T Y`` accumulated over chunks,
so the (samples * positions) x p matrix ``X`` is never held whole (DESIGN.md section 5). With the
Cholesky factor ``G + lambda I = L L^T``, the coordinates ``c_j = L^{-1} X^T y_j`` of every target
column satisfy ``||c_i - c_j|| = ||P y_i - P y_j||`` where ``P = X X^+`` projects onto the column
space of ``X``: clustering the projected outputs can be done in p dimensions instead of N.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurofuse.optimizers import OptimizerName, check_optimizer, make_optimizer
from neurofuse.progress import progress_bar
from neurofuse.utils import optional_tensor_attr, tensor_attr

# --------------------------------------------------------------------------- closed form


_Pair = tuple[int, int]


def _conv_geometry(layer: nn.Conv1d | nn.Conv2d) -> tuple[_Pair, _Pair, _Pair, _Pair]:
    """Kernel size, dilation, padding and stride, as 2-D pairs (a Conv1d is a 1 x k Conv2d)."""
    if layer.groups != 1:
        raise NotImplementedError(
            f"{layer} is a grouped convolution; the Linear variants support groups=1 only. "
            "Use a gradient variant (kf_gradient) for this model."
        )
    if layer.padding_mode != "zeros":
        raise NotImplementedError(
            f"{layer} uses padding_mode={layer.padding_mode!r}; the Linear variants support "
            "zero padding only. Use a gradient variant (kf_gradient)."
        )
    k = tuple(layer.kernel_size)
    d = tuple(layer.dilation)
    s = tuple(layer.stride)
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            p = tuple(0 for _ in k)
        elif any(si != 1 for si in s):
            raise NotImplementedError("padding='same' with stride > 1 is not supported")
        else:  # 'same': zero padding of d*(k-1)/2 on each side (symmetric kernels)
            if any((di * (ki - 1)) % 2 for ki, di in zip(k, d, strict=True)):
                raise NotImplementedError("padding='same' with an even kernel is not supported")
            p = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
    else:
        p = tuple(layer.padding)
    if isinstance(layer, nn.Conv1d):
        return (1, k[0]), (1, d[0]), (0, p[0]), (1, s[0])
    return (k[0], k[1]), (d[0], d[1]), (p[0], p[1]), (s[0], s[1])


def _patch_rows(
    x: Tensor, k: tuple[int, int], d: tuple[int, int], p: tuple[int, int], s: tuple[int, int]
) -> Tensor:
    """Convolution patches as rows, (B * H' * W', C * kh * kw), columns ordered like a conv
    weight's (C, kh, kw). Built from k*k strided views of the padded input: the same result as
    ``F.unfold``, without its im2col kernel, which was slow on CPU (``benchmarks/fusion_speed.py``
    times the Linear variants' fitting phase)."""
    b, c, h, w = x.shape
    h_out = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w_out = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    views = [
        xp[
            :,
            :,
            u * d[0] : u * d[0] + s[0] * (h_out - 1) + 1 : s[0],
            v * d[1] : v * d[1] + s[1] * (w_out - 1) + 1 : s[1],
        ]
        for u in range(k[0])
        for v in range(k[1])
    ]
    patches = torch.stack(views, dim=-1)  # (B, C, H', W', kh*kw)
    return patches.permute(0, 2, 3, 1, 4).reshape(b * h_out * w_out, c * k[0] * k[1])


def affine_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """Rows of ``X`` (without the bias column) for ``layer`` applied to the batch ``x``.

    Row order matches :func:`affine_output_rows` of the layer's output."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        k, d, p, s = _conv_geometry(layer)
        if isinstance(layer, nn.Conv1d):
            x = x.unsqueeze(2)
        return _patch_rows(x, k, d, p, s)
    raise TypeError(f"{type(layer).__name__} is not an affine layer (Linear, Conv1d, Conv2d)")


def affine_output_rows(layer: nn.Module, y: Tensor) -> Tensor:
    """(N, d) rows of a layer output in the order of :func:`affine_inputs`."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def set_affine_weights(layer: nn.Module, w: Tensor, bias: Tensor | None) -> None:
    """Write a fitted (p, d) weight matrix (rows in :func:`affine_inputs` order) into ``layer``."""
    weight, layer_bias = tensor_attr(layer, "weight"), optional_tensor_attr(layer, "bias")
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            weight.copy_(w.T.to(weight))
        else:
            weight.copy_(w.T.reshape(weight.shape).to(weight))
        if bias is not None:
            if layer_bias is None:
                raise ValueError("cannot set a bias on a layer without one")
            layer_bias.copy_(bias.to(layer_bias))
        elif layer_bias is not None:
            layer_bias.zero_()


BLOCK_ROWS = 16384


class LeastSquares:
    """Normal equations of one least-squares problem, accumulated chunk by chunk.

    :attr:`gram` is ``X^T X`` and :attr:`cross` is ``X^T Y`` for the rows passed to :meth:`add`;
    with ``bias=True`` a column of ones is appended to ``X``. Products are taken block by block
    in ``product_dtype`` on rows shifted by the first block's means (the shifted-data trick: the
    rounding error of a float32 product then scales with the rows' spread, not with their mean,
    which is large after a ReLU) and summed in ``dtype`` (float64); the exact uncentred sums
    are rebuilt in ``dtype``. With ``targets=True`` it also accumulates ``Y^T Y``
    (:attr:`target_gram`), which only the cross-validated :meth:`solve_prior` reads.
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
    ) -> None:
        self.p, self.d, self.bias, self.dtype = p, d, bias, dtype
        self.product_dtype = product_dtype or dtype
        z = functools.partial(torch.zeros, device=device, dtype=dtype)
        self.sxx, self.sxy, self.sx, self.sy = z(p, p), z(p, d), z(p), z(d)
        self.syy = z(d, d) if targets else None
        self.shift_x: Tensor | None = None
        self.shift_y: Tensor | None = None
        self.rows = 0

    @classmethod
    def empty(
        cls,
        p: int,
        d: int,
        bias: bool,
        device: torch.device,
        dtype: torch.dtype,
        product_dtype: torch.dtype | None = None,
        targets: bool = False,
    ) -> LeastSquares:
        return cls(p, d, bias, device, dtype, product_dtype, targets)

    def add(self, x_rows: Tensor, y_rows: Tensor) -> None:
        """Accumulate the rows ``x_rows`` (N, p) with their targets ``y_rows`` (N, d)."""
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
        self.rows += x_rows.shape[0]

    @property
    def gram(self) -> Tensor:
        """``[X, 1]^T [X, 1]`` (or ``X^T X`` without bias), uncentred, in ``dtype``."""
        a, n = self._shift_x(), self.rows
        g = self.sxx + torch.outer(a, self.sx) + torch.outer(self.sx, a) + n * torch.outer(a, a)
        if not self.bias:
            return g
        col = (self.sx + n * a).unsqueeze(1)
        corner = torch.full((1, 1), float(n), dtype=self.dtype, device=g.device)
        return torch.cat([torch.cat([g, col], 1), torch.cat([col.T, corner], 1)], 0)

    @property
    def cross(self) -> Tensor:
        """``[X, 1]^T Y`` (or ``X^T Y``), uncentred, in ``dtype``."""
        a, c, n = self._shift_x(), self._shift_y(), self.rows
        xy = self.sxy + torch.outer(self.sx, c) + torch.outer(a, self.sy) + n * torch.outer(a, c)
        if not self.bias:
            return xy
        return torch.cat([xy, (self.sy + n * c).unsqueeze(0)], 0)

    @property
    def target_gram(self) -> Tensor:
        """``Y^T Y``, uncentred, in ``dtype`` (for the residual norms of :meth:`solve_prior`)."""
        if self.syy is None:
            raise ValueError("Y^T Y was not accumulated: create the LeastSquares with targets=True")
        c, n = self._shift_y(), self.rows
        return self.syy + torch.outer(self.sy, c) + torch.outer(c, self.sy) + n * torch.outer(c, c)

    def _shift_x(self) -> Tensor:
        return self.shift_x if self.shift_x is not None else torch.zeros_like(self.sx)

    def _shift_y(self) -> Tensor:
        return self.shift_y if self.shift_y is not None else torch.zeros_like(self.sy)

    def factor(self, ridge: float = 1e-6) -> Tensor:
        """Lower Cholesky factor of ``G + lambda I`` with ``lambda = ridge * mean(diag G)``:
        the small ridge keeps rank-deficient inputs (dead neurons, constant channels) solvable."""
        g = self.gram
        scale = float(torch.diagonal(g).mean().clamp_min(1e-12))
        eye = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
        lam = ridge * scale
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(g + lam * eye)
            if int(info) == 0:
                return chol
            lam = max(lam * 100, 1e-10 * scale)
        raise RuntimeError("least squares: Gram matrix is not positive definite even with ridge")

    def coordinates(self, chol: Tensor, cross: Tensor | None = None) -> Tensor:
        """``L^{-1} X^T Y``: columns of Y in an orthonormal basis of the column space of X."""
        c = self.cross if cross is None else cross
        return torch.linalg.solve_triangular(chol, c, upper=False)

    @staticmethod
    def weights_from_coordinates(chol: Tensor, coords: Tensor) -> Tensor:
        """``L^{-T} c``: the weights whose output is the projection with coordinates ``c``."""
        return torch.linalg.solve_triangular(chol.T, coords, upper=True)

    def solve(self, ridge: float = 1e-6, cross: Tensor | None = None) -> Tensor:
        chol = self.factor(ridge)
        return self.weights_from_coordinates(chol, self.coordinates(chol, cross))

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
        decomposition of ``G``; a given ``strength`` is relative to ``mean(diag G)`` like
        ``ridge``, which is the floor of the grid. Returns the weights and ``lam`` used,
        relative to ``mean(diag G)``. (Hand-written: scikit-learn's ``RidgeCV`` does GCV, but centred on zero,
        on explicit rows and in float64 NumPy; here the rows are never held, only ``G``.)
        """
        g = self.gram
        c = self.cross if project is None else self.cross @ project.T.to(self.dtype)
        w0 = prior.to(g)
        if w0.shape != c.shape:
            raise ValueError(f"prior has shape {tuple(w0.shape)}, the weights {tuple(c.shape)}")
        scale = float(torch.diagonal(g).mean().clamp_min(1e-12))
        s, v = torch.linalg.eigh(g)
        s = s.clamp_min(0.0)
        z = v.T @ (c - g @ w0)
        if strength is not None:
            lam = max(strength, ridge) * scale
        else:
            lam = self._gcv(s, z, c, g, w0, project, scale, ridge)
        return w0 + v @ (z / (s + lam).unsqueeze(1)), lam / scale

    def _gcv(
        self,
        s: Tensor,
        z: Tensor,
        c: Tensor,
        g: Tensor,
        w0: Tensor,
        project: Tensor | None,
        scale: float,
        ridge: float,
    ) -> float:
        yy = self.target_gram
        if project is not None:
            pr = project.to(yy)
            yy = pr @ yy @ pr.T
        rss0 = float(torch.trace(yy) - 2 * (w0 * c).sum() + (w0 * (g @ w0)).sum())
        n = self.rows
        z2 = (z * z).sum(1)
        grid = scale * torch.logspace(math.log10(max(ridge, 1e-12)), 4, 41, dtype=s.dtype)
        den = s.unsqueeze(0) + grid.unsqueeze(1)  # (grid, p)
        rss = rss0 - 2 * (z2 / den).sum(1) + (s * z2 / den**2).sum(1)
        df = (s / den).sum(1)
        gcv = rss.clamp_min(0.0) / (1.0 - df / n).clamp_min(1e-9) ** 2
        gcv = torch.where(df < n - 1e-6, gcv, torch.full_like(gcv, math.inf))
        if not torch.isfinite(gcv).any() or rss0 <= 1e-20 * max(float(torch.trace(yy)), 1e-300):
            return float(grid[0])  # the prior fits already, or no valid grid point
        return float(grid[int(torch.argmin(gcv))])


def least_squares(x: Tensor, y: Tensor, bias: bool = True, ridge: float = 0.0) -> Tensor:
    """Closed-form ``argmin_W ||[X, 1] W - Y||^2 (+ ridge)`` for explicit matrices (reference)."""
    ls = LeastSquares.empty(x.shape[1], y.shape[1], bias, x.device, torch.float64)
    ls.add(x, y)
    return ls.solve(ridge)


# --------------------------------------------------------------------------- gradient fitting


@dataclass
class GradientConfig:
    """How one level is fitted by gradient descent (paper Table 9)."""

    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 100
    batch_size: int = 32
    val_split: float = 0.1
    patience: int = 20
    loss: Literal["mse", "kl", "ce"] = (
        "mse"  # "mse", "kl" (KL to soft predictions) or "ce" (targets are labels)
    )
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if self.loss not in ("mse", "kl", "ce"):
            raise ValueError(f"loss must be 'mse', 'kl' or 'ce', got {self.loss!r}")
        if not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {self.val_split}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")


@dataclass
class TrainingOptions:
    """Options of a training loop over the fusion set, shared by the distillation baselines
    (``kd``, ``lp``: :class:`neurofuse.methods.kd.DistillOptions`) and fine-tuning
    (:class:`neurofuse.finetuning.FinetuneOptions`), which change only the defaults.

    Attributes:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        lr, weight_decay: of the optimizer.
        epochs: maximum passes over the training part of the data.
        batch_size: mini-batch size.
        val_split: fraction of the data held out for early stopping; the weights with the best
            held-out loss are restored at the end (no hold-out below 10 samples).
        patience: epochs without a better held-out loss before training stops.
        temperature: ``T`` of the distillation loss ``T^2 KL(softmax(t/T) || softmax(s/T))``.
    """

    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 100
    batch_size: int = 32
    val_split: float = 0.1
    patience: int = 20
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if isinstance(self.weight_decay, bool) or not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.config()  # validates val_split

    def config(
        self,
        loss: Literal["mse", "kl", "ce"] = "kl",
        epochs: int | None = None,
        temperature: float | None = None,
    ) -> GradientConfig:
        """The :class:`GradientConfig` of a fit with these options and ``loss``."""
        return GradientConfig(
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            epochs=self.epochs if epochs is None else epochs,
            batch_size=self.batch_size,
            val_split=self.val_split,
            patience=self.patience,
            loss=loss,
            temperature=self.temperature if temperature is None else temperature,
        )


def perturb_(module: nn.Module, eps: float, generator: torch.Generator) -> None:
    """Add ``eps * std(p) * N(0, 1)`` noise to every parameter of ``module`` and all its
    submodules (relative noise, so one ``eps`` suits layers of any scale)."""
    if eps <= 0:
        return
    with torch.no_grad():
        for p in module.parameters():
            scale = float(p.std()) if p.numel() > 1 else float(p.abs().mean())
            noise = torch.randn(p.shape, generator=generator, device="cpu", dtype=torch.float32)
            p.add_(eps * max(scale, 1e-3) * noise.to(p))


def _level_loss(out: Tensor, target: Tensor, cfg: GradientConfig) -> Tensor:
    if cfg.loss == "ce":
        return F.cross_entropy(out, target)
    if cfg.loss == "kl":
        t = cfg.temperature
        return (
            F.kl_div(
                F.log_softmax(out / t, dim=-1),
                F.log_softmax(target / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )
    return F.mse_loss(out, target)


def fit_gradient(
    level: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    cfg: GradientConfig,
    generator: torch.Generator,
    parameters: Sequence[nn.Parameter] | None = None,
    penalty: Callable[[], Tensor] | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """Minimise the loss between ``level(inputs)`` and ``targets`` over the level's parameters.

    ``progress``, when given, is the label of a bar of epochs shown on stderr.

    ``penalty()``, when given, is added to every training step's loss (e.g. an anchor to the
    starting weights); validation and the returned losses are the data loss alone.

    A ``val_split`` fraction of the samples is held out; training stops after ``patience``
    epochs without a better validation loss and the best validation weights are restored.
    The level runs in eval mode (BatchNorm as a fixed affine map, dropout off); its
    parameters are trained. Returns the best validation and final train losses.
    """
    n = inputs.shape[0]
    perm = torch.randperm(n, generator=generator).to(inputs.device)
    n_val = int(round(cfg.val_split * n)) if n >= 10 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    params = list(parameters) if parameters is not None else [p for p in level.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)
    was_training = level.training
    level.eval()

    def evaluate(idx: Tensor) -> float:
        with torch.no_grad():
            total = 0.0
            for s in range(0, len(idx), 512):
                b = idx[s : s + 512]
                total += float(_level_loss(level(inputs[b]), targets[b], cfg)) * len(b)
            return total / max(len(idx), 1)

    # The starting weights are a candidate too: training that only makes things worse returns
    # them unchanged (matters for a good initialisation, e.g. Setting 2 or fine-tuning).
    best = evaluate(val_idx) if n_val else evaluate(tr_idx)
    best_state = copy.deepcopy(level.state_dict())
    stale = 0
    train_loss = math.nan
    with progress_bar(progress is not None, progress or "", cfg.epochs) as advance:
        for epoch in range(cfg.epochs):
            order = tr_idx[torch.randperm(len(tr_idx), generator=generator).to(tr_idx.device)]
            running, count = 0.0, 0
            for s in range(0, len(order), cfg.batch_size):
                b = order[s : s + cfg.batch_size]
                loss = _level_loss(level(inputs[b]), targets[b], cfg)
                total = loss if penalty is None else loss + penalty()
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                running += float(loss.detach()) * len(b)
                count += len(b)
            train_loss = running / max(count, 1)
            score = evaluate(val_idx) if n_val else train_loss
            advance(epoch + 1)
            if score < best - 1e-12:
                best, stale = score, 0
                best_state = copy.deepcopy(level.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    level.load_state_dict(best_state)
    level.train(was_training)
    for p in params:
        p.requires_grad_(False)
    return {"val_loss": best, "train_loss": train_loss}
