"""Neuron Transplantation (concatenate, prune, fine-tune) and the model surgery beneath it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from toys import TinyResNet, accuracy, cnn_bn, mlp, randomise_batchnorm
from toys_sharded import sharded_task

import neurofuse as nf
from neurofuse.alignment import Space, permutation_spaces
from neurofuse.methods.transplant import concatenate, hidden_spaces, neuron_norms
from neurofuse.models import build
from neurofuse.surgery import resize, select


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: thread start-up costs more than it saves (and the CI machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vgg() -> nn.Module:
    return build(
        "vgg",
        config=[4, "M", 6, "M"],
        in_channels=1,
        num_classes=3,
        input_size=8,
        batch_norm=True,
        classifier=[10],
    )


# (factory, input) pairs; BatchNorm statistics randomised so they matter
ARCHS = {
    "mlp": (lambda: mlp(10, (16, 12), 3), (10,)),
    "cnn_bn": (lambda: randomise_batchnorm(cnn_bn()), (1, 8, 8)),
    "vgg_bn": (lambda: randomise_batchnorm(_vgg()), (1, 8, 8)),
    "tiny_resnet": (lambda: randomise_batchnorm(TinyResNet()), (1, 8, 8)),
    "resnet18": (
        lambda: randomise_batchnorm(build("resnet18", in_channels=1, num_classes=3, width=2)),
        (1, 8, 8),
    ),
}


def _mean_logits(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([m(x) for m in models]).mean(0)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_concatenated_model_outputs_the_mean_of_the_members_logits(arch) -> None:
    factory, shape = ARCHS[arch]
    torch.manual_seed(0)
    models = [factory().eval() for _ in range(3)]
    for i, m in enumerate(models):
        randomise_batchnorm(m, seed=i)
    x = torch.randn(16, *shape)
    wide, spaces = concatenate(models)
    with torch.no_grad():
        out = wide(x)
    expected = _mean_logits(models, x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), float((out - expected).abs().max())
    base = {s.name: s.size for s in hidden_spaces(models[:1])[1][0]}
    assert {s.name: s.size for s in spaces} == {k: 3 * v for k, v in base.items()}


def test_concatenation_handles_different_widths_and_is_block_diagonal() -> None:
    torch.manual_seed(0)
    models = [mlp(10, (16, 12), 3).eval(), mlp(10, (8, 20), 3).eval()]
    wide, _ = concatenate(models)
    x = torch.randn(16, 10)
    assert torch.allclose(wide(x), _mean_logits(models, x), atol=1e-6)
    w = wide[3].weight.detach()  # second hidden layer: (12 + 20) x (16 + 8)
    assert w.shape == (32, 24)
    assert torch.equal(w[:12, :16], models[0][3].weight) and torch.equal(
        w[12:, 16:], models[1][3].weight
    )
    assert not w[:12, 16:].any() and not w[12:, :16].any()  # cross weights start at zero
    assert torch.allclose(wide[5].weight[:, :12], models[0][5].weight / 2)


def test_a_vit_is_refused_naming_the_layernorm_of_its_token_stream() -> None:
    models = [build("vit_tiny") for _ in range(2)]
    stream = permutation_spaces(models[0])[0].name
    with pytest.raises(ValueError, match=rf"hidden space '{stream}'.*LayerNorm"):
        hidden_spaces(models)
    # nf.fuse refuses it before any work, from the method's declared capabilities
    with pytest.raises(ValueError, match="transplant' does not fuse transformer-like.*LayerNorm"):
        nf.fuse(models, torch.randn(4, 3, 32, 32), method="transplant")


def test_a_layernorm_in_a_free_space_is_refused() -> None:
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))

    with pytest.raises(ValueError, match="LayerNorm"):
        concatenate([net(), net()])


# ----------------------------------------------------------------------------- prune


@pytest.mark.parametrize("arch", ["mlp", "vgg_bn", "resnet18"])
def test_transplant_returns_the_width_of_model_zero(arch) -> None:
    factory, shape = ARCHS[arch]
    torch.manual_seed(1)
    models = [factory().eval() for _ in range(2)]
    fused = nf.fuse(models, torch.randn(24, *shape), method="transplant", finetune_epochs=1)
    shapes = {k: v.shape for k, v in models[0].state_dict().items()}
    assert {k: v.shape for k, v in fused.state_dict().items()} == shapes
    with torch.no_grad():
        assert fused(torch.randn(2, *shape)).shape == (2, 3)


def test_pruning_keeps_the_largest_norm_neurons_jointly_across_models() -> None:
    torch.manual_seed(2)
    a = mlp(10, (16, 12), 3).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():  # b: same function, first-layer rows 10x larger (ReLU is homogeneous)
        b[1].weight.mul_(10), b[1].bias.mul_(10), b[3].weight.div_(10)
    x = torch.randn(50, 10)
    fused = nf.fuse([a, b], x, method="transplant", finetune_epochs=0)
    kept = fused.neurofuse_report["kept_per_model"]
    first, second = (s.name for s in hidden_spaces([a])[1][0])
    assert kept[first] == [0, 16]  # every neuron of b's first layer beats every one of a's
    assert torch.equal(fused[1].weight, b[1].weight)
    assert kept[second] == [12, 0]  # b's second-layer rows are 10x smaller than a's
    # a's second-layer neurons read only a's first layer, all pruned: their kept rows are zero
    assert not fused[3].weight.any()


def test_neuron_norms_follow_the_criterion() -> None:
    torch.manual_seed(3)
    model = mlp(10, (16,), 3)
    space = hidden_spaces([model])[1][0][0]
    incoming = neuron_norms(model, space, "incoming")
    assert torch.allclose(incoming.float(), model[1].weight.norm(dim=1))
    group = neuron_norms(model, space, "group")
    expected = (
        model[1].weight.pow(2).sum(1) + model[1].bias.pow(2) + model[3].weight.pow(2).sum(0)
    ).sqrt()
    assert torch.allclose(group.float(), expected.detach())
    with pytest.raises(ValueError, match="incoming"):
        nf.fuse([model, model], torch.randn(4, 10), method="transplant", criterion="l1")


# ----------------------------------------------------------------------------- fine-tune


@pytest.mark.parametrize("target", ["labels", "ensemble"])
def test_transplant_beats_the_weakest_base_model_on_a_sharded_task(target) -> None:
    task = sharded_task()
    fused = nf.fuse(
        task.models,
        (task.x_fusion, task.y_fusion),
        method="transplant",
        finetune_target=target,
        finetune_epochs=20,
    )
    assert fused.neurofuse_report["finetune"]["target"] == target
    assert fused.neurofuse_report["merge_relative_error"] < 1e-5
    acc = accuracy(fused, task.x_test, task.y_test)
    assert acc > task.weakest() + 0.15, (acc, task.weakest())


def test_labels_are_required_when_asked_for() -> None:
    models = [mlp(10, (8,), 3) for _ in range(2)]
    with pytest.raises(ValueError, match="labelled fusion data"):
        nf.fuse(models, torch.randn(12, 10), method="transplant", finetune_target="labels")


def test_transplant_leaves_the_base_models_untouched() -> None:
    models = [randomise_batchnorm(cnn_bn(), seed=i) for i in range(2)]
    saved = [copy.deepcopy(m.state_dict()) for m in models]
    nf.fuse(models, torch.randn(12, 1, 8, 8), method="transplant", finetune_epochs=1)
    for m, s in zip(models, saved, strict=True):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------- surgery


def test_resize_to_the_same_widths_is_an_identical_copy() -> None:
    model = randomise_batchnorm(_vgg())
    spaces = [s for s in permutation_spaces(model) if not s.fixed]
    copy_ = resize(model, {s.name: s.size for s in spaces}, spaces)
    assert copy_ is not model
    for key, value in model.state_dict().items():
        assert torch.equal(copy_.state_dict()[key], value)


def test_resize_narrows_like_selecting_the_first_neurons() -> None:
    torch.manual_seed(4)
    model = randomise_batchnorm(_vgg())
    spaces = [s for s in permutation_spaces(model) if not s.fixed]
    sizes = {s.name: max(1, s.size // 2) for s in spaces}
    narrow = resize(model, sizes, spaces)
    picked = select(model.state_dict(), spaces, {n: torch.arange(k) for n, k in sizes.items()})
    for key, value in narrow.state_dict().items():
        assert torch.equal(value, picked[key]), key
    conv = narrow.features[0]
    bn = narrow.features[1]
    assert conv.out_channels == sizes[spaces[0].name] == bn.num_features
    assert narrow.classifier[0].in_features == narrow.classifier[0].weight.shape[1]
    with torch.no_grad():
        assert narrow(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_select_reorders_and_checks_indices() -> None:
    model = mlp(10, (4,), 3)
    spaces = [s for s in permutation_spaces(model) if not s.fixed]
    name = spaces[0].name
    perm = torch.tensor([2, 0, 3, 1])
    out = select(model.state_dict(), spaces, {name: perm})
    assert torch.equal(out["1.weight"], model[1].weight[perm])
    assert torch.equal(out["3.weight"], model[3].weight[:, perm])
    with pytest.raises(ValueError, match="outside 0..3"):
        select(model.state_dict(), spaces, {name: torch.tensor([4])})
    with pytest.raises(ValueError, match="valid spaces"):
        select(model.state_dict(), spaces, {"nope": perm})


def test_resize_refuses_layers_it_does_not_know() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    model = nn.Sequential(nn.Linear(3, 4), Scale())
    space = Space("s", 4, [("0.weight", 0, 1), ("0.bias", 0, 1), ("1.weight", 0, 1)], [], False)
    with pytest.raises(TypeError, match="register_layer"):
        resize(model, {"s": 6}, [space])
    with pytest.raises(ValueError, match="positive integer"):
        resize(model, {"s": 0}, [space])


def _hidden_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the hidden Linear layers, by forward hooks."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out.double())) for m in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_repair_gives_every_kept_neuron_the_statistics_of_its_own_model() -> None:
    torch.manual_seed(0)
    models = [mlp(d_in=10, hidden=(12, 12)).eval() for _ in range(2)]
    x = torch.randn(128, 10)
    plain = nf.fuse(models, x, method="transplant", finetune_epochs=0)
    fused = nf.fuse(models, x, method="transplant", finetune_epochs=0, repair=True)
    base = [_hidden_outputs(m, x) for m in models]
    layers = [m for m in plain.modules() if isinstance(m, nn.Linear)][:-1]
    sources = [[m for m in b.modules() if isinstance(m, nn.Linear)][:-1] for b in models]
    shifted = 0.0
    for j, (got, before) in enumerate(
        zip(_hidden_outputs(fused, x), _hidden_outputs(plain, x), strict=True)
    ):
        for i, bias in enumerate(layers[j].bias.detach()):  # pruning copies each kept bias
            k, n = next(
                (k, int(n))
                for k in range(2)
                for n in torch.nonzero(sources[k][j].bias.detach() == bias).flatten()
            )
            want = base[k][j][:, n]
            assert float(got[:, i].mean()) == pytest.approx(float(want.mean()), abs=1e-5)
            assert float(got[:, i].std()) == pytest.approx(float(want.std()), rel=1e-4)
            shifted = max(shifted, float((before[:, i].std() - want.std()).abs()))
    assert shifted > 1e-2  # without the repair, pruning had moved the second layer's neurons
    assert len(fused.neurofuse_report["repair_collapse"]) == 2


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
def test_repair_targets_of_a_large_fusion_set_are_gathered_in_chunks(arch, monkeypatch) -> None:
    """Above ``STATS_CHUNK`` samples the kept neurons' statistics in the concatenated model are
    summed over chunks, like the fused side's: the repair of the whole set at once, and no
    graph evaluated on more than a chunk (but the concatenation's check on 256 samples)."""
    from neurofuse.alignment import repair as module
    from neurofuse.graph import GraphRunner

    torch.manual_seed(0)
    if arch == "mlp":
        models = [mlp(d_in=10, hidden=(12, 12)).eval() for _ in range(2)]
        x = torch.randn(300, 10)
    else:
        models = [randomise_batchnorm(cnn_bn(), seed).eval() for seed in range(2)]
        x = torch.randn(300, 1, 8, 8)
    whole = nf.fuse(models, x, method="transplant", finetune_epochs=0, repair=True)
    monkeypatch.setattr(module, "STATS_CHUNK", 64)
    seen: list[int] = []
    real = GraphRunner.__init__

    def spy(self, gm, inputs):
        seen.append(len(inputs))
        real(self, gm, inputs)

    monkeypatch.setattr(GraphRunner, "__init__", spy)
    chunked = nf.fuse(models, x, method="transplant", finetune_epochs=0, repair=True)
    assert seen and all(n <= 64 or n == 256 for n in seen)
    assert chunked.neurofuse_report["repair_collapse"] == pytest.approx(
        whole.neurofuse_report["repair_collapse"], rel=1e-6
    )
    for (k, v), (_, v2) in zip(
        whole.state_dict().items(), chunked.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(v2, v, rtol=1e-5, atol=1e-6, msg=k)


def test_reset_bn_reestimates_the_pruned_models_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    models = [randomise_batchnorm(cnn_bn(), s) for s in (1, 2)]
    x = torch.randn(64, 1, 8, 8)
    plain = nf.fuse(models, x, method="transplant", finetune_epochs=0)
    reset = nf.fuse(models, x, method="transplant", finetune_epochs=0, reset_bn=True)
    bn_plain = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_reset = [m for m in reset.modules() if isinstance(m, nn.BatchNorm2d)]
    # the first BatchNorm normalises the first conv's outputs: its reset statistics are theirs
    conv = next(m for m in reset.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        z = conv(x)
    torch.testing.assert_close(bn_reset[0].running_mean, z.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(bn_plain[0].running_mean, bn_reset[0].running_mean)
    assert reset.neurofuse_report["reset_bn"] is True
