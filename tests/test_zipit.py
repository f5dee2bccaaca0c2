"""ZipIt!: greedy feature merging within and across models."""

from __future__ import annotations

import pytest
import torch
from toys import (
    TinyResNet,
    cnn_bn,
    mlp,
    permute_resnet,
    permuted_by_analysis,
    randomise_batchnorm,
)

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


def _pair(arch: str = "mlp", seed: int = 0) -> tuple[list[torch.nn.Module], torch.Tensor]:
    """Two unrelated models of one toy architecture and a batch for them."""
    torch.manual_seed(seed)
    if arch == "mlp":
        return [mlp().eval(), mlp().eval()], torch.randn(64, 10)
    if arch == "cnn_bn":
        return [randomise_batchnorm(cnn_bn(), 1), randomise_batchnorm(cnn_bn(), 2)], torch.randn(
            64, 1, 8, 8
        )
    return [randomise_batchnorm(TinyResNet(), 1), randomise_batchnorm(TinyResNet(), 2)], (
        torch.randn(64, 1, 8, 8)
    )


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn", "resnet"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_partial_zip_with_every_layer_unzipped_is_the_ensemble(arch, combine):
    models, x = _pair(arch)
    ensemble = nf.fuse(models, x, method="ensemble", mode=combine)
    heads = nf.fuse(models, x, method="zipit", merge_layers=0, combine=combine)
    torch.testing.assert_close(heads(x), ensemble(x), atol=1e-5, rtol=1e-5)
    cost = heads.neurofuse_report["partial"]["inference_cost"]
    assert cost["parameters_vs_one_model"] == pytest.approx(2.0)


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn", "resnet"])
def test_partial_zip_of_a_permuted_copy_is_the_model_at_every_cut(arch):
    models, x = _pair(arch)
    model = models[0]
    twin = (
        permute_resnet(model, seed=3)
        if arch == "resnet"
        else permuted_by_analysis(model, seed=3, example=x[:2])
    )
    layers = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in model.modules())
    costs = []
    for merged in range(layers):
        fused = nf.fuse([model, twin], x, method="zipit", merge_layers=merged, combine="logit")
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
        costs.append(fused.neurofuse_report["partial"]["inference_cost"]["parameters"])
        # the heads are copies: training the fused model cannot move a base model
        base = {id(p) for m in (model, twin) for p in m.parameters()}
        assert not base & {id(p) for p in fused.parameters()}
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    full = nf.fuse([model, twin], x, method="zipit", merge_layers=layers)
    assert type(full) is type(model) and "partial" not in full.neurofuse_report
    torch.testing.assert_close(full(x), model(x), atol=1e-4, rtol=1e-4)  # fully zipped


def test_partial_zip_counts_from_the_end_exports_and_refuses_a_cut_beyond_the_model():
    models, x = _pair("cnn_bn")  # 3 affine layers
    heads = nf.fuse(models, x, method="zipit", merge_layers=-2)
    same = nf.fuse(models, x, method="zipit", merge_layers=1)
    assert heads.neurofuse_report["partial"]["merged_layers"] == 1
    torch.testing.assert_close(heads(x), same(x))
    exported = torch.export.export(heads, (x[:4],))
    torch.testing.assert_close(exported.module()(x[:4]), heads(x[:4]))
    with pytest.raises(ValueError, match="merge_layers=-4"):
        nf.fuse(models, x, method="zipit", merge_layers=-4)


def _first_layer(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, a, out: seen.append(out.detach().double()))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


def test_repair_sets_each_zipped_feature_to_its_members_statistics():
    models, x = _pair(seed=4)
    plain = nf.fuse(models, x, method="zipit", within=False)
    fused = nf.fuse(models, x, method="zipit", within=False, repair=True)
    z0, z1, zf = (_first_layer(m, x) for m in (*models, plain))
    # the first layer reads the input: each unrepaired feature is its pair's exact mean
    pairs = []
    for i in range(zf.shape[1]):
        err = ((z0[:, :, None] + z1[:, None, :]) / 2 - zf[:, i, None, None]).abs().amax(0)
        a, b = divmod(int(err.argmin()), err.shape[1])
        assert float(err[a, b]) < 1e-5
        pairs.append((a, b))
    repaired = _first_layer(fused, x)
    for i, (a, b) in enumerate(pairs):
        target = (z0[:, a].std(unbiased=False) + z1[:, b].std(unbiased=False)) / 2
        assert float(repaired[:, i].std(unbiased=False)) == pytest.approx(float(target), rel=1e-4)
        mean = (z0[:, a].mean() + z1[:, b].mean()) / 2
        assert float(repaired[:, i].mean()) == pytest.approx(float(mean), abs=1e-4)
    assert float(zf.std(0).mean()) < float(repaired.std(0).mean())  # the merge had collapsed
    assert len(fused.neurofuse_report["repair_collapse"]) == 2  # both hidden layers
