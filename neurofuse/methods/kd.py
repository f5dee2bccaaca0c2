"""Multi-teacher knowledge distillation on the fusion set.

Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network"; the multi-teacher
form (the teachers' averaged soft predictions as the target) follows Asif, Tang & Harrer (2019),
"Ensemble knowledge distillation for learning improved and efficient networks". The
neuron-interpolation paper (section 5) notes that KD is its algorithm with the whole model as a
single level. The student minimises, over the fusion-set inputs ``x`` (their labels are not used),

    T^2 * KL( softmax(log p_bar(x) / T) || softmax(student(x) / T) ),
    p_bar(x) = (1/n) sum_k softmax(teacher_k(x)),

with ``T`` the temperature; ``log p_bar`` is passed to the shared gradient fitter as target
logits (see :func:`neurofuse.fitting.fit_gradient`, ``loss="kl"``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neurofuse.fitting import TrainingOptions, fit_gradient
from neurofuse.methods.ensemble import ensemble_log_probs
from neurofuse.methods.registry import Capabilities, FusionContext, register_method


@dataclass
class DistillOptions(TrainingOptions):
    """Training options shared by the distillation baselines (``kd``, ``lp``): those of
    :class:`neurofuse.fitting.TrainingOptions` with its defaults."""


@dataclass
class KDOptions(DistillOptions):
    """Options of ``kd`` (plus the training options of :class:`DistillOptions`).

    Attributes:
        init_model: index of the base model the student starts from (a copy of it), or
            ``None`` for the fused template (``nf.fuse(..., target=...)``, which defaults to a
            copy of ``models[0]``; give a smaller template to compress).
        fresh: re-initialise the student instead: ``reset_parameters()`` on every submodule
            that has one (BatchNorm statistics included), seeded by the fusion ``seed``.
        temperature: the softmax temperature ``T`` (Hinton et al. use values from 1 to 20).
    """

    init_model: int | None = 0
    fresh: bool = False
    temperature: float = 4.0


def check_model_index(index: int | None, n: int, option: str = "init_model") -> None:
    """Raise a ValueError naming the valid range unless ``index`` is ``None`` or in ``0..n-1``."""
    if index is None:
        return
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(
            f"{option}={index!r} is not a model index: give an integer in 0..{n - 1} "
            "(or None for the fused template)"
        )


def starting_model(ctx: FusionContext, index: int | None) -> nn.Module:
    """A private copy of ``ctx.models[index]``, or the fused template when ``index`` is None."""
    check_model_index(index, len(ctx.models))
    if index is not None and ctx.target_given:
        raise ValueError(
            f"target= is given but init_model={index} starts from models[{index}] and would "
            "ignore it; pass init_model=None to start from the target"
        )
    return ctx.target if index is None else copy.deepcopy(ctx.models[index])


def reinitialise_(model: nn.Module, seed: int) -> nn.Module:
    """Call ``reset_parameters()`` on every submodule that has one, with the CPU random
    generator seeded by ``seed``; in place, returns ``model``.

    The new values are drawn on a CPU copy and loaded back, so the result is the same on any
    device and no global random state changes (the CPU generator's state is restored)."""
    cpu = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for module in cpu.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    model.load_state_dict(cpu.state_dict())
    return model


def teacher_targets(ctx: FusionContext) -> Tensor:
    """``log`` of the base models' mean softmax probabilities on the fusion inputs."""
    return ensemble_log_probs(ctx.models, ctx.inputs)


@register_method(
    "kd",
    "Knowledge distillation (multi-teacher): train a student to the models' mean soft predictions",
    KDOptions,
    Capabilities(single_model=True, tied_weights=True),
)
def kd(ctx: FusionContext) -> nn.Module:
    opt: KDOptions = ctx.options
    student = starting_model(ctx, opt.init_model)
    if opt.fresh:
        reinitialise_(student, ctx.seed)
    targets = teacher_targets(ctx)
    stats = fit_gradient(
        student,
        ctx.inputs,
        targets,
        opt.config(),
        ctx.generator(),
        progress="kd: distillation epochs" if ctx.progress else None,
    )
    ctx.report["distillation"] = stats
    ctx.report["labels_used"] = False
    return student.eval()
