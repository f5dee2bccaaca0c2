"""The contract every fusion method honours, checked for every registered method on a zoo of
small models (in the spirit of Captum's attribution test matrix).

A method gets all of this by being registered: the matrix iterates over
``nf.available_methods()`` and reads each method's declared capabilities
(``nf.method_info(name).caps``). ``QUICK`` only shortens training-based methods (fewer epochs)
and gives required options; a method missing from it runs with its defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from toys import TinyResNet, cnn_bn, permuted_by_analysis, randomise_batchnorm
from toys import mlp as toy_mlp

import neurofuse as nf
from neurofuse.models import build


class Swish(nn.Module):
    """A custom per-neuron activation whose forward torch.fx cannot trace (a Python branch on
    a traced value); registered below, it is one opaque elementwise call for every method."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 1:
            return x * torch.sigmoid(x)
        return x


nf.register_elementwise(Swish)


class Tied(nn.Module):
    """An MLP whose last hidden layer shares its weight with the one before it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 12)
        self.fc3 = nn.Linear(12, 12)
        self.fc3.weight = self.fc2.weight
        self.out = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        h = F.relu(self.fc2(h))
        return self.out(F.relu(self.fc3(h)))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def _mlp_bn() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )


def _custom() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 12), Swish(), nn.Linear(12, 12), Swish(), nn.Linear(12, 3))


def _vit() -> nn.Module:
    return build(
        "vit", image_size=8, patch_size=4, dim=16, depth=1, heads=4, mlp_dim=24, num_classes=3
    )


#: name -> (factory, input shape of one sample)
ZOO: dict[str, tuple[typing.Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (8,)),
    "mlp_bn": (_mlp_bn, (8,)),
    "vgg_bn": (lambda: cnn_bn(classes=3), (1, 8, 8)),
    "resnet": (lambda: TinyResNet(classes=3, width=6), (1, 8, 8)),
    "vit": (_vit, (3, 8, 8)),
    "tied": (Tied, (8,)),
    "custom_activation": (_custom, (8,)),
}

#: fewer epochs for the methods that train, and the options a method requires; everything
#: else runs with its defaults
QUICK: dict[str, dict[str, typing.Any]] = {
    "fedavg": {"sample_counts": [300, 100]},
    "kf_gradient": {"epochs": 2, "last_epochs": 2},
    "hf_gradient": {"epochs": 2, "last_epochs": 2},
    "kf_gradient+kd": {"epochs": 2, "last_epochs": 2, "kd_epochs": 2},
    "hf_gradient+kd": {"epochs": 2, "last_epochs": 2, "kd_epochs": 2},
    "kf_linear+kd": {"kd_epochs": 2},
    "hf_linear+kd": {"kd_epochs": 2},
    "kd": {"epochs": 2},
    "lp": {"epochs": 2},
    "transplant": {"finetune_epochs": 2},
    "auto": {"portfolio": ("kf_linear", "hf_linear")},
}

METHODS = sorted(nf.available_methods())
N = 40  # fusion samples: more than any layer's width in the zoo


def _model(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ZOO[arch][0]()
    randomise_batchnorm(model, seed)
    return model.eval()


def _inputs(arch: str, n: int = N, seed: int = 0) -> Tensor:
    return torch.randn(n, *ZOO[arch][1], generator=torch.Generator().manual_seed(seed))


def _expected_refusal(method: str, arch: str) -> str | None:
    """The error a method must raise on an architecture, from its declared capabilities."""
    caps = nf.method_info(method).caps
    if arch == "tied" and not caps.tied_weights:
        return "tied parameters"
    if arch == "vit" and not caps.transformers:
        return "transformer"
    return None


def _snapshot(models: list[nn.Module]) -> list[tuple[dict, dict, dict]]:
    return [
        (
            {k: v.clone() for k, v in m.state_dict().items()},
            {n: p.requires_grad for n, p in m.named_parameters()},
            {n: mod.training for n, mod in m.named_modules()},
        )
        for m in models
    ]


def _assert_untouched(models: list[nn.Module], before: list[tuple[dict, dict, dict]]) -> None:
    for m, (state, grads, modes) in zip(models, before, strict=True):
        now = m.state_dict()
        assert all(torch.equal(now[k], v) for k, v in state.items()), "a base model changed"
        assert {n: p.requires_grad for n, p in m.named_parameters()} == grads
        assert {n: mod.training for n, mod in m.named_modules()} == modes


@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("method", METHODS)
def test_contract(method: str, arch: str) -> None:
    models = [_model(arch, 0), _model(arch, 1)]
    models[1].train()  # a base model in training mode must stay so
    frozen = next(iter(models[0].parameters()))
    frozen.requires_grad_(False)  # a frozen first layer: the fused model keeps the flag
    before = _snapshot(models)
    x = _inputs(arch)
    options = QUICK.get(method, {})
    refusal = _expected_refusal(method, arch)
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            nf.fuse(models, x, method=method, **options)
        _assert_untouched(models, before)
        return
    fused = nf.fuse(models, x, method=method, seed=3, **options)
    _assert_untouched(models, before)
    theirs = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    assert not any(p.untyped_storage().data_ptr() in theirs for p in fused.parameters()), (
        "the result shares a parameter's storage with a base model"
    )
    assert not any(m.training for m in fused.modules()), "the result must be in eval mode"
    with torch.no_grad():
        out, ref = fused(x), models[0].eval()(x)
    models[1].train()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    report = fused.neurofuse_report
    assert {"method", "options", "seed", "seconds", "importance"} <= set(report)
    assert report["method"] == method and report["seed"] == 3
    name0 = next(iter(dict(models[0].named_parameters())))
    frozen_names = [n for n, _ in fused.named_parameters() if n.endswith(name0)]
    assert frozen_names, "the frozen base parameter has no counterpart in the fused model"
    flags = dict(fused.named_parameters())
    # the frozen layer of models[0] stays frozen (for an ensemble: in its member 0 only)
    assert not flags[frozen_names[0]].requires_grad
    assert sum(not p.requires_grad for p in flags.values()) == 1
    if arch == "tied":  # a method that accepts tied weights keeps them tied
        tied = [m for m in fused.modules() if isinstance(m, Tied)]
        assert tied and all(m.fc3.weight is m.fc2.weight for m in tied)
    again = nf.fuse(models, x, method=method, seed=3, **options)
    a, b = fused.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "not deterministic"


@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("method", [m for m in METHODS if nf.method_info(m).caps.exact])
def test_exact_on_a_permuted_copy(method: str, arch: str) -> None:
    if _expected_refusal(method, arch) is not None:
        pytest.skip("refused on this architecture (checked by test_contract)")
    model = _model(arch, 0)
    x = _inputs(arch)
    twin = permuted_by_analysis(model, seed=2, example=x[:2])
    with torch.no_grad():
        ref = model(x)
        assert (twin(x) - ref).abs().max() < 1e-5
        if arch != "tied":  # ties fix their spaces: nothing to permute there
            assert any(
                not torch.equal(a, b)
                for a, b in zip(twin.parameters(), model.parameters(), strict=True)
            )
    fused = nf.fuse([model, twin], x, method=method, **QUICK.get(method, {}))
    with torch.no_grad():
        err = (fused(x) - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, f"{method} on {arch}: relative error {err:.2e}"


@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("method", ["kf_linear", "hf_linear"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_linear_fits_of_either_precision_are_exact_from_three_samples(method, arch, precision):
    """Three fusion samples (the dense layers have more inputs than rows and lean on the
    aligned prior and its cross-validated strength; the convolutions' primal products are the
    ones taken in float32): a permuted copy comes back to 1e-4 with float32 as with float64
    products (the default ridge of float32 products, 1e-6, keeps their rounding from being
    amplified along the directions the samples leave undetermined)."""
    if _expected_refusal(method, arch) is not None:
        pytest.skip("refused on this architecture (checked by test_contract)")
    model = _model(arch, 0)
    x = _inputs(arch, n=3)
    twin = permuted_by_analysis(model, seed=2, example=x[:2])
    fused = nf.fuse([model, twin], x, method=method, precision=precision)
    test = _inputs(arch, n=64, seed=5)
    with torch.no_grad():
        ref = model(test)
        err = (fused(test) - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, f"{method} on {arch} with {precision} products: relative error {err:.2e}"


@pytest.mark.parametrize("precision", [None, "float32", "float64"])
def test_the_fits_take_their_products_and_ridge_in_the_precision_asked(precision, monkeypatch):
    """The engine really builds ``X^T X`` in the products' precision and floors the prior's
    strength at that precision's ridge (the default on a CPU: float64, 1e-9)."""
    from neurofuse import closed_form

    seen: list[tuple[torch.dtype, float]] = []
    solve_prior = closed_form.LeastSquares.solve_prior

    def spy(self, prior, strength=None, project=None, ridge=1e-9):
        seen.append((self.product_dtype, ridge))
        return solve_prior(self, prior, strength, project, ridge)

    monkeypatch.setattr(closed_form.LeastSquares, "solve_prior", spy)
    model = _model("vgg_bn", 0)
    x = _inputs("vgg_bn", n=40)
    kw = {} if precision is None else {"precision": precision}
    nf.fuse([model, _model("vgg_bn", 1)], x, method="kf_linear", **kw)
    want = (torch.float32, 1e-6) if precision == "float32" else (torch.float64, 1e-9)
    assert seen and set(seen) == {want}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_precision_auto_takes_float32_products_on_cuda_and_stays_exact() -> None:
    model = _model("vgg_bn", 0)
    x = _inputs("vgg_bn", n=3)
    twin = permuted_by_analysis(model, seed=2, example=x[:2])
    cuda = torch.device("cuda")
    fused = nf.fuse([model, twin], x, method="kf_linear", device=cuda)
    assert fused.neurofuse_report["precision"] == "float32"
    test = _inputs("vgg_bn", n=64, seed=5)
    with torch.no_grad():
        ref = model(test)
        err = (fused.cpu()(test) - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4


def test_precision_auto_is_float32_products_on_cuda_only() -> None:
    from neurofuse.methods._linear_parts import LinearOptions

    auto = LinearOptions()
    assert auto.resolved(torch.device("cpu")).precision == "float64"
    assert auto.resolved(torch.device("cuda", 0)).precision == "float32"
    assert auto.resolved(torch.device("cuda")).ridge_value == 1e-6
    assert auto.ridge_value == 1e-9 and LinearOptions(ridge=0.5).resolved("cuda").ridge_value == 0.5
    assert LinearOptions(precision="float64").resolved(torch.device("cuda")).precision == "float64"
    models, x = [_model("mlp", 0), _model("mlp", 1)], _inputs("mlp")
    assert nf.fuse(models, x, method="kf_linear").neurofuse_report["precision"] == "float64"
    fused = nf.fuse(models, x, method="hf_linear", precision="float32")
    assert fused.neurofuse_report["precision"] == "float32"


@pytest.mark.parametrize("method", METHODS)
def test_ignored_arguments_are_refused(method: str) -> None:
    caps = nf.method_info(method).caps
    models = [_model("mlp", 0), _model("mlp", 1)]
    x = _inputs("mlp")
    if not caps.levels:
        with pytest.raises(ValueError, match="does not use levels"):
            nf.fuse(models, x, method=method, levels=["2"])
    if not caps.importance:
        with pytest.raises(ValueError, match="does not use importance"):
            nf.fuse(models, x, method=method, importance="activation")
    if caps.target == "none":
        with pytest.raises(ValueError, match="ignore target"):
            nf.fuse(models, x, method=method, target=_model("mlp", 2))
    if caps.target == "same":
        wide = nn.Sequential(
            nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3)
        )
        with pytest.raises(ValueError, match="equal widths"):
            nf.fuse(models, x, method=method, target=wide)


@pytest.mark.parametrize("method", METHODS)
def test_every_option_is_type_checked_by_name(method: str) -> None:
    info = nf.method_info(method)
    hints = typing.get_type_hints(info.options)
    models = [_model("mlp", 0), _model("mlp", 1)]
    checked = 0
    for field in dataclasses.fields(info.options):
        if hints[field.name] is typing.Any or field.name in info.unused:
            continue
        with pytest.raises(TypeError, match=f"option {field.name}="):
            nf.fuse(models, _inputs("mlp"), method=method, **{field.name: object()})
        checked += 1
    assert checked or not dataclasses.fields(info.options)


def test_literal_choices_are_named_in_the_error() -> None:
    from neurofuse.methods.registry import Capabilities, matches

    assert matches("same", typing.get_type_hints(Capabilities)["target"])
    assert not matches("other", typing.get_type_hints(Capabilities)["target"])
    with pytest.raises(ValueError, match=r"option prior='flat'.*one of 'aligned', 'zero'"):
        nf.fuse([_model("mlp", 0), _model("mlp", 1)], _inputs("mlp"), prior="flat")


# ---------------------------------------------------------------- inputs, normalised up front
def _pair() -> tuple[list[nn.Module], Tensor]:
    return [_model("mlp", 0), _model("mlp", 1)], _inputs("mlp")


def test_float64_data_is_cast_to_the_models_dtype() -> None:
    models, x = _pair()
    fused = nf.fuse(models, x.double())
    reference = nf.fuse(models, x)
    torch.testing.assert_close(fused(x), reference(x))


def test_inputs_of_the_wrong_shape_are_a_clear_error() -> None:
    models, _ = _pair()
    with pytest.raises(ValueError, match=r"samples have shape \(5,\).*shaped like"):
        nf.fuse(models, torch.randn(N, 5))


def test_models_returning_a_tuple_are_a_clear_error() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.fc(x), x

    with pytest.raises(TypeError, match="returns a tuple, not a tensor.*model\\(x\\)\\[0\\]"):
        nf.fuse([Pair(), Pair()], _inputs("mlp"))


def test_labels_out_of_range_are_a_clear_error_even_where_unused() -> None:
    """Labels are checked whether or not the method reads them: labels no method could use
    are a mistake (a second batch of inputs in their place was once dropped silently)."""
    models, x = _pair()
    y = torch.full((N,), 7)
    with pytest.raises(ValueError, match=r"labels range over 7..7.*3 classes"):
        nf.fuse(models, (x, y), importance="grad_x_activation")
    with pytest.raises(ValueError, match=r"labels range over 7..7.*3 classes"):
        nf.fuse(models, (x, y))  # kf_linear with uniform importance does not read them
    nf.fuse(models, (x, torch.zeros(N, dtype=torch.long)))


@pytest.mark.parametrize(
    "method,option,value",
    [
        ("kf_linear", "ridge", "big"),
        ("kf_linear", "local_search", "no"),
        ("kf_gradient", "lr", "fast"),
        ("otfusion", "reg", "small"),
    ],
)
def test_option_values_of_the_wrong_type_name_the_option(method, option, value) -> None:
    models, x = _pair()
    with pytest.raises(TypeError, match=f"option {option}={value!r}"):
        nf.fuse(models, x, method=method, **{option: value})


def test_a_seed_that_is_not_an_integer_is_refused() -> None:
    models, x = _pair()
    with pytest.raises(TypeError, match="seed must be an integer"):
        nf.fuse(models, x, seed="x")


def test_a_fusion_set_smaller_than_a_layer_warns() -> None:
    models, x = _pair()
    with pytest.warns(UserWarning, match=r"2 rows \(2 samples\), fewer than the 12 neurons"):
        nf.fuse(models, x[:2])
    vit = [_model("vit", 0), _model("vit", 1)]  # 5 tokens a sample: 10 samples give 50 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf.fuse(vit, _inputs("vit", 10))
    with pytest.warns(UserWarning, match=r"45 rows \(9 samples x 5 positions\).*48 neurons"):
        nf.fuse(vit, _inputs("vit", 9))


def test_tied_weights_are_refused_by_per_layer_fits_and_kept_by_averaging() -> None:
    models = [_model("tied", 0), _model("tied", 1)]
    x = _inputs("tied")
    with pytest.raises(ValueError, match=r"'fc3.weight' is 'fc2.weight'.*Untie them"):
        nf.fuse(models, x, method="kf_linear")
    fused = nf.fuse(models, x, method="vanilla")
    assert fused.fc3.weight is fused.fc2.weight


def test_one_trace_per_model_per_fusion(monkeypatch) -> None:
    """Every part of a method reads a model's graph from the fusion's cache."""
    import neurofuse.graph.tracing as tracing

    calls: list[int] = []
    original = tracing._Tracer.trace

    def counting(self, root, *args, **kwargs):
        calls.append(id(root))
        return original(self, root, *args, **kwargs)

    monkeypatch.setattr(tracing._Tracer, "trace", counting)
    models, x = _pair()
    for method, importance in [
        ("kf_linear", "uniform"),
        ("kf_linear", "activation"),
        ("git_rebasin", "activation"),
        ("kf_gradient", "conductance"),
    ]:
        calls.clear()
        nf.fuse(models, x, method=method, importance=importance, **QUICK.get(method, {}))
        assert len(calls) == len(set(calls)), f"{method}/{importance}: a model traced twice"
        assert len(calls) <= 3  # the two models and the fused template


def test_registering_an_elementwise_module_is_honoured_by_every_method() -> None:
    class Erfish(nn.Module):  # per-neuron, but not in any table until registered
        def forward(self, x: Tensor) -> Tensor:
            return torch.special.erf(x) + x

    def build_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(8, 12), Erfish(), nn.Linear(12, 12), Erfish(), nn.Linear(12, 3)
        ).eval()

    model, x = build_model(0), _inputs("mlp")
    from neurofuse.alignment import permutation_spaces

    assert all(s.fixed for s in permutation_spaces(model, example=x[:2])[:2])  # unknown: fixed
    nf.register_elementwise(Erfish)
    assert not any(s.fixed for s in permutation_spaces(model, example=x[:2])[:2])
    twin = permuted_by_analysis(model, seed=2, example=x[:2])
    for method in ("kf_linear", "hf_linear", "git_rebasin", "otfusion"):
        fused = nf.fuse([model, twin], x, method=method)
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)


def test_base_models_and_copies_survive_a_failing_method() -> None:
    models, x = _pair()
    before = _snapshot(models)
    with pytest.raises(ValueError):
        nf.fuse(models, x, method="hf_linear", target=copy.deepcopy(_model("tied", 0)))
    _assert_untouched(models, before)


def test_literal_option_choices_match_the_tables_that_implement_them() -> None:
    """An option's ``Literal[...]`` choices and the table the method looks the value up in
    are written in two places; they must agree."""
    from neurofuse.fitting import GradientConfig
    from neurofuse.methods import _gradient, ensemble, git_rebasin, otfusion, transplant
    from neurofuse.methods import transformer_otfusion as tot
    from neurofuse.optimizers import OPTIMIZERS, OptimizerName

    def choices(cls: type, name: str) -> set:
        tp = typing.get_type_hints(cls)[name]
        args = typing.get_args(tp)
        if type(None) in args:  # Optional[Literal[...]]
            (tp,) = [a for a in args if a is not type(None)]
        return set(typing.get_args(tp))

    assert set(typing.get_args(OptimizerName)) == set(OPTIMIZERS)
    assert choices(GradientConfig, "optimizer") == set(OPTIMIZERS)
    assert choices(_gradient.GradientOptions, "preset") == set(_gradient.PRESETS)
    assert choices(_gradient.GradientOptions, "init") == set(_gradient.INITS)
    assert choices(ensemble.EnsembleOptions, "mode") == set(ensemble.COMBINE)
    assert choices(git_rebasin.GitRebasinOptions, "match") == set(git_rebasin.MATCHERS)
    assert choices(otfusion.OTFusionOptions, "solver") == set(otfusion.SOLVERS)
    assert choices(otfusion.OTFusionOptions, "ground_metric") == set(otfusion.GROUND_METRICS)
    assert choices(transplant.TransplantOptions, "criterion") == set(transplant.CRITERIA)
    assert choices(transplant.TransplantOptions, "finetune_target") == set(
        transplant.FINETUNE_TARGETS
    )
    assert choices(tot.TransformerOTFusionOptions, "residual") == set(tot.RESIDUAL_POLICIES)
    assert choices(tot.TransformerOTFusionOptions, "solver") == set(tot.SOLVERS)


@pytest.mark.parametrize("act", [nn.Hardswish, nn.Mish, nn.SELU])
@pytest.mark.parametrize("method", ["kf_linear", "hf_linear", "git_rebasin", "otfusion"])
def test_residual_blocks_with_any_listed_activation_fuse_exactly(method, act) -> None:
    """The operation table is one: an activation every method knows (once only the space
    analysis knew Hardswish and Mish, and the Linear variants failed on a residual block)."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 16), nn.Linear(16, 12)
            self.act, self.head = act(), nn.Linear(12, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.act(self.embed(x))
            h = h + self.fc2(self.act(self.fc1(h)))
            return self.head(self.act(h))

    torch.manual_seed(0)
    model, x = Residual().eval(), _inputs("mlp")
    twin = permuted_by_analysis(model, seed=2, example=x[:2])
    # the activation passes neurons through: the block's spaces are free, the twin really moved
    assert not torch.equal(twin.fc1.weight, model.fc1.weight)
    fused = nf.fuse([model, twin], x, method=method)
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)


def test_models_returning_a_dict_are_a_clear_error() -> None:
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": self.fc(x)}

    with pytest.raises(TypeError, match=r"returns a dict, not a tensor.*\['logits'\]"):
        nf.fuse([Named(), Named()], _inputs("mlp"))


def test_levels_out_of_order_are_refused() -> None:
    models, x = _pair()
    with pytest.raises(ValueError, match="forward order"):
        nf.fuse(models, x, method="kf_gradient", levels=["2", "0"], **QUICK["kf_gradient"])


def test_a_layer_called_twice_is_refused_like_tied_weights() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.fc1(x))
            h = F.relu(self.fc2(h))
            return self.out(F.relu(self.fc2(h)))  # fc2 again: one weight, two places

    models, x = [Twice().eval(), Twice().eval()], _inputs("mlp")
    for method in ("kf_linear", "hf_linear", "kf_gradient"):
        with pytest.raises(ValueError, match=r"calls layer 'fc2' 2 times.*git_rebasin"):
            nf.fuse(models, x, method=method)
    nf.fuse(models, x, method="git_rebasin")  # alignment keeps the shared layer consistent


def erfplus(x: Tensor) -> Tensor:
    """A per-neuron function that fx would inline (erf and add: an unknown pair)."""
    return torch.special.erf(x) + x


def test_a_registered_plain_function_is_one_call_for_every_method() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(erfplus(self.fc2(erfplus(self.fc1(x)))))

    from neurofuse.alignment import permutation_spaces

    torch.manual_seed(0)
    model, x = Model().eval(), _inputs("mlp")
    assert all(s.fixed for s in permutation_spaces(model, example=x[:2])[:2])
    nf.register_elementwise(erfplus)
    assert not any(s.fixed for s in permutation_spaces(model, example=x[:2])[:2])
    twin = permuted_by_analysis(model, seed=2, example=x[:2])
    fused = nf.fuse([model, twin], x, method="kf_linear")
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)


def test_numpy_integers_are_integers() -> None:
    import numpy as np

    models, x = _pair()
    fused = nf.fuse(models, x, seed=np.int64(3), n_init=np.int64(2))
    assert fused.neurofuse_report["seed"] == 3


def test_auto_refuses_levels_that_are_wrong_or_unused() -> None:
    models, x = _pair()
    with pytest.raises(ValueError, match="neither a module"):
        nf.fuse(models, x, method="auto", levels=["nope"])
    with pytest.raises(ValueError, match="no method of auto's portfolio uses levels"):
        nf.fuse(models, x, method="auto", levels=["2"], portfolio=("kf_linear",))


def test_matching_on_activations_warns_on_a_tiny_fusion_set() -> None:
    models, x = _pair()
    for method in ("git_rebasin", "otfusion", "cca_merge"):
        with pytest.warns(UserWarning, match="fewer than the 12 neurons"):
            nf.fuse(models, x[:3], method=method)


def test_transplant_refuses_missing_labels_before_any_work() -> None:
    models, x = _pair()
    with pytest.raises(ValueError, match="labelled fusion data"):
        nf.fuse(models, x, method="transplant", finetune_target="labels")


def test_an_option_the_method_never_reads_is_refused_and_not_listed() -> None:
    models, x = [toy_mlp().eval(), toy_mlp().eval()], torch.randn(32, 10)
    for method in ("hf_linear", "hf_gradient", "hf_linear+kd"):
        assert "n_init" not in nf.method_options(method)
        with pytest.raises(ValueError, match=r"\['n_init'\] do nothing for method"):
            nf.fuse(models, x, method=method, n_init=3)
    assert "n_init" in nf.method_options("kf_linear")
    assert "local_search" in nf.method_options("kf_linear+kd")


def test_every_option_of_every_method_is_documented() -> None:
    from neurofuse.methods import method_info, option_docs

    for method in nf.available_methods():
        docs = option_docs(method_info(method).options)
        missing = [k for k in nf.method_options(method) if not docs.get(k)]
        assert not missing, f"{method}: options without a description {missing}"
    kd = option_docs(method_info("kf_linear+kd").options)
    assert kd["kd_epochs"] and kd["ridge"]  # both sources of the combined options
