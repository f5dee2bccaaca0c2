"""The ensemble, knowledge-distillation and linear-probing baselines behind ``nf.fuse``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from toys import accuracy, mlp
from toys_sharded import sharded_task

import neurofuse as nf
from neurofuse.methods.ensemble import Ensemble
from neurofuse.methods.kd import reinitialise_
from neurofuse.methods.lp import find_head


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: thread start-up costs more than it saves (and the CI machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models(n: int = 3, seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [mlp(6, (12,), 4).eval() for _ in range(n)]


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_prob_mode_is_log_of_mean_softmax() -> None:
    models = _models()
    x = torch.randn(40, 6)
    fused = nf.fuse(models, x, method="ensemble")
    with torch.no_grad():
        out = fused(x)
        mean_p = torch.stack([F.softmax(m(x), dim=1) for m in models]).mean(0)
    assert torch.allclose(out.exp(), mean_p, atol=1e-6)
    assert torch.allclose(F.softmax(out, dim=1), mean_p, atol=1e-6)  # usable as logits
    assert torch.equal(out.argmax(1), mean_p.argmax(1))


def test_ensemble_logit_mode_is_mean_of_logits() -> None:
    models = _models()
    x = torch.randn(40, 6)
    fused = nf.fuse(models, x, method="ensemble", mode="logit")
    with torch.no_grad():
        expected = torch.stack([m(x) for m in models]).mean(0)
        assert torch.allclose(fused(x), expected, atol=1e-6)


def test_ensemble_is_a_module_holding_copies_of_every_member() -> None:
    models = _models()
    fused = nf.fuse(models, torch.randn(8, 6), method="ensemble")
    assert isinstance(fused, Ensemble) and len(fused.members) == 3
    n_params = sum(p.numel() for m in models for p in m.parameters())
    assert sum(p.numel() for p in fused.parameters()) == n_params
    assert len(fused.state_dict()) == sum(len(m.state_dict()) for m in models)
    assert all(not m.training for m in fused.members)
    before = fused(torch.ones(1, 6)).detach().clone()
    with torch.no_grad():  # members are copies: changing a base model leaves the ensemble alone
        models[0][1].weight.add_(1.0)
    assert torch.equal(fused(torch.ones(1, 6)).detach(), before)
    fused.to(torch.device("cpu"))
    assert fused.neurofuse_report["inference_cost"] == "3 models"


def test_ensemble_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="prob"):
        nf.fuse(_models(), torch.randn(8, 6), method="ensemble", mode="median")


# ----------------------------------------------------------------------------- kd and lp


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("kd", dict(epochs=30)),
        ("kd", dict(epochs=30, fresh=True)),
        ("lp", dict(epochs=30)),
        ("lp", dict(closed_form=True)),
    ],
)
def test_distillation_beats_the_weakest_base_model_on_a_sharded_task(method, options) -> None:
    task = sharded_task()
    weakest = task.weakest()
    fused = nf.fuse(task.models, task.x_fusion, method=method, **options)
    acc = accuracy(fused, task.x_test, task.y_test)
    assert acc > weakest + 0.15, (method, options, acc, weakest)


def test_lp_trains_only_the_head() -> None:
    task = sharded_task()
    fused = nf.fuse(task.models, task.x_fusion, method="lp", init_model=1, epochs=5)
    base = task.models[1].state_dict()
    state = fused.state_dict()
    head = fused.neurofuse_report["head"]
    assert head == "3"  # the last Linear of the toy MLP (Flatten, Linear, ReLU, Linear)
    for key, value in state.items():
        if key.startswith(head + "."):
            assert not torch.equal(value, base[key]), key
        else:
            assert torch.equal(value, base[key]), key


def test_lp_closed_form_solves_the_normal_equations_to_the_mean_logits() -> None:
    models = _models()
    x = torch.randn(200, 6)
    fused = nf.fuse(models, x, method="lp", closed_form=True, ridge=0.0)
    with torch.no_grad():
        feats = fused[:3](x)  # penultimate features of model 0 (unchanged body)
        target = torch.stack([m(x) for m in models]).mean(0)
        resid = fused(x) - target
    design = torch.cat([feats, torch.ones(len(x), 1)], dim=1).double()
    grad = design.T @ resid.double()  # zero at the least-squares optimum
    assert float(grad.abs().max()) < 1e-3 * float(design.abs().sum(0).max())
    assert float(resid.pow(2).mean()) < float((models[0](x) - target).detach().pow(2).mean())


def test_kd_and_lp_leave_the_base_models_untouched() -> None:
    models = _models(2)
    saved = [copy.deepcopy(m.state_dict()) for m in models]
    x = torch.randn(30, 6)
    nf.fuse(models, x, method="kd", epochs=2)
    nf.fuse(models, x, method="lp", epochs=2)
    for m, s in zip(models, saved, strict=True):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())


def test_reinitialise_is_seeded_and_changes_every_layer() -> None:
    model = mlp(6, (12,), 4)
    a = reinitialise_(copy.deepcopy(model), seed=3)
    b = reinitialise_(copy.deepcopy(model), seed=3)
    c = reinitialise_(copy.deepcopy(model), seed=4)
    for key, value in model.state_dict().items():
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])
        assert not torch.equal(a.state_dict()[key], value)
        assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_kd_init_model_none_starts_from_the_given_template() -> None:
    models = _models(2)
    small = mlp(6, (5,), 4)
    fused = nf.fuse(
        models, torch.randn(30, 6), method="kd", init_model=None, target=small, epochs=2
    )
    assert fused[1].out_features == 5


# ----------------------------------------------------------------------------- bad input


def test_unknown_head_name_lists_the_linear_layers() -> None:
    with pytest.raises(ValueError, match=r"head='nope'.*1, 3"):
        nf.fuse(_models(2), torch.randn(8, 6), method="lp", head="nope")
    with pytest.raises(ValueError, match="ReLU, not a Linear"):
        find_head(mlp(6, (12,), 4), "2")


@pytest.mark.parametrize("method", ["kd", "lp"])
def test_init_model_out_of_range_names_the_valid_range(method) -> None:
    with pytest.raises(ValueError, match=r"init_model=5 .* 0\.\.1"):
        nf.fuse(_models(2), torch.randn(8, 6), method=method, init_model=5)


def test_bad_training_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        nf.fuse(_models(2), torch.randn(8, 6), method="kd", optimizer="lbfgs")
    with pytest.raises(ValueError, match="temperature"):
        nf.fuse(_models(2), torch.randn(8, 6), method="lp", temperature=0.0)
