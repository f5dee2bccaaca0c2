"""The affine view of a layer that the Linear variants fit: the rows ``X`` a ``Linear`` or
convolution reads (convolution patches as rows), its outputs as rows, and writing fitted weights
back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurofuse.utils import optional_tensor_attr, tensor_attr

_Pair = tuple[int, int]


def conv_geometry(layer: nn.Conv1d | nn.Conv2d) -> tuple[_Pair, _Pair, _Pair, _Pair]:
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
        k, d, p, s = conv_geometry(layer)
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
            weight.copy_(w.T)  # (copy_ casts: no converted temporary)
        else:
            weight.copy_(w.T.reshape(weight.shape))
        if bias is not None:
            if layer_bias is None:
                raise ValueError("cannot set a bias on a layer without one")
            layer_bias.copy_(bias.to(layer_bias))
        elif layer_bias is not None:
            layer_bias.zero_()
