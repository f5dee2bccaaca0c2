"""Metrics of single models and ensembles: accuracy, NLL, ECE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.evaluate import (
    Metrics,
    evaluate,
    evaluate_ensemble,
    expected_calibration_error,
    metrics_from_logits,
    metrics_from_probs,
    predict_logits,
)


def two_class_probs(confidence: float, n: int, n_correct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples predicting class 0 with ``confidence``; the first ``n_correct`` are right."""
    probs = torch.tensor([[confidence, 1 - confidence]], dtype=torch.float64).repeat(n, 1)
    labels = torch.tensor([0] * n_correct + [1] * (n - n_correct))
    return probs, labels


def test_accuracy_on_hand_made_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2, 0, 2])  # predictions 0, 1, 0, 2: three of four right
    metrics = metrics_from_logits(logits, labels)
    assert metrics.accuracy == pytest.approx(0.75)
    assert metrics.n == 4


def test_nll_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    expected = F.cross_entropy(logits.double(), labels).item()
    assert metrics_from_logits(logits, labels).nll == pytest.approx(expected, rel=1e-12)
    from_probs = metrics_from_probs(F.softmax(logits.double(), dim=1), labels)
    assert from_probs.nll == pytest.approx(expected, rel=1e-9)
    assert from_probs.accuracy == metrics_from_logits(logits, labels).accuracy


def test_ece_of_calibrated_predictions_is_zero():
    # 60% confident and right 3 of 5 times; 90% confident and right 9 of 10 times.
    p1, y1 = two_class_probs(0.6, 5, 3)
    p2, y2 = two_class_probs(0.9, 10, 9)
    metrics = metrics_from_probs(torch.cat([p1, p2]), torch.cat([y1, y2]))
    assert metrics.ece == pytest.approx(0.0, abs=1e-12)
    assert metrics.accuracy == pytest.approx(12 / 15)


def test_ece_of_overconfident_wrong_predictions_is_large():
    probs, labels = two_class_probs(0.99, 20, 0)
    assert metrics_from_probs(probs, labels).ece == pytest.approx(0.99)


def test_ece_weights_each_bin_by_its_share_of_samples():
    # Bin (0.6, 0.667]: 4 samples, accuracy 1/4, confidence 0.65 -> gap 0.4.
    # Bin (0.933, 1]:   1 sample, accuracy 1, confidence 0.95 -> gap 0.05.
    confidence = torch.tensor([0.65, 0.65, 0.65, 0.65, 0.95])
    correct = torch.tensor([True, False, False, False, True])
    expected = 4 / 5 * 0.4 + 1 / 5 * 0.05
    assert expected_calibration_error(confidence, correct, n_bins=15) == pytest.approx(expected)
    # With one bin the gaps cancel: |mean(correct) - mean(confidence)|.
    one_bin = abs(correct.double().mean() - confidence.double().mean()).item()
    assert expected_calibration_error(confidence, correct, n_bins=1) == pytest.approx(one_bin)


def test_ece_bin_edges_are_right_closed():
    # With 4 bins, confidence 0.5 belongs to (0.25, 0.5] together with 0.3, so their gaps
    # partly cancel: |1 - 0.8| / 2. A left-closed bin [0.5, 0.75) would give (0.5 + 0.3) / 2.
    confidence = torch.tensor([0.5, 0.3], dtype=torch.float64)
    correct = torch.tensor([True, False])
    assert expected_calibration_error(confidence, correct, n_bins=4) == pytest.approx(0.1)
    # Confidence 0 and 1 fall into the first and last bins, perfectly calibrated.
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) == 0


def model_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    return nn.Linear(6, 4), nn.Linear(6, 4)


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_ensemble_of_identical_models_equals_the_model(mode):
    model, _ = model_pair()
    x, y = data()
    single = evaluate(model, x, y)
    ensemble = evaluate_ensemble([model, model, model], x, y, mode=mode)
    assert ensemble.accuracy == single.accuracy
    assert ensemble.nll == pytest.approx(single.nll, rel=1e-9)
    assert ensemble.ece == pytest.approx(single.ece, abs=1e-9)


def test_ensemble_averages_probabilities_or_logits():
    a, b = model_pair()
    x, y = data()
    with torch.no_grad():
        za, zb = a(x).double(), b(x).double()
    manual_prob = metrics_from_probs((F.softmax(za, 1) + F.softmax(zb, 1)) / 2, y)
    manual_logit = metrics_from_logits((za + zb) / 2, y)
    by_prob = evaluate_ensemble([a, b], x, y, mode="prob")
    by_logit = evaluate_ensemble([a, b], x, y, mode="logit")
    assert by_prob.to_dict() == pytest.approx(manual_prob.to_dict())
    assert by_logit.to_dict() == pytest.approx(manual_logit.to_dict())
    assert by_prob.nll != pytest.approx(by_logit.nll)  # the two modes really differ


def test_predict_logits_batches_and_restores_training_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    x, _ = data(10)
    flags = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    full = predict_logits(model, x)
    batched = predict_logits(model, x, batch_size=3)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[1].running_mean, stats)  # eval mode: BN statistics untouched
    assert torch.allclose(full, batched, atol=1e-6)  # dropout off, so batching changes nothing
    assert full.dtype == torch.float32 and full.device.type == "cpu"


def test_metrics_to_dict():
    metrics = Metrics(accuracy=0.5, nll=1.0, ece=0.1, n=10)
    assert metrics.to_dict() == {"accuracy": 0.5, "nll": 1.0, "ece": 0.1, "n": 10}


def test_bad_inputs_raise_clear_errors():
    model, _ = model_pair()
    x, y = data(8)
    with pytest.raises(ValueError, match="prob"):
        evaluate_ensemble([model], x, y, mode="median")
    with pytest.raises(ValueError, match="at least one model"):
        evaluate_ensemble([], x, y)
    with pytest.raises(ValueError, match="one entry per input"):
        evaluate(model, x, y[:5])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        evaluate(model, x, y + 4)
    with pytest.raises(ValueError, match="integer"):
        metrics_from_logits(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="logits"):
        metrics_from_probs(torch.full((2, 2), 2.0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.ones(2), torch.ones(2), n_bins=0)
