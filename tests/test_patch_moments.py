"""The normal equations of a convolution from shifted products of its input map
(neurofuse.patch_moments) against the same sums over explicit patches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurofuse import patch_moments
from neurofuse.affine import affine_inputs, affine_output_rows
from neurofuse.closed_form import LeastSquares
from neurofuse.methods._linear_parts import LinearOptions, normal_equations

GEOMETRIES = [
    (lambda: nn.Conv2d(5, 7, 3, padding=1), (12, 5, 9, 8)),
    (lambda: nn.Conv2d(5, 7, (3, 2), padding=(2, 0), dilation=(2, 1)), (12, 5, 9, 8)),
    (lambda: nn.Conv2d(3, 4, 5, padding=1), (12, 3, 7, 10)),  # padding < half the kernel
    (lambda: nn.Conv2d(3, 4, 3), (12, 3, 6, 6)),  # no padding
    (lambda: nn.Conv2d(3, 4, 3, padding="same", bias=False), (12, 3, 6, 6)),
    (lambda: nn.Conv1d(4, 6, 5, padding=2), (12, 4, 11)),
]


def _explicit(layer, x, y_rows, dtype=torch.float64):
    """The same problem fed as explicit patch rows (the reference)."""
    xr = affine_inputs(layer, x).to(torch.float64)
    ls = LeastSquares(xr.shape[1], y_rows.shape[1], True, x.device, dtype, targets=True, dual=False)
    ls.add(xr, y_rows.to(torch.float64))
    return ls


def _data(layer, shape, seed=0, offset=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).relu() + offset  # a large mean, as after a ReLU + shift
    with torch.no_grad():
        y = layer(x) + 0.1 * torch.randn(layer(x).shape, generator=g)
    return x, affine_output_rows(layer, y)


@pytest.mark.parametrize("make,shape", GEOMETRIES)
def test_shifted_products_equal_the_patch_sums_in_any_number_of_chunks(make, shape, monkeypatch):
    torch.manual_seed(0)
    layer = make()
    monkeypatch.setattr(patch_moments, "MIN_FAN_IN", 1)  # small layers, the same sums
    assert patch_moments.applies(layer)
    x, y = _data(layer, shape)
    ref = _explicit(layer, x, y)
    per_sample = y.shape[0] // x.shape[0]
    ls = LeastSquares(ref.p, ref.d, True, x.device, torch.float64, targets=True)
    shift_x = patch_moments.channel_shift(x[:5], torch.float64) + 0.25  # any shift will do
    shift_y = y[:5].double().mean(0)
    for lo, hi in [(0, 5), (5, 6), (6, 12)]:  # three unequal chunks
        m = patch_moments.conv_moments(
            layer,
            x[lo:hi],
            y[lo * per_sample : hi * per_sample],
            shift_x,
            shift_y,
            torch.float64,
            torch.float64,
            targets=True,
        )
        ls.add_moments(m, patch_moments.column_shift(layer, shift_x), shift_y)
    assert ls.rows == ref.rows and not ls.dual
    for got, want in [
        (ls.gram, ref.gram),
        (ls.cross, ref.cross),
        (ls.target_gram, ref.target_gram),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ls.solve(1e-9), ref.solve(1e-9), rtol=1e-7, atol=1e-7)


def test_float32_shifted_products_stay_accurate_for_large_means():
    layer = nn.Conv2d(4, 3, 3, padding=1)
    x, y = _data(layer, (40, 4, 8, 8), offset=50.0)
    ref = _explicit(layer, x, y)
    per_sample = y.shape[0] // x.shape[0]
    ls = LeastSquares(ref.p, ref.d, True, x.device, torch.float64, torch.float32, targets=True)
    shift_x = patch_moments.channel_shift(x, torch.float64)
    shift_y = y.double().mean(0)
    m = patch_moments.conv_moments(
        layer, x, y, shift_x, shift_y, torch.float32, torch.float64, targets=True
    )
    ls.add_moments(m, patch_moments.column_shift(layer, shift_x), shift_y)
    assert ls.rows == 40 * per_sample
    # relative to the entries' size (~2,500 x rows): float32 products on uncentred data would
    # be off by about 1e-4 of it; the border corrections are exact
    torch.testing.assert_close(ls.gram, ref.gram, rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(ls.cross, ref.cross, rtol=1e-6, atol=1e-2)


def test_normal_equations_take_the_shift_path_and_give_the_same_fit():
    torch.manual_seed(1)
    layer = nn.Conv2d(8, 5, 3, padding=1)  # fan-in 72 >= MIN_FAN_IN
    assert patch_moments.applies(layer) and 8 * 9 >= patch_moments.MIN_FAN_IN
    x, y = _data(layer, (30, 8, 5, 5))
    opt = LinearOptions(chunk_size=8)
    ls = normal_equations([layer], [([x], lambda lo, hi: y[lo:hi])], True, opt, 0, len(x))
    ref = _explicit(layer, x, y)
    assert ls.shift_x is not None and torch.equal(  # per-channel shift: the shifted products
        ls.shift_x, patch_moments.column_shift(layer, patch_moments.channel_shift(x, torch.float64))
    )
    torch.testing.assert_close(ls.gram, ref.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ls.solve(1e-9), ref.solve(1e-9), rtol=1e-7, atol=1e-7)
    # a row sketch still samples explicit patch rows
    sketched = normal_equations(
        [layer], [([x], lambda lo, hi: y[lo:hi])], True, LinearOptions(row_budget=4), 0, len(x)
    )
    assert sketched.rows < ls.rows


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 5, 3, padding=1), nn.Linear(8, 5)])
def test_normal_equations_over_pieces_equal_the_whole_set(layer):
    """``sample_chunk``'s pieces (uneven ones here) accumulate the same sums as one piece: the
    shifted-product path keeps the first piece's shifts for every later piece."""
    torch.manual_seed(2)
    shape = (30, 8, 5, 5) if isinstance(layer, nn.Conv2d) else (30, 8)
    x, y = _data(layer, shape)
    per = y.shape[0] // 30
    opt = LinearOptions(chunk_size=4)
    whole = normal_equations([layer], [([x], lambda lo, hi: y[lo:hi])], True, opt, 0, 30)
    cuts = [0, 7, 8, 21, 30]

    def pieces():
        for a, b in zip(cuts, cuts[1:], strict=False):
            yield [x[a:b]], lambda lo, hi, a=a, b=b: y[a * per : b * per][lo:hi]

    split = normal_equations([layer], pieces(), True, opt, 0, 30)
    assert split.rows == whole.rows == y.shape[0] and not split.dual
    torch.testing.assert_close(split.gram, whole.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(split.cross, whole.cross, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="no fusion samples"):
        normal_equations([layer], iter(()), True, opt, 0, 30)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1),  # strided: patches hold as few products
        nn.Conv2d(3, 4, 1),  # 1x1: the patches are the map
        nn.Conv2d(4, 4, 3, groups=2, padding=1),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        nn.Linear(3, 4),
        nn.Conv2d(3, 4, 3, padding=1),  # fan-in 27 < MIN_FAN_IN: the patches are faster
    ],
)
def test_layers_outside_the_shift_path(layer):
    assert not patch_moments.applies(layer)


def test_add_moments_refuses_other_shifts_and_held_rows():
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x, y = _data(layer, (4, 2, 5, 5))
    sx, sy = patch_moments.channel_shift(x, torch.float64), y.double().mean(0)
    m = patch_moments.conv_moments(layer, x, y, sx, sy, torch.float64, torch.float64)
    ls = LeastSquares(18, 3, True, x.device, torch.float64)
    ls.add_moments(m, patch_moments.column_shift(layer, sx), sy)
    with pytest.raises(ValueError, match="centred on the problem's shifts"):
        ls.add_moments(m, patch_moments.column_shift(layer, sx + 1.0), sy)
    held = LeastSquares(18, 3, True, x.device, torch.float64)
    held.add(affine_inputs(layer, x[:1])[:2], y[:2])  # 2 rows <= 19 unknowns: held (dual)
    with pytest.raises(ValueError, match="held for the dual form"):
        held.add_moments(m, patch_moments.column_shift(layer, sx), sy)
    needs_yy = LeastSquares(18, 3, True, x.device, torch.float64, targets=True)
    with pytest.raises(ValueError, match="targets=True"):
        needs_yy.add_moments(m, patch_moments.column_shift(layer, sx), sy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("product", [torch.float64, torch.float32])
def test_shifted_products_on_cuda_equal_the_cpu_ones(product):
    layer = nn.Conv2d(8, 6, 3, padding=1)
    x, y = _data(layer, (20, 8, 7, 7))
    sx, sy = patch_moments.channel_shift(x, torch.float64), y.double().mean(0)
    cpu = patch_moments.conv_moments(layer, x, y, sx, sy, product, torch.float64, True)
    dev = torch.device("cuda")
    gpu = patch_moments.conv_moments(
        layer.to(dev), x.to(dev), y.to(dev), sx.to(dev), sy.to(dev), product, torch.float64, True
    )
    tol = 1e-9 if product == torch.float64 else 1e-3
    for a, b in [(gpu.xx, cpu.xx), (gpu.xy, cpu.xy), (gpu.x, cpu.x), (gpu.yy, cpu.yy)]:
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
    # and a KF Linear fusion of two VGGs on the GPU takes the path and matches the CPU's
    from neurofuse.models import build

    torch.manual_seed(0)
    models = [
        build("vgg", config=[8, "M", 16, 16, "M"], input_size=8, in_channels=3).eval()
        for _ in range(2)
    ]
    inputs = torch.randn(32, 3, 8, 8)
    import neurofuse as nf

    on_cpu = nf.fuse(models, inputs, method="hf_linear")
    on_gpu = nf.fuse([m.to(dev) for m in models], inputs.to(dev), method="hf_linear")
    torch.testing.assert_close(on_gpu.cpu()(inputs), on_cpu(inputs), rtol=1e-3, atol=1e-3)
