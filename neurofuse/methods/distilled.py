"""Fuse-then-distill: ``<method>+kd`` runs a fusion method, then distils the base models'
probability ensemble into the fused model on the fusion set, anchored to the fitted weights
(:func:`neurofuse.finetuning.finetune`). One-shot like the method itself: no data beyond the
fusion set, whose labels are not used by the distillation.

The options are the fusion method's own plus :class:`neurofuse.finetuning.FinetuneOptions`
prefixed ``kd_`` (``kd_epochs``, ``kd_anchor``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from torch import nn

from neurofuse.finetuning import FinetuneOptions, finetune
from neurofuse.methods.registry import (
    Capabilities,
    FusionContext,
    get_method,
    option_types,
    register,
)

PREFIX = "kd_"


def _combined_options(base: type, name: str) -> type:
    """A dataclass with ``base``'s fields and every FinetuneOptions field prefixed ``kd_``."""
    types = option_types(FinetuneOptions)
    extra = [
        (
            PREFIX + f.name,
            types[f.name],  # resolved: the new class's module cannot resolve the name
            dataclasses.field(default=f.default),
        )
        for f in dataclasses.fields(FinetuneOptions)
    ]

    def post_init(self: Any) -> None:
        base_post = getattr(base, "__post_init__", None)
        if base_post is not None:
            base_post(self)
        distill_options(self)  # validates the kd_ fields

    cls = dataclasses.make_dataclass(name, extra, bases=(base,), namespace={})
    cls.__post_init__ = post_init  # type: ignore[attr-defined]
    cls.__option_sources__ = ((base, ""), (FinetuneOptions, PREFIX))  # type: ignore[attr-defined]
    cls.__doc__ = (
        f"Options of the fusion method ({base.__name__}) and, prefixed ``kd_``, of the "
        "distillation after it (:class:`neurofuse.finetuning.FinetuneOptions`)."
    )
    return cls


def distill_options(opts: Any) -> dict[str, Any]:
    """The ``kd_`` fields of combined options, unprefixed (checked by FinetuneOptions)."""
    values = {f.name: getattr(opts, PREFIX + f.name) for f in dataclasses.fields(FinetuneOptions)}
    FinetuneOptions(**values)
    return values


def fusion_options(opts: Any, base: type) -> Any:
    """The fusion method's own options out of combined ones."""
    return base(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(base)})


def register_distilled(
    method: str, base: type, caps: Capabilities, unused: frozenset[str] = frozenset()
) -> None:
    """Register ``<method>+kd``: ``method`` (options ``base``, of which it never reads
    ``unused``), then distillation."""
    options = _combined_options(base, f"{method.title().replace('_', '')}KDOptions")

    def fused_then_distilled(ctx: FusionContext) -> nn.Module:
        kd = distill_options(ctx.options)
        inner = dataclasses.replace(ctx, options=fusion_options(ctx.options, base))
        fused = get_method(method).fn(inner)
        ctx.report.update(inner.report)
        with ctx.timer("distillation"):
            student = finetune(
                fused,
                ctx.inputs,
                list(ctx.models),
                seed=ctx.seed,
                device=ctx.device,
                progress=ctx.progress,
                **kd,
            )
        # torch types a module attribute its class does not declare as Tensor | Module
        report = cast(dict[str, Any], student.neurofuse_report)
        ctx.report["distillation"] = report["finetune"]
        # the distillation reads no labels; the fusion's importance score gets them (an
        # attribution's target class) when they are given and the score is not uniform
        ctx.report["labels_used"] = ctx.labels is not None and not ctx.importance.uniform
        return student

    register(
        f"{method}+kd",
        f"{method}, then the models' probability ensemble distilled into it on the fusion set "
        "(anchored to the fitted weights)",
        fused_then_distilled,
        options,
        # distillation moves the weights: a permuted copy is no longer returned exactly
        dataclasses.replace(caps, exact=False),
        unused,
    )
