"""One name table for every fusion method (core and baselines alike).

A method is a function ``fn(ctx: FusionContext) -> nn.Module`` registered with a one-line
description, a dataclass of options and its :class:`Capabilities` (what it reads of a call and
what it can fuse). :func:`neurofuse.fuse` enforces both before any work: an unknown option, an
option value of the wrong type or outside its ``Literal[...]`` choices, and an argument the
method would ignore (``levels=``, ``importance=``, ``target=``) are errors that name the fix.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
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
    #: whether the caller gave ``target=`` (``target`` is then that template, else models[0])
    target_given: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    #: fx traces of the models, one per model for the whole fusion (shared with importance)
    graphs: GraphCache = field(default_factory=GraphCache)

    def trace(self, model: nn.Module) -> fx.GraphModule:
        """``model``'s torch.fx trace, traced once per fusion."""
        return self.graphs(model)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)


@dataclass(frozen=True)
class Capabilities:
    """What a method reads of a ``fuse`` call and what it can fuse; ``nf.fuse`` enforces it.

    Attributes:
        levels: honours ``levels=`` (otherwise giving levels is an error).
        importance: honours ``importance=`` (otherwise a score other than uniform is an error).
        labels: whether the method reads the fusion set's labels: ``"unused"``, ``"optional"``
            or ``"required"``; when read they are range-checked against the models' classes.
        equal_widths: every base model must have the same widths (and a ``target`` too).
        target: ``"any"`` (a template of other widths), ``"same"`` (only the models' own
            widths) or ``"none"`` (the method builds its own model: ``target=`` is an error).
        single_model: can fuse one model into a smaller ``target`` (compression).
        transformers: fuses transformer-like graphs (LayerNorm, attention).
        tied_weights: handles a parameter shared by two layers (otherwise such models are
            refused: per-layer fits would write two different values into one tensor).
        fits_data: learns from the fusion set or matches neurons on its activations (a warning
            when it gives a layer fewer rows than the layer has neurons).
        exact: fusing a model with a neuron-permuted copy of itself gives the model back
            (checked by the contract test matrix).
    """

    levels: bool = False
    importance: bool = False
    labels: Literal["unused", "optional", "required"] = "unused"
    equal_widths: bool = False
    target: Literal["any", "same", "none"] = "any"
    single_model: bool = False
    transformers: bool = True
    tied_weights: bool = False
    fits_data: bool = True
    exact: bool = False


@dataclass
class MethodInfo:
    name: str
    description: str
    fn: Callable[[FusionContext], nn.Module]
    options: type
    caps: Capabilities = field(default_factory=Capabilities)
    #: fields of ``options`` this method never reads (shared option classes: the K-means knobs
    #: of the Hungarian variants); refused when given, left out of :func:`method_options`
    unused: frozenset[str] = frozenset()

    @property
    def single_model(self) -> bool:
        return self.caps.single_model

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options) if f.name not in self.unused]


_METHODS: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    description: str,
    options: type = NoOptions,
    caps: Capabilities | None = None,
    unused: Iterable[str] = (),
) -> Callable[[Callable[[FusionContext], nn.Module]], Callable[[FusionContext], nn.Module]]:
    """Decorator registering a fusion method under ``name`` with its option dataclass and
    :class:`Capabilities`. Registering is all a method needs: ``nf.fuse``, the CLI, the
    benchmark suites and the contract test matrix then treat it like any other."""

    def deco(fn: Callable[[FusionContext], nn.Module]) -> Callable[[FusionContext], nn.Module]:
        register(name, description, fn, options, caps, unused)
        return fn

    return deco


def register(
    name: str,
    description: str,
    fn: Callable[[FusionContext], nn.Module],
    options: type = NoOptions,
    caps: Capabilities | None = None,
    unused: Iterable[str] = (),
) -> MethodInfo:
    """:func:`register_method` without the decorator (for methods built in a loop)."""
    if name in _METHODS:
        raise ValueError(f"fusion method {name!r} is already registered")
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of method {name!r} must be a dataclass, got {options!r}")
    fields = {f.name for f in dataclasses.fields(options)}
    stray = sorted(set(unused) - fields)
    if stray:
        raise ValueError(f"method {name!r}: unused options {stray} are not fields of {options}")
    info = MethodInfo(name, description, fn, options, caps or Capabilities(), frozenset(unused))
    _METHODS[name] = info
    return info


def get_method(name: str) -> MethodInfo:
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(
            f"unknown fusion method {name!r}; valid methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def method_info(name: str) -> MethodInfo:
    """A method's registration: description, option dataclass and :class:`Capabilities`."""
    return get_method(name)


def available_methods() -> dict[str, str]:
    """Every registered method name with its one-line description."""
    _load_builtin()
    return {k: v.description for k, v in sorted(_METHODS.items())}


def method_options(name: str) -> dict[str, Any]:
    """The options a method reads, with their defaults."""
    info = get_method(name)
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(info.options)
        if f.name not in info.unused
    }


def option_docs(options: type) -> dict[str, str]:
    """Each option's description, from the ``Attributes:`` sections of the docstrings of the
    option dataclass and its bases (Google style; ``a, b: text`` documents both); a class
    built from others may name its sources in ``__option_sources__`` as ``(class, prefix)``."""
    sources = getattr(options, "__option_sources__", None) or [
        (c, "") for c in options.__mro__ if c is not object
    ]
    docs: dict[str, str] = {}
    for cls, prefix in sources:
        for klass in cls.__mro__ if prefix else (cls,):
            for key, text in _attribute_docs(klass.__doc__ or "").items():
                docs.setdefault(prefix + key, text)
    return docs


def _attribute_docs(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    indent: int | None = None
    current: list[str] = []
    names: list[str] = []

    def flush() -> None:
        text = " ".join(" ".join(current).split())
        for n in names:
            out[n] = text

    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        here = len(line) - len(line.lstrip())
        if indent is None:
            indent = here
        if here < indent:
            break
        head, sep, rest = line.strip().partition(":")
        if here == indent and sep and re.fullmatch(r"[\w, ]+", head):
            flush()
            names = [n.strip() for n in head.split(",") if n.strip()]
            current = [rest]
        else:
            current.append(line.strip())
    flush()
    return out


def option_types(options: type) -> dict[str, Any]:
    """The resolved type of every field of an option dataclass."""
    return typing.get_type_hints(options)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    name = getattr(origin if origin is not None else tp, "__name__", str(tp))
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (the forms option dataclasses use)."""
    if tp is Any or isinstance(tp, typing.TypeVar):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # NumPy's integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, tuple | list):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(args) == len(value) and all(
                matches(v, a) for v, a in zip(value, args, strict=True)
            )
        return not args or all(matches(v, args[0]) for v in value)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping)
    if origin is Callable or tp is Callable:
        return callable(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a form these checks do not know: the dataclass's own checks apply


def _literal_choices(tp: Any) -> tuple[Any, ...]:
    """The choices of a ``Literal[...]`` annotation (also inside ``X | None``)."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(tp) for c in _literal_choices(a))
    return ()


def check_option(owner: str, name: str, value: Any, tp: Any) -> None:
    """Raise an error naming the option when ``value`` does not fit ``tp``: a ValueError for
    a value of the right type outside the ``Literal`` choices, else a TypeError."""
    if matches(value, tp):
        return
    choices = _literal_choices(tp)
    if any(type(value) is type(c) for c in choices):
        raise ValueError(f"option {name}={value!r} of {owner}: {name} must be {_describe(tp)}")
    raise TypeError(
        f"option {name}={value!r} of {owner}: expected {_describe(tp)}, got {type(value).__name__}"
    )


def build_options(info: MethodInfo, options: dict[str, Any]) -> Any:
    names = info.option_names()
    ignored = sorted(set(options) & info.unused)
    if ignored:
        raise ValueError(
            f"option(s) {ignored} do nothing for method {info.name!r} (they set a grouping or "
            f"engine it does not use); drop them. Its options: {', '.join(names) or 'none'}"
        )
    unknown = sorted(set(options) - set(names))
    if unknown:
        valid = ", ".join(names) if names else "none"
        raise ValueError(
            f"unknown option(s) {unknown} for method {info.name!r}; valid options: {valid}"
        )
    hints = option_types(info.options)
    # NumPy scalars (an np.int64 from an array, an np.float32) count as the Python numbers
    options = {k: v.item() if isinstance(v, np.generic) else v for k, v in options.items()}
    for key, value in options.items():
        check_option(f"method {info.name!r}", key, value, hints[key])
    try:
        return info.options(**options)
    except TypeError as exc:
        raise TypeError(f"bad options for method {info.name!r}: {exc}") from exc


def _load_builtin() -> None:
    # Importing the package registers the built-in methods (one file per method).
    import neurofuse.methods  # noqa: F401
