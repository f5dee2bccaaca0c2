"""The pieces of the Linear variants' closed-form fits: their options, the normal equations of a
unit's least-squares problem over chunks of the fusion set, writing fitted weights (a BatchNorm
after the layer folded into them), and the grouping of a layer that computes several parts of a
space side by side."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse import patch_moments
from neurofuse._sparse import entries, sparse_matrix
from neurofuse.checks import integer
from neurofuse.fitting import LeastSquares, affine_inputs, set_affine_weights
from neurofuse.graph import NORM_TYPES, module_of
from neurofuse.grouping import restarts
from neurofuse.grouping.strategy import check_kmeans_weights
from neurofuse.utils import optional_tensor_attr, tensor_attr

#: The default relative ridge of the Linear fits for each precision of the products.
PRODUCT_RIDGE = {"float64": 1e-9, "float32": 1e-6}


def check_sample_chunk(value: object) -> None:
    """Raise a clear error unless ``value`` is ``None`` or a positive number of samples (the
    ``sample_chunk`` of the Linear and Gradient variants)."""
    if value is not None:
        integer("sample_chunk", value, 1, requirement="a positive number of samples or None")


@dataclass
class LinearOptions:
    """Options of the Linear variants.

    Attributes:
        ridge: relative ridge added to ``X^T X`` (times its mean diagonal) for rank-deficient
            inputs, and the floor of the aligned prior's cross-validated strength. ``None``
            (default): ``1e-9`` with float64 products, ``1e-6`` with float32 ones (their
            rounding of ``X^T X``, amplified along the directions a small fusion set leaves
            undetermined, broke the exact recovery of a permuted ResNet from 3 samples at
            ``1e-9``: 4e-4 / 7e-4 for KF / HF, against 5e-5 / 8e-5 at ``1e-8`` and 2e-6 at
            ``1e-6``; ``tests/test_contract.py``).
        chunk_size: samples per chunk when accumulating Gram matrices.
        n_init: k-means restarts (KF only); ``"auto"`` (default): 4 up to 512 fused neurons
            per space, fewer beyond (:data:`neurofuse.grouping.AUTO_RESTARTS_K`) and for many
            base neurons (:data:`neurofuse.grouping.AUTO_RESTARTS_WORK`).
        max_iter: Lloyd iterations per restart (KF only).
        local_search: refine k-means with Kanungo et al.'s swap local search (KF only).
        kmeans_seeding: how k-means starts (KF only): ``"k-means++"`` (default, ``n_init``
            restarts), ``"matching"`` (one start from a Hungarian matching of equal-width
            models: faster on wide layers, a higher grouping error on trained ones) or
            ``"both"`` (:func:`neurofuse.grouping.group`).
        kmeans_weights: what the importance scores weigh in K-means Fusion (KF only):
            ``"uniform"`` (default): the k-means objective is unweighted and the scores weigh
            each group's members in its centroid; ``"importance"``: weighted k-means too,
            the paper's rule (:class:`neurofuse.grouping.strategy.NeuronGrouping`).
        row_budget: if set, fit each layer on a uniform random sample of about
            ``row_budget * p`` of its rows (sample x position), ``p`` being the layer's fan-in:
            a sketch of the least-squares problem that bounds the Gram cost of wide
            convolutions (two VGG-small CNNs: ``row_budget=4`` 0.63x the time, -0.1 points;
            ``benchmarks/results/fit_options_cpu.md``). ``None`` (default) uses every row and
            is exact; stride-1 convolutions then build their normal equations from shifted
            products of the input map (:mod:`neurofuse.patch_moments`), a sketch from
            explicit patch rows.
        stream: how a residual stream (a space joined by residual additions) is grouped:
            ``"first"`` on the projected outputs of the first layer that writes it (the stem
            or the embedding), like any other layer; ``"all"`` on the base models' values at
            every residual addition of the stream (each addition's values scaled to the same
            norm), which sees what the stream carries in every block, not only at its start.
        prior: what each least-squares fit is regularised towards: ``"aligned"`` (default)
            the aligned, importance-weighted average of the base models' weights that the
            grouping defines (every normalisation folded as in the fit), so that directions
            the fusion set does not excite keep the base models' weights, and a layer with
            more inputs than fusion rows is still recovered exactly from a permuted copy;
            ``"zero"`` the plain ridge of the paper (the minimum-norm answer in those
            directions).
        prior_strength: the strength of the ``"aligned"`` prior, relative to ``mean(diag
            X^T X)``; ``None`` (default) chooses it per layer by generalised cross-validation
            (recorded in ``fused.neurofuse_report["prior_strength"]``).
        matching: how HF pairs the two models' neurons (HF only): ``"exact"`` (default, the
            linear assignment, cubic in the width) or ``"sparse"``, the best pairing among each
            neuron's 128 cheapest partners (exact whenever the optimal pairs are among them;
            two wide MLPs: the optimal cost to five digits up to width 2048; 2.9x / 4.8x
            faster at width 4096 / 8192 for a 0.08% / 0.06% higher grouping cost and +0.1 /
            -0.1 points; slower below about 2048; ``benchmarks/results/hungarian_sparse.md``).
        precision: the precision of the blockwise products that build ``X^T X`` and ``X^T Y``
            (sums are always float64, on mean-shifted rows): ``"float64"``, ``"float32"`` or
            ``"auto"`` (default: float32 on a CUDA device, where float64 arithmetic is several
            times slower, float64 elsewhere). float32 products make a CNN's fits about 1.5x and
            its fusion 1.3-1.5x faster on a CPU (MLPs: 1.0-1.1x;
            ``benchmarks/results/fit_options_cpu.md``); on the 72 cached ``paper-cnn`` and
            ``paper-mlp`` model sets they moved test accuracy by -0.00 / -0.15 / +0.10 points
            on average (KF Linear, VGG / VGG-BN / MLP; single sets -1.1 to +1.5, where k-means
            settles on another grouping) and -0.02 to +0.01 (HF Linear;
            ``benchmarks/results/precision_ab.md``). With their default ridge (``1e-6``) a
            permuted model is still recovered to 1e-4.
        sample_chunk: if set, the models are evaluated on this many fusion samples at a time
            and each unit's inputs and targets are recomputed from the inputs, chunk by chunk,
            when it is fitted: the engine never holds a level's outputs for the whole fusion
            set, so peak memory stops growing with the number of fusion samples beyond one
            chunk (what remains per layer is ``X^T X``, ``p x p``, and the grouping's points,
            at most ``p`` coordinates per neuron). It costs forward passes: a unit at depth
            ``l`` reruns the ``l`` units before it, about ``L / 2`` forward passes of an
            ``L``-unit network in all (``benchmarks/results/scale.md`` measures it). The fit is
            the same up to the order of floating-point sums (k-means++ seeding may break an
            exact tie the other way, as it may for a reordered fusion set). Importance scores
            are computed from the inputs in the scores' own batches. ``None`` (default): the
            whole fusion set at once, each value computed once.
    """

    ridge: float | None = None
    chunk_size: int = 128
    n_init: int | Literal["auto"] = "auto"
    max_iter: int = 100
    local_search: bool = False
    kmeans_seeding: Literal["k-means++", "matching", "both"] = "k-means++"
    kmeans_weights: Literal["uniform", "importance"] = "uniform"
    matching: Literal["exact", "sparse"] = "exact"
    row_budget: int | None = None
    precision: Literal["auto", "float32", "float64"] = "auto"
    stream: Literal["first", "all"] = "first"
    prior: Literal["aligned", "zero"] = "aligned"
    prior_strength: float | None = None
    sample_chunk: int | None = None

    def __post_init__(self) -> None:
        check_kmeans_weights(self.kmeans_weights)
        check_sample_chunk(self.sample_chunk)
        if self.prior not in ("aligned", "zero"):
            raise ValueError(f"prior must be 'aligned' or 'zero', got {self.prior!r}")
        if self.prior_strength is not None and not self.prior_strength >= 0:
            raise ValueError(f"prior_strength must be >= 0 or None, got {self.prior_strength}")
        if self.stream not in ("first", "all"):
            raise ValueError(f"stream must be 'first' or 'all', got {self.stream!r}")
        if self.row_budget is not None and self.row_budget < 2:
            raise ValueError(
                f"row_budget must be at least 2 (rows per weight), got {self.row_budget}"
            )
        if self.matching not in ("exact", "sparse"):
            raise ValueError(f"matching must be 'exact' or 'sparse', got {self.matching!r}")
        if self.precision not in ("auto", "float32", "float64"):
            raise ValueError(
                f"precision must be 'auto', 'float32' or 'float64', got {self.precision!r}"
            )
        if restarts(self.n_init, 1) < 1:
            raise ValueError(
                f"n_init must be a positive number of restarts or 'auto'; got {self.n_init!r}"
            )
        if (self.ridge is not None and self.ridge < 0) or self.chunk_size < 1 or self.max_iter < 1:
            raise ValueError("ridge must be >= 0 and chunk_size, max_iter positive")

    def resolved(self, device: torch.device) -> LinearOptions:
        """These options with ``precision="auto"`` made concrete for inputs on ``device``."""
        if self.precision != "auto":
            return self
        return dataclasses.replace(
            self, precision="float32" if torch.device(device).type == "cuda" else "float64"
        )

    @property
    def ridge_value(self) -> float:
        """``ridge``, or its default for the products' precision (``"auto"``: float64's)."""
        if self.ridge is not None:
            return self.ridge
        return PRODUCT_RIDGE.get(self.precision, PRODUCT_RIDGE["float64"])


def check_batchnorms(fgm: fx.GraphModule) -> None:
    for n in fgm.graph.nodes:
        bn = module_of(fgm, n)
        if isinstance(bn, NORM_TYPES) and (bn.running_mean is None or not bn.affine):
            raise ValueError(
                f"BatchNorm {n.target!r} has no running statistics or no affine parameters; "
                "the Linear variants need eval-mode BatchNorm with both. Use kf_gradient."
            )


def check_untied(model: nn.Module) -> None:
    """Refuse tied parameters (one tensor under two names, e.g. a language model's embedding
    and output layer): the Linear variants fit each layer on its own and would overwrite the
    one with the other's solution after later layers were fitted against it."""
    seen: dict[int, str] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(p), key)
        if first != key:
            raise ValueError(
                f"{first!r} and {key!r} are one tied parameter; the Linear variants fit "
                "every layer separately and cannot keep them tied. Untie them first (e.g. "
                f"model.{key} = nn.Parameter(model.{key}.detach().clone())), or use "
                "kf_gradient with preset='setting1'."
            )


def set_unit(layer: nn.Module, bn: nn.Module | None, w: Tensor, intercept: Tensor | None) -> None:
    """Write fitted weights; a BatchNorm after the layer becomes the identity (it is folded)."""
    carries_bias = optional_tensor_attr(layer, "bias") is not None
    set_affine_weights(layer, w, intercept if carries_bias else None)
    if bn is not None:
        identity_norm(bn)
        if intercept is not None and not carries_bias:
            with torch.no_grad():
                bn_bias = tensor_attr(bn, "bias")
                bn_bias.copy_(intercept.to(bn_bias))
    elif intercept is not None and not carries_bias:
        raise ValueError(f"{layer} has no bias and no BatchNorm to carry the fitted intercept")


def norm_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(a, c)`` such that a normalisation's output is ``a * x_hat + c`` per neuron, ``x_hat``
    what the same normalisation set to the identity (:func:`identity_norm`) gives: for a
    LayerNorm its weight and bias, for an eval-mode BatchNorm its whole affine map of ``x``."""
    w = tensor_attr(norm, "weight").detach().to(torch.float64)
    b = tensor_attr(norm, "bias").detach().to(torch.float64)
    if getattr(norm, "running_mean", None) is None:
        return w.reshape(-1), b.reshape(-1)
    running_var = tensor_attr(norm, "running_var").to(torch.float64)
    scale = w / torch.sqrt(running_var + _eps(norm))
    return scale, b - tensor_attr(norm, "running_mean").to(torch.float64) * scale


def _eps(norm: nn.Module) -> float:
    # torch types a module attribute its class does not declare as ``Tensor | Module``.
    return cast(float, norm.eps)


def effective_unit(
    layer: nn.Module,
    before: nn.Module | None,
    after: nn.Module | None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """What a base model's unit computes from the input the fused unit sees, as one affine map
    ``(weight in the layer's shape, bias)`` in ``dtype``: a normalisation ``before`` it that the
    fused model folds (sets to the identity) restored, a BatchNorm ``after`` it folded in. For a
    convolution the shift of a folded normalisation is taken as constant over the kernel (exact
    away from the zero-padded border): this map is only the prior of a fit."""
    w = tensor_attr(layer, "weight").detach().to(dtype)
    bias = optional_tensor_attr(layer, "bias")
    b = torch.zeros(w.shape[0], dtype=w.dtype) if bias is None else bias.detach().to(w)
    b = b.to(w.device)
    if before is not None:
        a, c = norm_affine(before)
        if a.numel() == w.shape[1]:
            shape = (1, -1) + (1,) * (w.dim() - 2)
            b = b + (w.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w) @ c.to(w)
            w = w * a.to(w).reshape(shape)
    if after is not None:
        a, c = norm_affine(after)
        shape = (-1,) + (1,) * (w.dim() - 1)
        w = w * a.to(w).reshape(shape)
        b = b * a.to(w) + c.to(w)
    return w, b


def weight_rows(w: Tensor) -> Tensor:
    """A layer's weight ``(out, in, *kernel)`` as least-squares rows ``(p, out)`` in the order
    of :func:`neurofuse.fitting.affine_inputs`."""
    return w.reshape(w.shape[0], -1).T


def identity_norm(norm: nn.Module) -> None:
    """Set a normalisation's affine part to the identity (and a BatchNorm's statistics to zero
    mean and unit variance): what it did is absorbed by the fit of the layer next to it."""
    with torch.no_grad():
        tensor_attr(norm, "weight").fill_(1.0)
        tensor_attr(norm, "bias").zero_()
        if getattr(norm, "running_mean", None) is not None:
            tensor_attr(norm, "running_mean").zero_()
            tensor_attr(norm, "running_var").fill_(1.0 - _eps(norm))


def expand_parts(a: Tensor, parts: int, sizes: list[int]) -> Tensor:
    """A grouping ``(k, sum C_k)`` of a space, for a layer computing ``parts`` copies of it
    side by side (``[q | k | v]``): ``(parts k, sum parts C_k)``, model blocks in order."""
    if parts == 1:
        return a
    k = a.shape[0]
    if a.is_sparse:
        return _expand_sparse(a, parts, sizes)
    out = a.new_zeros(parts * k, parts * sum(sizes))
    lo = 0
    for c in sizes:
        for p in range(parts):
            out[p * k : (p + 1) * k, parts * lo + p * c : parts * lo + (p + 1) * c] = a[
                :, lo : lo + c
            ]
        lo += c
    return out


def _expand_sparse(a: Tensor, parts: int, sizes: list[int]) -> Tensor:
    """:func:`expand_parts` of a sparse grouping: entry ``(i, j)`` with ``j`` in model block
    ``[start, start + c)`` goes to ``(q k + i, parts start + q c + j - start)`` for each part q."""
    k = a.shape[0]
    rows, cols, vals = entries(a)
    edges = torch.tensor([0, *sizes], device=cols.device).cumsum(0)
    model = torch.bucketize(cols, edges[1:], right=True)
    start, width = edges[model], torch.tensor(sizes, device=cols.device)[model]
    q = torch.arange(parts, device=cols.device).repeat_interleave(rows.numel())
    index = torch.stack(
        [
            q * k + rows.repeat(parts),
            parts * start.repeat(parts) + q * width.repeat(parts) + (cols - start).repeat(parts),
        ]
    )
    shape = (parts * k, parts * sum(sizes))
    return sparse_matrix(index, vals.repeat(parts), shape)


#: One piece of a unit's least-squares data: the inputs ``xs`` of its layers on some samples,
#: and ``y_rows(lo, hi)``, the target rows ``lo..hi`` of those samples.
FitPiece = tuple[list[Tensor], Callable[[int, int], Tensor]]


def normal_equations(
    layers: list[nn.Module],
    pieces: Iterable[FitPiece],
    bias: bool,
    opt: LinearOptions,
    seed: int,
    n: int,
) -> LeastSquares:
    """Normal equations of the joint fit ``sum_i X_i W_i (+ b) ~ Y`` over the fusion set, which
    ``pieces`` give in consecutive parts (one, or chunks of ``opt.sample_chunk``), each
    accumulated in chunks of ``opt.chunk_size``: ``X_i`` are the rows ``layers[i]`` reads from
    its input ``xs[i]`` (with ``opt.row_budget``, a uniform row sketch); ``n`` is the number of
    rows of ``xs[0]`` over the whole set (samples, or samples x tokens after a reshape)."""
    ls: LeastSquares | None = None
    conv, keep, per_sample = False, 1.0, 1
    shifts: ConvShifts | None = None
    gen = torch.Generator(device="cpu")
    for xs, y_rows in pieces:
        if ls is None:
            opt = opt.resolved(xs[0].device)  # (precision "auto": the inputs' device decides)
            feats = [affine_inputs(layer, x[:1]).shape for layer, x in zip(layers, xs, strict=True)]
            per_sample = feats[0][0]
            p = sum(f[1] for f in feats)
            ls = LeastSquares(
                p,
                y_rows(0, per_sample).shape[1],
                bias,
                xs[0].device,
                torch.float64,
                getattr(torch, opt.precision),
                targets=opt.prior == "aligned" and opt.prior_strength is None,  # GCV reads Y^T Y
            )
            if opt.row_budget is not None:
                keep = min(1.0, opt.row_budget * p / (n * per_sample))
            conv = (
                len(layers) == 1
                and keep == 1.0
                and patch_moments.applies(layers[0])
                and n * per_sample > ls.unknowns  # (fewer rows: the dual form holds them)
            )
            gen.manual_seed(seed + p)
        if conv:
            shifts = _conv_normal_equations(ls, layers[0], xs[0], y_rows, per_sample, opt, shifts)  # type: ignore[arg-type]
        else:
            _add_rows(ls, layers, xs, y_rows, per_sample, keep, gen, opt.chunk_size)
        del xs, y_rows  # (not alive while the next piece is computed)
    if ls is None:
        raise ValueError("normal_equations: no fusion samples")
    return ls


def _add_rows(
    ls: LeastSquares,
    layers: list[nn.Module],
    xs: list[Tensor],
    y_rows: Callable[[int, int], Tensor],
    per_sample: int,
    keep: float,
    gen: torch.Generator,
    chunk: int,
) -> None:
    """Add the rows of one piece to ``ls`` in chunks of ``chunk`` inputs (a uniform sketch of
    them when ``keep < 1``)."""
    m = xs[0].shape[0]
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        xr = torch.cat(
            [affine_inputs(layer, x[lo:hi]) for layer, x in zip(layers, xs, strict=True)], dim=1
        )
        yr = y_rows(lo * per_sample, hi * per_sample)
        if keep < 1.0:  # a uniform row sketch of the least-squares problem
            rows = torch.rand(xr.shape[0], generator=gen) < keep
            rows = rows.nonzero().squeeze(1).to(xr.device)
            xr, yr = xr[rows], yr[rows]
        ls.add(xr, yr)


#: The shifts that every chunk of a convolution's normal equations is centred on: per input
#: channel, per column of ``X`` and per column of ``Y`` (the first chunk's means).
ConvShifts = tuple[Tensor, Tensor, Tensor]


def _conv_normal_equations(
    ls: LeastSquares,
    layer: nn.Conv1d | nn.Conv2d,
    x: Tensor,
    y_rows: Callable[[int, int], Tensor],
    per_sample: int,
    opt: LinearOptions,
    shifts: ConvShifts | None,
) -> ConvShifts:
    """Add the normal equations of a stride-1 convolution on the samples of ``x`` to ``ls``, from
    shifted products of its input map, without forming the patches
    (:mod:`neurofuse.patch_moments`), in chunks of samples whose map copy holds about 2^22
    elements (at least ``opt.chunk_size`` samples); returns the shifts, which later calls reuse."""
    n = x.shape[0]
    chunk = max(opt.chunk_size, (1 << 22) // max(1, x[:1].numel()))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        yr = y_rows(lo * per_sample, hi * per_sample)
        if shifts is None:  # the first chunk's means, kept for every chunk
            channel = patch_moments.channel_shift(x[lo:hi], ls.dtype)
            shifts = channel, patch_moments.column_shift(layer, channel), yr.to(ls.dtype).mean(0)
        channel, column, target = shifts
        m = patch_moments.conv_moments(
            layer, x[lo:hi], yr, channel, target, ls.product_dtype, ls.dtype, ls.targets
        )
        ls.add_moments(m, column, target)
    assert shifts is not None
    return shifts
