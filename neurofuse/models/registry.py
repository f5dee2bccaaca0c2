"""Name table of model architectures, and the JSON config that lets any built model be rebuilt.

Every model that `build` returns carries ``model.neurofuse_config = {"name": ..., "kwargs": ...}``,
a JSON-serialisable record of how it was made. Checkpoints store that record next to the weights
(safetensors + JSON, never pickle), so `build_from_config(model_config(m))` gives back an
identical, freshly initialised architecture into which the weights load strictly.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

CONFIG_ATTRIBUTE = "neurofuse_config"


@dataclass(frozen=True)
class _Architecture:
    factory: Factory
    description: str


_ARCHITECTURES: dict[str, _Architecture] = {}


def register_architecture(
    name: str, description: str, *, replace: bool = False
) -> Callable[[F], F]:
    """Decorator that adds a model factory (a class or function returning an `nn.Module`).

    The factory is called with keyword arguments only; its signature defines which kwargs
    `build` accepts, so give every parameter a name and, where sensible, a default. Example::

        @register_architecture("tiny_mlp", "two-layer MLP for tests")
        def tiny_mlp(in_features: int = 4, num_classes: int = 2) -> nn.Module:
            return nn.Sequential(nn.Linear(in_features, num_classes))

    Registering a name twice raises ValueError unless ``replace=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"architecture name must be a non-empty string, got {name!r}")
    if not isinstance(description, str) or "\n" in description.strip():
        raise ValueError("architecture description must be a one-line string")

    def decorator(factory: F) -> F:
        if not callable(factory):
            raise TypeError(f"architecture {name!r}: factory must be callable, got {factory!r}")
        if name in _ARCHITECTURES and not replace:
            raise ValueError(
                f"architecture {name!r} is already registered; pick another name or pass "
                "replace=True to register_architecture"
            )
        _ARCHITECTURES[name] = _Architecture(factory, description.strip())
        return factory

    return decorator


def available_architectures() -> dict[str, str]:
    """Map every registered architecture name to its one-line description, sorted by name."""
    return {name: _ARCHITECTURES[name].description for name in sorted(_ARCHITECTURES)}


def architecture_factory(name: str) -> Factory:
    """The factory registered as ``name``: its signature says which kwargs `build` accepts
    (the CLI fills input size and classes from a dataset for those it takes).

    Raises ValueError for an unknown name, listing the valid ones.
    """
    return _lookup(name).factory


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build architecture `name` with `kwargs` and record the config on the returned model.

    Kwargs are normalised to JSON types first (tuples become lists) and the factory receives the
    normalised values, so rebuilding from the stored config reproduces the model exactly.

    Raises:
        ValueError: unknown `name` (the message lists the valid names).
        TypeError: a kwarg the architecture does not take, a missing required one, or a value
            that is not JSON-serialisable (the message names the allowed kwargs).
    """
    architecture = _lookup(name)
    normalised = {key: _to_json(value, f"{name}.{key}") for key, value in kwargs.items()}
    _check_kwargs(name, architecture.factory, normalised)
    model = architecture.factory(**copy.deepcopy(normalised))
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"architecture {name!r}: factory returned {type(model).__name__}, expected nn.Module"
        )
    setattr(model, CONFIG_ATTRIBUTE, {"name": name, "kwargs": normalised})
    return model


def build_from_config(config: dict) -> nn.Module:
    """Build a model from a config ``{"name": str, "kwargs": dict}`` as `model_config` returns."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(
            f'config must be a dict {{"name": str, "kwargs": dict}}, got {config!r}; '
            "use model_config(model) to obtain one"
        )
    extra = set(config) - {"name", "kwargs"}
    if extra:
        raise ValueError(
            f"config has unexpected keys {sorted(extra)}; only 'name' and 'kwargs' are allowed"
        )
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"config['kwargs'] must be a dict, got {type(kwargs).__name__}")
    return build(config["name"], **kwargs)


def model_config(model: nn.Module) -> dict:
    """Return (a copy of) the config `model` was built from: ``{"name": str, "kwargs": dict}``.

    Raises ValueError for a model not made by `build`, since its architecture cannot be
    reconstructed from a name.
    """
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if not isinstance(config, dict):
        raise ValueError(
            f"{type(model).__name__} was not built by neurofuse.models.build, so it carries no "
            "config; build it with neurofuse.models.build(name, **kwargs) (see "
            "available_architectures()), or register its factory with register_architecture"
        )
    return copy.deepcopy(config)


def _lookup(name: str) -> _Architecture:
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name]
    valid = sorted(_ARCHITECTURES)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(valid)}.{hint}")


def _check_kwargs(name: str, factory: Factory, kwargs: dict[str, Any]) -> None:
    """Reject kwargs the factory's signature does not accept, before calling it."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    allowed = [key for key, p in parameters.items() if p.kind in keyword_kinds]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"architecture {name!r} got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    missing = [
        key
        for key in allowed
        if parameters[key].default is inspect.Parameter.empty and key not in kwargs
    ]
    if missing:
        raise TypeError(
            f"architecture {name!r} is missing required keyword argument(s) "
            f"{', '.join(missing)}; allowed: {', '.join(allowed)}"
        )


def _to_json(value: Any, where: str) -> Any:
    """Convert tuples to lists (recursively) and check the result is JSON-serialisable."""
    if isinstance(value, (tuple, list)):
        return [_to_json(item, where) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{where}: dict keys must be strings to be stored in a JSON config")
        return {key: _to_json(item, f"{where}.{key}") for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers and the like
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        f"{where}: value {value!r} of type {type(value).__name__} cannot be stored in a JSON "
        "config; pass plain numbers, strings, booleans, lists or dicts"
    )
