"""Accuracy, negative log-likelihood and calibration error of one model or an ensemble."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.utils import resolve_device

__all__ = [
    "ENSEMBLE_MODES",
    "Metrics",
    "evaluate",
    "evaluate_ensemble",
    "expected_calibration_error",
    "metrics_from_logits",
    "metrics_from_probs",
    "predict_logits",
]


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Classification quality on ``n`` samples.

    Attributes:
        accuracy: fraction of samples whose arg-max prediction equals the label, in [0, 1].
        nll: mean negative log-likelihood of the true label (natural log).
        ece: expected calibration error over equal-width confidence bins, in [0, 1].
        n: number of samples.
    """

    accuracy: float
    nll: float
    ece: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    def canonical(device: torch.device) -> torch.device:
        # A bare "cuda" means the current CUDA device.
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    return canonical(a) == canonical(b)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Run ``model`` on ``x`` in eval mode, in batches, and return float32 logits on the CPU.

    Args:
        model: any module mapping a batch ``(B, ...)`` to logits ``(B, C)``.
        x: inputs ``(N, ...)`` on any device; batches are moved to the compute device.
        batch_size: samples per forward pass (memory, not results, depends on it).
        device: where to compute. ``None`` uses the device of the model's parameters. A
            different device runs a temporary copy there, so ``model`` itself never moves.

    The model's previous ``training`` flags (per module) are restored afterwards, so calling
    this in the middle of training leaves BatchNorm/Dropout behaviour untouched.
    """
    _check_inputs(x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    compute = _model_device(model) if device is None else resolve_device(device)
    runner = model
    if not _same_device(compute, _model_device(model)):
        runner = copy.deepcopy(model).to(compute)
    flags = {module: module.training for module in runner.modules()}
    runner.eval()
    try:
        chunks = [
            runner(batch.to(compute, non_blocking=True)).float().cpu()
            for batch in x.split(batch_size)
        ]
    finally:
        for module, flag in flags.items():
            module.training = flag
    logits = torch.cat(chunks)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"model must return logits of shape (N, num_classes); got {tuple(logits.shape)} "
            f"for {x.shape[0]} inputs"
        )
    return logits


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15
) -> float:
    r"""Expected calibration error with ``n_bins`` equal-width confidence bins.

    .. math::
        \mathrm{ECE} = \sum_{b=1}^{B} \frac{|B_b|}{n} \, \lvert \mathrm{acc}(B_b) -
        \mathrm{conf}(B_b) \rvert
        = \frac{1}{n} \sum_b \Bigl\lvert \sum_{i \in B_b} (\mathbb{1}[\hat y_i = y_i] - p_i)
        \Bigr\rvert

    where bin :math:`B_b` holds the samples whose top-class probability :math:`p_i` lies in
    :math:`((b-1)/B, b/B]` (confidence 0 goes to the first bin). Guo et al. 2017.

    Args:
        confidence: ``(N,)`` top-class probabilities in [0, 1].
        correct: ``(N,)`` booleans (or 0/1), whether the top class is the label.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if confidence.ndim != 1 or confidence.shape != correct.shape or confidence.numel() == 0:
        raise ValueError(
            "confidence and correct must be non-empty 1-D tensors of the same length, got "
            f"{tuple(confidence.shape)} and {tuple(correct.shape)}"
        )
    confidence = confidence.double()
    bins = (confidence * n_bins).ceil().long().sub(1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    gap.index_add_(0, bins, correct.to(confidence) - confidence)
    return float(gap.abs().sum() / confidence.numel())


def _metrics_from_log_probs(log_probs: torch.Tensor, y: torch.Tensor, n_bins: int) -> Metrics:
    y = y.to(log_probs.device)
    confidence, prediction = log_probs.exp().max(dim=1)
    correct = prediction == y
    return Metrics(
        accuracy=float(correct.double().mean()),
        nll=float(-log_probs.gather(1, y[:, None]).double().mean()),
        ece=expected_calibration_error(confidence, correct, n_bins),
        n=int(y.numel()),
    )


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> Metrics:
    """Metrics of predictions given as logits ``(N, C)`` against integer labels ``y`` ``(N,)``.

    NLL is ``F.cross_entropy(logits, y)``, computed through ``log_softmax`` for stability.
    """
    _check_predictions(logits, y, "logits")
    return _metrics_from_log_probs(F.log_softmax(logits.double(), dim=1), y, n_bins)


def metrics_from_probs(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> Metrics:
    """Metrics of predicted class probabilities ``(N, C)`` (rows sum to 1) against labels ``y``.

    Probabilities of exactly 0 are clamped to the smallest positive double before the log,
    so one confidently wrong sample gives a large but finite NLL.
    """
    _check_predictions(probs, y, "probs")
    if (probs < 0).any() or (probs > 1).any():
        raise ValueError("probs must lie in [0, 1]; pass logits to metrics_from_logits instead")
    tiny = torch.finfo(torch.float64).tiny
    return _metrics_from_log_probs(probs.double().clamp_min(tiny).log(), y, n_bins)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    n_bins: int = 15,
) -> Metrics:
    """Accuracy, NLL and ECE of ``model`` on ``(x, y)``; see :func:`predict_logits`."""
    _check_labels(y, x)
    return metrics_from_logits(predict_logits(model, x, batch_size, device), y, n_bins)


def _average_probs(logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    return torch.stack([F.softmax(item.double(), dim=1) for item in logits]).mean(0), True


def _average_logits(logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    return torch.stack([item.double() for item in logits]).mean(0), False


ENSEMBLE_MODES: dict[str, Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, bool]]] = {
    "prob": _average_probs,
    "logit": _average_logits,
}
"""How an ensemble combines its members: mean of softmax probabilities, or mean of logits."""


def evaluate_ensemble(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str = "prob",
    batch_size: int = 512,
    device: str | torch.device | None = None,
    n_bins: int = 15,
) -> Metrics:
    r"""Metrics of the prediction ensemble of ``models`` on ``(x, y)``.

    ``mode="prob"`` scores :math:`\bar p = \frac1M \sum_m \mathrm{softmax}(z_m)`;
    ``mode="logit"`` scores :math:`\mathrm{softmax}(\frac1M \sum_m z_m)`. The ensemble is the
    usual upper bound for fusion, at M times the inference cost.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {sorted(ENSEMBLE_MODES)}")
    models = list(models)
    if not models:
        raise ValueError("evaluate_ensemble needs at least one model")
    _check_labels(y, x)
    logits = [predict_logits(model, x, batch_size, device) for model in models]
    shapes = {tuple(item.shape) for item in logits}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on the output shape: {sorted(shapes)}")
    combined, is_prob = ENSEMBLE_MODES[mode](logits)
    if is_prob:
        return metrics_from_probs(combined, y, n_bins)
    return metrics_from_logits(combined, y, n_bins)


def _check_inputs(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"inputs must have a non-empty batch axis, got shape {tuple(x.shape)}")


def _check_labels(y: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(y).__name__}")
    _check_inputs(x)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per input: got labels {tuple(y.shape)} "
            f"for inputs {tuple(x.shape)}"
        )


def _check_predictions(scores: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if not isinstance(scores, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} and labels must be torch.Tensors")
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(
            f"{what} must have shape (N, num_classes) with N > 0, got {tuple(scores.shape)}"
        )
    if y.ndim != 1 or y.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels must have shape ({scores.shape[0]},) to match {what}, got {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if int(y.min()) < 0 or int(y.max()) >= scores.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {scores.shape[1] - 1}] for {scores.shape[1]} classes, "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )
