"""Checkpoints that cannot run code: safetensors weights plus a JSON sidecar.

A checkpoint ``run/model`` is two files:

- ``run/model.safetensors``: the state dict (parameters and persistent buffers);
- ``run/model.json``: the sidecar, a flat JSON object holding the reserved keys ``format``,
  ``format_version``, ``neurofuse_version``, ``model`` (the architecture config of
  ``neurofuse.models``, or null) and ``weights`` (file name, byte size, tensor count and the
  SHA-256 of the weights file), plus every key of the caller's metadata (dataset, partition
  parameters, seed, class counts seen, metrics, ...).

Both files are written atomically (temporary file, fsync, rename), weights first and sidecar
last, so an interrupted save never leaves a half-written file, and weights that do not belong
to their sidecar fail the hash check at load time. Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neurofuse._version import __version__
from neurofuse.utils import atomic_path, atomic_write_text, resolve_device, to_jsonable

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "SIDECAR_SUFFIX",
    "WEIGHTS_SUFFIX",
    "TENSORS_FORMAT",
    "CheckpointError",
    "checkpoint_paths",
    "file_sha256",
    "load_checkpoint",
    "load_metadata",
    "load_strict",
    "model_config_record",
    "plain_tensors",
    "load_tensors",
    "load_weights",
    "save_checkpoint",
    "save_tensors",
]

CHECKPOINT_FORMAT = "neurofuse-checkpoint"
TENSORS_FORMAT = "neurofuse-tensors"
FORMAT_VERSION = 1
RESERVED_KEYS = frozenset({"format", "format_version", "neurofuse_version", "model", "weights"})
WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"
_SHOWN = 5  # how many offending keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, damaged, or does not fit the model it should load into."""


PathLike = str | os.PathLike[str]


def checkpoint_paths(path: PathLike) -> tuple[Path, Path]:
    """``(weights, sidecar)`` paths of a checkpoint given as ``stem``, ``stem.safetensors`` or
    ``stem.json``. Any other suffix is part of the stem (``run.v2`` -> ``run.v2.safetensors``)."""
    path = Path(path)
    if path.suffix in (WEIGHTS_SUFFIX, SIDECAR_SUFFIX):
        path = path.with_suffix("")
    return path.with_name(path.name + WEIGHTS_SUFFIX), path.with_name(path.name + SIDECAR_SUFFIX)


def save_checkpoint(
    model: nn.Module, path: PathLike, *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save ``model``'s state dict and a JSON sidecar; return the weights path.

    Args:
        model: any module. Its architecture config (``neurofuse.models.model_config``, set by
            ``neurofuse.models.build``) is recorded so :func:`load_checkpoint` can rebuild it;
            a model without one is saved with ``"model": null`` and loads only into a template.
        path: ``stem``, ``stem.safetensors`` or ``stem.json``; parent folders are created.
        metadata: JSON-able facts to keep with the weights, e.g. ``dataset``, ``partition``
            (its parameters), ``seed``, ``class_counts``, ``metrics``, ``train_config``.
            Tensors, arrays, dataclasses and objects with ``to_dict()`` are converted (a tensor
            comes back as a nested list). Keys may not be one of the reserved sidecar keys.

    Tensors are detached, copied to the CPU and made contiguous, so tied (shared) weights and
    strided views save fine and the model itself is not touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sidecar = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "neurofuse_version": __version__,
        "model": model_config_record(model),
    }
    return _write_pair(path, plain_tensors(model.state_dict()), sidecar, metadata)


def load_checkpoint(
    path: PathLike,
    *,
    device: str | torch.device | None = "cpu",
    model: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; return ``(model, sidecar)``.

    The weights' SHA-256 is checked against the sidecar, the architecture is rebuilt with
    ``neurofuse.models.build_from_config`` (or, when ``model`` is given, a deep copy of that
    template receives the weights; the template is untouched) and the state dict is loaded
    strictly. The model is returned in eval mode on ``device``. ``sidecar`` is the whole
    JSON object: the caller's metadata keys plus ``model``, ``weights``, ``format`` ...

    Raises:
        CheckpointError: naming the file and the problem (missing file, corrupt JSON, hash
            mismatch, unreadable safetensors, unknown architecture, missing/unexpected or
            mis-shaped keys).
    """
    weights_path, sidecar_path = checkpoint_paths(path)
    tensors, sidecar = _read_pair(path, CHECKPOINT_FORMAT)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module template, got {type(model).__name__}")
        model = copy.deepcopy(model)
    else:
        model = _rebuild(sidecar.get("model"), sidecar_path)
    load_strict(model, tensors, weights_path)
    return model.to(resolve_device(device)).eval(), sidecar


def load_weights(
    path: PathLike, *, device: str | torch.device | None = "cpu"
) -> dict[str, torch.Tensor]:
    """The hash-checked state dict of a checkpoint, without building a model."""
    return _read_pair(path, CHECKPOINT_FORMAT, device)[0]


def load_metadata(path: PathLike) -> dict[str, Any]:
    """The sidecar of a checkpoint or tensor file (the weights are not read or hashed)."""
    _, sidecar_path = checkpoint_paths(path)
    return _read_sidecar(sidecar_path, None)


def save_tensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save named tensors that are not a model (importance scores, class counts, ...) the same
    way as a checkpoint: ``stem.safetensors`` plus a ``stem.json`` sidecar. Returns the
    safetensors path."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("tensors must be a non-empty mapping of names to tensors")
    sidecar = {
        "format": TENSORS_FORMAT,
        "format_version": FORMAT_VERSION,
        "neurofuse_version": __version__,
    }
    return _write_pair(path, plain_tensors(tensors), sidecar, metadata)


def load_tensors(
    path: PathLike, *, device: str | torch.device | None = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors written by :func:`save_tensors`; return ``(tensors, sidecar)``."""
    return _read_pair(path, TENSORS_FORMAT, device)


def model_config_record(model: nn.Module) -> dict[str, Any] | None:
    if getattr(model, "neurofuse_config", None) is None:
        return None
    config: Any  # torch types the attribute as Tensor | Module: it is the build config
    try:
        from neurofuse.models import model_config
    except ImportError:
        config = model.neurofuse_config
    else:
        config = model_config(model)
    return to_jsonable(config)


def plain_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Fresh contiguous CPU copies, so no two entries share storage (safetensors refuses that)."""
    plain = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"entry {name!r} is a {type(value).__name__}, not a tensor; only tensors can be "
                "saved (put other values in metadata)"
            )
        plain[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return plain


def _write_pair(
    path: PathLike,
    tensors: dict[str, torch.Tensor],
    sidecar: dict[str, Any],
    metadata: Mapping[str, Any] | None,
) -> Path:
    weights_path, sidecar_path = checkpoint_paths(path)
    metadata = dict(metadata or {})
    clashes = sorted(RESERVED_KEYS & metadata.keys())
    if clashes:
        raise ValueError(
            f"metadata keys {clashes} are reserved for the sidecar; rename them "
            f"(reserved: {sorted(RESERVED_KEYS)})"
        )
    sidecar = {**sidecar, **to_jsonable(metadata)}  # converts, or fails, before any write
    with atomic_path(weights_path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
        sidecar["weights"] = {
            "file": weights_path.name,
            "sha256": file_sha256(tmp),
            "bytes": tmp.stat().st_size,
            "num_tensors": len(tensors),
        }
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2, allow_nan=False) + "\n")
    return weights_path


def _read_pair(
    path: PathLike, expected_format: str, device: str | torch.device | None = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights_path, sidecar_path = checkpoint_paths(path)
    sidecar = _read_sidecar(sidecar_path, expected_format)
    if not weights_path.is_file():
        raise CheckpointError(
            f"{weights_path}: weights file missing (its sidecar {sidecar_path.name} exists); "
            "copy both files of a checkpoint together"
        )
    expected = sidecar["weights"]["sha256"]
    actual = file_sha256(weights_path)
    if actual != expected:
        raise CheckpointError(
            f"{weights_path}: SHA-256 mismatch (file {actual[:16]}..., sidecar "
            f"{sidecar_path.name} expects {expected[:16]}...); the weights were modified, "
            "truncated or belong to another checkpoint"
        )
    try:
        tensors = load_file(os.fspath(weights_path), device=str(resolve_device(device)))
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err})") from err
    return tensors, sidecar


def _read_sidecar(sidecar_path: Path, expected_format: str | None) -> dict[str, Any]:
    if not sidecar_path.is_file():
        weights_path = checkpoint_paths(sidecar_path)[0]
        if weights_path.is_file():
            raise CheckpointError(
                f"{sidecar_path}: sidecar missing beside {weights_path.name}; the sidecar is "
                "written last, so the save was interrupted or the file was not copied. If it is "
                "a plain safetensors file (not written by neurofuse), load it with "
                "neurofuse.load_models(paths, ModelSpec(...)) or the CLI's --model/--arch"
            )
        raise CheckpointError(
            f"no checkpoint at {sidecar_path.with_suffix('')}: neither {weights_path.name} "
            f"nor {sidecar_path.name} exists"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sidecar_path}: corrupt JSON sidecar ({err})") from err
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{sidecar_path}: sidecar must be a JSON object")
    known = (CHECKPOINT_FORMAT, TENSORS_FORMAT) if expected_format is None else (expected_format,)
    if sidecar.get("format") not in known:
        raise CheckpointError(
            f"{sidecar_path}: format is {sidecar.get('format')!r}, expected {' or '.join(known)}"
        )
    version = sidecar.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar_path}: format_version {version!r} is not supported (this neurofuse "
            f"{__version__} reads up to {FORMAT_VERSION}); upgrade neurofuse"
        )
    weights = sidecar.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
        raise CheckpointError(f"{sidecar_path}: sidecar lacks the weights' sha256 entry")
    return sidecar


def file_sha256(path: PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rebuild(config: Any, sidecar_path: Path) -> nn.Module:
    if config is None:
        raise CheckpointError(
            f"{sidecar_path}: no model config recorded (the model was not built by "
            "neurofuse.models); pass model=<an instance of the architecture> to "
            "load_checkpoint, or read the state dict with load_weights"
        )
    name = config.get("name") if isinstance(config, dict) else None
    try:
        from neurofuse.models import build_from_config

        return build_from_config(config)
    except (ImportError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{sidecar_path}: cannot rebuild architecture {name!r} from its config ({err})"
        ) from err


def load_strict(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    weights_path: Path,
    hint: str | None = None,
) -> None:
    """Load ``tensors`` into ``model`` (in place) or raise a :class:`CheckpointError` naming
    ``weights_path`` and listing the missing, unexpected and mis-shaped keys (plus ``hint``)."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    mis_shaped = [
        f"{key}: file {tuple(tensors[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & tensors.keys())
        if tensors[key].shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_SHOWN])}{', ...' if len(items) > _SHOWN else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mis_shaped),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{weights_path}: weights do not fit the {type(model).__name__} model; "
            + "; ".join(problems)
            + (f"; {hint}" if hint else "")
        )
    model.load_state_dict(tensors, strict=True)
