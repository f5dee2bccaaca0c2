"""The one entry point: ``neurofuse.fuse(models, data, method=...)``."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from neurofuse.graph import Levels
from neurofuse.importance import ImportanceProvider, ImportanceSpec
from neurofuse.methods.registry import (
    FusionContext,
    MethodInfo,
    available_methods,
    build_options,
    get_method,
)


def _single_model_methods() -> dict[str, bool]:
    return {name: get_method(name).single_model for name in available_methods()}


def as_fusion_data(data: Any) -> tuple[Tensor, Tensor | None]:
    """Inputs and (optional) labels of the fusion set from a tensor, an ``(inputs, labels)``
    pair, a ``Dataset`` or a ``DataLoader``."""
    if isinstance(data, Tensor):
        x, y = data, None
    elif isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data[0], data[1]
        if not isinstance(y, Tensor):
            y = torch.as_tensor(y)
    elif isinstance(data, DataLoader | Dataset):
        xs, ys = [], []
        for item in data:
            if isinstance(item, tuple | list):
                xs.append(torch.as_tensor(item[0]))
                ys.append(torch.as_tensor(item[1]) if len(item) > 1 else None)
            else:
                xs.append(torch.as_tensor(item))
                ys.append(None)
        if not xs:
            raise ValueError("the fusion data is empty: give at least one sample")
        batched = isinstance(data, DataLoader)
        x = torch.cat(xs) if batched else torch.stack(xs)
        y = None
        if all(t is not None for t in ys):
            y = torch.cat(ys) if batched else torch.stack(ys)  # type: ignore[arg-type]
    else:
        raise TypeError(
            "data must be a tensor of inputs, an (inputs, labels) pair, a Dataset or a DataLoader; "
            f"got {type(data).__name__}"
        )
    if x.numel() == 0 or x.shape[0] == 0:
        raise ValueError("the fusion data is empty: give at least one sample")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("the fusion data contains NaN or Inf values; clean or drop those samples")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"fusion data has {x.shape[0]} inputs but {y.shape[0]} labels")
    return x, y


def _check_models(models: Any, info: MethodInfo, has_target: bool) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError("models must be a list of two or more nn.Module")
    models = list(models)
    if not models:
        raise ValueError("fusion needs two or more models, got none")
    if len(models) == 1:
        if not info.single_model:
            single = sorted(k for k, v in _single_model_methods().items() if v)
            raise ValueError(
                f"method {info.name!r} needs two or more models, got 1; to compress one model "
                f"into a smaller template use one of {single} with target=..."
            )
        if not has_target:
            raise ValueError(
                "fusion needs two or more models, got 1; a single model can only be "
                "compressed, which needs a target: give target=<smaller template>"
            )
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(
                    f"models[{i}] has NaN or Inf values in {name!r}; fusion needs finite weights "
                    "(retrain or reload that model)"
                )
    return models


def _private_copy(model: nn.Module, device: torch.device) -> nn.Module:
    clone = copy.deepcopy(model).to(device).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def fuse(
    models: Sequence[nn.Module],
    data: Any,
    method: str = "kf_linear",
    importance: ImportanceSpec = "uniform",
    levels: Levels | Sequence[str] | None = None,
    target: nn.Module | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Fuse ``models`` into one network, with no retraining of the base models.

    Args:
        models: two or more models; never modified (fusion works on copies). One model is
            accepted by the methods that can compress (``kf_linear``, ``kf_gradient``, ``kd``)
            when ``target`` is a smaller template: the model is fused into it.
        data: the fusion set: inputs ``(B, ...)``, an ``(inputs, labels)`` pair, a ``Dataset``
            or a ``DataLoader``.
        method: a name from :func:`neurofuse.available_methods`.
        importance: ``"uniform"``, another registered score name, a callable
            ``f(model, name, output) -> scores`` or precomputed ``[{name: scores}, ...]``.
        levels: ``None`` (automatic), module names each ending a level, or a :class:`Levels`.
        target: template of the fused model (other widths allowed); default ``models[0]``.
        seed: seeds every random choice (k-means, noise, batches).
        device: where to fuse; default the data's device.
        progress: show a progress bar.
        **options: method options (see :func:`neurofuse.method_options`).

    Returns:
        The fused model in eval mode on ``device``. ``fused.neurofuse_report`` holds
        diagnostics (method, options, per-level losses).
    """
    info = get_method(method)
    opts = build_options(info, options)
    models = _check_models(models, info, target is not None)
    x, y = as_fusion_data(data)
    dev = torch.device(device) if device is not None else x.device
    x = x.to(dev)
    y = y.to(dev) if y is not None else None
    copies = [_private_copy(m, dev) for m in models]
    template = _private_copy(target if target is not None else models[0], dev)
    with torch.no_grad():
        widths = [tuple(m(x[:2]).shape[1:]) for m in copies + [template]]
    if len(set(widths)) != 1:
        raise ValueError(
            f"the models' outputs differ in shape {widths[:-1]} (fused template: {widths[-1]}); "
            "fusion needs models with the same classes"
        )
    ctx = FusionContext(
        models=copies,
        inputs=x,
        labels=y,
        importance=ImportanceProvider(importance, copies, x, y),
        levels=Levels.coerce(levels),
        target=template,
        seed=seed,
        device=dev,
        options=opts,
        progress=progress,
    )
    fused = info.fn(ctx)
    for p in fused.parameters():
        p.requires_grad_(True)
    fused.neurofuse_report = {
        "method": method,
        "options": vars(opts),
        "seed": seed,
        "seconds": ctx.timer.as_dict(),
        **ctx.report,
    }
    return fused.eval()
