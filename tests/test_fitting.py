"""Closed-form fitting: Gram-based least squares, unfold features, projected coordinates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.fitting import (
    GradientConfig,
    LeastSquares,
    affine_inputs,
    affine_output_rows,
    fit_gradient,
    least_squares,
    perturb_,
    set_affine_weights,
)


def test_least_squares_matches_torch_lstsq():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64)
    y = torch.randn(200, 3, generator=g, dtype=torch.float64)
    w = least_squares(x, y, bias=True)
    ref = torch.linalg.lstsq(torch.cat([x, torch.ones(200, 1, dtype=x.dtype)], 1), y).solution
    torch.testing.assert_close(w, ref, rtol=1e-8, atol=1e-10)


def test_chunked_accumulation_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 5, generator=g)
    y = torch.randn(300, 4, generator=g)
    one = LeastSquares(5, 4, True, x.device, torch.float64)
    one.add(x, y)
    chunked = LeastSquares(5, 4, True, x.device, torch.float64)
    for lo in range(0, 300, 37):
        chunked.add(x[lo : lo + 37], y[lo : lo + 37])
    torch.testing.assert_close(one.solve(0.0), chunked.solve(0.0))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(3, 5, 3, padding=1),
        nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        nn.Conv1d(2, 6, 5, padding=2, stride=2),
        nn.Linear(6, 3),
    ],
)
def test_affine_rows_reproduce_layer(layer):
    shape = {nn.Conv2d: (4, 3, 9, 8), nn.Conv1d: (4, 2, 17), nn.Linear: (4, 7, 6)}[type(layer)]
    x = torch.randn(*shape)
    rows = affine_inputs(layer, x)
    if isinstance(layer, nn.Linear):
        w = layer.weight.T
    else:
        w = layer.weight.reshape(layer.out_channels, -1).T
    out_rows = rows @ w + layer.bias
    torch.testing.assert_close(out_rows, affine_output_rows(layer, layer(x)), rtol=1e-5, atol=1e-5)


def test_fit_recovers_conv_weights_exactly():
    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 4, 3, padding=1)
    student = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(16, 3, 6, 6)
    y = teacher(x).detach()
    ls = LeastSquares(27, 4, True, x.device, torch.float64)
    ls.add(affine_inputs(student, x), affine_output_rows(student, y))
    w = ls.solve(0.0)
    set_affine_weights(student, w[:-1], w[-1])
    torch.testing.assert_close(student.weight, teacher.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student(x), y, rtol=1e-4, atol=1e-5)


def test_coordinates_preserve_projected_distances():
    """||c_i - c_j|| == ||P y_i - P y_j|| with P the projection onto the column space of X."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64)
    y = torch.randn(120, 9, generator=g, dtype=torch.float64)
    ls = LeastSquares(6, 9, True, x.device, torch.float64)
    ls.add(x, y)
    coords = ls.coordinates(ls.factor(0.0))  # (7, 9)
    xb = torch.cat([x, torch.ones(120, 1, dtype=x.dtype)], 1)
    proj = xb @ torch.linalg.pinv(xb) @ y
    torch.testing.assert_close(torch.cdist(coords.T, coords.T), torch.cdist(proj.T, proj.T))
    # the weights recovered from coordinates reproduce the projections
    w = LeastSquares.weights_from_coordinates(ls.factor(0.0), coords)
    torch.testing.assert_close(xb @ w, proj)


def test_ridge_makes_rank_deficient_inputs_solvable():
    x = torch.randn(50, 4, dtype=torch.float64)
    x = torch.cat([x, x[:, :1], torch.zeros(50, 1, dtype=x.dtype)], 1)  # duplicate + dead column
    y = x[:, :2] @ torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=x.dtype)
    w = least_squares(x, y, ridge=1e-9)
    assert torch.isfinite(w).all()
    xb = torch.cat([x, torch.ones(50, 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(xb @ w, y, rtol=1e-5, atol=1e-6)


def test_gradient_fit_reaches_target_and_restores_best():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(400, 5)
    y = teacher(x).detach()
    before = F.mse_loss(student(x), y).item()
    cfg = GradientConfig(optimizer="adam", lr=1e-2, epochs=60, patience=100)
    stats = fit_gradient(student, x, y, cfg, torch.Generator().manual_seed(0))
    after = F.mse_loss(student(x), y).item()
    assert after < 0.2 * before
    assert stats["val_loss"] <= stats["train_loss"] * 5
    assert all(not p.requires_grad for p in student.parameters())


def test_perturb_reaches_every_submodule_and_is_seeded():
    a = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    b = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    b.load_state_dict(a.state_dict())
    perturb_(b, 0.5, torch.Generator().manual_seed(0))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert not torch.equal(pa, pb), name
    c = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    c.load_state_dict(a.state_dict())
    perturb_(c, 0.5, torch.Generator().manual_seed(0))
    for pb, pc in zip(b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pb, pc)


def test_gradient_config_rejects_bad_values():
    with pytest.raises(ValueError, match="optimizer"):
        GradientConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="val_split"):
        GradientConfig(val_split=1.5)


def test_float32_products_on_shifted_rows_stay_accurate_for_large_means():
    """Post-ReLU features have large means; shifting by the first block's mean keeps float32
    products accurate where naive float32 normal equations lose digits."""
    g = torch.Generator().manual_seed(4)
    x = 50.0 + torch.rand(4000, 6, generator=g)
    y = x @ torch.randn(6, 2, generator=g) + 3.0
    exact = LeastSquares(6, 2, True, x.device, torch.float64)
    exact.add(x.double(), y.double())
    fast = LeastSquares(6, 2, True, x.device, torch.float64, torch.float32)
    fast.add(x, y)
    torch.testing.assert_close(fast.gram, exact.gram, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(fast.solve(0.0), exact.solve(0.0), rtol=1e-3, atol=1e-3)


def _problem(n, p, d, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64).relu() + offset * torch.rand(
        p, generator=g, dtype=torch.float64
    )
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


def _pair(x, y, bias=True, targets=True, chunk=None):
    """The same problem in the dual form (rows held) and in the primal form."""
    out = []
    for dual in (True, False):
        ls = LeastSquares(
            x.shape[1], y.shape[1], bias, x.device, torch.float64, targets=targets, dual=dual
        )
        for lo in range(0, x.shape[0], chunk or x.shape[0]):
            ls.add(x[lo : lo + (chunk or x.shape[0])], y[lo : lo + (chunk or x.shape[0])])
        out.append(ls)
    return out


def _assignment(labels, k, g):
    a = torch.zeros(k, labels.numel(), dtype=torch.float64)
    w = torch.rand(labels.numel(), generator=g, dtype=torch.float64) + 0.1
    a[labels, torch.arange(labels.numel())] = w
    return a / a.sum(1, keepdim=True)


@pytest.mark.parametrize("bias", [True, False])
def test_dual_form_equals_primal_form_with_fewer_rows_than_unknowns(bias):
    x, y = _problem(12, 30, 8)
    dual, primal = _pair(x, y, bias, chunk=5)
    assert dual.dual and not primal.dual
    torch.testing.assert_close(dual.gram, primal.gram)
    torch.testing.assert_close(dual.cross, primal.cross)
    torch.testing.assert_close(dual.solve(1e-6), primal.solve(1e-6), rtol=1e-6, atol=1e-8)
    fd, fp = dual.factor(1e-6), primal.factor(1e-6)
    cd, cp = dual.coordinates(fd), primal.coordinates(fp)
    assert cd.shape[0] <= 12 < cp.shape[0]  # N-dimensional coordinates instead of q
    # the same geometry of the projected target columns, and the same weights from it
    torch.testing.assert_close(
        torch.cdist(cd.T, cd.T), torch.cdist(cp.T, cp.T), rtol=1e-6, atol=1e-8
    )
    a = _assignment(torch.tensor([0, 1, 2, 0, 1, 2, 3, 3]), 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fd.weights(cd @ a.T), fp.weights(cp @ a.T), rtol=1e-6, atol=1e-8)


def test_dual_prior_centred_solve_equals_primal():
    x, y = _problem(15, 40, 6, seed=4)
    dual, primal = _pair(x, y)
    g = torch.Generator().manual_seed(5)
    a = _assignment(torch.tensor([0, 1, 2, 0, 1, 2]), 3, g)
    w0 = torch.randn(41, 3, generator=g, dtype=torch.float64)
    wd, lam_d = dual.solve_prior(w0, 1e-3, a)
    wp, lam_p = primal.solve_prior(w0, 1e-3, a)
    assert lam_d == lam_p == pytest.approx(1e-3)
    torch.testing.assert_close(wd, wp, rtol=1e-6, atol=1e-7)
    # off the rows' span the answer keeps the prior (the span of X^T)
    x1 = torch.cat([x, torch.ones(15, 1, dtype=x.dtype)], 1)
    null = torch.linalg.svd(x1, full_matrices=True).Vh[15:]  # (q - N, q)
    torch.testing.assert_close(null @ wd, null @ w0, rtol=1e-6, atol=1e-7)


def test_dual_gcv_choice_is_the_minimum_of_the_explicit_criterion():
    """With fewer rows than unknowns the residual vanishes as lam -> 0; the criterion, in the
    kernel's terms ``RSS = ||lam (K + lam)^{-1} r0||^2``, ``1 - df/n = lam tr((K + lam)^{-1}) / n``
    (no cancellation), must still be minimised on the grid."""
    x, y = _problem(15, 40, 6, seed=9)
    dual, _ = _pair(x, y)
    g = torch.Generator().manual_seed(10)
    a = _assignment(torch.tensor([0, 1, 2, 0, 1, 2]), 3, g)
    w0 = 0.05 * torch.randn(41, 3, generator=g, dtype=torch.float64)
    _, chosen = dual.solve_prior(w0, None, a, ridge=1e-9)
    x1 = torch.cat([x, torch.ones(15, 1, dtype=x.dtype)], 1)
    k = x1 @ x1.T
    scale = float(torch.trace(k)) / 41
    r0 = y @ a.T - x1 @ w0
    best, best_rel = math.inf, None
    for rel in torch.logspace(-9, 4, 41, dtype=torch.float64).tolist():
        lam = rel * scale
        m = k + lam * torch.eye(15, dtype=x.dtype)
        rss = float((lam * torch.linalg.solve(m, r0)).square().sum())
        slack = lam * float(torch.trace(torch.linalg.inv(m))) / 15
        gcv = rss / slack**2
        if gcv < best * (1 - 1e-9):
            best, best_rel = gcv, rel
    assert chosen == pytest.approx(best_rel, rel=1e-6)


def test_rows_beyond_the_unknowns_switch_to_the_primal_form_losslessly():
    x, y = _problem(40, 10, 3, seed=6)
    held = LeastSquares(10, 3, True, x.device, torch.float64, targets=True)
    held.add(x[:8], y[:8])
    assert held.dual
    held.add(x[8:], y[8:])  # 40 rows > 11 unknowns: the held rows join the normal equations
    assert not held.dual
    _, primal = _pair(x, y)
    torch.testing.assert_close(held.gram, primal.gram)
    torch.testing.assert_close(held.target_gram, primal.target_gram)
    torch.testing.assert_close(held.solve(1e-8), primal.solve(1e-8))


def test_target_energy_is_the_norm_of_the_projected_targets():
    x, y = _problem(50, 6, 9, seed=7)
    _, primal = _pair(x, y)
    g = torch.Generator().manual_seed(8)
    sparse = _assignment(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3]), 4, g)
    dense = torch.rand(4, 9, generator=g, dtype=torch.float64)
    for p in (None, sparse, dense):
        t = y if p is None else y @ p.T
        assert primal._target_energy(p) == pytest.approx(float(t.square().sum()), rel=1e-10)


@pytest.mark.parametrize("parts,repeat", [(1, 1), (3, 1), (2, 4)])
@pytest.mark.parametrize("kind", ["grouping", "shared", "dense"])
def test_map_axis_sparse_paths_equal_the_dense_product(parts, repeat, kind):
    """A grouping (one non-zero per old neuron), a plan whose neurons split between groups,
    and a dense map must all give ``t'[.., i, ..] = sum_j m[i, j] t[.., j, ..]``."""
    from neurofuse.alignment.space import Member
    from neurofuse.methods._plan import map_axis

    g = torch.Generator().manual_seed(11)
    size, k = 12, 5
    t = torch.randn(7, parts * size * repeat, 3, generator=g, dtype=torch.float64)
    if kind == "dense":
        m = torch.rand(k, size, generator=g, dtype=torch.float64)
    else:
        m = torch.zeros(k, size, dtype=torch.float64)
        labels = torch.arange(size) % k
        m[labels, torch.arange(size)] = torch.rand(size, generator=g, dtype=torch.float64) + 0.1
        if kind == "shared":  # one neuron split between two groups (a transport plan)
            m[(labels[0] + 1) % k, 0] = 0.5
    member = Member("w", 1, repeat, parts)
    blocks = t.reshape(7, parts, size, repeat, 3)
    ref = torch.einsum("ij,npjrx->npirx", m, blocks).reshape(7, parts * k * repeat, 3)
    torch.testing.assert_close(map_axis(t, 1, m, member, size), ref)


def test_expand_parts_of_a_sparse_grouping_equals_the_dense_one():
    from neurofuse.grouping import weighted_kmeans
    from neurofuse.methods._linear_parts import expand_parts

    g = torch.Generator().manual_seed(12)
    sizes = [6, 4, 5]
    grouping = weighted_kmeans(torch.randn(15, 3, generator=g), torch.rand(15, generator=g), 4)
    dense, sparse = grouping.assignment_matrix(), grouping.assignment_matrix(sparse=True)
    torch.testing.assert_close(sparse.to_dense(), dense)
    for parts in (1, 3):
        got = expand_parts(sparse, parts, sizes)
        assert got.is_sparse
        torch.testing.assert_close(got.to_dense(), expand_parts(dense, parts, sizes))


def test_linear_fusion_raises_no_warning_of_its_own():
    """The sparse groupings must not make torch warn (about invariant checks) on every fusion."""
    import warnings

    import neurofuse as nf

    torch.manual_seed(13)
    models = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval() for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("kf_linear", "hf_linear"):
            nf.fuse(models, torch.randn(64, 6), method=method)
