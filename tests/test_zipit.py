"""ZipIt!: greedy feature merging within and across models."""

from __future__ import annotations

import pytest
import torch
from toys import cnn_bn, mlp, permuted_by_analysis, randomise_batchnorm

import neurofuse as nf
from neurofuse.methods.zipit import correlation_matrix, zip_groups


def _features(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 300, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pairs_follow_the_correlations_across_models():
    base = _features()
    perm = torch.tensor([2, 0, 3, 1])
    z = torch.cat([base, base[perm] + 0.01 * _features(1)])  # model 1: model 0's neurons, moved
    owners = torch.tensor([0] * 4 + [1] * 4)
    labels = zip_groups(correlation_matrix(z), owners, 4, 2, within=True)
    for j in range(4):  # model 1's neuron j is model 0's neuron perm[j]
        assert labels[4 + j] == labels[int(perm[j])]


def test_redundant_neurons_of_one_model_merge_with_each_other():
    base = _features()
    # model 0 holds feature 0 twice; model 1 holds features 1..3 and a feature of its own
    m0 = torch.stack([base[0], base[0] * 2 + 0.01 * base[3], base[1], base[2]])
    m1 = torch.stack([base[1], base[2], base[3], _features(5)[0]])
    z, owners = torch.cat([m0, m1]), torch.tensor([0] * 4 + [1] * 4)
    labels = zip_groups(correlation_matrix(z), owners, 5, 2, within=True)
    assert labels[0] == labels[1]  # the duplicate pair of model 0 is one feature
    assert labels[7] not in labels[:7]  # model 1's own feature survives alone
    assert labels[2] == labels[4] and labels[3] == labels[5]  # shared features pair up
    across = zip_groups(correlation_matrix(z), owners, 5, 2, within=False)
    assert across[0] != across[1]  # across models only: the duplicates cannot merge


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
def test_three_permuted_copies_zip_back_into_the_model(arch):
    torch.manual_seed(0)
    model = mlp().eval() if arch == "mlp" else randomise_batchnorm(cnn_bn(), 1)
    x = torch.randn(64, 10) if arch == "mlp" else torch.randn(64, 1, 8, 8)
    twins = [permuted_by_analysis(model, seed=s, example=x[:2]) for s in (1, 2)]
    fused = nf.fuse([model, *twins], x, method="zipit")
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(v == 0 for v in fused.neurofuse_report["features_merged_within_a_model"].values())
