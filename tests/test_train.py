"""Training loop: learns, follows its schedule, is reproducible, keeps the best epoch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.evaluate import evaluate
from neurofuse.train import (
    TrainConfig,
    _stratified_holdout,
    build_optimizer,
    build_scheduler,
    train_model,
    train_models,
)
from neurofuse.utils import resolve_device


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from intra-op threads, and lose a lot on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rings(n: int, seed: int, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two concentric noisy rings in 2-D, lifted to ``dim`` features by a fixed tanh map.

    No linear classifier separates them (they share a centre); a small MLP does.
    """
    g = torch.Generator().manual_seed(seed)
    lift = torch.randn(2, dim, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, 2, (n,), generator=g)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    radius = 1.0 + y + 0.25 * torch.randn(n, generator=g)
    z = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    x = torch.tanh(z @ lift / 2) + 0.05 * torch.randn(n, dim, generator=g)
    return x, y


def mlp(dim: int = 16, classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))


def quick(**overrides) -> TrainConfig:
    settings = dict(epochs=20, batch_size=64, lr=3e-3, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_mlp_learns_nonlinear_task_and_leaves_data_untouched():
    x, y = rings(600, seed=0)
    x_test, y_test = rings(2000, seed=1)
    x_copy, y_copy = x.clone(), y.clone()
    model = mlp()
    result = train_model(model, x, y, quick())

    assert evaluate(model, x_test, y_test).accuracy > 0.85
    linear = nn.Linear(16, 2)
    train_model(linear, x, y, quick(lr=3e-2))
    assert evaluate(linear, x_test, y_test).accuracy < 0.7  # the task really needs the MLP
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy)
    assert result.num_train + result.num_val == 600
    assert abs(result.num_val - 60) <= 1
    assert [h.epoch for h in result.history] == list(range(1, 21))
    assert all(h.val_accuracy is not None and h.train_loss > 0 for h in result.history)
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_stratified_holdout_keeps_class_shares_and_is_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = _stratified_holdout(y, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    assert torch.bincount(y[val]).tolist() == [10, 6, 4]
    again = _stratified_holdout(y, 0.2, torch.Generator().manual_seed(3))[1]
    other = _stratified_holdout(y, 0.2, torch.Generator().manual_seed(4))[1]
    assert torch.equal(val, again) and not torch.equal(val, other)


def test_schedule_warms_up_linearly_then_decays_to_min_lr():
    config = TrainConfig(lr=0.1, min_lr=0.001, epochs=10, warmup_epochs=2, progress=False)
    steps_per_epoch = 5
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for _ in range(config.epochs * steps_per_epoch):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    warmup = 2 * steps_per_epoch
    expected_warmup = [config.lr * (k + 1) / warmup for k in range(warmup)]
    assert lrs[:warmup] == pytest.approx(expected_warmup)
    decay = lrs[warmup:]
    assert decay[0] == pytest.approx(config.lr)
    assert all(a >= b for a, b in zip(decay[:-1], decay[1:], strict=True))
    half = warmup + (len(lrs) - warmup) // 2  # cosine midpoint: halfway between lr and min_lr
    assert lrs[half] == pytest.approx((config.lr + config.min_lr) / 2)
    assert scheduler.get_last_lr()[0] == pytest.approx(config.min_lr)
    assert min(lrs) > config.min_lr


def test_history_records_the_scheduled_learning_rate():
    x, y = rings(200, seed=0)
    config = quick(epochs=4, warmup_epochs=1, min_lr=1e-5, batch_size=50, val_fraction=0.0)
    result = train_model(mlp(), x, y, config)
    lrs = [h.lr for h in result.history]
    assert lrs[0] == pytest.approx(config.lr)  # last warm-up step reaches the peak
    assert lrs[1] > lrs[2] > lrs[3] > config.min_lr


def noisy(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.05 * torch.randn(x.shape, generator=generator)


def test_same_seed_gives_identical_weights_and_other_seed_does_not():
    x, y = rings(300, seed=0)
    runs = []
    for seed in (7, 7, 8):
        model = mlp(seed=0)
        train_model(model, x, y, quick(epochs=3, seed=seed, augment=noisy))
        runs.append(model.state_dict())
    same = [torch.equal(runs[0][k], runs[1][k]) for k in runs[0]]
    different = [torch.equal(runs[0][k], runs[2][k]) for k in runs[0]]
    assert all(same)
    assert not all(different)


def test_best_validation_weights_are_restored():
    x, y = rings(400, seed=0)
    # Validation labels are the opposite of the truth, so validation accuracy falls as the
    # model learns: the best epoch is early and the final weights are worse than it.
    x_val, y_val = x[:100], 1 - y[:100]
    model = mlp()
    result = train_model(model, x, y, quick(epochs=12), x_val=x_val, y_val=y_val)
    accs = [h.val_accuracy for h in result.history]
    assert result.best_val_accuracy == max(accs)
    assert result.best_epoch == accs.index(max(accs)) + 1
    assert result.best_epoch < 12 and accs[-1] < result.best_val_accuracy
    assert evaluate(model, x_val, y_val).accuracy == pytest.approx(result.best_val_accuracy)
    assert result.num_val == 100 and result.num_train == 400


def test_without_validation_the_last_epoch_is_kept():
    x, y = rings(200, seed=0)
    result = train_model(mlp(), x, y, quick(epochs=3, val_fraction=0.0))
    assert result.best_epoch == 3 and result.best_val_accuracy is None
    assert result.num_val == 0 and all(h.val_accuracy is None for h in result.history)


def _reference_cutmix(x, y, alpha, num_classes, generator):
    """Minimal CutMix used only when neurofuse.data.augment is not there yet."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), generator=generator)
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    mixed = x.clone()
    mixed[..., :ch, :cw] = x[perm][..., :ch, :cw]
    keep = 1 - ch * cw / (h * w)
    soft = F.one_hot(y, num_classes).float()
    return mixed, keep * soft + (1 - keep) * soft[perm]


def test_cutmix_and_augment_paths_run(monkeypatch):
    import neurofuse.train as train_module

    try:
        from neurofuse.data.augment import cutmix
    except ImportError:
        cutmix = _reference_cutmix
    calls = {"cutmix": 0, "augment": 0}

    def counting_cutmix(x, y, alpha, num_classes, generator):
        calls["cutmix"] += 1
        assert isinstance(generator, torch.Generator) and num_classes == 3
        mixed, soft = cutmix(x, y, alpha, num_classes, generator)
        assert soft.shape == (len(x), 3)
        return mixed, soft

    def counting_augment(x, generator):
        calls["augment"] += 1
        return noisy(x, generator)

    monkeypatch.setattr(train_module, "_load_cutmix", lambda: counting_cutmix)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.arange(96) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    config = quick(
        epochs=2, batch_size=32, cutmix_alpha=1.0, cutmix_prob=1.0, augment=counting_augment
    )
    result = train_model(model, x, y, config, num_classes=3, x_val=x[:12], y_val=y[:12])
    assert calls == {"cutmix": 6, "augment": 6}
    assert all(math.isfinite(h.train_loss) for h in result.history)


def test_batchnorm_model_survives_a_trailing_single_sample_batch():
    x, y = rings(129, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    result = train_model(model, x, y, quick(epochs=1, batch_size=64, val_fraction=0.0))
    assert math.isfinite(result.history[0].train_loss)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "message"),
    [
        (torch.empty(0, 4), torch.empty(0, dtype=torch.long), {}, "empty"),
        (torch.randn(10, 4), torch.zeros(9, dtype=torch.long), {}, "one label per row"),
        (torch.randn(10, 4), torch.full((10,), 2), {"num_classes": 2}, r"\[0, 1\]"),
        (torch.randn(10, 4), torch.full((10,), -1), {}, "labels must lie"),
        (torch.randn(10, 4), torch.zeros(10), {}, "integer class indices"),
        (
            torch.randn(10, 4),
            torch.zeros(10, dtype=torch.long),
            {"x_val": torch.randn(2, 4)},
            "both",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_model(nn.Linear(4, 2), x, y, quick(epochs=1), **kwargs)


def test_bad_config_and_model_mismatch_raise():
    with pytest.raises(ValueError, match="adamw"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    x, y = torch.randn(20, 4), torch.arange(20) % 3
    with pytest.raises(ValueError, match="num_classes=3"):
        train_model(nn.Linear(4, 2), x, y, quick(epochs=1, val_fraction=0.0))
    with pytest.raises(ValueError, match="empty validation"):
        train_model(nn.Linear(4, 3), x[:3], y[:3], quick(epochs=1, val_fraction=0.1))


def test_training_and_fusion_fits_share_one_table_of_optimizers():
    """Every optimizer name the gradient fits accept also trains base models, built alike."""
    import neurofuse.fitting
    import neurofuse.train
    from neurofuse.optimizers import OPTIMIZERS

    assert set(OPTIMIZERS) == {"adam", "adamw", "sgd"}
    assert not hasattr(neurofuse.train, "OPTIMIZERS") or neurofuse.train.OPTIMIZERS is OPTIMIZERS
    assert not hasattr(neurofuse.fitting, "OPTIMIZERS")
    model = nn.Linear(4, 2)
    for name, cls in OPTIMIZERS.items():
        config = TrainConfig(optimizer=name, lr=0.01, weight_decay=0.1, momentum=0.5)
        opt = build_optimizer(model, config)
        assert type(opt) is cls and opt.defaults["weight_decay"] == 0.1
        assert opt.defaults.get("momentum", 0.5) == 0.5


def test_train_models_trains_one_reproducible_model_per_part():
    x, y = rings(300, seed=0)
    parts = [torch.arange(0, 150), torch.arange(150, 300)]
    built = []

    def build(i: int) -> nn.Module:
        built.append(i)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

    rng_before = torch.random.get_rng_state()
    first = train_models(build, x, y, parts, quick(epochs=2))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    second = train_models(build, x, y, parts, quick(epochs=2))
    assert built == [0, 1, 0, 1]
    for (model_a, result), (model_b, _), part in zip(first, second, parts, strict=True):
        assert result.num_train + result.num_val == len(part)
        assert all(
            torch.equal(a, b)
            for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True)
        )
    w0, w1 = (m[0].weight for m, _ in first)
    assert not torch.equal(w0, w1)  # seeds seed+i differ, so do the models
    with pytest.raises(ValueError, match=r"parts\[1\]"):
        train_models(build, x, y, [parts[0], torch.tensor([0, 300])], quick(epochs=1))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="auto"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
