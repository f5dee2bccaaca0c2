"""Training after fusion: fine-tuning on labels, or distilling the base models into the fused one.

One function, :func:`finetune`, serves both uses the neuron-interpolation paper and its critics
ask for:

- **plain fine-tuning** (``teachers=None``): cross-entropy on the labels of ``data``, as in the
  paper's full-dataset setup (Tables 4, 14, 16), where fused models are fine-tuned on the
  users' data;
- **fuse-then-distill** (``teachers=models``): the fused model is the student of the base
  models' *probability* ensemble, ``log((1/n) sum_k softmax(model_k(x)))``, on the fusion set
  alone (its labels unused), so the setting stays one-shot. The closed-form fit reproduces the
  models' averaged *logits*, in which a model that never learned a class vetoes it; the
  probability ensemble lets the model that knows the class speak, and distilling it moves the
  fused model towards it.

The fusion set holds only some classes in the hard regimes (sharded splits: the owner's), and
an unconstrained student forgets the rest: nothing in the loss sees them. Training is
therefore *anchored* to the starting weights, as in L2-SP (Li, Grandvalet & Davoine 2018,
"Explicit inductive bias for transfer learning with convolutional networks"): the loss adds
``anchor * sum ||theta - theta_0||^2 / sum ||theta_0||^2``, a penalty on the relative drift of
all trained parameters, and early stopping on a held-out part of ``data`` keeps the best
weights (the starting ones included: training that only makes the held-out loss worse returns
the model unchanged).

``fuse(..., method="kf_linear+kd")`` (and ``hf_linear+kd``, ``kf_gradient+kd``,
``hf_gradient+kd``) runs the fusion method and then this distillation, with the distillation's
options prefixed ``kd_`` (``kd_epochs=...``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from neurofuse.checks import integer, number
from neurofuse.fitting import TrainingOptions, fit_gradient

#: Inputs synthesised per missing class by ``synthetic="auto"`` (where it synthesises).
SYNTHETIC_PER_CLASS = 40


def synthetic_per_class(setting: int | str, teachers: list[nn.Module], inputs: Tensor) -> int:
    """How many inputs :func:`finetune` synthesises per missing class: ``setting`` itself, or
    for ``"auto"`` :data:`SYNTHETIC_PER_CLASS` when every teacher has BatchNorm layers with
    running statistics and ``inputs`` are floating point, else 0."""
    if setting != "auto":
        return int(setting)
    from neurofuse.data.inversion import has_batch_norm

    wanted = inputs.is_floating_point() and has_batch_norm(teachers)
    return SYNTHETIC_PER_CLASS if wanted else 0


@dataclass
class FinetuneOptions(TrainingOptions):
    """Options of :func:`finetune` (``kd_``-prefixed in the ``+kd`` methods): those of
    :class:`neurofuse.fitting.TrainingOptions` with fine-tuning's defaults (few epochs, a small
    learning rate: the start is already a good model; no weight decay: ``anchor`` pulls towards
    the start instead), and:

    Attributes:
        anchor: strength of the L2-SP penalty on the relative drift from the starting weights;
            0 trains freely.
        mixup: distillation only: copies of the inputs made of random convex combinations of
            two of them (mixup, Zhang et al. 2018), added to the distillation set with the
            teachers' predictions on them as targets. They lie off the fusion set's
            distribution, where the teachers that know other classes speak; without them,
            distillation on a fusion set of a few classes forgets the others (REPORT.md,
            claim 9, measures both).
        synthetic: distillation only: inputs synthesised from the teachers for each class the
            data does not show (absent from its labels, or, without labels, never the
            teachers' ensemble's top class on it), added to the distillation set with the
            teachers' predictions on them as targets: DeepInversion
            (:func:`neurofuse.data.inversion.synthesise`; with a BatchNorm-statistics prior
            when the teachers have BatchNorm). An integer: that many per missing class (0:
            none). ``"auto"`` (default): :data:`SYNTHETIC_PER_CLASS` per missing class when
            every teacher has BatchNorm layers with running statistics and the inputs are
            floating point, none otherwise; where the data shows every class nothing is
            synthesised either way. The rule follows where the inversions look like data:
            the BatchNorm prior pulls them towards the statistics of the teachers' training
            data, and with it they lifted ``kf_linear+kd`` on VGG-small with BatchNorm in 9 of
            10 sharded-4 / 6 cells (5.2 points on average, seeds 0-4); without BatchNorm the
            inversions are whatever excites a class, and they moved VGG-small by -5.3 to +8.5
            (1.7 on average) and cost MLPs 3-4 points (``benchmarks/results/class_probes``
            and ``class_probes_seeds34``). Costs 100 forward and backward passes of every
            teacher per missing class.
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: int = 30
    patience: int = 5
    temperature: float = 4.0
    anchor: float = 1.0
    mixup: int = 2
    synthetic: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        number("anchor", self.anchor, at_least=0)
        self.mixup = integer("mixup", self.mixup, 0)
        if self.synthetic != "auto":
            self.synthetic = integer(
                "synthetic", self.synthetic, 0, requirement="an integer >= 0 or 'auto'"
            )


def mixup_inputs(x: Tensor, copies: int, seed: int) -> Tensor:
    """``x`` followed by ``copies`` sets of random convex combinations ``l x_i + (1 - l) x_j``
    of two of its rows (``l ~ U(0, 1)``, ``j`` a seeded random permutation)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = [x]
    for _ in range(copies):
        j = torch.randperm(len(x), generator=g).to(x.device)
        lam = torch.rand(len(x), *[1] * (x.dim() - 1), generator=g).to(x)
        out.append(lam * x + (1 - lam) * x[j])
    return torch.cat(out)


def drift_penalty(model: nn.Module, strength: float) -> Any:
    """``strength * sum ||p - p_0||^2 / sum ||p_0||^2`` over ``model``'s parameters, ``p_0``
    their values now; ``None`` for strength 0."""
    if strength == 0:
        return None
    params = [p for p in model.parameters()]
    start = [p.detach().clone() for p in params]
    norm = float(sum(float((s * s).sum()) for s in start)) or 1.0

    def penalty() -> Tensor | float:  # a float only for a model without parameters
        total = sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
        return strength * total / norm

    return penalty


def finetune(
    model: nn.Module,
    data: Any,
    teachers: list[nn.Module] | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """A fine-tuned copy of ``model`` (never modified; nor are the teachers).

    Args:
        model: the starting model (typically a fused one).
        data: inputs, an ``(inputs, labels)`` pair, a ``Dataset`` or a ``DataLoader`` (as for
            :func:`neurofuse.fuse`). Labels are needed without ``teachers`` and unused with.
        teachers: ``None`` for cross-entropy on the labels; else the models whose mean softmax
            probabilities the copy is distilled towards on ``data``'s inputs.
        seed: seeds the held-out split and the batch order (same seed, same weights).
        device: where to train; default the data's device.
        progress: show a bar of epochs on stderr.
        **options: :class:`FinetuneOptions` fields.

    Returns:
        The trained copy in eval mode, with ``neurofuse_report["finetune"]`` (options and
        losses) added to the starting model's report.
    """
    from neurofuse.api import _check_labels, as_fusion_data
    from neurofuse.methods.ensemble import ensemble_log_probs

    names = [f.name for f in dataclasses.fields(FinetuneOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown finetune option(s) {unknown}; valid options: {', '.join(names)}")
    opt = FinetuneOptions(**options)
    x, y = as_fusion_data(data)
    dev = torch.device(device) if device is not None else x.device
    x = x.to(dev)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    student = copy.deepcopy(model).to(dev).eval()
    with torch.no_grad():
        classes = int(student(x[:1]).shape[-1])
    if y is not None:  # whole class indices in range, one per sample
        y = _check_labels(y, classes)
    lacking: list[int] = []
    per_class = 0
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    if teachers is None:
        if opt.synthetic != "auto" and opt.synthetic:
            raise ValueError(
                "synthetic inputs are made by the teachers and distilled from them: pass "
                "teachers=models, or synthetic=0 to fine-tune on the labels"
            )
        if y is None:
            raise ValueError(
                "fine-tuning without teachers trains on labels: give data as (inputs, labels), "
                "or pass teachers=models to distil them instead"
            )
        targets = y.to(dev)
    else:
        if isinstance(teachers, nn.Module):  # (an nn.Sequential would iterate its layers)
            raise TypeError("teachers must be a list of models; for one teacher pass [model]")
        if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
            raise TypeError("teachers must be a non-empty list of nn.Module (or None)")
        copies = [copy.deepcopy(t).to(dev).eval() for t in teachers]
        with torch.no_grad():
            for i, t in enumerate(copies):
                own = int(t(x[:1]).shape[-1])
                if own != classes:
                    raise ValueError(
                        f"teacher {i} has {own} output classes, the model {classes}; distil "
                        "teachers with the model's classes"
                    )
        per_class = synthetic_per_class(opt.synthetic, copies, x)
        if per_class:
            from neurofuse.data.inversion import missing_classes, synthesise

            lacking = missing_classes(copies, x, None if y is None else y.to(dev))
            if lacking:
                x = torch.cat([x, synthesise(copies, x, lacking, per_class, seed=seed)])
        x = mixup_inputs(x, opt.mixup, seed)
        targets = ensemble_log_probs(copies, x)
    gen = torch.Generator().manual_seed(seed)
    stats = fit_gradient(
        student,
        x,
        targets,
        opt.config("kl" if teachers is not None else "ce"),
        gen,
        penalty=drift_penalty(student, float(opt.anchor)),
        progress="fine-tuning epochs" if progress else None,
    )
    for name, p in student.named_parameters():
        p.requires_grad_(flags[name])
    report = dict(getattr(model, "neurofuse_report", {}) or {})
    report["finetune"] = {
        "mode": "labels" if teachers is None else f"distill {len(teachers)} teachers",
        "options": dataclasses.asdict(opt),
        **({"synthesised_for": lacking, "synthesised_per_class": per_class} if per_class else {}),
        **stats,
    }
    # torch's stub of Module.__setattr__ admits only a Tensor or a Module; any value is stored
    student.neurofuse_report = report  # type: ignore[assignment]
    return student.eval()


__all__ = [
    "SYNTHETIC_PER_CLASS",
    "FinetuneOptions",
    "finetune",
    "mixup_inputs",
    "synthetic_per_class",
]
