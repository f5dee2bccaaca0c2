"""Prediction ensemble: keep every model and average their predictions.

The classic reference point of model fusion (e.g. Lakshminarayanan et al. 2017, "Simple and
scalable predictive uncertainty estimation using deep ensembles"; the neuron-interpolation paper,
section 2, calls it the upper bound of zero-shot fusion). It is not a fusion into one network:
the returned module holds all n members, so its inference cost (time and memory) is n times
that of one model. The soft targets it defines, :func:`ensemble_log_probs`, are also what the
distillation baselines (``kd``, ``lp``, ``transplant``) train towards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurofuse.methods.registry import Capabilities, FusionContext, register_method


def _mean_probs_log(outputs: list[Tensor]) -> Tensor:
    stacked = torch.stack([F.log_softmax(o, dim=-1) for o in outputs])
    return torch.logsumexp(stacked, dim=0) - math.log(len(outputs))


def _mean_logits(outputs: list[Tensor]) -> Tensor:
    return torch.stack(outputs).mean(0)


#: How the members' outputs are combined; each maps the list of member logits to the output.
COMBINE: dict[str, Callable[[list[Tensor]], Tensor]] = {
    "prob": _mean_probs_log,
    "logit": _mean_logits,
}


class Ensemble(nn.Module):
    """An ``nn.Module`` that runs every member and averages their predictions.

    With ``mode="prob"`` the output is ``log((1/n) sum_k softmax(z_k))``, the log of the mean of
    the members' class probabilities (computed stably with ``logsumexp``). These are
    log-probabilities: they can be used like logits, since ``softmax`` of them gives back the
    mean probabilities exactly, ``argmax`` is the ensemble's prediction and
    ``F.cross_entropy(output, y)`` is the ensemble's NLL. With ``mode="logit"`` the output is
    the mean of the members' logits ``(1/n) sum_k z_k``.

    Inference costs one forward pass of every member (n times one model). ``members`` is an
    ``nn.ModuleList``, so ``state_dict``, ``.to(device)``, ``.eval()`` and ``parameters()``
    cover all members.

    Args:
        members: the models, each mapping ``(B, ...)`` to logits ``(B, C)``; they are held as
            given (not copied): pass copies if the originals must stay independent.
        mode: ``"prob"`` or ``"logit"``.
    """

    def __init__(self, members: Sequence[nn.Module], mode: str = "prob") -> None:
        super().__init__()
        if mode not in COMBINE:
            raise ValueError(f"ensemble mode must be one of {sorted(COMBINE)}, got {mode!r}")
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return COMBINE[self.mode]([m(x) for m in self.members])

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, n={len(self.members)}"


@dataclass
class EnsembleOptions:
    """Options of the ``ensemble`` baseline.

    Attributes:
        mode: ``"prob"``: the output is the log of the members' mean softmax probabilities
            (usable as logits: argmax and cross-entropy act on the ensemble's averaged
            probabilities); ``"logit"``: the output is the mean of the members' logits.
    """

    mode: Literal["prob", "logit"] = "prob"

    def __post_init__(self) -> None:
        if self.mode not in COMBINE:
            raise ValueError(f"mode must be one of {sorted(COMBINE)}, got {self.mode!r}")


@register_method(
    "ensemble",
    "Prediction ensemble: averages the members' probabilities or logits (n x inference cost)",
    EnsembleOptions,
    Capabilities(target="none", tied_weights=True, fits_data=False),
)
def ensemble(ctx: FusionContext) -> nn.Module:
    opt: EnsembleOptions = ctx.options
    ctx.report["inference_cost"] = f"{len(ctx.models)} models"
    return Ensemble(ctx.models, mode=opt.mode).eval()


def ensemble_log_probs(models: Sequence[nn.Module], inputs: Tensor, chunk: int = 512) -> Tensor:
    """``log((1/n) sum_k softmax(model_k(x)))`` for every row of ``inputs``, shape ``(B, C)``.

    The soft targets of the distillation baselines; as target *logits* for a KL loss,
    ``softmax(target / T)`` is the ensemble's mean probability sharpened or softened by ``T``
    (exactly the mean probability at ``T = 1``). Computed without gradients, in chunks.
    """
    outs = []
    with torch.no_grad():
        for s in range(0, inputs.shape[0], chunk):
            x = inputs[s : s + chunk]
            outs.append(_mean_probs_log([m(x) for m in models]))
    return torch.cat(outs)
