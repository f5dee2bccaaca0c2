"""Averaging-family baselines: vanilla, FedAvg, OTFusion, Git Re-Basin.

The central check is permutation recovery: B is A with its hidden neurons permuted (the same
function, different weights). Aligning B to A and averaging must give A back; plain averaging
must not (so the check can fail).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from toys import (
    TinyResNet,
    cnn_bn,
    mlp,
    permute_resnet,
    permute_sequential,
    permuted_by_analysis,
    randomise_batchnorm,
    relative_error,
)

import neurofuse as nf
from neurofuse import api
from neurofuse.alignment import apply_permutation, permutation_spaces
from neurofuse.graph import trace
from neurofuse.methods import otfusion as otfusion_module
from neurofuse.models import build

ALIGNING = [
    ("otfusion", {}),
    ("otfusion", {"ground_metric": "weights"}),
    ("git_rebasin", {}),
    ("git_rebasin", {"match": "weights"}),
]
ALIGNING_IDS = ["ot-acts", "ot-weights", "rebasin-acts", "rebasin-weights"]


def _evaluated_batches(monkeypatch) -> list[int]:
    """The batch sizes of every graph node the alignment methods evaluate from now on (a
    runner made on the whole set but never read does not count)."""
    from neurofuse.graph import GraphRunner

    sizes: list[int] = []
    real = GraphRunner._run

    def spy(self, n):
        placeholder = next(iter(self.values.values()))
        sizes.append(int(placeholder.shape[0]))
        return real(self, n)

    monkeypatch.setattr(GraphRunner, "_run", spy)
    return sizes


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def zoo_pair(name: str) -> tuple[nn.Module, nn.Module, Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        a, x = build("mlp", in_features=12, hidden=[16, 16]), torch.randn(48, 12)
    elif name == "vgg_bn":
        a = build("vgg", config=[8, "M", 16, "M"], input_size=8, batch_norm=True, classifier=[12])
        x = torch.randn(24, 3, 8, 8)
    elif name == "resnet18":
        a, x = build("resnet18", width=4), torch.randn(24, 3, 8, 8)
    else:  # ViT: only the MLP sublayers' hidden neurons are free to permute
        a, x = build("vit_tiny", image_size=16, depth=1), torch.randn(16, 3, 16, 16)
    a = randomise_batchnorm(a)
    return a, permuted_by_analysis(a), x


def toy_pair(name: str) -> tuple[nn.Module, nn.Module, Tensor]:
    """Pairs permuted by tests/toys.py's hand-written helpers, independent of the analysis."""
    torch.manual_seed(0)
    if name == "toy_mlp":
        a = mlp()
        return a.eval(), permute_sequential(a), torch.randn(48, 10)
    if name == "toy_cnn":
        a = randomise_batchnorm(cnn_bn())
        return a, permute_sequential(a, flatten_repeat=4).eval(), torch.randn(24, 1, 8, 8)
    a = randomise_batchnorm(TinyResNet())
    return a, permute_resnet(a).eval(), torch.randn(24, 1, 8, 8)


@pytest.fixture
def exact_scores(monkeypatch):
    """Hand the methods exactly these scores per node (bypassing the provider's own
    normalisation policy, which is not what these tests are about)."""

    def install(tables: list[dict[str, Tensor]]) -> None:
        def scores(self, k: int, name: str, output: Tensor, width: int) -> Tensor:
            return tables[k][name].to(output.device)

        monkeypatch.setattr(api.ImportanceProvider, "scores", scores)

    return install


@pytest.fixture
def emd_marginals(monkeypatch):
    """Record the marginals ``(a, b)`` of every exact OT plan OTFusion solves: call it, then
    read the returned list after the fusion."""

    def install() -> list[tuple]:
        seen: list[tuple] = []
        emd = otfusion_module.SOLVERS["emd"]

        def spy(a_, b_, cost, opt):
            seen.append((a_, b_))
            return emd(a_, b_, cost, opt)

        monkeypatch.setitem(otfusion_module.SOLVERS, "emd", spy)
        return seen

    return install


ZOO = ["mlp", "vgg_bn", "resnet18", "vit"]
TOYS = ["toy_mlp", "toy_cnn", "toy_resnet"]


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[nn.Module, nn.Module, Tensor]]:
    return {**{n: zoo_pair(n) for n in ZOO}, **{n: toy_pair(n) for n in TOYS}}


@pytest.mark.parametrize("method,options", ALIGNING, ids=ALIGNING_IDS)
@pytest.mark.parametrize("pair", ZOO + TOYS)
def test_aligning_methods_recover_a_permuted_copy(pairs, pair, method, options):
    a, b, x = pairs[pair]
    assert relative_error(logits(b, x), logits(a, x)) < 1e-5  # the same function...
    fused = nf.fuse([a, b], x, method=method, **options)
    assert relative_error(logits(fused, x), logits(a, x)) < 1e-4


@pytest.mark.parametrize("pair", ZOO + TOYS)
def test_vanilla_averaging_of_a_permuted_copy_fails(pairs, pair):
    a, b, x = pairs[pair]
    fused = nf.fuse([a, b], x, method="vanilla")
    assert relative_error(logits(fused, x), logits(a, x)) > 0.1


def test_more_than_two_models_align_to_the_reference(pairs):
    a, b, x = pairs["vgg_bn"]
    c = permuted_by_analysis(a, seed=7)
    for method in ("otfusion", "git_rebasin"):
        fused = nf.fuse([b, a, c], x, method=method, reference=1)
        assert relative_error(logits(fused, x), logits(a, x)) < 1e-4
        assert torch.equal(fused.features[0].weight, a.features[0].weight)  # a's neuron order


def test_sinkhorn_with_small_reg_is_close_to_the_exact_plan(pairs):
    a, b, x = pairs["mlp"]
    fused = nf.fuse([a, b], x, method="otfusion", solver="sinkhorn", reg=0.003)
    assert relative_error(logits(fused, x), logits(a, x)) < 1e-3
    blurred = nf.fuse([a, b], x, method="otfusion", solver="sinkhorn", reg=1.0)
    assert relative_error(logits(blurred, x), logits(a, x)) > 1e-2  # large reg: a soft plan


def test_otfusion_fuses_models_of_different_widths_into_the_reference():
    torch.manual_seed(0)
    a = build("vgg", config=[8, "M", 16, "M"], input_size=8, batch_norm=True, classifier=[12])
    b = build("vgg", config=[12, "M", 20, "M"], input_size=8, batch_norm=True, classifier=[16])
    x = torch.randn(16, 3, 8, 8)
    for metric in ("acts", "weights"):
        for ref, model in ((0, a), (1, b)):
            fused = nf.fuse([a, b], x, method="otfusion", ground_metric=metric, reference=ref)
            shapes = {k: v.shape for k, v in fused.state_dict().items()}
            assert shapes == {k: v.shape for k, v in model.state_dict().items()}
            assert torch.isfinite(logits(fused, x)).all()
    with pytest.raises(ValueError, match="equal widths"):
        nf.fuse([a, b], x, method="git_rebasin")


def test_importance_scores_are_the_ot_marginals(emd_marginals, exact_scores):
    torch.manual_seed(0)
    a = build("mlp", in_features=12, hidden=[16, 16])
    b = build("mlp", in_features=12, hidden=[16, 16])  # an unrelated model: the plan is not trivial
    x = torch.randn(48, 12)
    g = torch.Generator().manual_seed(3)
    tables = [
        {n: torch.rand(16, generator=g) ** 4 + 1e-3 for n in ("fc1", "fc2")} for _ in range(2)
    ]
    seen = emd_marginals()
    exact_scores(tables)
    weighted = nf.fuse([a, b], x, method="otfusion", importance=tables, importance_in="marginals")
    (a1, b1), (a2, b2) = seen
    for got, want in ((a1, tables[1]["fc1"]), (b1, tables[0]["fc1"]), (a2, tables[1]["fc2"])):
        assert torch.allclose(torch.as_tensor(got), (want / want.sum()).double(), atol=1e-6)
    plain = nf.fuse([a, b], x, method="otfusion")  # uniform: the provider is not asked
    assert not torch.allclose(weighted.fc1.weight, plain.fc1.weight, atol=1e-4)
    with pytest.raises(ValueError, match="importance_in must be"):
        nf.fuse([a, b], x, method="otfusion", importance_in="marginal")


def _noisy_permuted_pair() -> tuple[nn.Module, nn.Module, nn.Module, Tensor]:
    """An MLP ``a``, a slightly perturbed copy ``noisy`` and ``b``: ``noisy`` with its hidden
    neurons permuted by ``p`` (so ``b``'s neuron ``p[j]`` is ``noisy``'s neuron ``j``)."""
    torch.manual_seed(0)
    a = build("mlp", in_features=12, hidden=[16])
    noisy = copy.deepcopy(a)
    with torch.no_grad():
        for q in noisy.parameters():
            q.add_(0.01 * torch.randn_like(q))
    p = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(noisy.state_dict(), permutation_spaces(a), {"fc1": p}))
    return a, noisy, b, p


def test_otfusion_averages_each_neuron_with_its_importance_by_default(emd_marginals, exact_scores):
    """``importance_in="average"`` (the default): uniform marginals, so the transport is the
    permutation of uniform importance, and each fused neuron is the score-weighted average of
    the neurons mapped onto it (Git Re-Basin's rule)."""
    a, noisy, b, p = _noisy_permuted_pair()
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(16, generator=g) + 0.1 for _ in range(2)]
    classes = [torch.rand(10, generator=g) + 0.1 for _ in range(2)]
    tables = [{"fc1": s, "head": c} for s, c in zip(scores, classes, strict=True)]
    x = torch.randn(64, 12)
    seen = emd_marginals()
    exact_scores(tables)
    fused = nf.fuse([a, b], x, method="otfusion", importance=tables)
    ((ma, mb),) = seen
    assert all(
        torch.allclose(torch.as_tensor(m), torch.full((16,), 1 / 16, dtype=torch.float64))
        for m in (ma, mb)
    )
    sa, sb = scores[0], scores[1][torch.argsort(p)]  # b's neuron mapped onto a's neuron j
    want = (sa[:, None] * a.fc1.weight + sb[:, None] * noisy.fc1.weight) / (sa + sb)[:, None]
    assert torch.allclose(fused.fc1.weight, want, atol=1e-6)
    ca, cb = classes
    head = (ca[:, None] * a.head.weight + cb[:, None] * noisy.head.weight) / (ca + cb)[:, None]
    assert torch.allclose(fused.head.weight, head, atol=1e-6)


def test_otfusion_carries_scores_through_soft_maps(monkeypatch):
    """Models of different widths (soft transports): the score of what a map puts on a
    reference neuron is the plan-weighted average of the scores it takes, so scores that are
    constant within each model weigh the models like model weights."""
    torch.manual_seed(0)
    cfg = dict(input_size=8, batch_norm=True, classifier=[12])
    a = randomise_batchnorm(build("vgg", config=[8, "M", 16, "M"], **cfg)).eval()
    b = randomise_batchnorm(
        build("vgg", config=[12, "M", 20, "M"], **{**cfg, "classifier": [16]})
    ).eval()
    x = torch.randn(24, 3, 8, 8)
    plain = nf.fuse([a, b], x, method="otfusion")
    weighted = nf.fuse([a, b], x, method="otfusion", weights=[1.0, 3.0])

    def constant(self, k: int, name: str, output: Tensor, width: int) -> Tensor:
        return torch.full((width,), (1.0, 3.0)[k])

    monkeypatch.setattr(api.ImportanceProvider, "scores", constant)
    fused = nf.fuse([a, b], x, method="otfusion", importance="activation")
    for key, t in weighted.state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(fused.state_dict()[key], t, atol=1e-6), key
    assert relative_error(logits(plain, x), logits(weighted, x)) > 1e-2  # (the weights matter)
    assert not torch.allclose(
        plain.state_dict()["features.0.weight"], weighted.state_dict()["features.0.weight"]
    )


def test_git_rebasin_averages_each_neuron_with_its_importance(exact_scores):
    a, noisy, b, p = _noisy_permuted_pair()
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(16, generator=g) + 0.1 for _ in range(2)]
    tables = [{"fc1": s, "head": torch.ones(10)} for s in scores]
    x = torch.randn(64, 12)
    exact_scores(tables)
    fused = nf.fuse([a, b], x, method="git_rebasin", importance=tables)
    sa, sb = scores[0], scores[1][torch.argsort(p)]  # b's neuron matched to a's neuron j
    want = (sa[:, None] * a.fc1.weight + sb[:, None] * noisy.fc1.weight) / (sa + sb)[:, None]
    assert torch.allclose(fused.fc1.weight, want, atol=1e-6)
    plain = nf.fuse([a, b], x, method="git_rebasin")
    assert torch.allclose(plain.fc1.weight, (a.fc1.weight + noisy.fc1.weight) / 2, atol=1e-6)


def test_vanilla_is_the_plain_mean_and_fedavg_the_sample_weighted_mean():
    torch.manual_seed(0)
    models = [randomise_batchnorm(cnn_bn(), seed=i) for i in range(3)]
    x = torch.randn(8, 1, 8, 8)
    counts = [100, 300, 600]
    mean = nf.fuse(models, x, method="vanilla").state_dict()
    fed = nf.fuse(models, x, method="fedavg", sample_counts=counts).state_dict()
    states = [m.state_dict() for m in models]
    for key, value in states[0].items():
        if not value.is_floating_point():
            continue
        plain = sum(s[key] for s in states) / 3
        weighted = sum(c * s[key] for c, s in zip(counts, states, strict=True)) / sum(counts)
        assert torch.allclose(mean[key], plain, atol=1e-6), key
        assert torch.allclose(fed[key], weighted, atol=1e-6), key
    assert not torch.allclose(mean["1.running_mean"], fed["1.running_mean"])


@pytest.mark.parametrize(
    "options,message",
    [
        ({}, "needs sample_counts"),
        ({"sample_counts": [10]}, "1 entries for 2 models"),
        ({"sample_counts": [10, 0]}, "positive integers"),
        ({"sample_counts": [10, -3]}, "positive integers"),
    ],
)
def test_fedavg_rejects_bad_sample_counts(options, message):
    models = [mlp(), mlp()]
    with pytest.raises(ValueError, match=message):
        nf.fuse(models, torch.randn(4, 10), method="fedavg", **options)


@pytest.mark.parametrize("method", ["vanilla", "fedavg", "otfusion", "git_rebasin"])
def test_models_of_different_depth_are_refused_naming_the_layer(method):
    models = [build("mlp", in_features=6, hidden=[8]), build("mlp", in_features=6, hidden=[8, 8])]
    options = {"sample_counts": [1, 1]} if method == "fedavg" else {}
    with pytest.raises(ValueError, match="'fc2.weight'"):
        nf.fuse(models, torch.randn(4, 6), method=method, **options)


def test_reset_bn_sets_the_fusion_set_statistics(pairs):
    a, b, _ = pairs["toy_cnn"]
    x = torch.randn(64, 1, 8, 8) + 1.0
    for method in ("vanilla", "git_rebasin"):
        fused = nf.fuse([a, b], x, method=method, reset_bn=True)
        kept = nf.fuse([a, b], x, method=method)
        with torch.no_grad():
            z = fused[0](x)  # the first BatchNorm's input
        assert torch.allclose(fused[1].running_mean, z.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(fused[1].running_var, z.var((0, 2, 3)), rtol=1e-4)
        assert not torch.allclose(kept[1].running_mean, fused[1].running_mean, atol=1e-3)


def test_bad_options_are_refused():
    models, x = [mlp(), mlp()], torch.randn(4, 10)
    with pytest.raises(ValueError, match="ground_metric"):
        nf.fuse(models, x, method="otfusion", ground_metric="euclid")
    with pytest.raises(ValueError, match="solver"):
        nf.fuse(models, x, method="otfusion", solver="greedy")
    with pytest.raises(ValueError, match="match"):
        nf.fuse(models, x, method="git_rebasin", match="both")
    with pytest.raises(ValueError, match="reference"):
        nf.fuse(models, x, method="git_rebasin", reference=2)
    with pytest.raises(ValueError, match="weights"):
        nf.fuse(models, x, method="otfusion", weights=[1.0])


def test_graphs_that_differ_only_in_parameter_free_layers_are_refused():
    relu = build("mlp", in_features=6, hidden=[8])
    tanh = build("mlp", in_features=6, hidden=[8], activation="tanh")
    for method in ("otfusion", "git_rebasin"):
        with pytest.raises(ValueError, match=r"act1 \(Tanh\)"):
            nf.fuse([relu, tanh], torch.randn(4, 6), method=method)


@pytest.mark.parametrize("method", ["otfusion", "git_rebasin"])
def test_a_linear_batchnorm1d_mlp_is_aligned(method):
    """Without flatten the input's rank is unknown to the graph alone, so BatchNorm1d could not
    tell (B, C) from (B, C, L) and left every space fixed (the permuted copy was averaged
    unaligned). The fusion set's shapes settle it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    x = torch.randn(64, 10)
    twin = permuted_by_analysis(model, 3, example=x)
    assert relative_error(logits(twin, x), logits(model, x)) < 1e-5
    assert not torch.equal(twin[0].weight, model[0].weight)
    fused = nf.fuse([model, twin], x, method=method)
    assert relative_error(logits(fused, x), logits(model, x)) < 1e-5


def test_otfusion_keeps_activations_across_permutations_as_if_it_recomputed_them(monkeypatch):
    """After a hard permutation OTFusion does not rerun the aligned model (its function is
    unchanged); the plans and the fused model must be those of recomputing after every map."""
    torch.manual_seed(0)
    models = [cnn_bn() for _ in range(3)]  # unrelated models: non-trivial permutations
    for m in models:
        randomise_batchnorm(m)
        m.eval()
    x = torch.randn(24, 1, 8, 8)
    plans: dict[str, list[Tensor]] = {"skip": [], "rerun": []}
    emd = otfusion_module.SOLVERS["emd"]
    reloads = []
    reload = otfusion_module._Aligner._reload

    def counting(self, keys):
        reloads.append(len(keys))
        return reload(self, keys)

    monkeypatch.setattr(otfusion_module._Aligner, "_reload", counting)
    for mode in ("skip", "rerun"):

        def spy(a_, b_, cost, opt, mode=mode):
            plan = emd(a_, b_, cost, opt)
            plans[mode].append(torch.as_tensor(plan))
            return plan

        monkeypatch.setitem(otfusion_module.SOLVERS, "emd", spy)
        if mode == "rerun":
            monkeypatch.setattr(otfusion_module, "_is_permutation", lambda q, tol=1e-9: False)
        fused = nf.fuse(models, x, method="otfusion")
        if mode == "skip":
            assert reloads == []  # every plan was a permutation: the copies were never rerun
            skipped = fused
    assert reloads  # the rerun mode did reload
    for p, q in zip(plans["skip"], plans["rerun"], strict=True):
        assert torch.equal(p, q)
    torch.testing.assert_close(logits(skipped, x), logits(fused, x), rtol=1e-5, atol=1e-6)
    # the plans were permutations, and not the identity
    assert any(
        not torch.equal(p * p.shape[0], torch.eye(p.shape[0], dtype=p.dtype)) for p in plans["skip"]
    )


def test_channel_map_distances_equal_the_neuron_row_distances(monkeypatch):
    from neurofuse.graph import to_neurons

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 4, 3, generator=g).relu() + 2.0
    y = torch.randn(5, 7, 4, 3, generator=g).relu()
    d, length = otfusion_module.map_distances(x.reshape(5, 6, -1), y.reshape(5, 7, -1))
    want = otfusion_module.squared_distances(to_neurons(x, 1).double(), to_neurons(y, 1).double())
    assert length == 5 * 4 * 3
    torch.testing.assert_close(d.double(), want, rtol=1e-5, atol=1e-4)
    # OTFusion of CNNs takes the map path for its convolutions, with the same fused model
    torch.manual_seed(1)
    models = [cnn_bn().eval() for _ in range(2)]
    inputs = torch.randn(16, 1, 8, 8)
    calls = []
    real = otfusion_module.map_distances

    def spy(a, b):
        calls.append(a.shape)
        return real(a, b)

    monkeypatch.setattr(otfusion_module, "map_distances", spy)
    fast = nf.fuse(models, inputs, method="otfusion")
    assert calls and all(len(s) == 3 for s in calls)
    monkeypatch.setattr(otfusion_module, "_channel_maps", lambda *a: None)
    slow = nf.fuse(models, inputs, method="otfusion")
    torch.testing.assert_close(logits(fast, inputs), logits(slow, inputs), rtol=1e-5, atol=1e-6)


def test_average_states_reads_lazy_states_once_in_order_and_equals_the_list_average():
    from neurofuse.methods._averaging import average_states
    from neurofuse.methods._plan import LazySequence

    g = torch.Generator().manual_seed(0)
    states = [
        {
            "w": torch.randn(4, 3, generator=g),
            "b": torch.randn(4, generator=g),
            "n": torch.tensor(k),  # integer buffer: model 0's
        }
        for k in range(3)
    ]
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    per_neuron = {"w": [torch.rand(4, generator=g) + 0.1 for _ in range(3)]}
    made: list[int] = []

    def make(k: int) -> dict[str, Tensor]:
        made.append(k)
        return states[k]

    lazy = average_states(LazySequence(3, make), weights, per_neuron)
    assert made == [0, 1, 2]
    eager = average_states(states, weights, per_neuron)
    c = [weights[k] * per_neuron["w"][k].double()[:, None] for k in range(3)]
    want_w = sum(c[k] * states[k]["w"].double() for k in range(3)) / sum(c)
    want_b = sum(weights[k] * states[k]["b"].double() for k in range(3)) / weights.sum()
    for out in (lazy, eager):
        torch.testing.assert_close(out["w"], want_w.float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out["b"], want_b.float(), rtol=1e-6, atol=1e-7)
        assert out["n"] == 0 and out["w"].dtype == torch.float32
    assert all(torch.equal(lazy[k], eager[k]) for k in eager)


def test_git_rebasin_correlation_equals_numpy_and_leaves_its_inputs_intact():
    import numpy as np

    from neurofuse.methods.git_rebasin import correlation

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 40, generator=g, dtype=torch.float64)
    y = torch.randn(7, 40, generator=g, dtype=torch.float64)
    y[3] = 2.0  # a dead neuron: correlation 0 with everything
    x0, y0 = x.clone(), y.clone()
    got = correlation(x, y)
    with np.errstate(invalid="ignore"):  # numpy divides by the dead neuron's zero spread
        want = np.corrcoef(x.numpy(), y.numpy())[:5, 5:]
    want[:, 3] = 0.0
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_git_rebasin_correlation_sums_over_chunks_equal_the_one_shot_correlation():
    """Sums about the first chunk's means: rows with a mean far above their spread (where raw
    moments would cancel) and a dead row still give the one-shot Pearson correlations."""
    from neurofuse.methods.git_rebasin import CorrelationSums, correlation

    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 90, generator=g, dtype=torch.float64)
    y = torch.randn(4, 90, generator=g, dtype=torch.float64)
    x[0] += 1e6  # large mean, unit spread
    y[1] = x[2] * 3.0 + 5.0  # perfectly correlated with x[2]
    y[2] = -7.0  # dead
    whole = correlation(x, y)
    sums = CorrelationSums()
    for lo in range(0, 90, 13):  # uneven chunks, the last shorter
        sums.add(x[:, lo : lo + 13], y[:, lo : lo + 13])
    torch.testing.assert_close(sums.correlation(), whole, rtol=0, atol=1e-9)
    assert whole[2, 1] == pytest.approx(1.0, abs=1e-8)  # eps in the norms
    assert torch.all(whole[:, 2] == 0)
    with pytest.raises(ValueError, match="no samples"):
        CorrelationSums().correlation()
    # float32 inputs: a nearly constant neuron far from zero still correlates about 0
    x32 = torch.randn(3, 90, generator=g)
    x32[1] = 1e5 + 1 / 3 + 1e-3 * torch.randn(90, generator=g)
    sums = CorrelationSums()
    for lo in range(0, 90, 13):
        sums.add(x32[:, lo : lo + 13], y[:, lo : lo + 13].float())
    got = sums.correlation()
    assert got.dtype == torch.float64 and bool((got.abs() <= 1 + 1e-12).all())
    torch.testing.assert_close(
        got, correlation(x32.double(), y.float().double()), atol=1e-6, rtol=0
    )


def test_git_rebasin_correlation_sums_of_channel_maps_equal_those_of_neuron_rows():
    """``add_maps`` (float32 products on the maps as they lie, summed in float64) gives the
    correlations of the float64 neuron rows, over uneven chunks, with a channel whose mean is
    far above its spread, a dead channel and a perfectly correlated pair."""
    from neurofuse.graph import to_neurons
    from neurofuse.methods.git_rebasin import CorrelationSums, correlation

    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, 4, 3, generator=g)
    y = torch.randn(30, 6, 4, 3, generator=g)
    x[:, 0] = 300.0 + 0.5 * x[:, 0]  # large mean against its spread
    y[:, 1] = 2.0 * x[:, 3] - 1.0  # perfectly correlated with channel 3
    y[:, 2] = 4.0  # dead
    want = correlation(to_neurons(x, 1).double(), to_neurons(y, 1).double())
    sums = CorrelationSums()
    for lo in range(0, 30, 7):
        sums.add_maps(x[lo : lo + 7].reshape(-1, 5, 12), y[lo : lo + 7].reshape(-1, 6, 12))
    got = sums.correlation()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got[3, 1] == pytest.approx(1.0, abs=1e-5)
    assert torch.all(got[:, 2].abs() < 1e-5)
    assert not torch.equal(x[:, 0], torch.full_like(x[:, 0], 300.0))  # inputs left intact


def test_git_rebasin_matches_activations_in_one_pass_of_each_model(monkeypatch):
    """Activation matching evaluates every node of each model matched once per chunk, beside
    the reference (one model at a time: one model's correlation sums held),
    and a CNN's correlations take the channel-map path."""
    from neurofuse.methods import git_rebasin as module
    from neurofuse.methods.git_rebasin import CorrelationSums

    torch.manual_seed(0)
    models = [randomise_batchnorm(cnn_bn()).eval() for _ in range(3)]
    x = torch.randn(40, 1, 8, 8)
    maps = []
    real = CorrelationSums.add_maps

    def spy(self, a, b):
        maps.append(a.shape)
        return real(self, a, b)

    monkeypatch.setattr(CorrelationSums, "add_maps", spy)
    monkeypatch.setattr(module, "ACTS_CHUNK", 16)
    seen = _evaluated_batches(monkeypatch)
    nf.fuse(models, x, method="git_rebasin")
    n_nodes = len([n for n in trace(models[0]).graph.nodes if n.op != "output"])
    # 2 models matched, each beside the reference, over 3 chunks of at most 16 samples
    assert sum(1 for s in seen if s > 2) <= n_nodes * 2 * 2 * 3
    assert maps and all(len(s) == 3 for s in maps)


@pytest.mark.parametrize(
    "name,importance",
    [("mlp", "uniform"), ("vgg_bn", "uniform"), ("vit", "uniform"), ("mlp", "activation")],
)
def test_git_rebasin_activation_matching_in_chunks_equals_one_chunk(name, importance, monkeypatch):
    """Activation matching accumulates its correlations over chunks of the fusion set: chunks of
    5 samples give the same permutations and fused model as the whole set at once, for three
    models of unrelated weights (a non-trivial matching); importance scores then come from the
    inputs in batches, not from values of the whole set."""
    from neurofuse.methods import git_rebasin as module

    a, _, x = zoo_pair(name)
    torch.manual_seed(1)
    models = [a, *(copy.deepcopy(a) for _ in range(2))]
    for m in models[1:]:
        for p in m.parameters():
            p.data.add_(torch.randn_like(p), alpha=0.5)
    whole = nf.fuse(models, x, method="git_rebasin", importance=importance)
    monkeypatch.setattr(module, "ACTS_CHUNK", 5)
    sizes = _evaluated_batches(monkeypatch)
    chunked = nf.fuse(models, x, method="git_rebasin", importance=importance)
    assert sizes and max(sizes) <= 5
    assert chunked.neurofuse_report["moved_neurons"] == whole.neurofuse_report["moved_neurons"]
    assert sum(whole.neurofuse_report["moved_neurons"]) > 0
    for (k, v), (k2, v2) in zip(
        whole.state_dict().items(), chunked.state_dict().items(), strict=True
    ):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=0, atol=1e-6)


def test_otfusion_lets_the_exact_solver_run_to_optimality_and_warns_when_it_cannot(monkeypatch):
    """POT stops its network simplex after ``numItermax`` pivots (100,000 by default: short of
    optimal for layers of a few thousand neurons); otfusion raises the cap with the problem
    size and warns, naming the alternative, when the solver still reports a non-optimal end."""
    import numpy as np
    import ot

    calls = []
    real_emd = ot.emd

    def emd(a, b, cost, numItermax=100000, log=False, **kwargs):
        calls.append(numItermax)
        plan, info = real_emd(a, b, cost, numItermax=numItermax, log=True, **kwargs)
        if cost.shape[0] == 12:  # the hidden layer: pretend the pivots ran out
            info = {**info, "result_code": 3, "warning": "numItermax reached before optimality"}
        return (plan, info) if log else plan

    monkeypatch.setattr(ot, "emd", emd)
    torch.manual_seed(0)
    models = [nf.models.build("mlp", in_features=6, hidden=[12]) for _ in range(2)]
    with pytest.warns(UserWarning, match="before optimality.*sinkhorn"):
        nf.fuse(models, torch.randn(40, 6), method="otfusion")
    assert calls and all(c >= 100_000 for c in calls)
    big = np.ones((200, 300))
    from neurofuse.methods.otfusion import OTFusionOptions, _emd

    calls.clear()
    _emd(np.full(200, 1 / 200), np.full(300, 1 / 300), big, OTFusionOptions())
    assert calls == [10 * 200 * 300]


@pytest.mark.parametrize(
    "case",
    ["mlp", "cnn_bn", "widths", "sinkhorn", "resnet18", "importance"],
)
def test_otfusion_activation_costs_in_chunks_give_the_plans_of_the_whole_set(case, monkeypatch):
    """A fusion set of more than ``ACTS_CHUNK`` samples is evaluated chunk by chunk (squared
    distances add up over samples): the same fused model as the whole set at once, soft maps
    (other widths, Sinkhorn) reloaded into the chunks' copies too, and no evaluation of more
    than one chunk."""
    torch.manual_seed(0)
    kw: dict = {}
    if case in ("mlp", "importance"):
        models = [build("mlp", in_features=12, hidden=[16, 16]) for _ in range(3)]
        x = torch.randn(70, 12)
        if case == "importance":  # scores from the inputs in batches, not from whole-set values
            kw = {"importance": "activation"}
    elif case == "resnet18":
        models = [randomise_batchnorm(build("resnet18", width=4)).eval() for _ in range(2)]
        x = torch.randn(40, 3, 8, 8)
    else:
        cfg = dict(input_size=8, batch_norm=True, classifier=[12])
        models = [build("vgg", config=[8, "M", 16, "M"], **cfg) for _ in range(2)]
        if case == "widths":
            models[1] = build("vgg", config=[12, "M", 20, "M"], **{**cfg, "classifier": [16]})
        if case == "sinkhorn":
            kw = {"solver": "sinkhorn", "reg": 0.05}
        models = [randomise_batchnorm(m).eval() for m in models]
        x = torch.randn(40, 3, 8, 8)
    whole = nf.fuse(models, x, method="otfusion", **kw)
    monkeypatch.setattr(otfusion_module, "ACTS_CHUNK", 16)
    seen = _evaluated_batches(monkeypatch)
    chunked = nf.fuse(models, x, method="otfusion", **kw)
    assert seen and max(seen) <= 16
    assert relative_error(logits(chunked, x), logits(whole, x)) < 1e-5
    assert chunked.neurofuse_report["transport_cost"] == pytest.approx(
        whole.neurofuse_report["transport_cost"], rel=1e-5
    )


@pytest.mark.parametrize("method", ["zipit", "cca_merge"])
@pytest.mark.parametrize("options", [{}, {"repair": True}])
def test_merges_read_a_large_fusion_set_in_chunks(method, options, monkeypatch):
    """ZipIt! and CCA Merge on more than ``ACTS_CHUNK`` samples: correlations (covariances)
    summed over chunks give the whole set's merge, the REPAIR targets too, and no node is
    evaluated on more than a chunk."""
    from neurofuse.alignment import repair
    from neurofuse.methods import _activations

    torch.manual_seed(0)
    models = [randomise_batchnorm(cnn_bn(), s).eval() for s in range(3)]
    x = torch.randn(60, 1, 8, 8)
    whole = nf.fuse(models, x, method=method, **options)
    monkeypatch.setattr(_activations, "ACTS_CHUNK", 16)
    monkeypatch.setattr(repair, "STATS_CHUNK", 16)  # (REPAIR's own chunks)
    sizes = _evaluated_batches(monkeypatch)
    chunked = nf.fuse(models, x, method=method, **options)
    assert sizes and max(sizes) <= 16
    assert relative_error(logits(chunked, x), logits(whole, x)) < 1e-5
    if method == "cca_merge":
        got, want = (m.neurofuse_report["aligned_similarity"] for m in (chunked, whole))
        assert got.keys() == want.keys() and got
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6)


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "resnet18"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_otfusion_streams_its_activation_costs_in_one_pass_per_model(case, chunk, monkeypatch):
    """Where every transport is a permutation (exact EMD, equal widths, uniform marginals) the
    activation costs of every space come from one pass of each model over each chunk (beside
    the reference, which reruns for each model), with the plans, transport costs and fused
    model of the space-by-space path, bit for bit."""
    torch.manual_seed(0)
    if case == "mlp":
        models = [build("mlp", in_features=12, hidden=[16, 16]) for _ in range(3)]
        x = torch.randn(40, 12)
    elif case == "resnet18":
        models = [randomise_batchnorm(build("resnet18", width=4)).eval() for _ in range(2)]
        x = torch.randn(40, 3, 8, 8)
    else:
        models = [randomise_batchnorm(cnn_bn()).eval() for _ in range(2)]
        x = torch.randn(40, 1, 8, 8)
    if chunk is not None:
        monkeypatch.setattr(otfusion_module, "ACTS_CHUNK", chunk)
    kw = {"reference": 1} if case == "mlp" else {}
    streams = []
    real = otfusion_module._StreamedCosts

    def counting(*args):
        streams.append(1)
        return real(*args)

    monkeypatch.setattr(otfusion_module, "_StreamedCosts", counting)
    seen = _evaluated_batches(monkeypatch)
    streamed = nf.fuse(models, x, method="otfusion", **kw)
    assert len(streams) == len(models) - 1  # once per model aligned
    n_nodes = len([n for n in trace(models[0]).graph.nodes if n.op != "output"])
    chunks = 1 if chunk is None else -(-x.shape[0] // chunk)
    # per model aligned, one evaluation of its nodes and the reference's per chunk (the checks
    # run on 2-sample batches)
    passes = 2 * (len(models) - 1) * chunks
    assert sum(1 for s in seen if s > 2) <= n_nodes * passes
    monkeypatch.setattr(otfusion_module, "_stream_costs", lambda *a: False)
    seen.clear()
    spaced = nf.fuse(models, x, method="otfusion", **kw)
    assert len(streams) == len(models) - 1
    if chunk is not None:  # the space-by-space path reruns the models for every space
        assert sum(1 for s in seen if s > 2) > n_nodes * passes
    assert streamed.neurofuse_report["transport_cost"] == spaced.neurofuse_report["transport_cost"]
    for (k, a), (_, b) in zip(
        streamed.state_dict().items(), spaced.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


class _SequenceFirst(nn.Module):
    """Tokens laid out ``(T, B, D)``: the samples on axis 1 of the residual stream's values."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1 = nn.Linear(4, 8), nn.Linear(8, 16)
        self.fc2, self.head = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x).transpose(0, 1)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(0))


@pytest.mark.parametrize("streamed", [True, False])
def test_otfusion_costs_of_sequence_first_values_do_not_depend_on_the_chunks(streamed, monkeypatch):
    """Each node's distances are averaged over the samples and positions of the whole set,
    whichever axis holds the samples: uneven chunks of 7 samples give the transport costs of
    the whole set at once, streamed or space by space (dividing by the chunk's first axis,
    the tokens here, weighted the nodes by the chunks' sizes)."""
    torch.manual_seed(0)
    models = [_SequenceFirst().eval() for _ in range(3)]
    x = torch.randn(40, 5, 4)
    if not streamed:
        monkeypatch.setattr(otfusion_module, "_stream_costs", lambda *a: False)
    whole = nf.fuse(models, x, method="otfusion")
    monkeypatch.setattr(otfusion_module, "ACTS_CHUNK", 7)
    chunked = nf.fuse(models, x, method="otfusion")
    assert chunked.neurofuse_report["transport_cost"] == pytest.approx(
        whole.neurofuse_report["transport_cost"],
        rel=1e-6,  # float32 distances per chunk
    )
    assert sum(whole.neurofuse_report["transport_cost"]) > 0


def test_covariance_sums_of_half_precision_maps_are_taken_in_float32():
    """Channel maps in bfloat16 are centred and multiplied in float32: their covariance is
    that of the same values as float64 neuron rows (a bfloat16 product would lose about 1%),
    and mixing maps and rows on one object subtracts one shift."""
    from neurofuse.graph import to_neurons
    from neurofuse.methods._activations import CovarianceSums

    g = torch.Generator().manual_seed(4)
    z = (torch.randn(20, 5, 9, generator=g) + 3.0).to(torch.bfloat16)
    want = CovarianceSums()
    want.add(to_neurons(z.double(), 1))
    got = CovarianceSums()
    got.add_maps(z[:12])
    got.add(to_neurons(z[12:].double(), 1))
    torch.testing.assert_close(got.centred(), want.centred(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [3, 200])
def test_batched_gram_sums_every_sample_product(d):
    """``batched_gram`` (groups of samples, each summed in float64) equals the float64 sum of
    ``z_b z_b^T`` over every sample, also when the groups are smaller than the batch."""
    from neurofuse.methods._activations import batched_gram

    g = torch.Generator().manual_seed(5)
    z = torch.randn(37, d, 6, generator=g)
    want = torch.einsum("bip,bjp->ij", z.double(), z.double())
    got = batched_gram(z)
    assert got.dtype == torch.float64 and got.shape == (d, d)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
