"""One name table for every fusion method (core and baselines alike).

A method is a function ``fn(ctx: FusionContext) -> nn.Module`` registered with a one-line
description and a dataclass of options; :func:`neurofuse.fuse` validates user options against
that dataclass, so an unknown or ill-typed option is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.graph import GraphCache, Levels
from neurofuse.importance import ImportanceProvider
from neurofuse.timing import PhaseTimer


@dataclass
class NoOptions:
    """This method takes no options."""


@dataclass
class FusionContext:
    """Everything a fusion method receives; the models are private copies on ``device``."""

    models: list[nn.Module]
    inputs: Tensor
    labels: Tensor | None
    importance: ImportanceProvider
    levels: Levels
    target: nn.Module
    seed: int
    device: torch.device
    options: Any
    progress: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    #: fx traces of the models, one per model for the whole fusion (shared with importance)
    graphs: GraphCache = field(default_factory=GraphCache)

    def trace(self, model: nn.Module) -> fx.GraphModule:
        """``model``'s torch.fx trace, traced once per fusion."""
        return self.graphs(model)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)


@dataclass
class MethodInfo:
    name: str
    description: str
    fn: Callable[[FusionContext], nn.Module]
    options: type
    needs_levels: bool = True
    single_model: bool = False


_METHODS: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    description: str,
    options: type = NoOptions,
    *,
    needs_levels: bool = True,
    single_model: bool = False,
):
    """Decorator registering a fusion method under ``name``. ``single_model``: the method can
    also fuse one model into a different template (compression, ``nf.fuse([big], data,
    target=small)``)."""

    def deco(fn: Callable[[FusionContext], nn.Module]) -> Callable[[FusionContext], nn.Module]:
        if name in _METHODS:
            raise ValueError(f"fusion method {name!r} is already registered")
        _METHODS[name] = MethodInfo(name, description, fn, options, needs_levels, single_model)
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(
            f"unknown fusion method {name!r}; valid methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def available_methods() -> dict[str, str]:
    """Every registered method name with its one-line description."""
    _load_builtin()
    return {k: v.description for k, v in sorted(_METHODS.items())}


def method_options(name: str) -> dict[str, Any]:
    """The options of a method with their defaults."""
    info = get_method(name)
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(info.options)
    }


def build_options(info: MethodInfo, options: dict[str, Any]) -> Any:
    names = [f.name for f in dataclasses.fields(info.options)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        valid = ", ".join(names) if names else "none"
        raise ValueError(
            f"unknown option(s) {unknown} for method {info.name!r}; valid options: {valid}"
        )
    try:
        return info.options(**options)
    except TypeError as exc:
        raise TypeError(f"bad options for method {info.name!r}: {exc}") from exc


def _load_builtin() -> None:
    # Importing the package registers the built-in methods (one file per method).
    import neurofuse.methods  # noqa: F401
