"""Issue 11: prior-centred least squares, fine-tuning / fuse-then-distill, and ``auto``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_alignment import ZOO
from torch import nn
from toys import (
    accuracy,
    cnn_bn,
    mlp,
    permuted_by_analysis,
    randomise_batchnorm,
    relative_error,
    toy_task,
    train,
)

import neurofuse as nf
from neurofuse.finetuning import mixup_inputs
from neurofuse.fitting import LeastSquares
from neurofuse.methods.auto import class_balanced_accuracy, holdout_split
from neurofuse.models import build

# --------------------------------------------------------------------------- prior-centred LS


def _problem(n: int, p: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    w0 = torch.randn(p + 1, d, generator=g, dtype=torch.float64)
    ls = LeastSquares(p, d, True, x.device, torch.float64, targets=True)
    for lo in range(0, n, 7):  # accumulated in chunks
        ls.add(x[lo : lo + 7], t[lo : lo + 7])
    return x, t, w0, ls


@pytest.mark.parametrize("n,p", [(12, 30), (80, 10)], ids=["underdetermined", "overdetermined"])
def test_prior_centred_solution_matches_the_closed_form(n, p):
    x, t, w0, ls = _problem(n, p, 3)
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    g = xb.T @ xb
    rel = 0.3
    lam = rel * float(torch.diagonal(g).mean())
    ref = torch.linalg.solve(g + lam * torch.eye(p + 1, dtype=x.dtype), xb.T @ t + lam * w0)
    w, used = ls.solve_prior(w0, rel)
    assert used == pytest.approx(rel)
    assert torch.allclose(w, ref, atol=1e-9)


def test_prior_centred_solution_keeps_the_prior_in_the_null_space():
    x, t, w0, ls = _problem(6, 20, 2)
    xb = torch.cat([x, torch.ones(6, 1, dtype=x.dtype)], 1)
    t_exact = xb @ w0  # the prior fits the rows exactly
    ls = LeastSquares(20, 2, True, x.device, torch.float64, targets=True)
    ls.add(x, t_exact)
    w, _ = ls.solve_prior(w0)  # strength by GCV
    assert torch.allclose(w, w0, atol=1e-8)
    w_min_norm = ls.solve(1e-12)  # the zero-centred answer differs off the rows' span
    assert (w_min_norm - w0).abs().max() > 0.1


def test_gcv_choice_is_the_minimum_of_the_explicit_criterion():
    x, t, w0, ls = _problem(25, 15, 4, seed=3)
    xb = torch.cat([x, torch.ones(25, 1, dtype=x.dtype)], 1)
    g = xb.T @ xb
    scale = float(torch.diagonal(g).mean())
    _, chosen = ls.solve_prior(w0, None, ridge=1e-9)
    best, best_rel = math.inf, None
    for rel in torch.logspace(-9, 4, 41, dtype=torch.float64).tolist():
        lam = rel * scale
        inv = torch.linalg.inv(g + lam * torch.eye(16, dtype=x.dtype))
        h = xb @ inv @ xb.T
        w = w0 + inv @ (xb.T @ t - g @ w0)
        rss = float(((xb @ w - t) ** 2).sum())
        gcv = rss / (1 - float(torch.trace(h)) / 25) ** 2
        if gcv < best:
            best, best_rel = gcv, rel
    assert chosen == pytest.approx(best_rel, rel=1e-6)


def test_prior_options_are_checked():
    m = mlp()
    x = torch.randn(20, 10)
    with pytest.raises(ValueError, match="prior must be"):
        nf.fuse([m, m], x, method="kf_linear", prior="mean")
    with pytest.raises(ValueError, match="prior_strength"):
        nf.fuse([m, m], x, method="kf_linear", prior_strength=-1.0)


@pytest.mark.parametrize("method", ["kf_linear", "hf_linear"])
@pytest.mark.parametrize(
    "name,kwargs,shape", [z[:3] for z in ZOO], ids=[f"{z[0]}-{i}" for i, z in enumerate(ZOO)]
)
def test_permuted_copy_is_recovered_with_fewer_fusion_rows_than_fan_in(method, name, kwargs, shape):
    """Three fusion samples: every Linear layer has more inputs than rows. The aligned prior
    gives the exact model back; the zero-centred fit of the paper does not."""
    torch.manual_seed(0)
    model = randomise_batchnorm(build(name, **kwargs)).eval()
    twin = permuted_by_analysis(model, example=torch.randn(*shape))
    data = torch.randn(3, *shape[1:])
    test = torch.randn(16, *shape[1:])
    with torch.no_grad():
        ref = model(test)
        fused = nf.fuse([model, twin], data, method=method)
        assert relative_error(fused(test), ref) < 1e-4
        zero = nf.fuse([model, twin], data, method=method, prior="zero")
        assert relative_error(zero(test), ref) > 1e-2
    assert fused.neurofuse_report["prior_strength"]


# --------------------------------------------------------------------------- finetune / +kd


@pytest.fixture(scope="module")
def sharded_pair():
    """Two MLPs on disjoint classes of a 4-class toy task; the fusion set is model 0's."""
    x, y = toy_task(n=1600, d=10, classes=4, seed=0)
    models = []
    for i, classes in enumerate(((0, 1), (2, 3))):
        keep = (y == classes[0]) | (y == classes[1])
        torch.manual_seed(i)
        models.append(train(mlp(10, (32, 32), 4), x[keep][:600], y[keep][:600], epochs=30))
    fusion = (y == 0) | (y == 1)
    return models, x[fusion][600:800], y[fusion][600:800], x[:400], y[:400]


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_finetune_never_mutates_and_is_deterministic(sharded_pair):
    models, x, y, _, _ = sharded_pair
    fused = nf.fuse(models, (x, y), method="kf_linear")
    before = [_state(m) for m in models + [fused]]
    a = nf.finetune(fused, x, teachers=models, epochs=3, seed=1)
    b = nf.finetune(fused, x, teachers=models, epochs=3, seed=1)
    for m, s in zip(models + [fused], before, strict=True):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, fused.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.neurofuse_report["finetune"]["mode"] == "distill 2 teachers"
    assert a.neurofuse_report["method"] == "kf_linear"


def test_finetune_on_labels_learns_and_needs_labels(sharded_pair):
    models, x, y, _, _ = sharded_pair
    start = copy.deepcopy(models[1])  # knows classes 2 and 3 only
    tuned = nf.finetune(start, (x, y), epochs=30, lr=3e-3, anchor=0.0, patience=30)
    assert accuracy(tuned, x, y) > accuracy(start, x, y) + 0.3
    with pytest.raises(ValueError, match="labels"):
        nf.finetune(start, x)
    with pytest.raises(ValueError, match="lr must be"):
        nf.finetune(start, (x, y), lr=0)
    with pytest.raises(ValueError, match="unknown finetune option"):
        nf.finetune(start, (x, y), epoch=3)


def test_distillation_synthesises_inputs_for_the_classes_the_data_lacks(sharded_pair):
    models, x, y, x_all, y_all = sharded_pair  # the fusion set shows classes 0 and 1 of 4
    fused = nf.fuse(models, (x, y), method="kf_linear")
    before = [_state(m) for m in models + [fused]]
    opts = {"teachers": models, "epochs": 2, "seed": 1}
    a = nf.finetune(fused, (x, y), synthetic=4, **opts)
    b = nf.finetune(fused, (x, y), synthetic=4, **opts)
    plain = nf.finetune(fused, (x, y), **opts)
    for m, s in zip(models + [fused], before, strict=True):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())
    assert a.neurofuse_report["finetune"]["synthesised_for"] == [2, 3]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in a.state_dict().items())
    # data that shows every class gets no synthetic input: the same training as without
    full = nf.finetune(fused, (x_all, y_all), synthetic=4, **opts)
    same = nf.finetune(fused, (x_all, y_all), **opts)
    assert full.neurofuse_report["finetune"]["synthesised_for"] == []
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in full.state_dict().items())
    with pytest.raises(ValueError, match="teachers=models"):
        nf.finetune(fused, (x, y), synthetic=4)
    with pytest.raises(ValueError, match="synthetic must be"):
        nf.finetune(fused, x, teachers=models, synthetic=-1)
    kd = nf.fuse(models, (x, y), method="kf_linear+kd", kd_epochs=2, kd_synthetic=4, seed=1)
    assert kd.neurofuse_report["distillation"]["synthesised_for"] == [2, 3]


def test_anchor_limits_the_drift_from_the_start(sharded_pair):
    models, x, _, _, _ = sharded_pair
    fused = nf.fuse(models, x, method="kf_linear")

    def drift(m: nn.Module) -> float:
        return sum(
            float(((p - q) ** 2).sum())
            for p, q in zip(m.parameters(), fused.parameters(), strict=True)
        )

    free = nf.finetune(fused, x, teachers=models, anchor=0.0, epochs=10, patience=10, lr=1e-3)
    held = nf.finetune(fused, x, teachers=models, anchor=100.0, epochs=10, patience=10, lr=1e-3)
    assert drift(held) < 0.5 * drift(free)


def test_fuse_then_distill_is_a_method_with_prefixed_options(sharded_pair):
    models, x, y, _, _ = sharded_pair
    before = [_state(m) for m in models]
    a = nf.fuse(models, (x, y), method="kf_linear+kd", kd_epochs=3, seed=2)
    b = nf.fuse(models, (x, y), method="kf_linear+kd", kd_epochs=3, seed=2)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    for m, s in zip(models, before, strict=True):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())
    report = a.neurofuse_report
    assert report["distillation"]["options"]["epochs"] == 3
    assert report["labels_used"] is False and "grouping_cost" in report
    assert "kd_anchor" in nf.method_options("hf_gradient+kd")
    with pytest.raises(ValueError, match="temperature"):
        nf.fuse(models, x, method="kf_linear+kd", kd_temperature=0)
    with pytest.raises(ValueError, match="unknown option"):
        nf.fuse(models, x, method="kf_linear+kd", epochs=3)


# --------------------------------------------------------------------------- auto


def test_holdout_split_is_stratified_disjoint_and_seeded():
    y = torch.tensor([0] * 40 + [1] * 20)
    tr, ho = holdout_split(60, 0.25, y, seed=0)
    assert len(set(tr.tolist()) & set(ho.tolist())) == 0 and len(tr) + len(ho) == 60
    assert int((y[ho] == 0).sum()) == 10 and int((y[ho] == 1).sum()) == 5
    assert torch.equal(ho, holdout_split(60, 0.25, y, seed=0)[1])
    for labels, share in ((torch.arange(10), 0.6), (torch.arange(5).repeat(2), 0.75)):
        # tiny classes: every class keeps a row to fit on where it can, and two rows remain
        tr, ho = holdout_split(10, share, labels, seed=0)
        assert len(tr) >= 2 and len(set(tr.tolist()) & set(ho.tolist())) == 0
        assert len(tr) + len(ho) == 10
    tr, _ = holdout_split(10, 0.75, torch.arange(5).repeat(2), seed=0)
    assert set(torch.arange(5).repeat(2)[tr].tolist()) == set(range(5))
    probes = mixup_inputs(torch.randn(5, 3), 2, seed=0)
    assert probes.shape == (15, 3)


def test_auto_picks_the_clearly_best_candidate(sharded_pair):
    """Of a useless copy of one base model and KF Linear (which recovers most of the
    ensemble's gain here), auto must keep KF Linear, and say so in its report."""
    models, x, y, xt, yt = sharded_pair
    fused = nf.fuse(
        models, (x, y), method="auto", portfolio=["kf_linear", "vanilla"], include_base=True
    )
    report = fused.neurofuse_report["auto"]
    assert report["chosen"] == "kf_linear", report
    assert set(report["scores"]) == {"model 0", "model 1", "kf_linear", "vanilla"}
    assert report["candidates_fitted"] == 2 and report["labels_scored"] is True
    default = nf.fuse(models, (x, y), method="auto", portfolio=["kf_linear", "vanilla"])
    assert set(default.neurofuse_report["auto"]["scores"]) == {"kf_linear", "vanilla"}
    assert default.neurofuse_report["auto"]["bases_scored"] is False
    assert report["bases_scored"] is True
    best_base = max(accuracy(m, xt, yt) for m in models)
    assert accuracy(fused, xt, yt) > best_base + 0.1


@pytest.mark.parametrize("include_base", ["covered", True])
def test_auto_returns_a_base_model_when_it_is_best(include_base):
    """Two models trained apart on the same data, and a portfolio of plain weight averaging
    only (which breaks them): a base model is far closer to their ensemble, so auto returns
    a copy of one of them, never below the best base model. The fusion set shows all three
    classes, so ``"covered"`` scores the base models as ``True`` does, with labels or without
    (then the ensemble's top classes count as shown); the default scores fused candidates
    only."""
    x, y = toy_task(n=900, d=10, classes=3, seed=1)
    models = []
    for seed in (0, 7):
        torch.manual_seed(seed)
        models.append(train(mlp(), x[:600], y[:600], epochs=30))
    kwargs = {"include_base": include_base}
    fused = nf.fuse(
        models, (x[600:700], y[600:700]), method="auto", portfolio=["vanilla"], **kwargs
    )
    report = fused.neurofuse_report["auto"]
    chosen = report["chosen"]
    assert chosen in ("model 0", "model 1"), report
    assert report["bases_scored"] is True and report["classes_shown"] == [0, 1, 2]
    base = models[int(chosen[-1])]
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in fused.state_dict().items())
    assert fused is not base
    assert report["scores"][chosen]["disagreement"] < report["scores"]["vanilla"]["disagreement"]
    unlabelled = nf.fuse(models, x[600:700], method="auto", portfolio=["vanilla"], **kwargs)
    assert unlabelled.neurofuse_report["auto"]["chosen"] in ("model 0", "model 1")
    off = nf.fuse(
        models, (x[600:700], y[600:700]), method="auto", portfolio=["vanilla"], include_base=False
    )
    assert off.neurofuse_report["auto"]["scores"].keys() == {"vanilla"}
    assert off.neurofuse_report["auto"]["bases_scored"] is False
    # a fusion set without class 2: "covered" leaves the base models out, True does not
    no2 = y[600:700] != 2
    part = nf.fuse(
        models, (x[600:700][no2], y[600:700][no2]), method="auto", portfolio=["vanilla"], **kwargs
    )
    assert part.neurofuse_report["auto"]["bases_scored"] is (include_base is True)


def test_auto_default_scores_only_the_base_model_of_best_class_balanced_accuracy():
    """The default ``include_base="balanced"``: with a labelled fusion set that shows every
    class, only the base model whose accuracy averaged over the classes is highest is scored.
    Here model 0 always says class 0 (right on the 80 rows of class 0: accuracy 0.8, balanced
    1/3) and model 1 is right on classes 1 and 2 only (accuracy 0.2, balanced 2/3), so plain
    accuracy would rank them the other way round; without labels no base model is scored."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(80), torch.ones(10), torch.full((10,), 2.0)]).long()
    x = torch.eye(3)[y] + 0.05 * torch.randn(100, 3, generator=g)
    models = [nn.Sequential(nn.Linear(3, 3)) for _ in range(2)]
    with torch.no_grad():
        for m, bias in zip(models, ([10.0, 0.0, 0.0], [-10.0, 0.0, 0.0]), strict=True):
            m[0].weight.copy_(torch.eye(3))
            m[0].bias.copy_(torch.tensor(bias))
    before = [copy.deepcopy(m.state_dict()) for m in models]
    fused = nf.fuse(models, (x, y), method="auto", portfolio=["vanilla"])
    report = fused.neurofuse_report["auto"]
    assert report["bases_scored"] is True
    assert report["class_balanced_accuracy"] == pytest.approx([1 / 3, 2 / 3])
    assert set(report["scores"]) == {"model 1", "vanilla"}
    assert class_balanced_accuracy(models[0], x, y) == pytest.approx(1 / 3)
    unlabelled = nf.fuse(models, x, method="auto", portfolio=["vanilla"])
    assert unlabelled.neurofuse_report["auto"]["bases_scored"] is False
    assert "class_balanced_accuracy" not in unlabelled.neurofuse_report["auto"]
    no2 = y != 2  # a fusion set without class 2: no base model is scored
    part = nf.fuse(models, (x[no2], y[no2]), method="auto", portfolio=["vanilla"])
    assert part.neurofuse_report["auto"]["bases_scored"] is False
    assert all(
        torch.equal(v, b[k])
        for m, b in zip(models, before, strict=True)
        for k, v in m.state_dict().items()
    )


def test_auto_scores_each_base_model_against_the_other_models(sharded_pair):
    """``include_base="others"``: model k is scored against the ensemble of the models other
    than k (for two models: the other model alone), so the owner of the fusion set, whose
    confident predictions make the ensemble's on its own data, gets no vote from itself;
    ``True`` scores it against the whole ensemble."""
    from neurofuse.methods.ensemble import ensemble_log_probs

    models, x, y, _, _ = sharded_pair
    _, held = holdout_split(len(x), 0.25, y, seed=3)
    probe = mixup_inputs(x[held], 1, 3)
    with torch.no_grad():
        tops = [m(probe).argmax(-1) for m in models]
        both = ensemble_log_probs(models, probe).argmax(-1)
    scores = {}
    for mode in (True, "others"):
        fused = nf.fuse(
            models, (x, y), method="auto", portfolio=["vanilla"], include_base=mode, seed=3
        )
        scores[mode] = fused.neurofuse_report["auto"]["scores"]
    for k in (0, 1):
        against_other = float((tops[k] != tops[1 - k]).float().mean())
        against_all = float((tops[k] != both).float().mean())
        assert scores["others"][f"model {k}"]["disagreement"] == pytest.approx(against_other)
        assert scores[True][f"model {k}"]["disagreement"] == pytest.approx(against_all)
    # the owner (model 0) agrees with the whole ensemble on its own data, not with model 1
    assert scores[True]["model 0"]["disagreement"] < 0.2
    assert scores["others"]["model 0"]["disagreement"] > 0.8
    assert scores[True]["vanilla"] == scores["others"]["vanilla"]


def test_auto_checks_held_out_inputs_against_their_labels(monkeypatch):
    """Three linear models on ``y = argmax(x)``: the owner is right, the two others give the
    next class, so the probability ensemble is wrong on the owner's data. Of two candidates,
    one copying the ensemble and one right on every input, ``criterion="labels"`` keeps the
    right one (the held-out inputs are checked against their labels), ``"ensemble"`` the copy;
    the probes are checked against the ensemble in both."""
    import neurofuse.api

    def linear(weight: torch.Tensor) -> nn.Module:
        m = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            m.weight.copy_(10 * weight)
        return m.eval()

    eye, shift = torch.eye(3), torch.eye(3).roll(1, dims=0)  # shift: class (argmax + 1) % 3
    models = [linear(eye), linear(shift), linear(shift)]
    right, copier = linear(eye), linear(shift)
    x = torch.rand(60, 3, generator=torch.Generator().manual_seed(0))
    y = x.argmax(1)
    real = neurofuse.api.fuse

    def fake(ms, data, *, method, **kw):  # the candidates, whatever they are fitted on
        if method == "auto":
            return real(ms, data, method=method, **kw)
        return copy.deepcopy({"kf_linear": copier, "vanilla": right}[method])

    monkeypatch.setattr(neurofuse.api, "fuse", fake)
    kept = {}
    for criterion in ("labels", "ensemble"):
        fused = nf.fuse(
            models,
            (x, y),
            method="auto",
            portfolio=["kf_linear", "vanilla"],
            probes=0,
            criterion=criterion,
            include_base=False,  # (the fused candidates' criterion is the question)
        )
        kept[criterion] = fused.neurofuse_report["auto"]
    assert kept["labels"]["chosen"] == "vanilla" and kept["labels"]["labels_scored"]
    assert kept["labels"]["scores"]["vanilla"]["disagreement"] == 0.0
    assert kept["labels"]["scores"]["kf_linear"]["disagreement"] == 1.0
    assert kept["ensemble"]["chosen"] == "kf_linear" and not kept["ensemble"]["labels_scored"]
    # with one probe per held-out input: each candidate is wrong on exactly one half
    both = nf.fuse(
        models, (x, y), method="auto", portfolio=["kf_linear", "vanilla"], include_base=False
    )
    scores = both.neurofuse_report["auto"]["scores"]
    assert scores["vanilla"]["disagreement"] == pytest.approx(0.5, abs=0.05)
    assert scores["kf_linear"]["disagreement"] == pytest.approx(0.5, abs=0.05)
    # without labels there is nothing but the ensemble to check against
    unlabelled = nf.fuse(
        models, x, method="auto", portfolio=["kf_linear", "vanilla"], probes=0, include_base=False
    )
    assert unlabelled.neurofuse_report["auto"]["chosen"] == "kf_linear"
    with pytest.raises(ValueError, match="criterion must be one of"):
        nf.fuse(models, (x, y), method="auto", criterion="accuracy")


def test_weak_owner_fusion_is_not_below_the_best_base_model():
    """8 classes; model 0, whose 200 samples form the fusion set, saw mostly classes 0-3 and
    model 1 mostly 4-7, from twice the data. The ensemble beats both; every fusion that auto
    can return must not fall below the better base model."""
    x, y = toy_task(n=3000, d=12, classes=8, seed=3)
    x = x + 1.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(0)
    own = torch.multinomial(torch.tensor([1.0] * 4 + [0.1] * 4)[y[:1000]], 200, generator=g)
    other = 1000 + torch.multinomial(
        torch.tensor([0.1] * 4 + [1.0] * 4)[y[1000:2000]], 400, generator=g
    )
    torch.manual_seed(0)
    weak = train(mlp(12, (32, 32), 8), x[own], y[own], epochs=40)
    torch.manual_seed(1)
    strong = train(mlp(12, (32, 32), 8), x[other], y[other], epochs=40)
    xt, yt = x[2000:], y[2000:]
    best = max(accuracy(weak, xt, yt), accuracy(strong, xt, yt))
    from neurofuse.methods.ensemble import Ensemble

    assert accuracy(Ensemble([weak, strong]), xt, yt) > best + 0.05  # fusion has room
    fused = nf.fuse([weak, strong], (x[own], y[own]), method="auto")
    assert accuracy(fused, xt, yt) >= best
    for method in ("kf_linear", "kf_linear+kd"):
        assert accuracy(nf.fuse([weak, strong], (x[own], y[own]), method=method), xt, yt) >= best


def test_auto_options_are_checked():
    m = mlp()
    x = torch.randn(20, 10)
    with pytest.raises(ValueError, match="holdout"):
        nf.fuse([m, m], x, method="auto", holdout=1.5)
    with pytest.raises(ValueError, match="unknown fusion method"):
        nf.fuse([m, m], x, method="auto", portfolio=["kf_lineer"])
    with pytest.raises(ValueError, match="cannot contain 'auto'"):
        nf.fuse([m, m], x, method="auto", portfolio=["auto"])
    with pytest.raises(
        ValueError, match="include_base must be False, True, 'balanced', 'covered' or 'others'"
    ):
        nf.fuse([m, m], x, method="auto", include_base="others!")
    with pytest.raises(ValueError, match="min_shown must be a number in"):
        nf.fuse([m, m], x, method="auto", min_shown=1.5)


def test_auto_scores_only_distilled_candidates_when_most_classes_are_missing(sharded_pair):
    """A fusion set of class 0 alone shows 1 of the models' 4 classes: each candidate is
    replaced by its distilled version (once) and no base model is scored; ``min_shown=0``
    scores the portfolio as it is; the set that shows 2 of 4 (half) is scored in full; a
    portfolio without a method that has a distilled version is left alone."""
    models, x, y, _, _ = sharded_pair
    one = y == 0
    portfolio = ["kf_linear", "kf_linear+kd"]
    blind = nf.fuse(models, (x[one], y[one]), method="auto", portfolio=portfolio, include_base=True)
    report = blind.neurofuse_report["auto"]
    assert report["distilled_only"] and report["classes_shown"] == [0]
    assert report["scores"] == {"kf_linear+kd": "the only candidate: not scored"}
    assert report["candidates_fitted"] == 0 and report["labels_scored"] is False
    assert report["chosen"] == "kf_linear+kd"
    assert blind.neurofuse_report["auto"]["chosen_report"]["method"] == "kf_linear+kd"
    free = nf.fuse(models, (x[one], y[one]), method="auto", portfolio=portfolio, min_shown=0)
    assert not free.neurofuse_report["auto"]["distilled_only"]
    assert set(free.neurofuse_report["auto"]["scores"]) == {"kf_linear", "kf_linear+kd"}
    half = nf.fuse(models, (x, y), method="auto", portfolio=portfolio)
    assert half.neurofuse_report["auto"]["classes_shown"] == [0, 1]
    assert set(half.neurofuse_report["auto"]["scores"]) == {"kf_linear", "kf_linear+kd"}
    unlabelled = nf.fuse(models, x[one], method="auto", portfolio=portfolio)
    assert unlabelled.neurofuse_report["auto"]["distilled_only"]
    both = nf.fuse(
        models, (x[one], y[one]), method="auto", portfolio=["kf_linear", "vanilla", "hf_linear"]
    )
    assert set(both.neurofuse_report["auto"]["scores"]) == {"kf_linear+kd", "hf_linear+kd"}
    plain = nf.fuse(models, (x[one], y[one]), method="auto", portfolio=["vanilla"])
    assert not plain.neurofuse_report["auto"]["distilled_only"]
    assert set(plain.neurofuse_report["auto"]["scores"]) == {"vanilla"}


def test_auto_fits_augmented_copies_of_the_kept_part_only(monkeypatch):
    """``augment=``: every candidate is fused on the kept rows followed by their augmented
    copies, the winner refitted on the whole set with its copies; no held-out input is
    fitted, in any form."""
    import neurofuse.api

    torch.manual_seed(0)
    models = [cnn_bn(), cnn_bn()]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, 1, 8, 8, generator=g) + 0.5  # no zero pixel: a shift shows
    y = torch.arange(40) % 3
    calls = []
    real = neurofuse.api.fuse

    def spy(ms, data, **kw):
        calls.append(data)
        return real(ms, data, **kw)

    monkeypatch.setattr(neurofuse.api, "fuse", spy)
    fused = nf.fuse(
        models,
        (x, y),
        method="auto",
        portfolio=["kf_linear", "vanilla"],
        augment="crop=2",
        augment_copies=3,
        seed=5,
        include_base=False,  # (a fused winner, refitted on the set and its copies)
    )
    train, held = holdout_split(40, 0.25, y, seed=5)
    _, (xc, yc), (xv, _), (xf, yf) = calls  # (the first: the call above itself)
    assert torch.equal(xv, xc)  # every candidate is fitted on the same rows
    assert len(xc) == 4 * len(train) and torch.equal(xc[: len(train)], x[train])
    assert torch.equal(yc, y[train].repeat(4))
    copies = xc[len(train) :]
    assert not torch.equal(copies, x[train].repeat(3, 1, 1, 1))  # the copies are shifted
    for h in x[held]:  # no held-out input among the fitted rows, nor a shift of one
        assert not any(torch.isin(r[r != 0], h).all() for r in xc)
    assert len(xf) == 160 and torch.equal(xf[:40], x) and torch.equal(yf, y.repeat(4))
    report = fused.neurofuse_report["auto"]
    assert report["augment"] == {"spec": "crop=2", "copies": 3}
    assert report["fitted_rows"] == 4 * len(train)
    calls.clear()
    plain = nf.fuse(
        models,
        (x, y),
        method="auto",
        portfolio=["kf_linear", "vanilla"],
        seed=5,
        include_base=False,
    )
    assert [len(d[0]) for d in calls] == [40, len(train), len(train), 40]
    calls.clear()  # a single candidate: no trial fit, the whole set fused once
    one = nf.fuse(
        models, (x, y), method="auto", portfolio=["kf_linear"], seed=5, include_base=False
    )
    assert [len(d[0]) for d in calls] == [40, 40]
    assert one.neurofuse_report["auto"]["scores"] == {"kf_linear": "the only candidate: not scored"}
    assert "augment" not in plain.neurofuse_report["auto"]


def test_auto_augment_options_are_checked():
    m = mlp()
    x = torch.randn(20, 10)
    with pytest.raises(ValueError, match="leaves the inputs unchanged"):
        nf.fuse([m, m], x, method="auto", augment="none")
    with pytest.raises(ValueError, match="augment_copies must be a positive integer"):
        nf.fuse([m, m], x, method="auto", augment="crop=2", augment_copies=0)
    with pytest.raises(TypeError, match="augment=2"):
        nf.fuse([m, m], x, method="auto", augment=2)
    with pytest.raises(ValueError, match="unknown augmentation"):
        nf.fuse([m, m], x, method="auto", augment="rotate=3")
    with pytest.raises(ValueError, match="shifted copies need signals or images"):
        nf.fuse([m, m], x, method="auto", augment="crop=2")  # feature vectors


def test_auto_passes_every_kind_of_importance_and_honours_target_and_levels(sharded_pair):
    """A callable importance reaches the candidates that read importance (it was dropped for
    all but named scores); a portfolio that reads none refuses a score as it refuses levels;
    a template (``target=``) leaves out the candidates that build their own model; the
    report says whether the levels given shaped the model returned."""
    models, x, y, _, _ = sharded_pair
    calls = []

    def score(model, name, out):
        calls.append(name)
        return out.detach().abs().reshape(-1, out.shape[-1]).mean(0) + 1.0

    fused = nf.fuse(models, (x, y), method="auto", portfolio=["kf_linear"], importance=score)
    assert calls and "kf_linear (callable)" in fused.neurofuse_report["auto"]["scores"]
    with pytest.raises(ValueError, match="no method of auto's portfolio reads importance"):
        nf.fuse(models, (x, y), method="auto", portfolio=["vanilla"], importance="activation")
    narrow = mlp(10, (16, 16), 4)
    small = nf.fuse(
        models, (x, y), method="auto", portfolio=["ensemble", "kf_linear"], target=narrow
    )
    assert set(small.neurofuse_report["auto"]["scores"]) == {"kf_linear"}
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in narrow.parameters())
    levels = nf.fuse(
        models,
        (x, y),
        method="auto",
        portfolio=["kf_linear", "kf_gradient"],
        levels=["1", "3"],
        include_base=False,
    )
    report = levels.neurofuse_report["auto"]
    assert report["levels_used"] is (report["chosen"].startswith("kf_gradient"))


def test_finetune_refuses_bad_teachers_and_labels(sharded_pair):
    models, x, y, _, _ = sharded_pair
    with pytest.raises(TypeError, match=r"for one teacher pass \[model\]"):
        nf.finetune(models[0], x, teachers=models[1], epochs=1)
    with pytest.raises(ValueError, match="teacher 0 has 3 output classes, the model 4"):
        nf.finetune(models[0], x, teachers=[mlp(10, (8,), 3)], epochs=1)
    with pytest.raises(ValueError, match="not whole numbers"):
        nf.finetune(models[0], (x, y.float() + 0.5), epochs=1)
    with pytest.raises(ValueError, match="labels have shape"):
        nf.finetune(models[0], (x, torch.nn.functional.one_hot(y, 4)), epochs=1)


def test_labels_are_checked_even_where_the_method_ignores_them():
    """``fuse(models, [x1, x2])`` read ``x2`` as labels and dropped it silently."""
    a, b = mlp(), mlp()
    x1, x2 = torch.randn(16, 10), torch.randn(16, 10)
    with pytest.raises(ValueError, match="labels"):
        nf.fuse([a, b], [x1, x2], method="vanilla")


def test_fuse_then_distill_reports_labels_given_to_its_importance_score(sharded_pair):
    models, x, y, _, _ = sharded_pair
    plain = nf.fuse(models, (x, y), method="kf_linear+kd", kd_epochs=1)
    scored = nf.fuse(models, (x, y), method="kf_linear+kd", importance="activation", kd_epochs=1)
    assert plain.neurofuse_report["labels_used"] is False
    assert scored.neurofuse_report["labels_used"] is True
