"""CCA Merge: the canonical-correlation transform and the merge built on it."""

from __future__ import annotations

import torch
from torch import nn
from toys import mlp, permuted_by_analysis

import neurofuse as nf
from neurofuse.alignment import permutation_spaces
from neurofuse.methods._plan import is_incoming
from neurofuse.methods.cca_merge import cca_transform, map_space_linear


def test_the_transform_of_a_permuted_copy_is_the_permutation():
    g = torch.Generator().manual_seed(0)
    za = torch.randn(6, 200, generator=g, dtype=torch.float64) @ torch.randn(
        200, 200, generator=g, dtype=torch.float64
    ).mul(0.1)
    perm = torch.randperm(6, generator=g)
    zb = za[perm]  # B's neuron j is A's neuron perm[j]
    t = cca_transform(za, zb, reg=1e-6)
    torch.testing.assert_close(t @ zb, za, atol=1e-8, rtol=1e-8)
    assert torch.equal(t.round().abs().sum(0), torch.ones(6, dtype=torch.float64))


def test_the_transform_recovers_any_invertible_mixing():
    g = torch.Generator().manual_seed(1)
    za = torch.randn(5, 400, generator=g, dtype=torch.float64)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64) + 3 * torch.eye(5)
    t = cca_transform(za, mix @ za, reg=1e-9)
    torch.testing.assert_close(t @ mix, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)


def test_mapping_writes_by_t_and_reads_by_its_inverse_keeps_a_linear_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)).double().eval()
    x = torch.randn(10, 4, dtype=torch.float64)
    gm = torch.fx.symbolic_trace(model)
    state = dict(model.state_dict())
    for space in permutation_spaces(model, example=x[:2]):
        if space.fixed:
            continue
        t = torch.randn(space.size, space.size, dtype=torch.float64) + 2 * torch.eye(space.size)
        reads = {(m.key, m.axis) for m in space.members if is_incoming(gm, m.key, m.axis)}
        state = map_space_linear(state, space, t, reads)
    twin = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)).double().eval()
    twin.load_state_dict(state)
    assert not torch.allclose(twin[0].weight, model[0].weight)
    torch.testing.assert_close(twin(x), model(x))


def test_merging_identical_models_returns_the_model_and_many_models_merge():
    torch.manual_seed(0)
    model, x = mlp().eval(), torch.randn(64, 10)
    fused = nf.fuse([model, model], x, method="cca_merge")
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    twins = [permuted_by_analysis(model, seed=s, example=x[:2]) for s in (1, 2, 3)]
    fused = nf.fuse([model, *twins], x, method="cca_merge")
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(s > 0.999 for s in fused.neurofuse_report["aligned_similarity"].values())


def test_a_permuted_resnet_and_bn_vgg_are_recovered():
    from toys import TinyResNet, cnn_bn, permute_resnet, randomise_batchnorm

    torch.manual_seed(0)
    x = torch.randn(96, 1, 8, 8)
    resnet = randomise_batchnorm(TinyResNet(), 1)
    vgg = randomise_batchnorm(cnn_bn(), 2)
    pairs = [
        (resnet, permute_resnet(resnet, seed=5)),
        (vgg, permuted_by_analysis(vgg, seed=5, example=x[:2])),
    ]
    for model, twin in pairs:
        fused = nf.fuse([model, twin], x, method="cca_merge")
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
