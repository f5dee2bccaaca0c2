"""Partitions among models (Appendix D), fusion-set sampling and stratified splits."""

from __future__ import annotations

import json

import pytest
import torch

from neurofuse.data.partition import (
    PARTITION_SCHEMES,
    Partition,
    fusion_indices,
    partition,
    stratified_split,
)

NUM_CLASSES = 10


@pytest.fixture()
def labels() -> torch.Tensor:
    """2,000 labels of 10 classes with unequal class sizes, in random order."""
    gen = torch.Generator().manual_seed(123)
    sizes = [100, 150, 200, 250, 300, 120, 180, 220, 280, 200]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return y[torch.randperm(y.numel(), generator=gen)]


def _class_sets(labels: torch.Tensor, part: Partition) -> list[set[int]]:
    return [set(labels[idx].unique().tolist()) for idx in part.indices]


@pytest.mark.parametrize("scheme", sorted(PARTITION_SCHEMES))
@pytest.mark.parametrize("n_parts", [1, 2, 5])
def test_every_sample_goes_to_exactly_one_part(labels, scheme, n_parts):
    part = partition(labels, n_parts, scheme, seed=3)
    assert part.n_parts == n_parts and part.scheme == scheme
    everything = torch.cat(part.indices)
    assert everything.dtype == torch.int64
    assert everything.numel() == labels.numel()  # no sample twice ...
    assert torch.equal(everything.sort().values, torch.arange(labels.numel()))  # ... none missed


@pytest.mark.parametrize("scheme", sorted(PARTITION_SCHEMES))
def test_class_counts_match_indices(labels, scheme):
    part = partition(labels, 4, scheme, seed=1)
    assert part.class_counts.shape == (4, NUM_CLASSES)
    assert part.class_counts.dtype == torch.int64
    for k, idx in enumerate(part.indices):
        expected = torch.bincount(labels[idx], minlength=NUM_CLASSES)
        assert torch.equal(part.class_counts[k], expected)
    assert part.sizes == part.class_counts.sum(1).tolist()


@pytest.mark.parametrize("scheme", sorted(PARTITION_SCHEMES))
def test_deterministic_by_seed_and_different_across_seeds(labels, scheme):
    a = partition(labels, 3, scheme, seed=7)
    b = partition(labels, 3, scheme, seed=7)
    c = partition(labels, 3, scheme, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert not all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a.indices, c.indices, strict=True)
    )


def test_partition_uses_no_global_random_state(labels):
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    partition(labels, 3, "dirichlet", seed=1)
    assert torch.equal(torch.rand(3), before)


def test_iid_parts_are_near_equal_and_class_mixed(labels):
    part = partition(labels, 4, "iid", seed=0)
    assert max(part.sizes) - min(part.sizes) <= 1
    assert all(len(s) == NUM_CLASSES for s in _class_sets(labels, part))


@pytest.mark.parametrize("n_parts", [2, 3, 4, 10])
def test_sharded_parts_own_disjoint_classes(labels, n_parts):
    part = partition(labels, n_parts, "sharded", seed=5)
    classes = _class_sets(labels, part)
    for i in range(n_parts):
        assert classes[i], "every part needs at least one class"
        for j in range(i + 1, n_parts):
            assert not classes[i] & classes[j]
    assert set().union(*classes) == set(range(NUM_CLASSES))
    sizes = [len(s) for s in classes]
    assert max(sizes) - min(sizes) <= 1  # near-equal class groups
    # every sample of a part's classes is in that part
    for k, idx in enumerate(part.indices):
        assert idx.numel() == int(torch.isin(labels, torch.tensor(sorted(classes[k]))).sum())


def test_sharded_refuses_more_parts_than_classes(labels):
    with pytest.raises(ValueError, match=r"at least one class per part.*n_parts=11.*dirichlet"):
        partition(labels, 11, "sharded")


def _mean_label_skew(labels: torch.Tensor, ratio: float, n_parts: int, seeds: range) -> float:
    """Mean over seeds and parts of KL(part's class distribution || global distribution)."""
    total = 0.0
    for seed in seeds:
        counts = partition(labels, n_parts, "dirichlet", seed=seed, min_max_ratio=ratio)
        counts = counts.class_counts.double()
        glob = counts.sum(0) / counts.sum()
        q = counts / counts.sum(1, keepdim=True).clamp(min=1)
        kl = torch.where(q > 0, q * (q / glob).log(), torch.zeros_like(q)).sum(1)
        total += kl.mean().item()
    return total / len(seeds)


def test_dirichlet_skew_grows_as_min_max_ratio_falls(labels):
    # Two parts, the paper's main setting. (With alpha_min fixed the total concentration grows
    # as the ratio falls, so for many parts the skew is not monotone; see _dirichlet's doc.)
    skews = [_mean_label_skew(labels, r, 2, range(20)) for r in (1.0, 0.2, 0.05)]
    assert skews[0] < skews[1] < skews[2], skews


def test_dirichlet_alphas_follow_appendix_d(labels):
    # ratio 1 with a huge alpha_min: Dir(a, a) with a -> inf gives (nearly) equal halves
    part = partition(labels, 2, "dirichlet", seed=0, alpha_min=1e5, min_max_ratio=1.0)
    share = part.class_counts[0].double() / part.class_counts.sum(0).double()
    assert torch.allclose(share, torch.full_like(share, 0.5), atol=0.03)
    # ratio 0.01: alphas (a, 100 a): per class, one part takes ~100/101 of the samples
    part = partition(labels, 2, "dirichlet", seed=0, alpha_min=1e3, min_max_ratio=0.01)
    share = part.class_counts.double() / part.class_counts.sum(0).double()
    assert torch.allclose(
        share.max(0).values, torch.full((NUM_CLASSES,), 100 / 101, dtype=torch.float64), atol=0.02
    )
    # the favoured part is drawn per class (alphas shuffled per class), not always the same
    assert 0 < int((share[0] > 0.5).sum()) < NUM_CLASSES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_parts": 0}, "n_parts"),
        ({"n_parts": 2, "scheme": "pathological"}, "dirichlet, iid, sharded"),
        ({"n_parts": 2, "scheme": "dirichlet", "min_max_ratio": 0.0}, "min_max_ratio"),
        ({"n_parts": 2, "scheme": "dirichlet", "min_max_ratio": 1.5}, "min_max_ratio"),
        ({"n_parts": 2, "scheme": "dirichlet", "alpha_min": -1.0}, "alpha_min"),
        ({"n_parts": 2, "num_classes": 3}, "num_classes"),
    ],
)
def test_invalid_arguments_are_refused(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition(labels, **kwargs)


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="integer"):
        partition(torch.rand(10), 2)


@pytest.mark.parametrize("scheme", sorted(PARTITION_SCHEMES))
def test_to_dict_round_trips_through_json(labels, scheme):
    part = partition(labels, 3, scheme, seed=2)
    back = Partition.from_dict(json.loads(json.dumps(part.to_dict())))
    assert back.scheme == part.scheme and back.params == part.params
    assert all(torch.equal(a, b) for a, b in zip(back.indices, part.indices, strict=True))
    assert torch.equal(back.class_counts, part.class_counts)


# ---------------------------------------------------------------- fusion set


@pytest.mark.parametrize("scheme", ["dirichlet", "sharded"])
@pytest.mark.parametrize("from_part", [0, 1])
def test_fusion_set_comes_only_from_the_chosen_part(labels, scheme, from_part):
    part = partition(labels, 3, scheme, seed=4)
    idx = fusion_indices(labels, part, 150, seed=0, from_part=from_part)
    assert idx.numel() == 150 and idx.unique().numel() == 150
    assert torch.isin(idx, part.indices[from_part]).all()


def _assert_balanced(labels: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor) -> None:
    """Counts differ by at most one among the classes that were not exhausted."""
    taken = torch.bincount(labels[idx], minlength=NUM_CLASSES)
    available = torch.bincount(labels[pool], minlength=NUM_CLASSES)
    assert (taken <= available).all()
    open_classes = taken < available
    if open_classes.any():
        assert taken[open_classes].max() - taken[open_classes].min() <= 1
        # an exhausted class never has more than an open one
        exhausted = (taken == available) & (available > 0)
        if exhausted.any():
            assert taken[exhausted].max() <= taken[open_classes].max()


@pytest.mark.parametrize("n", [10, 95, 400])
def test_fusion_set_is_class_balanced_as_far_as_the_part_allows(labels, n):
    part = partition(labels, 2, "dirichlet", seed=9, min_max_ratio=0.05)
    big = max(range(2), key=lambda k: part.sizes[k])
    pool = part.indices[big]
    if n == 400:
        assert int(part.class_counts[big].min()) < n // NUM_CLASSES  # some classes too small
    idx = fusion_indices(labels, part, n, seed=1, from_part=big)
    _assert_balanced(labels, pool, idx)


def test_fusion_set_balanced_on_iid_draws_from_whole_split(labels):
    part = partition(labels, 4, "iid", seed=0)
    idx = fusion_indices(labels, part, 400, seed=2)
    assert torch.equal(torch.bincount(labels[idx], minlength=NUM_CLASSES), torch.full((10,), 40))
    # iid pools the whole training split: samples of every part appear
    for piece in part.indices:
        assert torch.isin(idx, piece).any()
    assert torch.equal(fusion_indices(labels, None, 400, seed=2), idx)


def test_fusion_set_may_take_every_sample_of_a_part(labels):
    part = partition(labels, 2, "sharded", seed=0)
    size = part.sizes[0]
    idx = fusion_indices(labels, part, size)
    assert torch.equal(idx.sort().values, part.indices[0])


def test_fusion_set_too_large_names_what_is_available(labels):
    part = partition(labels, 2, "sharded", seed=0)
    size = part.sizes[0]
    with pytest.raises(ValueError, match=f"only {size} are available in part 0"):
        fusion_indices(labels, part, size + 1)
    with pytest.raises(ValueError, match="only 2000 are available"):
        fusion_indices(labels, None, 2001)


def test_fusion_set_deterministic_by_seed(labels):
    part = partition(labels, 2, "dirichlet", seed=0)
    a = fusion_indices(labels, part, 100, seed=3)
    assert torch.equal(a, fusion_indices(labels, part, 100, seed=3))
    assert not torch.equal(a, fusion_indices(labels, part, 100, seed=4))


def test_fusion_set_rejects_bad_part_and_size(labels):
    part = partition(labels, 2, "dirichlet", seed=0)
    with pytest.raises(ValueError, match="from_part"):
        fusion_indices(labels, part, 10, from_part=2)
    with pytest.raises(ValueError, match="n"):
        fusion_indices(labels, part, 0)


# ---------------------------------------------------------------- stratified split


def test_stratified_split_keeps_class_proportions(labels):
    pool = torch.arange(0, 2000, 2)  # every other sample
    train, val = stratified_split(pool, labels, 0.25, seed=0)
    assert val.numel() == 250 and train.numel() == 750
    assert torch.equal(torch.cat([train, val]).sort().values, pool)
    per_class = torch.bincount(labels[pool], minlength=NUM_CLASSES).double()
    val_counts = torch.bincount(labels[val], minlength=NUM_CLASSES).double()
    assert ((val_counts - 0.25 * per_class).abs() < 1).all()
    again = stratified_split(pool, labels, 0.25, seed=0)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)


def test_stratified_split_refuses_degenerate_fractions(labels):
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(torch.arange(10), labels, 1.0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        stratified_split(torch.arange(3), labels, 0.1, seed=0)
