"""The one entry point: ``neurofuse.fuse(models, data, method=...)``."""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from neurofuse.graph import AFFINE_TYPES, GraphCache, Levels, is_transformer_like
from neurofuse.importance import Importance, ImportanceProvider, ImportanceSpec
from neurofuse.importance.provider import describe
from neurofuse.methods._averaging import check_same_layers
from neurofuse.methods.registry import (
    FusionContext,
    MethodInfo,
    available_methods,
    build_options,
    get_method,
)
from neurofuse.utils import all_finite


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
        for item in data:  # type: ignore[union-attr]  # a map-style Dataset iterates by index
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
    if not all_finite(x):
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


def _private_copy(model: nn.Module, device: torch.device, share: bool = False) -> nn.Module:
    """The model as fusion uses it: its own modules (mode, hooks and buffers private), in eval
    mode on ``device``, parameters frozen. ``share=True`` (the base models, which methods only
    read): parameters already on ``device`` keep their storage, in new frozen ``Parameter``
    objects, instead of a copy (two width-16384 MLPs: 2.2 GB). The template, which methods
    write into, is always a full copy; ``tests/test_contract.py`` checks that no method
    changes a base model."""
    memo: dict[int, Any] = {}
    if share:
        for p in model.parameters():
            if p.device == device:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    clone = copy.deepcopy(model, memo).to(device).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _unshare(fused: nn.Module, models: Sequence[nn.Module]) -> None:
    """Give the fused model its own copy of any parameter that still holds a base model's
    storage (an ensemble's members are the shared private copies): the result never aliases
    the caller's models."""
    theirs = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    fresh: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for module in fused.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.untyped_storage().data_ptr() in theirs:
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = fresh[id(p)]


def _models_dtype(models: Sequence[nn.Module]) -> torch.dtype:
    """The floating dtype of the models' parameters (float32 for a model without any)."""
    for m in models:
        for t in m.parameters():
            if t.is_floating_point():
                return t.dtype
    return torch.get_default_dtype()


def tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of parameter names that are one tensor (``fc3.weight = fc2.weight``)."""
    first: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((first[id(p)], name))
        else:
            first[id(p)] = name
    return pairs


def _methods_with(flag: str) -> list[str]:
    return [n for n in available_methods() if getattr(get_method(n).caps, flag)]


def _check_call(
    info: MethodInfo,
    models: list[nn.Module],
    levels: Any,
    importance: Any,
    target: nn.Module | None,
    seed: Any,
) -> None:
    """Refuse what ``info``'s method would silently ignore or cannot do, before any work."""
    caps, name = info.caps, info.name
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    if levels is not None and not caps.levels:
        raise ValueError(
            f"method {name!r} does not use levels (it would ignore levels={levels!r}); drop "
            f"the argument, or use a method that cuts the model into levels: "
            f"{', '.join(_methods_with('levels'))}"
        )
    if not caps.importance and not _is_uniform(importance):
        raise ValueError(
            f"method {name!r} does not use importance scores (it would ignore importance="
            f"{describe(importance)}); drop the argument, or use a method that weighs neurons "
            f"by importance: {', '.join(_methods_with('importance'))}"
        )
    if target is not None and caps.target == "none":
        raise ValueError(
            f"method {name!r} builds its own model and would ignore target=; drop the argument"
        )
    if caps.equal_widths:
        check_same_layers([m.state_dict() for m in models], name)
    if target is not None and caps.target == "same":
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        tgt = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        if all(tgt != sh for sh in shapes):
            raise ValueError(
                f"method {name!r} fuses into the models' own widths, so a target needs equal widths "
                "to theirs; the given target has other shapes. Drop target=, or use kf_linear / kf_gradient to fuse into other widths"
            )
    if not caps.tied_weights:
        for i, m in enumerate(models + ([target] if target is not None else [])):
            pairs = tied_parameters(m)
            if pairs:
                who = f"models[{i}]" if i < len(models) else "the target"
                raise ValueError(
                    f"{who} has tied parameters ({pairs[0][1]!r} is {pairs[0][0]!r}); method "
                    f"{name!r} fits each layer on its own and would write two values into the "
                    "one shared tensor. Untie them (give each layer its own copy), or use a "
                    f"method that keeps them tied: {', '.join(_methods_with('tied_weights'))}"
                )


def _refuse_reused_layers(info: MethodInfo, gm: Any) -> None:
    """A layer called twice shares its weights between two places of the graph, like tied
    parameters: refused by the methods that fit layer by layer."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters()):
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    reused = sorted(name for name, c in calls.items() if c > 1)
    if reused:
        raise ValueError(
            f"models[0] calls layer {reused[0]!r} {calls[reused[0]]} times, so its weights are "
            f"shared by {calls[reused[0]]} places of the network; method {info.name!r} fits each "
            "place on its own and would write different values into the one layer. Give each "
            "place its own layer, or use a method that keeps shared weights: "
            f"{', '.join(_methods_with('tied_weights'))}"
        )


def _is_uniform(importance: Any) -> bool:
    try:
        return Importance.coerce(importance).score == "uniform"
    except (TypeError, ValueError):
        return False


def _forward_outputs(models: list[nn.Module], x: Tensor, template: nn.Module) -> list[tuple]:
    """One forward pass of every model on two samples: a clear error for inputs of the wrong
    shape and for models that do not return one tensor; the output shape of each."""
    shapes = []
    for i, m in enumerate([*models, template]):
        who = f"models[{i}]" if i < len(models) else "the target"
        try:
            with torch.no_grad():
                out = m(x[:2])
        except Exception as exc:  # any failure here is the data not fitting the model
            raise ValueError(
                f"{who} cannot run on the fusion data: its samples have shape "
                f"{tuple(x.shape[1:])} ({x.dtype}), and the forward pass failed with "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Give "
                "inputs shaped like the models' training data (batch first)"
            ) from exc
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{who} returns a {type(out).__name__}, not a tensor; fusion needs models whose "
                "forward returns one tensor of logits. Wrap the model, e.g. a module whose "
                "forward returns model(x)[0] or model(x)['logits']"
            )
        shapes.append(tuple(out.shape[1:]))
    return shapes


def _check_labels(y: Tensor, classes: int) -> Tensor:
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError(
                "the fusion labels are not whole numbers; give class indices (one integer per "
                "sample), not probabilities or one-hot rows"
            )
        y = y.long()
    if y.dim() != 1:
        raise ValueError(
            f"the fusion labels have shape {tuple(y.shape)}; give one class index per sample"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(
            f"the fusion labels range over {int(y.min())}..{int(y.max())}, but the models have "
            f"{classes} classes (0..{classes - 1}); give class indices in that range"
        )
    return y.long()


def _warn_small(info: MethodInfo, template: nn.Module, x: Tensor) -> None:
    """Warn when a layer of the template sees fewer rows (samples times positions or tokens)
    than it has neurons: its fit is then underdetermined."""
    if not info.caps.fits_data:
        return
    rows: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, mod in template.named_modules():
        if isinstance(mod, AFFINE_TYPES):
            width = mod.out_features if isinstance(mod, nn.Linear) else int(mod.out_channels)  # type: ignore[arg-type]

            def hook(
                m: nn.Module, args: Any, out: Any, name: str = name, width: int = width
            ) -> None:
                if isinstance(out, Tensor) and out.shape[0]:
                    rows[name] = (out.numel() // (out.shape[0] * width), width)

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            template(x[:1])
    finally:
        for h in hooks:
            h.remove()
    n = x.shape[0]
    short = [(w, name, per) for name, (per, w) in rows.items() if n * per < w]
    if short:
        width, name, per = max(short)
        seen = f"{n * per} rows ({n} samples" + (f" x {per} positions)" if per > 1 else ")")
        warnings.warn(
            f"the fusion set gives {seen}, fewer than the {width} neurons of {name!r}: "
            f"{info.name} cannot tell those neurons apart on so few samples, and the fused "
            f"model may be far from the base models. Give at least {-(-width // per)} samples.",
            UserWarning,
            stacklevel=3,
        )


def _keep_flags(fused: nn.Module, source: nn.Module, models: Sequence[nn.Module]) -> None:
    """The fused model's parameters get ``requires_grad`` from the base parameters they come
    from: the same name in the model the fused one was built from, or, for a model that holds
    the base models as parts (``members.<k>.<name>``: an ensemble), ``<name>`` in ``models[k]``;
    True where no base parameter matches."""
    flags = {n: p.requires_grad for n, p in source.named_parameters()}
    per_model = [{n: p.requires_grad for n, p in m.named_parameters()} for m in models]
    for name, p in fused.named_parameters():
        flag = flags.get(name)
        parts = name.split(".")
        for i in range(1, len(parts)):
            if flag is not None:
                break
            rest = ".".join(parts[i:])
            k = parts[i - 1]
            if k.isdigit() and int(k) < len(models) and rest in per_model[int(k)]:
                flag = per_model[int(k)][rest]
            elif rest in flags:
                flag = flags[rest]
        p.requires_grad_(True if flag is None else flag)


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
    r"""Fuse ``models`` into one network, with no retraining of the base models.

    Args:
        models: two or more models; never modified (fusion works on copies). One model is
            accepted by the methods that can compress (``kf_linear``, ``kf_gradient``, ``kd``)
            when ``target`` is a smaller template: the model is fused into it.
        data: the fusion set: inputs ``(B, ...)``, an ``(inputs, labels)`` pair, a ``Dataset``
            or a ``DataLoader``. Inputs are cast to the models' dtype.
        method: a name from :func:`neurofuse.available_methods`.
        importance: ``"uniform"``, another registered score name, a callable
            ``f(model, name, output) -> scores`` or precomputed ``[{name: scores}, ...]``.
        levels: ``None`` (automatic), module names each ending a level, or a :class:`Levels`.
        target: template of the fused model (other widths allowed); default ``models[0]``.
        seed: seeds every random choice (k-means, noise, batches).
        device: where to fuse; default the data's device.
        progress: show a progress bar.
        **options: method options (see :func:`neurofuse.method_options`).

    Each method declares what it reads and what it can fuse
    (:func:`neurofuse.method_info`\ ``(name).caps``); an argument the method would ignore
    (``levels``, ``importance``, ``target``), an option of the wrong type, a model with tied
    parameters the method cannot keep tied, models of unequal widths for a method that needs
    equal ones, inputs the models cannot run on and labels outside the models' classes are
    refused with an error that names the fix, before any work.

    Returns:
        The fused model in eval mode on ``device``, its parameters' ``requires_grad`` as in the
        model it was built from. ``fused.neurofuse_report`` holds diagnostics (method, options,
        per-level losses).
    """
    info = get_method(method)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    opts = build_options(info, options)
    models = _check_models(models, info, target is not None)
    _check_call(info, models, levels, importance, target, seed)
    seed = int(seed)
    levels = Levels.coerce(levels)
    x, y = as_fusion_data(data)
    x = x.to(_models_dtype(models))
    dev = torch.device(device) if device is not None else x.device
    x = x.to(dev)
    copies = [_private_copy(m, dev, share=True) for m in models]
    template = _private_copy(target if target is not None else models[0], dev)
    widths = _forward_outputs(copies, x, template)
    if len(set(widths)) != 1:
        raise ValueError(
            f"the models' outputs differ in shape {widths[:-1]} (fused template: {widths[-1]}); "
            "fusion needs models with the same classes"
        )
    if y is not None:  # checked even where unused: a second input batch is no labels
        y = _check_labels(y, widths[0][-1] if widths[0] else 1)
    y = y.to(dev) if y is not None else None
    _warn_small(info, template, x)
    graphs = GraphCache()
    if not info.caps.tied_weights:
        _refuse_reused_layers(info, graphs(copies[0]))
    if not info.caps.transformers and is_transformer_like(graphs(copies[0])):
        raise ValueError(
            f"method {method!r} does not fuse transformer-like models (LayerNorm or attention, "
            "whose statistics mix the neurons); use one of "
            f"{', '.join(n for n in available_methods() if get_method(n).caps.transformers)}"
        )
    ctx = FusionContext(
        models=copies,
        inputs=x,
        labels=y,
        importance=ImportanceProvider(importance, copies, x, y, graphs, progress),
        levels=levels,
        target=template,
        seed=seed,
        device=dev,
        options=opts,
        progress=progress,
        graphs=graphs,
        target_given=target is not None,
    )
    fused = info.fn(ctx)
    _unshare(fused, models)
    _keep_flags(fused, target if target is not None else models[0], models)
    # torch's stub of Module.__setattr__ admits only a Tensor or a Module; any value is stored
    fused.neurofuse_report = {  # type: ignore[assignment]
        "method": method,
        "options": vars(opts),
        "importance": describe(importance),
        "seed": seed,
        "seconds": ctx.timer.as_dict(),
        **ctx.report,
    }
    return fused.eval()
