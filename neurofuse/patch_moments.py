"""The normal equations of a convolution without forming its input patches.

The Linear variants fit a convolution from ``G = X^T X`` and ``X^T Y``, where each row of ``X``
is one input patch: ``B H' W'`` rows of ``p = C kh kw`` columns. Formed directly, ``G`` costs
``B H' W' p^2`` multiply-adds, ``p / C_out`` times the layer's forward pass (4.5-9 times for the
wider convolutions of a small VGG), and the patches take ``kh kw`` times the memory of the map.

Block ``(c, o1), (c', o2)`` of ``G`` sums ``x[b, c, t + o1] x[b, c', t + o2]`` over the samples
``b`` and the output positions ``t`` (in padded coordinates): it depends on the two kernel
offsets only through their difference ``delta = o2 - o1`` and through the window ``t`` runs
over. So the per-position products ``R_delta[t] = sum_b x[b, :, t] x[b, :, t + delta]^T`` are
computed once for each distinct difference (``(2 kh - 1)(2 kw - 1)`` of them, half up to a
transpose), and every block is a window sum of one of them: about ``13 H W C^2 B`` multiply-adds
for a 3x3 kernel instead of ``81 H' W' C^2 B``, and exactly the same sums. ``X^T Y`` is the
weight gradient of the convolution (``torch.nn.grad.conv2d_weight``), also without patches.

Centring (the shifted-data trick of :class:`neurofuse.closed_form.LeastSquares`): the products
are taken on the map minus a per-channel shift ``m`` (zero padded afterwards), i.e. on patches
``X' = X - 1 a^T + E`` where ``a = m`` repeated over the offsets and ``E`` is ``m_c`` wherever an
offset reads the zero padding. The few terms in ``E`` (border positions only) are added back
exactly in the accumulation dtype, so the sums are those of ``X - 1 a^T``, as the class expects.

Only stride-1 convolutions with a kernel larger than 1x1 and a fan-in of at least
:data:`MIN_FAN_IN` take this path (:func:`applies`): for a strided convolution the patches hold
about as many products as the shifts, a 1x1 convolution's patches are the map itself, and for a
narrow input the many small per-position products cost more than the patches they replace.
``X^T Y`` costs ``B H' W' p d`` either way; in float64 on a CPU it is the larger part that
remains (``benchmarks/results/fit_options_cpu.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from neurofuse.affine import conv_geometry

#: Elements of one block of per-position products ``R_delta`` (positions x C x C) at a time.
BLOCK_ELEMENTS = 1 << 24
#: Patch elements (samples x positions x fan-in) that one block of the ``X^T Y`` product forms.
PATCH_ELEMENTS = 1 << 21
#: The smallest fan-in ``C kh kw`` that takes the shifted products: below it the explicit
#: patches, built and multiplied in chunks, are faster (a 3x3 convolution on 400 samples, float64
#: products, the sums of one layer: 0.66x the time at fan-in 576, 0.6x at 144, 0.9x at 72, 3.3x
#: at 9: many tiny per-position products).
MIN_FAN_IN = 64


@dataclass(frozen=True)
class Moments:
    """Sums over ``rows`` rows of ``(X - 1 a^T)`` and ``(Y - 1 c^T)``: ``xx`` (p, p), ``xy``
    (p, d), ``x`` (p), ``y`` (d) and, when asked for, ``yy`` (d, d)."""

    rows: int
    xx: Tensor
    xy: Tensor
    x: Tensor
    y: Tensor
    yy: Tensor | None


def applies(layer: nn.Module) -> bool:
    """Whether :func:`conv_moments` serves ``layer``: a stride-1 ``Conv1d``/``Conv2d`` with
    ``groups=1``, zero padding, a kernel of more than one element and a fan-in of at least
    :data:`MIN_FAN_IN` (the function itself takes any such layer)."""
    if not isinstance(layer, nn.Conv1d | nn.Conv2d):
        return False
    try:
        k, _, _, s = conv_geometry(layer)
    except NotImplementedError:
        return False
    c = layer.in_channels
    return s == (1, 1) and k[0] * k[1] > 1 and c * k[0] * k[1] >= MIN_FAN_IN


def channel_shift(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-channel means of the map ``x`` (the shift :func:`conv_moments` centres on)."""
    dims = [0, *range(2, x.dim())]
    return x.to(dtype).mean(dims)


def column_shift(layer: nn.Module, shift: Tensor) -> Tensor:
    """The shift of the patch columns ``(c, u, v)`` that a per-channel ``shift`` amounts to."""
    k, _, _, _ = conv_geometry(layer)  # type: ignore[arg-type]
    return shift.repeat_interleave(k[0] * k[1])


def conv_moments(
    layer: nn.Conv1d | nn.Conv2d,
    x: Tensor,
    y_rows: Tensor,
    x_shift: Tensor,
    y_shift: Tensor,
    product_dtype: torch.dtype,
    dtype: torch.dtype,
    targets: bool = False,
) -> Moments:
    """The sums of the least-squares problem ``patches(x) W ~ y_rows`` for a layer that
    :func:`applies`, centred on ``x_shift`` (per channel, ``(C,)``) and ``y_shift`` (``(d,)``);
    products in ``product_dtype``, sums in ``dtype``. ``y_rows`` are ``(B H' W', d)`` in the
    order of :func:`neurofuse.affine.affine_output_rows`."""
    k, dil, pad, _ = conv_geometry(layer)
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
    b, c, h, w = x.shape
    ho, wo = h + 2 * pad[0] - dil[0] * (k[0] - 1), w + 2 * pad[1] - dil[1] * (k[1] - 1)
    d = y_rows.shape[1]
    offsets = [(u * dil[0], v * dil[1]) for u in range(k[0]) for v in range(k[1])]
    kk, p = len(offsets), c * len(offsets)

    xc = x.to(product_dtype) - x_shift.to(product_dtype).view(1, c, 1, 1)
    xp = F.pad(xc, (pad[1], pad[1], pad[0], pad[0]))
    gram = _shift_gram(xp, offsets, (ho, wo), (pad[0], pad[1], h, w), dtype)  # (c, kk, c, kk)

    # The border terms E (module docstring), exact in dtype.
    hp, wp = xp.shape[2:]
    outside = torch.ones(hp, wp, dtype=dtype, device=x.device)
    outside[pad[0] : pad[0] + h, pad[1] : pad[1] + w] = 0.0
    o = torch.stack([outside[u : u + ho, v : v + wo].reshape(-1) for u, v in offsets], 1)
    s = xp.sum(0, dtype=dtype)  # (c, hp, wp)
    sw = torch.stack([s[:, u : u + ho, v : v + wo].reshape(c, -1) for u, v in offsets], 1)
    m = x_shift.to(dtype)
    z = sw @ o  # (c, kk, kk): z[c, o1, o2] = sum_t S[c, t + o1] [t + o2 is padding]
    xe = z.unsqueeze(2) * m.view(1, 1, c, 1)  # X'^T E as (c, kk, c', kk)
    ee = b * (m.view(c, 1, 1, 1) * m.view(1, 1, c, 1)) * (o.T @ o).view(1, kk, 1, kk)
    xx = (gram - xe - xe.permute(2, 3, 0, 1) + ee).reshape(p, p)
    sx = (sw.sum(-1) - b * m.unsqueeze(1) * o.sum(0).unsqueeze(0)).reshape(p)

    # X^T Y, Y^T Y and the target sums by blocks of samples: the weight gradient forms the
    # block's patches internally (im2col), so a block holds at most PATCH_ELEMENTS of them
    xty = torch.zeros(d, p, dtype=dtype, device=x.device)
    sy_map = torch.zeros(d, ho * wo, dtype=dtype, device=x.device)
    yy = torch.zeros(d, d, dtype=dtype, device=x.device) if targets else None
    rows = ho * wo
    step = max(1, PATCH_ELEMENTS // (p * rows))
    for lo in range(0, b, step):
        hi = min(lo + step, b)
        yc = y_rows[lo * rows : hi * rows].to(product_dtype) - y_shift.to(product_dtype)
        # (the weight gradient is several times slower with a channels-last gradient map)
        ymap = yc.reshape(hi - lo, ho, wo, d).permute(0, 3, 1, 2).contiguous()
        g = conv2d_weight(xc[lo:hi], (d, c, k[0], k[1]), ymap, stride=1, padding=pad, dilation=dil)
        xty += g.reshape(d, p).to(dtype)
        sy_map += ymap.sum(0, dtype=dtype).reshape(d, -1)
        if yy is not None:
            yy += (yc.T @ yc).to(dtype)
    q = o.T @ sy_map.T  # (kk, d)
    xy = xty.T - (m.view(c, 1, 1) * q.unsqueeze(0)).reshape(p, d)
    return Moments(b * ho * wo, xx, xy, sx, sy_map.sum(1), yy)


def _shift_gram(
    xp: Tensor,
    offsets: list[tuple[int, int]],
    out: tuple[int, int],
    real: tuple[int, int, int, int],
    dtype: torch.dtype,
) -> Tensor:
    """``(C, K, C, K)`` Gram blocks of the patches of the zero-padded map ``xp`` at the
    ``K`` kernel ``offsets`` (stride 1, output size ``out``), from one product per offset
    difference. ``real`` = (top, left, height, width) of the unpadded map inside ``xp``."""
    _, c, _, _ = xp.shape
    top, left, h, w = real
    ho, wo = out
    kk = len(offsets)
    gram = torch.zeros(c, kk, c, kk, dtype=dtype, device=xp.device)
    flat = xp.permute(2, 3, 1, 0).contiguous()  # (hp, wp, c, b)
    pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, (ui, vi) in enumerate(offsets):
        for j, (uj, vj) in enumerate(offsets):
            delta = (uj - ui, vj - vi)
            if delta >= (0, 0):  # the other half are transposes
                pairs.setdefault(delta, []).append((i, j))
    for (dh, dw), members in pairs.items():
        # positions t with t and t + delta both inside the real map (elsewhere R is zero)
        r0, r1 = max(top, top - dh), min(top + h, top + h - dh)
        c0, c1 = max(left, left - dw), min(left + w, left + w - dw)
        if r1 <= r0 or c1 <= c0:
            continue
        step = max(1, BLOCK_ELEMENTS // max(1, (c1 - c0) * c * c))
        for lo in range(r0, r1, step):
            hi = min(lo + step, r1)
            a = flat[lo:hi, c0:c1].reshape(-1, c, flat.shape[3])
            bb = flat[lo + dh : hi + dh, c0 + dw : c1 + dw].reshape(-1, c, flat.shape[3])
            r = torch.bmm(a, bb.transpose(1, 2)).to(dtype).reshape(hi - lo, c1 - c0, c, c)
            window = _window_sums(r) if len(members) > 3 else None
            for i, j in members:
                ui, vi = offsets[i]
                # the window of t for offset i is [ui, ui + ho) x [vi, vi + wo)
                ra, rb = max(lo, ui) - lo, min(hi, ui + ho) - lo
                ca, cb = max(c0, vi) - c0, min(c1, vi + wo) - c0
                if rb <= ra or cb <= ca:
                    continue
                blk = window(ra, rb, ca, cb) if window else r[ra:rb, ca:cb].sum((0, 1))
                gram[:, i, :, j] += blk
                if i != j:
                    gram[:, j, :, i] += blk.T
    return gram


def _window_sums(r: Tensor) -> Callable[[int, int, int, int], Tensor]:
    """Sums of ``r`` (rows, cols, ...) over rectangles ``[ra, rb) x [ca, cb)`` in four lookups
    each, from two-dimensional prefix sums (one pass instead of one per rectangle)."""
    pre = r.new_zeros(r.shape[0] + 1, r.shape[1] + 1, *r.shape[2:])
    pre[1:, 1:] = r.cumsum(0).cumsum(1)

    def window(ra: int, rb: int, ca: int, cb: int) -> Tensor:
        return pre[rb, cb] - pre[ra, cb] - pre[rb, ca] + pre[ra, ca]

    return window
