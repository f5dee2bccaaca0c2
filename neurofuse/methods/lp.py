"""Linear probing: refit only the classifier head of one base model to the ensemble.

Linear probing (Alain & Bengio 2016, "Understanding intermediate layers using linear classifier
probes") trains a linear classifier on frozen features. As a fusion baseline (neuron-interpolation
paper, section 5 and appendix F) the features are those of one base model and the head is fitted
on the fusion set to the ensemble of all base models; the paper notes it is its algorithm with
every level but the head skipped, and that its gradient "Setting 2" mostly acts like LP.

Two fits of the head ``h`` on the penultimate features ``phi(x)`` (every other weight frozen):
- gradient (default): ``min_h T^2 KL(softmax(log p_bar(x) / T) || softmax(h(phi(x)) / T))`` with
  ``p_bar`` the models' mean softmax probabilities (KL to the averaged soft predictions);
- ``closed_form=True``: least squares to the mean logits,
  ``min_h sum_x ||h(phi(x)) - (1/n) sum_k z_k(x)||^2 (+ ridge)``, solved exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.fitting import (
    LeastSquares,
    affine_inputs,
    affine_output_rows,
    fit_gradient,
    set_affine_weights,
)
from neurofuse.graph import AFFINE_TYPES, affine_nodes, trace
from neurofuse.methods.kd import DistillOptions, starting_model, teacher_targets
from neurofuse.methods.registry import Capabilities, FusionContext, register_method
from neurofuse.utils import tensor_attr


@dataclass
class LPOptions(DistillOptions):
    """Options of ``lp`` (plus the training options of :class:`DistillOptions`, used by the
    gradient fit).

    Attributes:
        init_model: index of the base model whose features are probed, or ``None`` for the
            fused template (``nf.fuse(..., target=...)``, default a copy of ``models[0]``).
        head: module name of the head (a Linear or Conv layer, e.g. ``"fc"``); ``None`` finds
            the last affine layer of the model's torch.fx graph.
        closed_form: fit the head by least squares to the mean logits instead of by gradient
            descent on the KL loss (needs the head's output to be the model's output).
        ridge: relative ridge of the least-squares fit (times the mean diagonal of the Gram).
    """

    init_model: int | None = 0
    head: str | None = None
    closed_form: bool = False
    ridge: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


def find_head(
    model: nn.Module,
    name: str | None = None,
    tracer: Callable[[nn.Module], fx.GraphModule] = trace,
) -> tuple[str, nn.Module]:
    """``(name, module)`` of the classifier head: ``name`` if given, else the last affine layer
    (Linear/Conv) that the model's forward calls."""
    if name is None:
        nodes = affine_nodes(tracer(model))
        if not nodes:
            raise ValueError(
                "the model calls no Linear or Conv layer, so it has no head to probe; "
                "give the head's module name with head='...'"
            )
        name = str(nodes[-1].target)
    modules = dict(model.named_modules())
    affine = [n for n, m in modules.items() if isinstance(m, AFFINE_TYPES)]
    if name not in modules:
        raise ValueError(
            f"head={name!r} is not a module of the model; its Linear/Conv modules are: "
            f"{', '.join(affine) or 'none'}"
        )
    if not isinstance(modules[name], AFFINE_TYPES):
        raise ValueError(
            f"head={name!r} is a {type(modules[name]).__name__}, not a Linear or Conv layer; "
            f"choose one of: {', '.join(affine) or 'none'}"
        )
    return name, modules[name]


def head_features(
    model: nn.Module, head: nn.Module, inputs: Tensor, chunk: int = 512
) -> tuple[Tensor, bool]:
    """The head's inputs (the penultimate features) for every row of ``inputs``, and whether
    the head's output *is* the model's output (nothing is computed after it)."""
    feats: list[Tensor] = []
    last = True
    captured: dict[str, Tensor] = {}

    def hook(_mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        captured["in"], captured["out"] = args[0].detach(), out.detach()

    handle = head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in range(0, inputs.shape[0], chunk):
                captured.clear()
                out = model(inputs[s : s + chunk])
                if "in" not in captured:
                    raise ValueError("the head module is not called by the model's forward")
                feats.append(captured["in"])
                last = (
                    last
                    and captured["out"].shape == out.shape
                    and torch.equal(captured["out"], out)
                )
    finally:
        handle.remove()
    return torch.cat(feats), last


def _least_squares_head(
    head: nn.Module, feats: Tensor, targets: Tensor, ridge: float, chunk: int = 1024
) -> float:
    """Fit ``head`` exactly to ``targets`` (its output) by least squares; returns the RMSE."""
    p = affine_inputs(head, feats[:1]).shape[1]
    ls = LeastSquares(
        p, tensor_attr(head, "weight").shape[0], head.bias is not None, feats.device, torch.float64
    )
    for s in range(0, feats.shape[0], chunk):
        ls.add(
            affine_inputs(head, feats[s : s + chunk]),
            affine_output_rows(head, targets[s : s + chunk]),
        )
    w = ls.solve(ridge)
    set_affine_weights(head, w[:p], w[p] if head.bias is not None else None)
    with torch.no_grad():
        return float((head(feats) - targets).pow(2).mean().sqrt())


def _mean_logits(models: list[nn.Module], inputs: Tensor, chunk: int = 512) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                torch.stack([m(inputs[s : s + chunk]) for m in models]).mean(0)
                for s in range(0, inputs.shape[0], chunk)
            ]
        )


@register_method(
    "lp",
    "Linear probing: refit one model's classifier head to the ensemble (KL or least squares)",
    LPOptions,
    Capabilities(tied_weights=True),
)
def lp(ctx: FusionContext) -> nn.Module:
    opt: LPOptions = ctx.options
    model = starting_model(ctx, opt.init_model)
    name, head = find_head(model, opt.head, ctx.trace)
    for p in model.parameters():
        p.requires_grad_(False)
    feats, head_is_output = head_features(model, head, ctx.inputs)
    ctx.report["head"] = name
    if opt.closed_form:
        if not head_is_output:
            raise ValueError(
                f"closed_form=True fits the head {name!r} to the mean logits, but the model "
                "computes something after it; use closed_form=False (the KL fit trains the head "
                "through the rest of the model)"
            )
        mean_logits = _mean_logits(ctx.models, ctx.inputs)
        ctx.report["rmse_to_mean_logits"] = _least_squares_head(head, feats, mean_logits, opt.ridge)
        return model.eval()
    targets = teacher_targets(ctx)
    params = list(head.parameters())
    if head_is_output:  # train the head alone on cached features: no pass through the body
        stats = fit_gradient(
            head, feats, targets, opt.config(), ctx.generator(), progress=_bar(ctx)
        )
    else:
        stats = fit_gradient(
            model, ctx.inputs, targets, opt.config(), ctx.generator(), params, progress=_bar(ctx)
        )
    ctx.report["distillation"] = stats
    return model.eval()


def _bar(ctx: FusionContext) -> str | None:
    return "lp: probe epochs" if ctx.progress else None
