"""Grouping core: weighted k-means, Hungarian matching, local search, the dispatcher."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from neurofuse.grouping import (
    GROUPING_METHODS,
    Grouping,
    group,
    hungarian_matching,
    kmeans_cost,
    local_search_kmeans,
    matching_labels,
    weighted_centroids,
    weighted_kmeans,
)
from neurofuse.grouping._workspace import _dists, _fit, _gram_coordinates, _workspace, row_blocks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(n_blobs: int, per_blob: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs (centres ~50 apart, spread 1) and their true labels."""
    g = _gen(seed)
    centres = torch.randn(n_blobs, dim, generator=g, dtype=torch.float64) * 50
    truth = torch.arange(n_blobs).repeat_interleave(per_blob)
    points = centres[truth] + torch.randn(len(truth), dim, generator=g, dtype=torch.float64)
    return points, truth


def _same_partition(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """True when ``labels`` equals ``truth`` up to a renaming of the groups."""
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(truth.tolist())) == len(set(labels.tolist()))


def _manual_centroids(points, weights, labels, k):
    out = torch.zeros(k, points.shape[1], dtype=points.dtype)
    for i in range(k):
        members = [j for j in range(len(labels)) if labels[j] == i]
        if not members:
            continue
        total = sum(float(weights[j]) for j in members)
        if total > 0:
            out[i] = sum(float(weights[j]) * points[j] for j in members) / total
        else:
            out[i] = sum(points[j] for j in members) / len(members)
    return out


def _brute_force_optimum(points: torch.Tensor, weights: torch.Tensor, k: int) -> float:
    """Exact weighted k-means optimum by enumerating all k^n labelings (tiny n only)."""
    n = points.shape[0]
    labelings = torch.tensor(list(itertools.product(range(k), repeat=n)))
    onehot = F.one_hot(labelings, k).to(points.dtype)  # (L, n, k)
    weighted = onehot * weights[None, :, None]
    totals = weighted.sum(1)  # (L, k)
    centres = torch.einsum("lnk,nd->lkd", weighted, points) / totals.clamp_min(1e-300)[..., None]
    assigned = torch.einsum("lnk,lkd->lnd", onehot, centres)
    costs = (weights * (points[None] - assigned).square().sum(-1)).sum(1)
    return float(costs.min())


# ---------------------------------------------------------------------------------------------
# centroids and cost


def test_weighted_centroids_equal_a_manual_loop():
    g = _gen(0)
    points = torch.randn(30, 7, generator=g, dtype=torch.float64)
    weights = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    labels = torch.randint(0, 5, (30,), generator=g)  # group 5 stays empty
    labels[:3] = 4
    labels[labels == 4] = 4
    weights[labels == 4] = 0.0  # a group whose members all weigh zero: plain mean
    got = weighted_centroids(points, weights, labels, 6)
    want = _manual_centroids(points, weights, labels, 6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(got[5] == 0)


def test_kmeans_cost_equals_a_manual_sum():
    g = _gen(1)
    points = torch.randn(25, 4, generator=g, dtype=torch.float64)
    weights = torch.rand(25, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (25,), generator=g)
    centroids = torch.randn(3, 4, generator=g, dtype=torch.float64)  # any centres, not means
    manual = sum(
        float(weights[j]) * float(((points[j] - centroids[labels[j]]) ** 2).sum())
        for j in range(25)
    )
    assert kmeans_cost(points, weights, labels, centroids) == pytest.approx(manual, rel=1e-12)


@pytest.mark.parametrize("dim", [6, 200])  # 200 >= 2n: Gram coordinates
def test_kmeans_result_is_self_consistent(dim):
    g = _gen(2)
    points = torch.randn(40, dim, generator=g, dtype=torch.float64)
    weights = torch.rand(40, generator=g, dtype=torch.float64) + 0.05
    res = weighted_kmeans(points, weights, 7, seed=0)
    assert isinstance(res, Grouping) and res.k == 7
    assert res.labels.dtype == torch.int64 and res.labels.shape == (40,)
    torch.testing.assert_close(res.centroids, _manual_centroids(points, weights, res.labels, 7))
    assert res.cost == pytest.approx(
        kmeans_cost(points, weights, res.labels, res.centroids), rel=1e-9
    )
    a = res.assignment_matrix()
    torch.testing.assert_close(a @ points, res.centroids)
    torch.testing.assert_close(a.sum(1), torch.ones(7, dtype=a.dtype))
    members = torch.cat([res.members(i) for i in range(7)]).sort().values
    assert torch.equal(members, torch.arange(40))
    with pytest.raises(IndexError):
        res.members(7)


def test_lloyd_reaches_a_fixed_point_of_the_assignment():
    g = _gen(3)
    points = torch.randn(300, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(300, generator=g, dtype=torch.float64) + 0.1
    res = weighted_kmeans(points, weights, 15, seed=0, tol=0.0, max_iter=1000)
    dists = torch.cdist(points, res.centroids).square()
    own = dists.gather(1, res.labels[:, None]).squeeze(1)
    assert torch.all(own <= dists.min(1).values + 1e-9)


def test_gram_coordinates_preserve_distances():
    g = _gen(4)
    points = torch.randn(20, 500, generator=g, dtype=torch.float64) + 3.0
    points[5] = points[4]  # a duplicate makes the Gram matrix singular
    coords = _gram_coordinates(points, torch.float64)
    assert coords.shape[0] == 20 and coords.shape[1] <= 20
    torch.testing.assert_close(
        torch.cdist(coords, coords), torch.cdist(points, points), atol=1e-6, rtol=1e-9
    )


def test_blocked_centroid_and_cost_sums_equal_the_one_shot_sums():
    # 3000 x 200 points: the sums run over several row blocks; the centroids and the cost
    # must be those of the unblocked formulas (the same order of additions: equal bit for bit)
    g = _gen(11)
    points = torch.randn(3000, 200, generator=g, dtype=torch.float64)
    w = torch.rand(3000, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (3000,), generator=g)
    assert len(list(row_blocks(3000, 200))) > 2
    ws = _workspace(points, w)
    centres, cost = _fit(ws, labels, 40)
    total = torch.zeros(40, dtype=torch.float64).index_add_(0, labels, w)[labels]
    coef = w / total
    want = torch.zeros(40, 200, dtype=torch.float64).index_add_(0, labels, ws.acc * coef[:, None])
    assert torch.equal(centres, want)
    want_cost = float((w * (ws.acc - want[labels]).square().sum(1)).sum())
    assert cost == want_cost


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_distances_equal_the_textbook_expression(dtype):
    g = _gen(12)
    y, c = torch.randn(300, 17, generator=g).to(dtype), torch.randn(40, 17, generator=g).to(dtype)
    ysq, csq = y.square().sum(1), c.square().sum(1)
    want = (ysq[:, None] - 2.0 * (y @ c.T) + csq[None, :]).clamp_min(0)
    assert torch.equal(_dists(y, ysq, c, csq), want)
    torch.testing.assert_close(
        _dists(y, ysq, c, csq), torch.cdist(y, c).square(), atol=1e-4, rtol=1e-4
    )


# ---------------------------------------------------------------------------------------------
# Lloyd behaviour


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_objective_never_increases_across_iterations(init):
    lengths = []
    for seed in range(5):
        g = _gen(10 + seed)
        points = torch.randn(200, 3, generator=g)
        weights = torch.rand(200, generator=g) + 0.01
        res = weighted_kmeans(points, weights, 12, seed=seed, init=init, n_init=1, tol=0.0)
        hist = torch.tensor(res.history, dtype=torch.float64)
        assert torch.all(hist[1:] <= hist[:-1] * (1 + 1e-12)), res.history
        assert res.history[-1] == pytest.approx(res.cost, rel=1e-9)
        lengths.append(len(res.history))
    assert max(lengths) > 3  # the trajectories are long enough to mean something


def test_same_seed_same_labels_and_global_rng_untouched():
    g = _gen(5)
    points = torch.randn(120, 4, generator=g)
    weights = torch.rand(120, generator=g)
    state = torch.get_rng_state()
    first = weighted_kmeans(points, weights, 9, seed=3)
    second = weighted_kmeans(points, weights, 9, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.labels, second.labels)
    from_generator = weighted_kmeans(points, weights, 9, generator=_gen(3))
    assert torch.equal(first.labels, from_generator.labels)
    others = {tuple(weighted_kmeans(points, weights, 9, seed=s).labels.tolist()) for s in range(6)}
    assert len(others) > 1


@pytest.mark.parametrize("dim", [5, 400])  # 400 >= 2n: Gram coordinates
def test_separated_blobs_are_recovered_with_weights(dim):
    points, truth = _blobs(6, 12, dim, seed=6)
    weights = torch.rand(72, generator=_gen(7), dtype=torch.float64) * 10 + 0.1
    res = weighted_kmeans(points, weights, 6, seed=0)
    assert _same_partition(res.labels, truth)


@pytest.mark.parametrize("init", ["k-means++", "random"])
@pytest.mark.parametrize("k", [9, 14])
def test_empty_clusters_are_repaired_with_duplicate_points(init, k):
    base = torch.randn(3, 4, generator=_gen(8), dtype=torch.float64)
    points = base.repeat_interleave(5, 0)  # 15 points, only 3 distinct
    res = weighted_kmeans(points, None, k, init=init, seed=1)
    assert torch.bincount(res.labels, minlength=k).min() >= 1
    assert res.cost == pytest.approx(0.0, abs=1e-12)
    same = weighted_kmeans(torch.ones(10, 3), torch.rand(10, generator=_gen(9)), 5)
    assert torch.bincount(same.labels, minlength=5).min() >= 1


def test_k_equal_to_number_of_points_gives_singletons():
    points = torch.randn(10, 3, generator=_gen(10))
    res = weighted_kmeans(points, torch.rand(10, generator=_gen(11)), 10)
    assert res.cost == 0.0
    assert sorted(res.labels.tolist()) == list(range(10))
    torch.testing.assert_close(res.centroids[res.labels], points)


def test_k_larger_than_number_of_points_is_rejected():
    with pytest.raises(ValueError, match=r"k=11.*10 points.*k <= 10"):
        weighted_kmeans(torch.randn(10, 3), None, 11)
    with pytest.raises(ValueError, match="at least 1"):
        weighted_kmeans(torch.randn(10, 3), None, 0)
    with pytest.raises(TypeError):
        weighted_kmeans(torch.randn(10, 3), None, 2.5)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (torch.tensor([1.0, -1.0, 1.0, 1.0]), "non-negative"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "NaN"),
        (torch.zeros(4), "sum to zero"),
        (torch.ones(3), r"shape \(4,\)"),
    ],
)
def test_bad_weights_are_rejected(weights, message):
    with pytest.raises(ValueError, match=message):
        weighted_kmeans(torch.randn(4, 2), weights, 2)


def test_bad_points_and_options_are_rejected():
    bad = torch.randn(6, 2)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        weighted_kmeans(bad, None, 2)
    with pytest.raises(ValueError, match="shape"):
        weighted_kmeans(torch.randn(6), None, 2)
    with pytest.raises(ValueError, match="k-means\\+\\+"):
        weighted_kmeans(torch.randn(6, 2), None, 2, init="farthest")


def test_inputs_are_not_mutated_and_dtype_follows_points():
    points = torch.randn(50, 6, generator=_gen(12))
    weights = torch.rand(50, generator=_gen(13))
    p0, w0 = points.clone(), weights.clone()
    res = weighted_kmeans(points, weights, 5, local_search=3)
    hungarian_matching(points[:25], points[25:], weights[:25], weights[25:])
    assert torch.equal(points, p0) and torch.equal(weights, w0)
    assert res.centroids.dtype == torch.float32
    assert res.assignment_matrix(weights).dtype == torch.float32


def test_a_heavy_weight_pulls_its_centroid_to_its_point():
    pair = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    far = torch.tensor([[100.0, 0.0], [100.0, 1.0], [101.0, 0.0]], dtype=torch.float64)
    points = torch.cat([pair, far])
    uniform = weighted_kmeans(points, None, 2)
    heavy = weighted_kmeans(points, torch.tensor([1e6, 1.0, 1.0, 1.0, 1.0]), 2)
    assert uniform.labels[0] == uniform.labels[1] and heavy.labels[0] == heavy.labels[1]
    mid = uniform.centroids[uniform.labels[0]]
    pulled = heavy.centroids[heavy.labels[0]]
    torch.testing.assert_close(mid, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert float((pulled - points[0]).norm()) < 1e-5


# ---------------------------------------------------------------------------------------------
# Hungarian matching


def test_hungarian_recovers_a_permutation():
    g = _gen(14)
    a = torch.randn(12, 30, generator=g)
    perm = torch.randperm(12, generator=g)
    b = a[perm] + 1e-3 * torch.randn(12, 30, generator=g)
    res = hungarian_matching(a, b)
    assert torch.equal(res.labels[:12], torch.arange(12))
    assert torch.equal(res.labels[12:], perm)  # B_j is A_perm[j], so it joins group perm[j]


def test_hungarian_equals_brute_force_over_all_permutations():
    g = _gen(15)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    wa = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    wb = torch.rand(5, generator=g, dtype=torch.float64) + 0.1

    def pair_cost(perm):
        return sum(
            float(wa[i] * wb[j] / (wa[i] + wb[j]) * ((a[i] - b[j]) ** 2).sum())
            for i, j in enumerate(perm)
        )

    costs = {perm: pair_cost(perm) for perm in itertools.permutations(range(5))}
    best = min(costs, key=costs.get)
    res = hungarian_matching(a, b, wa, wb)
    assert res.cost == pytest.approx(costs[best], rel=1e-10)
    assert res.labels[5:].argsort().tolist() == list(best)  # group i holds A_i and B_best[i]
    points, weights = torch.cat([a, b]), torch.cat([wa, wb])
    torch.testing.assert_close(res.centroids, weighted_centroids(points, weights, res.labels, 5))
    assert res.cost == pytest.approx(kmeans_cost(points, weights, res.labels, res.centroids))
    torch.testing.assert_close(res.assignment_matrix() @ points, res.centroids)


def test_sparse_assignment_is_the_exact_one_when_the_optimal_pairs_are_candidates(monkeypatch):
    """Among each neuron's k cheapest partners the sparse matching finds the exact optimum on
    a noisy permutation (every optimal partner is the nearest), with zero costs present (the
    dense solver is disabled: the sparse one must find it)."""
    from scipy.optimize import linear_sum_assignment

    from neurofuse.grouping import hungarian as module
    from neurofuse.grouping.hungarian import assign_pairs

    g = _gen(16)
    a = torch.randn(300, 20, generator=g, dtype=torch.float64)
    perm = torch.randperm(300, generator=g)
    b = a[perm] + 0.05 * torch.randn(300, 20, generator=g, dtype=torch.float64)
    b[:10] = a[perm[:10]]  # exact twins: zero costs must stay edges
    cost = torch.cdist(a, b).square()
    want = torch.as_tensor(linear_sum_assignment(cost.numpy())[1])
    exact = hungarian_matching(a, b)

    def no_dense(*args, **kwargs):
        raise AssertionError("fell back to the dense assignment")

    monkeypatch.setattr(module, "linear_sum_assignment", no_dense)
    assert torch.equal(assign_pairs(cost, 3), want)
    assert torch.equal(assign_pairs(cost, 3), perm.argsort())
    res = hungarian_matching(a, b, neighbours=3)
    assert torch.equal(res.labels[300:], perm.argsort().argsort())
    assert res.cost == pytest.approx(exact.cost, rel=1e-12)


def test_sparse_assignment_is_the_optimum_over_its_candidates_and_falls_back_when_it_cannot_match(
    monkeypatch,
):
    """On random costs the sparse matching is the optimum over the candidate pairs (each row's
    and each column's k cheapest), checked against the dense solver on the cost with every
    other pair priced out; float32 costs spanning many orders of magnitude keep their small
    differences; when every row's cheapest partners are the same few columns the candidates
    hold no full matching and the dense assignment is returned."""
    from scipy.optimize import linear_sum_assignment

    from neurofuse.grouping import hungarian as module
    from neurofuse.grouping.hungarian import assign_pairs

    g = _gen(17)
    for n, k in ((40, 2), (40, 5), (60, 3)):
        cost = torch.rand(n, n, generator=g, dtype=torch.float64)
        cand = torch.zeros(n, n, dtype=torch.bool)
        cand.scatter_(1, cost.topk(k, dim=1, largest=False).indices, True)
        cand.scatter_(0, cost.topk(k, dim=0, largest=False).indices, True)
        priced = torch.where(cand, cost, torch.full_like(cost, 1e6)).numpy()
        r, c = linear_sum_assignment(priced)
        p = assign_pairs(cost, k)
        assert sorted(p.tolist()) == list(range(n))  # a permutation
        got = float(cost[torch.arange(n), p].sum())
        if priced[r, c].max() < 1e6:  # the candidates hold a full matching
            assert got == pytest.approx(float(priced[r, c].sum()), rel=1e-12)
    # float32 costs with one huge outlier: the small ones must still be told apart
    small = torch.rand(50, 50, generator=g) * 0.01
    small[0, 0] = 1e4
    r, c = linear_sum_assignment(small.double().numpy())
    p = assign_pairs(small, 10)
    assert float(small.double()[torch.arange(50), p].sum()) == pytest.approx(
        float(small.double().numpy()[r, c].sum()), rel=1e-9
    )
    # hubs: columns 0-1 are every row's two cheapest, rows 0-1 every column's
    hub = torch.full((30, 30), 10.0, dtype=torch.float64) + torch.rand(30, 30, generator=g)
    hub[:, :2] = torch.rand(30, 2, generator=g)
    hub[:2, :] = torch.rand(2, 30, generator=g)
    r, c = linear_sum_assignment(hub.numpy())
    dense = []
    monkeypatch.setattr(module, "linear_sum_assignment", lambda m: dense.append(m.shape) or (r, c))
    assert torch.equal(assign_pairs(hub, 2), torch.as_tensor(c))
    assert dense == [(30, 30)]
    with pytest.raises(ValueError, match="neighbours must be a positive"):
        assign_pairs(hub, 0)


def test_hungarian_rejects_unequal_widths():
    with pytest.raises(ValueError, match="equal width.*K-means"):
        hungarian_matching(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="equal width"):
        group(torch.randn(9, 3), None, 4, method="hungarian", sizes=[4, 5])
    with pytest.raises(ValueError, match="sizes"):
        group(torch.randn(8, 3), None, 4, method="hungarian")
    with pytest.raises(ValueError, match="k=3"):
        group(torch.randn(8, 3), None, 3, method="hungarian", sizes=[4, 4])


def test_group_dispatches_by_name():
    g = _gen(16)
    points = torch.randn(16, 5, generator=g)
    weights = torch.rand(16, generator=g) + 0.1
    by_name = group(points, weights, 8, method="hungarian", sizes=[8, 8])
    direct = hungarian_matching(points[:8], points[8:], weights[:8], weights[8:])
    assert torch.equal(by_name.labels, direct.labels)
    km = group(points, weights, 5, method="kmeans", seed=2, n_init=2)
    assert torch.equal(km.labels, weighted_kmeans(points, weights, 5, seed=2, n_init=2).labels)
    assert set(GROUPING_METHODS) >= {"kmeans", "hungarian"}
    with pytest.raises(ValueError, match="hungarian.*kmeans"):
        group(points, weights, 5, method="spectral")
    with pytest.raises(ValueError, match="add up"):
        group(points, weights, 5, sizes=[8, 7])


# ---------------------------------------------------------------------------------------------
# Local search


def test_local_search_is_never_worse_than_its_start():
    for seed in range(3):
        g = _gen(20 + seed)
        points = torch.randn(150, 4, generator=g)
        weights = torch.rand(150, generator=g) + 0.05
        poor = weighted_kmeans(points, weights, 10, init="random", n_init=1, max_iter=0, seed=seed)
        improved = local_search_kmeans(points, weights, 10, poor, seed=seed)
        assert improved.cost <= poor.cost * (1 + 1e-9)
        hist = improved.history
        assert all(b <= a for a, b in itertools.pairwise(hist))
        lloyd = weighted_kmeans(points, weights, 10, seed=seed)
        assert local_search_kmeans(points, weights, 10, lloyd).cost <= lloyd.cost * (1 + 1e-9)
        refined = weighted_kmeans(points, weights, 10, seed=seed, local_search=True)
        assert refined.cost <= lloyd.cost * (1 + 1e-9)


def test_local_search_meets_the_bound_against_brute_force():
    optimal = 0
    for seed in range(10):
        g = _gen(40 + seed)
        points = torch.randn(8, 2, generator=g, dtype=torch.float64)
        weights = torch.rand(8, generator=g, dtype=torch.float64) + 0.1
        opt = _brute_force_optimum(points, weights, 3)
        res = local_search_kmeans(points, weights, 3, seed=seed)
        assert opt * (1 - 1e-9) <= res.cost <= 9.01 * opt
        optimal += res.cost <= opt * (1 + 1e-9)
    assert optimal >= 8


def test_local_search_escapes_a_bad_local_optimum():
    # three tight pairs on a line and a far cluster: a start that splits the far cluster and
    # merges two pairs is a Lloyd fixed point; one swap fixes it
    points = torch.tensor(
        [[0.0], [0.1], [10.0], [10.1], [50.0], [50.1], [51.0], [51.1]], dtype=torch.float64
    )
    start_labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    centroids = weighted_centroids(points, None, start_labels, 3)
    start = Grouping(start_labels, centroids, kmeans_cost(points, None, start_labels, centroids), 3)
    res = local_search_kmeans(points, None, 3, start)
    assert res.cost < 0.5 * start.cost
    assert res.cost == pytest.approx(
        _brute_force_optimum(points, torch.ones(8, dtype=torch.float64), 3)
    )


# ---------------------------------------------------------------------------------------------
# Against scikit-learn


def test_cost_is_close_to_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster", reason="scikit-learn is not installed")
    g = _gen(30)
    centres = torch.randn(25, 8, generator=g, dtype=torch.float64) * 3
    points = centres[torch.randint(0, 25, (400,), generator=g)]
    points = points + torch.randn(400, 8, generator=g, dtype=torch.float64)
    weights = torch.rand(400, generator=g, dtype=torch.float64) + 0.05
    ours = weighted_kmeans(points, weights, 20, seed=0)
    theirs = sklearn_cluster.KMeans(n_clusters=20, n_init=4, random_state=0).fit(
        points.numpy(), sample_weight=weights.numpy()
    )
    assert ours.cost <= 1.05 * theirs.inertia_


# ----------------------------------------------------------------------------- heads as units


def _head_permuted(
    points: torch.Tensor, heads: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = points.shape[0] // heads
    order = torch.randperm(heads, generator=g)
    perm = torch.cat([order[i] * h + torch.randperm(h, generator=g) for i in range(heads)])
    return points[perm], perm


def test_block_assignment_is_the_best_head_preserving_matching():
    """Against brute force over every head matching and every dimension matching (2 heads of
    3 dimensions: 2 x 6 x 6 = 72 candidates)."""
    import itertools

    from neurofuse.grouping.heads import block_assignment

    g = torch.Generator().manual_seed(0)
    score = torch.rand(6, 6, generator=g)
    best = float("inf")
    for heads_perm in itertools.permutations(range(2)):
        for d0 in itertools.permutations(range(3)):
            for d1 in itertools.permutations(range(3)):
                p = [heads_perm[0] * 3 + d for d in d0] + [heads_perm[1] * 3 + d for d in d1]
                best = min(best, float(score[torch.arange(6), torch.tensor(p)].sum()))
    p = block_assignment(score, 2)
    assert abs(float(score[torch.arange(6), p].sum()) - best) < 1e-9
    assert sorted((p // 3).tolist()[:3]) == [int(p[0]) // 3] * 3  # head 0 lands in one head
    with pytest.raises(ValueError, match="multiple of heads"):
        block_assignment(score, 4)


def test_hungarian_heads_recovers_a_head_permutation():
    from neurofuse.grouping.heads import hungarian_heads

    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 20, generator=g)
    b, perm = _head_permuted(a, 4, seed=2)
    b = b + 0.01 * torch.randn(b.shape, generator=g)
    res = hungarian_heads(a, b, 4)
    assert torch.equal(res.labels[16:], perm)  # B's neuron j joins A's neuron perm[j]
    assert res.cost < 0.05 and res.k == 16  # the noise: 16 pairs x 20 x 1e-4 / 2


def test_kmeans_heads_groups_whole_heads_of_several_models():
    from neurofuse.grouping.heads import kmeans_heads

    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 30, generator=g)  # 3 heads of 4 dimensions
    b, pb = _head_permuted(a, 3, seed=4)
    c, pc = _head_permuted(a, 3, seed=5)
    res = kmeans_heads(torch.cat([a, b, c]), None, 4, 3, seed=0)
    la, lb, lc = res.labels[:12], res.labels[12:24], res.labels[24:]
    assert torch.equal(lb, la[pb]) and torch.equal(lc, la[pc])
    assert res.cost < 1e-9
    # every group holds one dimension of one head of each model: heads stay whole
    for labels in (la, lb, lc):
        assert all(len(set((labels[i * 4 : i * 4 + 4] // 4).tolist())) == 1 for i in range(3))
    with pytest.raises(ValueError, match="whole heads"):
        kmeans_heads(torch.randn(10, 3), None, 4, 2)


@pytest.mark.parametrize("kind", ["kmeans", "hungarian"])
def test_neuron_grouping_averages_with_the_weights_it_grouped_with(kind):
    from neurofuse.grouping.strategy import NeuronGrouping

    g = torch.Generator().manual_seed(0)
    points = torch.randn(8, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(8, generator=g, dtype=torch.float64) + 0.1
    grouping = NeuronGrouping(kind).neurons(points, weights, 4, [4, 4], "space 'x'")
    a = grouping.assignment_matrix()  # no weights passed again: the grouping's own
    for i in range(4):
        members = grouping.members(i)
        expected = weights[members] / weights[members].sum()
        torch.testing.assert_close(a[i, members], expected)


def test_kmeans_weights_choose_what_the_scores_weigh():
    """1-D neurons 0, 0, 4 (model 0) and 0, 0, 10 (model 1) in two groups. Unweighted the
    cheapest split is {0, 0, 0, 0, 4} | {10} (cost 12.8 against 18); with the 4 weighing 1000
    it is {0, 0, 0, 0} | {4, 10} (35.9 against 63.8). ``"importance"`` clusters with the
    weights, ``"uniform"`` without them; both average each group with the weights."""
    from neurofuse.grouping.strategy import NeuronGrouping

    points = torch.tensor([[0.0], [0.0], [4.0], [0.0], [0.0], [10.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0, 1000.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    together = {}
    for mode in ("uniform", "importance"):
        g = NeuronGrouping("kmeans", kmeans_weights=mode).neurons(points, weights, 2, [3, 3], "x")
        together[mode] = bool(g.labels[2] == g.labels[5])
        a = g.assignment_matrix()
        for i in range(2):
            members = g.members(i)
            torch.testing.assert_close(a[i, members], weights[members] / weights[members].sum())
        torch.testing.assert_close(g.centroids, a @ points)  # the centroids are the targets
    assert together == {"uniform": False, "importance": True}
    with pytest.raises(ValueError, match="kmeans_weights must be 'uniform'.*got 'paper'"):
        NeuronGrouping("kmeans", kmeans_weights="paper")


@pytest.mark.parametrize("method", ["kf_linear", "kf_gradient"])
def test_kmeans_weights_is_checked_when_the_options_are_made(method):
    import neurofuse as nf

    x = torch.randn(16, 4)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))]
    with pytest.raises(ValueError, match="kmeans_weights must be"):
        nf.fuse(models * 2, x, method=method, kmeans_weights="weighted")


def test_hungarian_grouping_names_the_variant_to_use_instead():
    from neurofuse.grouping.strategy import NeuronGrouping

    points, weights = torch.randn(7, 3), torch.ones(7)
    with pytest.raises(ValueError, match=r"level 2 has base widths \[4, 3\].*Use kf_gradient"):
        NeuronGrouping("hungarian", "gradient").neurons(points, weights, 4, [4, 3], "level 2")


# ------------------------------------------------------------------ matching seeds (issue 13)
def _permuted_models(n_models: int, d: int = 40, dim: int = 30, noise: float = 0.01):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(d, dim, generator=g, dtype=torch.float64)
    perms = [torch.arange(d)] + [torch.randperm(d, generator=g) for _ in range(n_models - 1)]
    blocks = [
        base[p] + noise * torch.randn(d, dim, generator=g, dtype=torch.float64) for p in perms
    ]
    return torch.cat(blocks), perms


@pytest.mark.parametrize("n_models", [2, 3])
def test_matching_labels_pair_every_neuron_with_its_twins(n_models):
    points, perms = _permuted_models(n_models)
    labels = matching_labels(points, [40] * n_models)
    for m, perm in enumerate(perms):
        # model m's neuron j is base neuron perm[j], founded by model 0's neuron perm[j]
        assert torch.equal(labels[m * 40 : (m + 1) * 40], perm)
    with pytest.raises(ValueError, match="equal width"):
        matching_labels(points[:70], [40, 30])


def test_group_seeds_from_a_matching_on_request_and_both_is_never_worse():
    points, _ = _permuted_models(2, noise=0.5)
    matched = group(points, None, 40, sizes=[40, 40], seeding="matching", n_init=2)
    assert matched.seeding == "matching"
    plain = group(points, None, 40, sizes=[40, 40], n_init=2)
    assert plain.seeding == "k-means++"
    both = group(points, None, 40, sizes=[40, 40], seeding="both", n_init=2)
    assert both.seeding == "matching+k-means++"
    assert both.cost <= min(matched.cost, plain.cost) + 1e-9  # the best of both starts
    with pytest.raises(ValueError, match="matching seeds need"):
        group(points, None, 30, sizes=[40, 40], seeding="matching")
    with pytest.raises(ValueError, match="unknown seeding"):
        group(points, None, 40, sizes=[40, 40], seeding="greedy")


def test_seeding_in_principal_coordinates_keeps_the_exact_seedings_quality(monkeypatch):
    import neurofuse.grouping.seeding as km

    g = torch.Generator().manual_seed(3)
    centres = torch.randn(30, 400, generator=g, dtype=torch.float64) * 4
    points = centres[torch.randint(0, 30, (600,), generator=g)]
    points = points + torch.randn(600, 400, generator=g, dtype=torch.float64)
    monkeypatch.setattr(km, "SEED_PRINCIPAL_WORK", 0.0)  # this small problem counts as large
    fast = weighted_kmeans(points, None, 30, n_init=2, seed=1)
    monkeypatch.setattr(km, "SEED_DIMS", None)
    exact = weighted_kmeans(points, None, 30, n_init=2, seed=1)
    # thirty separated blobs: both seedings find them, to the same (optimal) cost
    assert fast.cost == pytest.approx(exact.cost, rel=1e-9)
    before = torch.random.get_rng_state()
    monkeypatch.setattr(km, "SEED_DIMS", 64)
    weighted_kmeans(points, None, 30, n_init=2, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # no global RNG draw


def test_kmeans_from_given_labels_alone_keeps_their_partition_when_it_is_optimal():
    points, perms = _permuted_models(2)
    labels = matching_labels(points, [40, 40])
    g = weighted_kmeans(points, None, 40, n_init=0, init_labels=[labels])
    assert g.seeding == "matching" and torch.equal(g.labels, labels)
    with pytest.raises(ValueError, match="n_init"):
        weighted_kmeans(points, None, 40, n_init=0)


def test_kf_linear_with_a_matching_seed_recovers_a_permuted_copy():
    from toys import mlp, permuted_by_analysis

    import neurofuse as nf

    torch.manual_seed(0)
    model, x = mlp(hidden=(24, 24)).eval(), torch.randn(80, 10)
    twin = permuted_by_analysis(model, seed=4, example=x[:2])
    fused = nf.fuse([model, twin], x, method="kf_linear", kmeans_seeding="matching")
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    assert set(fused.neurofuse_report["kmeans_seeding"].values()) == {"matching"}


@pytest.mark.parametrize("method", ["hf_linear", "hf_gradient", "git_rebasin"])
def test_sparse_matching_recovers_a_permuted_copy_of_a_wide_mlp(method, monkeypatch):
    """``matching="sparse"`` pairs the neurons through the candidate graph (width 200 > the 128
    candidates, so the sparse solver runs) and still recovers a permuted copy; K-means Fusion
    has no matching to choose and refuses the option."""
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching
    from toys import mlp, permuted_by_analysis

    import neurofuse as nf
    from neurofuse.grouping import hungarian as module

    calls = []

    def counted(graph):
        calls.append(graph.shape)
        return min_weight_full_bipartite_matching(graph)

    monkeypatch.setattr(module, "min_weight_full_bipartite_matching", counted)
    torch.manual_seed(0)
    model, x = mlp(hidden=(200, 200)).eval(), torch.randn(500, 10)
    twin = permuted_by_analysis(model, seed=4, example=x[:2])
    options = {"epochs": 2, "last_epochs": 2} if method == "hf_gradient" else {}
    fused = nf.fuse([model, twin], x, method=method, matching="sparse", **options)
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    assert calls == [(200, 200), (200, 200)]
    if method == "git_rebasin":  # weight matching too
        calls.clear()
        fused = nf.fuse([model, twin], x, method=method, matching="sparse", match="weights")
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
        assert len(calls) >= 2 and set(calls) == {(200, 200)}
    with pytest.raises(ValueError, match="matching"):
        nf.fuse([model, twin], x, method="kf_linear", matching="sparse")
    with pytest.raises(ValueError, match="matching must be one of 'exact', 'sparse'"):
        nf.fuse([model, twin], x, method="hf_linear", matching="greedy")


def test_auto_restarts_fall_with_the_number_of_groups():
    from neurofuse.grouping import AUTO_RESTARTS, AUTO_RESTARTS_K, restarts

    assert restarts("auto", 10) == restarts("auto", AUTO_RESTARTS_K) == AUTO_RESTARTS
    assert restarts("auto", 2 * AUTO_RESTARTS_K) == AUTO_RESTARTS // 2
    assert restarts("auto", 4 * AUTO_RESTARTS_K) == restarts("auto", 10**6) == 1
    assert restarts(3, 10**6) == 3  # an explicit count is kept
    for bad in ("many", 2.5, True):
        with pytest.raises(ValueError, match="n_init"):
            restarts(bad, 10)
    # "auto" runs the restarts it names: the same answer as asking for them
    g = torch.Generator().manual_seed(0)
    points = torch.randn(300, 5, generator=g)
    auto = weighted_kmeans(points, None, 20, seed=3)
    explicit = weighted_kmeans(points, None, 20, seed=3, n_init=restarts("auto", 20))
    assert torch.equal(auto.labels, explicit.labels)


def test_auto_restarts_cap_the_work_of_many_points():
    from neurofuse.grouping import AUTO_RESTARTS, AUTO_RESTARTS_K, AUTO_RESTARTS_WORK, restarts

    # two models (points = 2 x groups): the rule on groups decides at the usual widths
    for k in (16, 512, 700, 1024, 1448, 2048, 5000):
        assert restarts("auto", k, 2 * k) == restarts("auto", k)
    # many models of one width: fewer restarts once restarts x points x groups passes the cap
    k = AUTO_RESTARTS_K
    assert restarts("auto", k, 4 * k) == AUTO_RESTARTS
    assert restarts("auto", k, 8 * k) == AUTO_RESTARTS // 2
    assert restarts("auto", k, 16 * k) == restarts("auto", k, 10**9) == 1
    for models in (4, 8, 16):
        n = models * k
        assert restarts("auto", k, n) * n * k <= AUTO_RESTARTS_WORK
    assert restarts(3, k, 10**9) == 3  # an explicit count is kept
    # weighted_kmeans asks with its number of points
    g = torch.Generator().manual_seed(0)
    points = torch.randn(600, 3, generator=g)
    import neurofuse.grouping._base as base

    old = base.AUTO_RESTARTS_WORK
    try:
        base.AUTO_RESTARTS_WORK = 600 * 20  # one restart's work for 600 points, 20 groups
        auto = weighted_kmeans(points, None, 20, seed=3)
    finally:
        base.AUTO_RESTARTS_WORK = old
    one = weighted_kmeans(points, None, 20, seed=3, n_init=1)
    four = weighted_kmeans(points, None, 20, seed=3, n_init=4)
    assert torch.equal(auto.labels, one.labels) and not torch.equal(one.labels, four.labels)
