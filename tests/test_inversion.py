"""Inputs synthesised from trained models (neurofuse.data.inversion) and their use by
``finetune``."""

from __future__ import annotations

import pytest
import torch
from toys import cnn_bn, mlp, train

from neurofuse.data.inversion import has_batch_norm, missing_classes, synthesise
from neurofuse.methods.ensemble import ensemble_log_probs


@pytest.fixture(scope="module")
def image_models():
    """Two small BatchNorm CNNs on 8x8 images of 3 classes (a bright square per class)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    x = 0.5 * torch.randn(600, 1, 8, 8, generator=g)
    for c, (r, col) in enumerate(((0, 0), (0, 4), (4, 2))):
        x[y == c, :, r : r + 4, col : col + 4] += 2.0
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = train(cnn_bn(3), x[:400], y[:400], epochs=8, seed=seed)
        for p in model.parameters():
            p.grad = None  # training leaves the last step's; synthesis must add none
        models.append(model)
    return models, x[400:], y[400:]


def _snapshot(models):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def test_synthesised_inputs_are_named_by_the_models_and_change_nothing(image_models):
    models, x, _ = image_models
    before = _snapshot(models)
    made = synthesise(models, x[:64], [0, 1, 2], per_class=8, steps=60, seed=3)
    assert made.shape == (24, 1, 8, 8)
    assert float(made.min()) >= float(x[:64].min()) and float(made.max()) <= float(x[:64].max())
    top = ensemble_log_probs(models, made).argmax(-1)
    assert float((top == torch.arange(3).repeat_interleave(8)).float().mean()) >= 0.9
    for m, state in zip(models, before, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
        assert all(p.grad is None for p in m.parameters())
        assert not any(mod._forward_hooks for mod in m.modules())
    again = synthesise(models, x[:64], [0, 1, 2], per_class=8, steps=60, seed=3)
    other = synthesise(models, x[:64], [0, 1, 2], per_class=8, steps=60, seed=4)
    assert torch.equal(made, again) and not torch.equal(made, other)
    assert synthesise(models, x[:64], [], per_class=8).shape == (0, 1, 8, 8)


def test_the_batchnorm_prior_matches_the_stored_statistics(image_models):
    models, x, _ = image_models
    assert has_batch_norm(models)
    bn = models[0][1]  # the first BatchNorm layer, after the first convolution

    def gap(inputs: torch.Tensor) -> float:
        with torch.no_grad():
            a = models[0][0](inputs)
        mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
        return float(((mean - bn.running_mean) ** 2).sum() + ((var - bn.running_var) ** 2).sum())

    free = synthesise(models, x[:64], [0, 1, 2], per_class=16, steps=80, bn=0.0, seed=1)
    held = synthesise(models, x[:64], [0, 1, 2], per_class=16, steps=80, bn=1.0, seed=1)
    assert gap(held) < 0.5 * gap(free)


def test_missing_classes_from_labels_or_from_the_ensemble(image_models):
    models, x, y = image_models
    two = (y == 0) | (y == 2)
    assert missing_classes(models, x[two], y[two]) == [1]
    assert missing_classes(models, x[two]) == [1]  # the models name only classes 0 and 2 there
    assert missing_classes(models, x, y) == []


def test_synthesis_refuses_what_it_cannot_do(image_models):
    models, x, _ = image_models
    with pytest.raises(ValueError, match="floating point"):
        synthesise(models, x.long(), [0], per_class=2)
    with pytest.raises(ValueError, match="per_class"):
        synthesise(models, x, [0], per_class=0)
    with pytest.raises(ValueError, match="steps"):
        synthesise(models, x, [0], per_class=2, steps=0)


def test_finetune_synthesises_by_default_for_batchnorm_teachers_only(image_models):
    """``synthetic="auto"`` (the default): ``SYNTHETIC_PER_CLASS`` inputs per missing class
    for BatchNorm teachers, none for teachers without BatchNorm, none where every class is
    shown; an explicit count overrides it."""
    import neurofuse as nf
    from neurofuse.finetuning import SYNTHETIC_PER_CLASS, synthetic_per_class

    models, x, y = image_models
    two = (y == 0) | (y == 2)
    start = models[0]
    tuned = nf.finetune(start, (x[two], y[two]), teachers=models, epochs=1, seed=0)
    report = tuned.neurofuse_report["finetune"]
    assert report["synthesised_for"] == [1]
    assert report["synthesised_per_class"] == SYNTHETIC_PER_CLASS
    off = nf.finetune(start, (x[two], y[two]), teachers=models, epochs=1, seed=0, synthetic=0)
    assert "synthesised_for" not in off.neurofuse_report["finetune"]
    assert any(not torch.equal(v, off.state_dict()[k]) for k, v in tuned.state_dict().items())
    shown = nf.finetune(start, (x, y), teachers=models, epochs=1, seed=0)
    assert shown.neurofuse_report["finetune"]["synthesised_for"] == []
    plain = [mlp(64, (16,), 3), mlp(64, (16,), 3)]
    flat = x.flatten(1)
    assert synthetic_per_class("auto", plain, flat) == 0
    assert synthetic_per_class("auto", models, x) == SYNTHETIC_PER_CLASS
    assert synthetic_per_class("auto", models, x.long()) == 0  # token ids: no gradient steps
    assert synthetic_per_class(7, plain, flat) == 7
    with pytest.raises(ValueError, match="synthetic must be"):
        nf.finetune(start, x, teachers=models, synthetic="always")


def test_distilled_fusion_synthesises_by_default_for_batchnorm_models(image_models):
    """The ``+kd`` methods carry the default through ``kd_synthetic``: without labels in the
    distillation, the class the ensemble never names on the fusion set gets inputs."""
    import neurofuse as nf
    from neurofuse.finetuning import SYNTHETIC_PER_CLASS

    models, x, y = image_models
    two = (y == 0) | (y == 2)
    fused = nf.fuse(models, (x[two], y[two]), method="kf_linear+kd", kd_epochs=1, seed=0)
    report = fused.neurofuse_report["distillation"]
    assert report["synthesised_for"] == [1]
    assert report["synthesised_per_class"] == SYNTHETIC_PER_CLASS
    off = nf.fuse(models, (x[two], y[two]), method="kf_linear+kd", kd_epochs=1, kd_synthetic=0)
    assert "synthesised_for" not in off.neurofuse_report["distillation"]
