"""Neuron importance scores: what they say about known networks, their shape at every level
kind, their round trip beside a checkpoint, and that fusion with them does no harm."""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from toys import TinyResNet, accuracy, cnn_bn, mlp, randomise_batchnorm, toy_task, train

import neurofuse as nf
from neurofuse.checkpoint import CheckpointError, save_checkpoint, save_tensors
from neurofuse.graph import GraphRunner, layer_width, producing_layer, trace
from neurofuse.importance import (
    Importance,
    ImportanceProvider,
    available_importance,
    compute_importance,
    default_nodes,
    importance_path,
    load_importance,
    normalise,
    probe,
    register_importance,
    save_importance,
)
from neurofuse.importance.attribution import deeplift_chunks
from neurofuse.models import build

SCORES = ["activation", "variance", "grad_x_activation", "deeplift", "conductance"]
FAST = {"conductance": {"n_steps": 4}}


def _spec(name: str) -> object:
    return (name, FAST[name]) if name in FAST else name


# ----------------------------------------------------------------------------- a known network


def _dead_and_dominant(functional: bool = False) -> nn.Module:
    """Three hidden neurons with the same incoming weights: neuron 0 has zero outgoing weights
    (dead), neuron 1 outgoing weights ten times those of neuron 2 (dominant)."""
    fc1, fc2 = nn.Linear(4, 3), nn.Linear(3, 2)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([0.5, -0.3, 0.4, 0.2]).repeat(3, 1))
        fc1.bias.fill_(1.0)  # active on every input of the test
        fc2.weight.copy_(torch.tensor([[0.0, 5.0, 0.5], [0.0, -5.0, -0.5]]))
        fc2.bias.zero_()
    if not functional:
        return nn.Sequential(OrderedDict(fc1=fc1, act=nn.ReLU(), fc2=fc2)).eval()

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = fc1, fc2

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(F.relu(self.fc1(x)))

    return Functional().eval()


@pytest.mark.parametrize("functional", [False, True], ids=["relu_module", "functional_relu"])
@pytest.mark.parametrize("score", ["conductance", "deeplift", "grad_x_activation"])
def test_dead_neuron_scores_zero_and_dominant_neuron_ranks_first(score, functional):
    model = _dead_and_dominant(functional)
    x = 0.5 * torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    nodes = ["fc1", "relu" if functional else "act"]
    for s in compute_importance(model, (x, y), score, nodes=nodes)[0].values():
        assert s[0] < 1e-5 * s.max()  # dead: no path to the output
        assert int(s.argmax()) == 1  # dominant
        assert s[1] > 5 * s[2]


def test_deeplift_differs_from_the_gradient_where_relu_saturates():
    """DeepLIFT's rescale rule credits a neuron switched off at the input but on at the
    baseline, where the gradient is zero; the functional relu must get that rule too."""
    model = _dead_and_dominant(functional=True)
    x = torch.full((8, 4), -3.0) * torch.tensor([1.0, -1.0, 1.0, 1.0])  # fc1 output < 0: relu off
    y = torch.zeros(8, dtype=torch.long)
    dl = compute_importance(model, (x, y), Importance("deeplift"), nodes=["fc1"])[0]["fc1"]
    gx = compute_importance(model, (x, y), "grad_x_activation", nodes=["fc1"])[0]["fc1"]
    assert torch.allclose(gx, torch.ones(3))  # all zero -> normalised to uniform
    assert dl[1] > 5 * dl[2] and dl[0] < 1e-5


# ----------------------------------------------------------------------------- every level kind


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return build("vit_tiny").eval()


ARCHS = {
    "mlp": (lambda: mlp(), (10,), 3),
    "cnn": (lambda: randomise_batchnorm(cnn_bn()), (1, 8, 8), 3),
    "resnet_block": (lambda: randomise_batchnorm(TinyResNet()), (1, 8, 8), 3),
    "vit_block": (_vit, (3, 32, 32), 10),
}
VIT_WIDTHS = {"blocks_0_attn_qkv": 96, "blocks_1_attn_qkv": 96, "blocks_0_mlp_fc1": 64}
VIT_WIDTHS |= {"blocks_1_mlp_fc1": 64, "head": 10}


def _expected_width(arch: str, gm, name: str) -> int:
    if arch == "vit_block":
        return VIT_WIDTHS.get(name, 32)
    node = next(n for n in gm.graph.nodes if n.name == name)
    return layer_width(producing_layer(gm, node))[0]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_scores_are_finite_normalised_deterministic_and_sized_at_every_level(arch, score):
    make, shape, classes = ARCHS[arch]
    torch.manual_seed(0)
    model = make()
    before = copy.deepcopy(model.state_dict())
    n = 10 if arch == "vit_block" else 24
    x, y = torch.randn(n, *shape), torch.randint(0, classes, (n,))
    first = compute_importance([model], (x, y), _spec(score))[0]
    again = compute_importance([model], (x, y), _spec(score))[0]
    gm = trace(model)
    assert list(first) == default_nodes(model)
    kinds = {n.name: n.op for n in gm.graph.nodes}
    if arch in ("resnet_block", "vit_block"):  # residual adds: no module output of their own
        assert any(kinds[name] == "call_function" for name in first)
    for name, s in first.items():
        assert s.shape == (_expected_width(arch, gm, name),), name
        assert torch.isfinite(s).all() and (s > 0).all()
        assert s.mean().item() == pytest.approx(1.0, rel=1e-5)
        assert torch.equal(s, again[name])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # never modified
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("score", ["conductance", "deeplift"])
@pytest.mark.parametrize("arch", ["mlp", "resnet_block"])
def test_one_pass_scores_equal_captum_per_node(arch, score):
    """All nodes in one pass give what Captum's LayerConductance / LayerDeepLift give node by
    node (including nodes with no module output: residual adds, functional relus)."""
    pytest.importorskip("captum")
    make, shape, classes = ARCHS[arch]
    torch.manual_seed(1)
    model = make()
    x, y = torch.randn(20, *shape), torch.randint(0, classes, (20,))
    options = {"baseline": "mean", **({"n_steps": 6} if score == "conductance" else {})}
    ours = compute_importance(model, (x, y), (score, options))[0]
    ref = compute_importance(model, (x, y), (score, {**options, "backend": "captum"}))[0]
    for name in ours:
        assert torch.allclose(ours[name], ref[name], rtol=1e-4, atol=1e-6), name


def test_deeplift_sums_to_the_change_of_the_output_at_every_node():
    """DeepLIFT's summation-to-delta: at every node, the attributions of a sample add up to
    F_t(x) - F_t(x_0), through BatchNorm, ReLU and two max-pools."""
    torch.manual_seed(3)
    model = randomise_batchnorm(cnn_bn())
    x, x0 = torch.randn(12, 1, 8, 8), torch.randn(1, 1, 8, 8)
    y = torch.randint(0, 3, (12,))
    names = default_nodes(model)
    probed = probe(model, names, deeplift=True)
    (chunk,) = list(deeplift_chunks(probed, x, y, x0, names, batch_size=12))
    with torch.no_grad():
        delta = (model(x) - model(x0)).gather(1, y[:, None]).squeeze(1)
    for name in names:
        assert torch.allclose(chunk[name].flatten(1).sum(1), delta, atol=1e-5), name


def test_conductance_completeness_at_the_head():
    """At the logits, conductance of the target class is its change from the baseline (exactly,
    with a path that starts at the baseline and ends at the input)."""
    torch.manual_seed(2)
    model = mlp().eval()
    x, y = torch.randn(30, 10), torch.randint(0, 3, (30,))
    options = {"n_steps": 3, "method": "riemann_trapezoid"}
    scores = compute_importance(model, (x, y), ("conductance", options), nodes=["_5"])
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros(1, 10))).gather(1, y[:, None]).abs().squeeze(1)
    expected = torch.stack([delta[y == c].sum() for c in range(3)])
    assert torch.allclose(scores[0]["_5"], normalise(expected), rtol=1e-5)


def test_forward_scores_match_the_definition():
    torch.manual_seed(3)
    model = randomise_batchnorm(cnn_bn())
    x = torch.randn(16, 1, 8, 8)
    runner = GraphRunner(trace(model), x)
    z = runner.value(runner.node("_1"))  # BatchNorm output (B, 6, 8, 8)
    act = compute_importance(model, x, "activation", nodes=["_1"])[0]["_1"]
    var = compute_importance(model, x, "variance", nodes=["_1"])[0]["_1"]
    assert torch.allclose(act, normalise(z.abs().mean((0, 2, 3))), rtol=1e-5)
    assert torch.allclose(var, normalise(z.var((0, 2, 3), unbiased=False)), rtol=1e-4)


def test_gradient_x_activation_matches_autograd():
    torch.manual_seed(4)
    model = mlp().eval()
    x, y = torch.randn(12, 10), torch.randint(0, 3, (12,))
    hidden = model[:2](x).detach().requires_grad_(True)
    model[2:](hidden).gather(1, y[:, None]).sum().backward()
    expected = (hidden * hidden.grad).abs().mean(0)
    got = compute_importance(model, (x, y), "grad_x_activation", nodes=["_1"])[0]["_1"]
    assert torch.allclose(got, normalise(expected), rtol=1e-5)


# ----------------------------------------------------------------------------- targets, baselines


def test_target_is_the_label_when_given_else_the_prediction():
    torch.manual_seed(5)
    model = mlp().eval()
    x = torch.randn(40, 10)
    pred = model(x).argmax(1)
    wrong = (pred + 1) % 3
    by = {
        "no labels": compute_importance(model, x, "grad_x_activation")[0],
        "predicted labels": compute_importance(model, (x, pred), "grad_x_activation")[0],
        "other labels": compute_importance(model, (x, wrong), "grad_x_activation")[0],
        "forced prediction": compute_importance(
            model, (x, wrong), ("grad_x_activation", {"target": "predicted"})
        )[0],
    }
    for name in by["no labels"]:
        assert torch.equal(by["no labels"][name], by["predicted labels"][name])
        assert torch.equal(by["no labels"][name], by["forced prediction"][name])
    assert not all(torch.equal(by["no labels"][n], by["other labels"][n]) for n in by["no labels"])


def test_baseline_is_configurable():
    torch.manual_seed(6)
    model = mlp().eval()
    x, y = torch.randn(20, 10) + 1.0, torch.randint(0, 3, (20,))

    def cond(**kw):
        return compute_importance(model, (x, y), ("conductance", {"n_steps": 4, **kw}))[0]["_1"]

    assert torch.equal(cond(), cond(baseline=torch.zeros(10)))
    assert torch.equal(cond(baseline=0.0), cond(baseline="zeros"))
    assert not torch.allclose(cond(), cond(baseline="mean"))
    with pytest.raises(ValueError, match="one sample's shape"):
        cond(baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="zeros"):
        cond(baseline="median")


def test_conductance_does_not_depend_on_its_chunk_size():
    """Chunks of path points only bound memory: one sample at a time, the default and one
    chunk for everything give the same scores."""
    torch.manual_seed(7)
    model = mlp().eval()
    x, y = torch.randn(30, 10), torch.randint(0, 3, (30,))

    def cond(size):
        spec = ("conductance", {"n_steps": 4, "internal_batch_size": size})
        return compute_importance(model, (x, y), spec)[0]

    one, default, whole = cond(5), cond(256), cond(10_000)
    for name in whole:
        torch.testing.assert_close(one[name], whole[name])
        torch.testing.assert_close(default[name], whole[name])


# ----------------------------------------------------------------------------- the provider


def test_normalise_scales_tempers_and_mixes():
    s = torch.tensor([0.0, 1.0, 3.0])
    assert torch.allclose(normalise(s), torch.tensor([1e-6, 0.75, 2.25]))
    assert torch.allclose(normalise(s, mix=1.0), torch.ones(3))
    assert torch.allclose(normalise(s, mix=0.5), torch.tensor([0.5, 0.875, 1.625]))
    assert torch.allclose(
        normalise(torch.tensor([1.0, 4.0]), power=0.5), torch.tensor([2 / 3, 4 / 3])
    )
    assert torch.equal(normalise(torch.zeros(4)), torch.ones(4))
    for bad in (torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="finite and non-negative"):
            normalise(bad)


def test_importance_spec_forms_and_errors():
    model = mlp().eval()
    x = torch.randn(8, 10)
    out = model[:2](x)
    as_tuple = ImportanceProvider(("conductance", {"n_steps": 3, "mix": 0.0}), [model], x, None)
    as_object = ImportanceProvider(Importance("conductance", n_steps=3, mix=0.0), [model], x, None)
    assert torch.equal(as_tuple.scores(0, "_1", out, 16), as_object.scores(0, "_1", out, 16))
    assert as_tuple.spec.options == {"n_steps": 3}
    assert set(SCORES) | {"uniform"} <= set(available_importance())
    with pytest.raises(ValueError, match="valid options: n_steps"):
        ImportanceProvider(("conductance", {"steps": 3}), [model], x, None)
    with pytest.raises(ValueError, match="valid names"):
        ImportanceProvider("nope", [model], x, None)
    with pytest.raises(ValueError, match="mix must be"):
        Importance("conductance", mix=1.5)
    table = ImportanceProvider([{"_1": torch.ones(16)}], [model], x, None)
    with pytest.raises(ValueError, match="compute_importance"):
        table.scores(0, "_3", out, 16)
    with pytest.raises(ValueError, match="valid names include"):
        compute_importance(model, x, "activation", nodes=["no_such_node"])


def test_a_registered_score_reaches_fuse():
    seen = []

    @register_importance("_test_last_neuron", "test score: only the last neuron counts")
    def factory(models, inputs, labels, *, weight=1.0):
        def score(model, name, output):
            seen.append(name)
            s = torch.full((output.shape[1],), 1e-3)
            s[-1] = weight
            return s

        return score

    torch.manual_seed(7)
    a, b = mlp().eval(), mlp().eval()
    x = torch.randn(60, 10)
    nf.fuse([a, b], x, importance=("_test_last_neuron", {"weight": 5.0, "mix": 0.0}))
    assert {"_1", "_3"} <= set(seen) and "_5" not in seen  # the head is uniform by default
    seen.clear()
    nf.fuse([a, b], x, importance=("_test_last_neuron", {"weight": 5.0, "head_mix": 0.0}))
    assert "_5" in seen


# ----------------------------------------------------------------------------- precomputed, saved


def test_precomputed_scores_give_the_same_fusion_as_the_name():
    torch.manual_seed(8)
    a, b = mlp().eval(), mlp().eval()
    x, y = torch.randn(80, 10), torch.randint(0, 3, (80,))
    spec = ("conductance", {"n_steps": 4})
    table = compute_importance([a, b], (x, y), spec)
    by_name = nf.fuse([a, b], (x, y), method="kf_linear", importance=spec)
    by_table = nf.fuse([a, b], (x, y), method="kf_linear", importance=table)
    for p, q in zip(by_name.parameters(), by_table.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_scores_round_trip_beside_a_checkpoint(tmp_path):
    torch.manual_seed(9)
    model = randomise_batchnorm(TinyResNet())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    save_checkpoint(model, tmp_path / "client0")
    scores = compute_importance(model, (x, y), ("conductance", {"n_steps": 4}))[0]
    path = importance_path(tmp_path / "client0.safetensors")
    assert path == tmp_path / "client0.importance"
    written = save_importance(path, scores, {"score": "conductance", "samples": 16})
    assert written == tmp_path / "client0.importance.safetensors"
    loaded, meta = load_importance(path)
    assert meta["score"] == "conductance" and meta["samples"] == 16
    assert list(loaded) == list(scores) or set(loaded) == set(scores)
    for name, s in scores.items():
        assert torch.equal(loaded[name], s)
    save_tensors(tmp_path / "other", {"counts": torch.ones(3)})
    with pytest.raises(CheckpointError, match="not importance scores"):
        load_importance(tmp_path / "other")
    with pytest.raises(ValueError, match="finite and non-negative"):
        save_importance(tmp_path / "bad", {"fc": torch.tensor([1.0, -1.0])})


def test_deeplift_probe_gives_each_nonlinearity_call_its_own_module():
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))

    model = Reuse().eval()
    probed = probe(model, ["fc1", "fc2"], deeplift=True)
    called = [n.target for n in probed.module.graph.nodes if n.op == "call_module"]
    acts = [t for t in called if isinstance(probed.module.get_submodule(t), nn.ReLU)]
    assert len(set(acts)) == 2  # one module per call
    assert not any(probed.module.get_submodule(t).inplace for t in acts)
    assert model.act.inplace  # the model itself untouched
    x = torch.randn(5, 4)
    assert torch.allclose(probed.module(x), model(x))


# ----------------------------------------------------------------------------- no harm


@functools.lru_cache(maxsize=3)  # fusion never modifies its models: train each pair once
def _sharded_pair(seed: int) -> tuple[list[nn.Module], Tensor, Tensor, Tensor, Tensor]:
    """Four classes; model 0 trains on {0, 1}, model 1 on {2, 3}; the fusion set is drawn from
    model 0's data only, as in the paper's sharded regime (scores of model 1 are computed on
    data it never saw)."""
    x, y = toy_task(n=2400, d=10, classes=4, seed=seed)
    x_train, y_train, x_test, y_test = x[:1600], y[:1600], x[1600:], y[1600:]
    models = []
    for k, shard in enumerate([y_train < 2, y_train >= 2]):
        torch.manual_seed(10 * seed + k)
        models.append(train(mlp(10, (24,), 4), x_train[shard], y_train[shard], epochs=20, seed=k))
    own = torch.nonzero(y_train < 2).squeeze(1)
    pick = own[torch.randperm(len(own), generator=torch.Generator().manual_seed(seed))[:300]]
    return models, x_train[pick], y_train[pick], x_test, y_test


@pytest.mark.parametrize(
    "method", ["kf_linear", pytest.param("kf_gradient", marks=pytest.mark.slow)]
)
def test_conductance_does_no_harm_on_a_sharded_task(method):
    """Mean test accuracy over three sharded toy tasks (seeds 0, 1, 2): Conductance (default
    treatment) lands within 2 points of uniform, or above it."""
    acc: dict[str, list[float]] = {"uniform": [], "conductance": []}
    for seed in range(3):
        models, xf, yf, x_test, y_test = _sharded_pair(seed)
        for score in acc:
            fused = nf.fuse(models, (xf, yf), method=method, importance=score, seed=seed)
            acc[score].append(accuracy(fused, x_test, y_test))
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    assert mean["conductance"] >= mean["uniform"] - 0.02, acc


def test_top_level_names_reach_the_importance_package():
    import neurofuse
    from neurofuse import importance

    assert nf.Importance is importance.Importance
    assert nf.compute_importance is importance.compute_importance
    assert set(nf.available_importance()) >= {"uniform", "conductance", "deeplift"}
    assert {"Importance", "compute_importance"} <= set(neurofuse.__all__)
