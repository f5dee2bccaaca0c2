"""Models from files, whoever wrote them: neurofuse checkpoints, plain state dicts, plain
safetensors files and folders of any of these.

- a **neurofuse checkpoint** (``stem.safetensors`` + ``stem.json`` sidecar) rebuilds its own
  architecture when it was built by :mod:`neurofuse.models`;
- a **plain state dict** (``.pt``, ``.pth``, ``.bin``: what ``torch.save(model.state_dict(),
  path)`` writes, or a dict holding one under ``state_dict`` / ``model_state_dict`` /
  ``model``) is read with ``torch.load(weights_only=True)`` only: a file holding other Python
  objects is refused, never unpickled;
- a **plain safetensors file** (no neurofuse sidecar beside it);
- a **model folder** written by :func:`neurofuse.save_pretrained` (``config.json`` +
  ``model.safetensors``): one model;
- any other **folder**: every file of the kinds above in it, in natural order of their names
  (``model_2`` before ``model_10``); neurofuse sidecars and other files are skipped.

Weights that record no architecture need a :class:`ModelSpec`: the user's own class
(``"package.module:ClassName"`` plus keyword arguments) or a zoo architecture name. A state dict
that does not fit the architecture is an error listing the missing, unexpected and mis-shaped
keys, naming the file.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurofuse.checkpoint import (
    SIDECAR_SUFFIX,
    WEIGHTS_SUFFIX,
    CheckpointError,
    checkpoint_paths,
    file_sha256,
    load_checkpoint,
    load_strict,
)
from neurofuse.pretrained import is_pretrained_folder

#: suffixes of plain PyTorch state-dict files (read with ``weights_only=True`` only)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: keys under which training scripts commonly nest the state dict
_NESTED = ("state_dict", "model_state_dict", "model")


class ModelSpecError(ValueError):
    """The architecture to build for plain weights cannot be found or built."""


@dataclass(frozen=True)
class ModelSpec:
    """The architecture that plain weights load into.

    Attributes:
        target: the user's class or factory, ``"package.module:Name"`` (the current directory
            is importable, as with ``python -m``); or ``None``.
        arch: a :mod:`neurofuse.models` architecture name; or ``None``.
        kwargs: keyword arguments of the class, factory or architecture.
    """

    target: str | None = None
    arch: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target is not None and self.arch is not None:
            raise ModelSpecError("give the model class (--model) or a zoo --arch, not both")
        if self.target is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.target):
            raise ModelSpecError(
                f"model {self.target!r} must be 'package.module:ClassName' (e.g. "
                "'mymodels:Net' for class Net in mymodels.py in the current directory)"
            )

    @property
    def given(self) -> bool:
        return self.target is not None or self.arch is not None

    def describe(self) -> dict[str, Any]:
        return {"target": self.target, "arch": self.arch, "kwargs": dict(self.kwargs)}

    def build(
        self, derived: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    ) -> nn.Module:
        """A fresh model. ``derived(arch, kwargs)`` may fill a zoo architecture's input and
        class sizes from the dataset (see ``neurofuse.cli._common.architecture_kwargs``)."""
        if self.arch is not None:
            from neurofuse.models import build

            kwargs = dict(self.kwargs)
            if derived is not None:
                kwargs = derived(self.arch, kwargs)
            return build(self.arch, **kwargs)
        if self.target is None:
            raise ModelSpecError("no model class or architecture given")
        factory = import_object(self.target)
        try:
            model = factory(**dict(self.kwargs))
        except TypeError as err:
            raise ModelSpecError(
                f"cannot build {self.target} with {dict(self.kwargs)} ({err}); pass its "
                "arguments with --model-kw key=value"
            ) from err
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"{self.target} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        return model


def import_object(target: str) -> Any:
    """``"package.module:Name.attr"`` -> the object (the current directory importable)."""
    module_name, _, attr = target.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(
            f"cannot import module {module_name!r} for --model {target} ({err}); run from the "
            "folder that holds it or add that folder to PYTHONPATH"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"module {module_name!r} has no {attr!r} (for --model {target})")
        obj = getattr(obj, part)
    return obj


@dataclass
class LoadedModel:
    """One model read from a file: the path given, the model, the neurofuse sidecar (``{}``
    for plain weights), the kind of file, and the SHA-256 of its weights."""

    path: Path
    model: nn.Module
    sidecar: dict[str, Any]
    kind: str
    sha256: str


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Every model file named by ``paths``: files as given, folders as the weights files in
    them (natural order of names), each checkpoint once (both files of one count once)."""
    out: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if is_pretrained_folder(path):
            out.setdefault(path, None)
        elif path.is_dir():
            found = sorted(
                (
                    p
                    for p in path.iterdir()
                    if p.is_file() and p.suffix in (WEIGHTS_SUFFIX, *TORCH_SUFFIXES)
                ),
                key=lambda p: _natural(p.name),
            )
            if not found:
                raise CheckpointError(
                    f"{path}: folder holds no model file (*.safetensors, "
                    f"{', '.join('*' + s for s in TORCH_SUFFIXES)})"
                )
            for p in found:
                out.setdefault(p, None)
        elif path.suffix == SIDECAR_SUFFIX or (
            path.suffix not in (WEIGHTS_SUFFIX, *TORCH_SUFFIXES) and not path.exists()
        ):
            out.setdefault(checkpoint_paths(path)[0], None)  # a checkpoint named by its stem
        else:
            out.setdefault(path, None)
    return list(out)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain state-dict or safetensors file (nothing unpickled)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == WEIGHTS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects besides tensors, and neurofuse never "
            "unpickles them (torch.load(weights_only=True)). Save the weights alone: "
            "torch.save(model.state_dict(), path), or as safetensors"
        ) from err
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({err})") from err
    if isinstance(obj, Mapping):
        for key in _NESTED:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and not isinstance(obj.get("weight"), torch.Tensor)
            ):
                if all(isinstance(v, torch.Tensor) for v in inner.values()):
                    obj = inner
                    break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to "
            "tensors); save model.state_dict()"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: entries {bad[:5]} are not tensors; a state dict maps names to tensors "
            f"(nested under one of {list(_NESTED)} is also read)"
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_model(
    path: Path,
    spec: ModelSpec | None = None,
    device: str | torch.device = "cpu",
    derived: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
) -> LoadedModel:
    """One model from ``path`` (any form of :func:`expand`'s output); ``spec`` builds the
    architecture for plain weights (and overrides a neurofuse checkpoint's own)."""
    spec = spec or ModelSpec()
    if is_pretrained_folder(path):
        from neurofuse.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_pretrained

        model = load_pretrained(
            path, model=spec.build(derived) if spec.given else None, device=device
        )
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        sidecar = {
            "model": config.get("model"),
            "weights": {"sha256": file_sha256(path / WEIGHTS_FILE)},
        }
        return LoadedModel(path, model, sidecar, "pretrained", sidecar["weights"]["sha256"])
    weights, sidecar_path = checkpoint_paths(path)
    is_checkpoint = path.suffix not in TORCH_SUFFIXES and sidecar_path.is_file()
    if is_checkpoint:
        template = spec.build(derived) if spec.given else None
        model, sidecar = load_checkpoint(weights, model=template, device=device)
        return LoadedModel(path, model, sidecar, "neurofuse", sidecar["weights"]["sha256"])
    if path.suffix == WEIGHTS_SUFFIX or path.suffix in TORCH_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        kind = "safetensors" if path.suffix == WEIGHTS_SUFFIX else "state_dict"
        if not spec.given:
            raise CheckpointError(
                f"{path}: a plain {kind.replace('_', ' ')} file records no architecture; pass "
                "--model package.module:ClassName (with --model-kw key=value) for your own "
                "class, or --arch NAME for a neurofuse architecture"
            )
        state = read_state_dict(path)
        model = spec.build(derived)
        load_strict(model, state, path, hint="check --model / --arch and --model-kw")
        return LoadedModel(path, model.to(device).eval(), {}, kind, file_sha256(path))
    raise CheckpointError(
        f"no model at {path}: neither a neurofuse checkpoint ({weights.name} + "
        f"{sidecar_path.name}) nor a *.safetensors / {' / '.join('*' + s for s in TORCH_SUFFIXES)} file"
    )


def load_models(
    paths: Sequence[str | Path],
    spec: ModelSpec | None = None,
    device: str | torch.device = "cpu",
    derived: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
) -> list[LoadedModel]:
    """Every model named by ``paths`` (files and folders, see :func:`expand`), in order."""
    return [load_model(p, spec, device, derived) for p in expand(paths)]


__all__ = [
    "TORCH_SUFFIXES",
    "LoadedModel",
    "ModelSpec",
    "ModelSpecError",
    "expand",
    "import_object",
    "load_model",
    "load_models",
    "read_state_dict",
]
