"""Model folders a Hugging Face user recognises: ``config.json``, ``model.safetensors`` and a
``README.md`` model card (plus ``recipe.yaml`` when a fusion wrote the folder).

``save_pretrained(model, folder, ...)`` writes one; ``load_pretrained(folder)`` reads it back in
one call. ``config.json`` holds the architecture: a :mod:`neurofuse.models` config (rebuilt
directly), or the user's class as ``"package.module:Name"`` with its keyword arguments, which
``load_pretrained`` imports only when asked to (``import_model=True``, like transformers'
``trust_remote_code``) or builds into the ``model=`` template given. The card records what a
reader needs to trust the model: the recipe that made it, the base models' hashes, the fusion
set and the measured metrics. Every file is written atomically; nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from neurofuse._version import __version__
from neurofuse.checkpoint import CheckpointError, load_strict, model_config_record, plain_tensors
from neurofuse.utils import atomic_path, atomic_write_text, resolve_device, to_jsonable

PRETRAINED_FORMAT = "neurofuse-pretrained"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
RECIPE_FILE = "recipe.yaml"


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pretrained`."""
    config = Path(path) / CONFIG_FILE
    if not (Path(path).is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == PRETRAINED_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def save_pretrained(
    model: nn.Module,
    folder: str | Path,
    *,
    model_class: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    recipe_text: str | None = None,
) -> Path:
    """Write ``model`` as a folder: weights, ``config.json``, the model card (and the recipe).

    Args:
        model: a :mod:`neurofuse.models` model (its config is recorded), or any module with
            ``model_class`` given.
        folder: created if missing; existing files of the layout are replaced atomically.
        model_class: ``{"target": "package.module:Name", "kwargs": {...}}`` for a user's
            class.
        card: what the card reports: ``method``, ``inputs`` (paths and hashes), ``fusion_set``,
            ``metrics`` (any JSON-able mapping).
        recipe_text: the recipe, written as ``recipe.yaml`` and quoted in the card.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; choose a folder path")
    arch = model_config_record(model)
    if arch is None and not model_class:
        raise ValueError(
            f"a {type(model).__name__} is not a neurofuse architecture: pass model_class="
            "{'target': 'package.module:Name', 'kwargs': {...}} so the folder can be loaded"
        )
    tensors = plain_tensors(model.state_dict())
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {
        "format": PRETRAINED_FORMAT,
        "format_version": 1,
        "neurofuse_version": __version__,
        "model": arch,
        "model_class": to_jsonable(dict(model_class)) if model_class else None,
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    if recipe_text is not None:
        atomic_write_text(folder / RECIPE_FILE, recipe_text)
    atomic_write_text(folder / CARD_FILE, model_card(config, dict(card or {}), recipe_text))
    return folder


def model_card(config: dict[str, Any], card: dict[str, Any], recipe_text: str | None) -> str:
    """The ``README.md`` of a folder: front matter, provenance, fusion set, metrics, recipe."""
    arch = config.get("model") or {}
    klass = config.get("model_class") or {}
    name = arch.get("name") or klass.get("target") or "model"
    lines = [
        "---",
        "library_name: neurofuse",
        "tags: [model-fusion, neurofuse]",
        "---",
        "",
        f"# Fused {name}",
        "",
    ]
    method = card.get("method")
    inputs = card.get("inputs") or []
    if method:
        lines += [
            f"Made by `neurofuse {__version__}` with method `{method}` from "
            f"{len(inputs)} base model(s), without retraining.",
            "",
        ]
    if inputs:
        lines += ["## Base models", "", "| file | SHA-256 |", "|---|---|"]
        lines += [f"| `{i.get('path')}` | `{i.get('sha256')}` |" for i in inputs]
        lines.append("")
    fusion_set = card.get("fusion_set")
    if fusion_set:
        shown = {k: v for k, v in fusion_set.items() if k != "indices"}
        lines += ["## Fusion set", "", "```json", json.dumps(shown, indent=2), "```", ""]
    metrics = card.get("metrics")
    if metrics:
        lines += [
            "## Measured metrics",
            "",
            "| model | accuracy | NLL | ECE |",
            "|---|---|---|---|",
        ]
        for label, m in metrics.items():
            if isinstance(m, Mapping) and "accuracy" in m:
                lines.append(
                    f"| {label} | {100 * m['accuracy']:.2f}% | {m.get('nll', float('nan')):.4f} "
                    f"| {m.get('ece', float('nan')):.4f} |"
                )
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "import neurofuse",
        'model = neurofuse.load_pretrained("path/to/this/folder"'
        + (", import_model=True)" if klass else ")"),
        "```",
        "",
    ]
    if recipe_text:
        lines += ["## Recipe", "", "Reproduce with `neurofuse fuse --config recipe.yaml`:", ""]
        lines += ["```yaml", recipe_text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def load_pretrained(
    folder: str | Path,
    *,
    model: nn.Module | None = None,
    import_model: bool = False,
    device: str | torch.device | None = "cpu",
) -> nn.Module:
    """The model of a :func:`save_pretrained` folder, in eval mode.

    A neurofuse architecture is rebuilt from ``config.json``; a user's class is imported only
    with ``import_model=True`` (it runs that module's code), or the weights load into a copy of
    the ``model`` template. Mismatched weights raise a :class:`CheckpointError` naming the keys.
    """
    import copy

    from neurofuse.sources import ModelSpec, read_state_dict  # it imports this module

    folder = Path(folder)
    if not is_pretrained_folder(folder):
        raise CheckpointError(
            f"{folder}: not a neurofuse model folder (no {CONFIG_FILE} with format "
            f"{PRETRAINED_FORMAT!r}); for a checkpoint file use neurofuse.load_checkpoint"
        )
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: {WEIGHTS_FILE} is missing")
    if model is not None:
        built = copy.deepcopy(model)
    elif config.get("model"):
        from neurofuse.models import build_from_config

        built = build_from_config(config["model"])
    elif config.get("model_class"):
        klass = config["model_class"]
        if not import_model:
            raise CheckpointError(
                f"{folder}: the model is the class {klass.get('target')!r}; pass "
                "import_model=True to import it (this runs that module's code) or model=<an "
                "instance> to load the weights into"
            )
        built = ModelSpec(target=klass["target"], kwargs=klass.get("kwargs") or {}).build()
    else:
        raise CheckpointError(f"{folder}: {CONFIG_FILE} records no architecture")
    load_strict(built, read_state_dict(weights), weights)
    return built.to(resolve_device(device)).eval()


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "PRETRAINED_FORMAT",
    "RECIPE_FILE",
    "WEIGHTS_FILE",
    "is_pretrained_folder",
    "load_pretrained",
    "model_card",
    "save_pretrained",
]
