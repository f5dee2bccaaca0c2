"""Fusion recipes: one YAML (or JSON) file that says everything a fusion needs, like mergekit's.

``neurofuse fuse --config recipe.yaml`` runs one; every ``neurofuse fuse`` that saves a model
writes the recipe it ran beside it (``<out>.recipe.yaml``, or ``recipe.yaml`` in a
``--save-pretrained`` folder), with the SHA-256 of every base model, so that running it again
gives bit-identical weights (same machine, same versions) and refuses base models that changed.

Example::

    models: [runs/a.pt, runs/b.pt]        # files or folders, relative to this file
    model: mymodels:Net                   # your class (or arch: mlp for a zoo model)
    model_kwargs: {hidden: 128}
    dataset: mnist5k                      # test set, and fusion set unless `data` is given
    data: fusion.npz                      # optional: the fusion set from a file
    method: kf_linear
    importance: uniform
    options: {ridge: 1.0e-4}
    seed: 0
    output: runs/fused.safetensors        # or save_pretrained: runs/fused/

Validated by :class:`Recipe` (pydantic): an unknown field, a wrong type or a missing
architecture is an error naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neurofuse.utils import atomic_write_text

RECIPE_SUFFIX = ".recipe.yaml"


class ModelEntry(BaseModel):
    """A base model file (or folder) and, when recorded, the SHA-256 of its weights."""

    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str | None = None


class Recipe(BaseModel):
    """Everything ``neurofuse fuse`` needs. Paths are relative to the recipe's folder."""

    model_config = ConfigDict(extra="forbid")

    models: list[str | ModelEntry] = Field(min_length=1)
    model: str | None = Field(None, description="your class or factory, 'package.module:Name'")
    arch: str | None = Field(None, description="a neurofuse architecture name")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    dataset: str | None = Field(None, description="named dataset (test set, default fusion set)")
    dataset_kwargs: dict[str, Any] = Field(default_factory=dict)
    root: str | None = None
    data: str | None = Field(None, description="fusion set file (.npz, .pt) or folder")
    fusion_samples: int | None = Field(None, ge=1)
    from_part: int | None = Field(None, ge=0)
    method: str = "kf_linear"
    importance: str | None = None
    levels: list[str] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    output: str | None = None
    save_pretrained: str | None = None

    @field_validator("model")
    @classmethod
    def _target(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("must be 'package.module:ClassName'")
        return value

    @model_validator(mode="after")
    def _one_architecture(self) -> Recipe:
        if self.model is not None and self.arch is not None:
            raise ValueError("give 'model' (your class) or 'arch' (a zoo architecture), not both")
        if self.model_kwargs and self.model is None and self.arch is None:
            raise ValueError("'model_kwargs' needs 'model' or 'arch'")
        return self

    def entries(self) -> list[ModelEntry]:
        return [m if isinstance(m, ModelEntry) else ModelEntry(path=m) for m in self.models]

    def resolved(self, base: Path) -> Recipe:
        """A copy whose relative paths are taken from ``base`` (the recipe's folder)."""

        def at(p: str | None) -> str | None:
            return None if p is None else str(base / Path(p).expanduser())

        return self.model_copy(
            update={
                "models": [e.model_copy(update={"path": at(e.path)}) for e in self.entries()],
                "data": at(self.data),
                "root": at(self.root),
                "output": at(self.output),
                "save_pretrained": at(self.save_pretrained),
            }
        )


def _field_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"field {where!r}: {e['msg']}")
    return "; ".join(parts)


def parse_recipe(obj: Any, source: str = "recipe") -> Recipe:
    """Validate a mapping as a :class:`Recipe`; errors name the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: a recipe is a mapping of fields, got {type(obj).__name__}")
    try:
        return Recipe.model_validate(obj)
    except ValidationError as err:
        raise ValueError(f"{source}: {_field_errors(err)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe (YAML or JSON) and make its relative paths relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err})"
        ) from None
    return parse_recipe(obj, str(path)).resolved(path.parent)


def dump_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` (YAML, atomically) with its paths relative to ``path``'s folder, so
    that the recipe, its output and its inputs can move together."""
    path = Path(path)
    folder = path.resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), folder)

    data = recipe.model_dump(exclude_none=True)
    data["models"] = [
        {k: v for k, v in {"path": rel(e.path), "sha256": e.sha256}.items() if v is not None}
        for e in recipe.entries()
    ]
    for key in ("data", "root", "output", "save_pretrained"):
        if data.get(key) is not None:
            data[key] = rel(data[key])
    for key in ("model_kwargs", "dataset_kwargs", "options"):
        if not data.get(key):
            data.pop(key, None)
    header = "# neurofuse fusion recipe: run it again with  neurofuse fuse --config <this file>\n"
    atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))
    return path


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe (for editors and validators)."""
    return Recipe.model_json_schema()


__all__ = [
    "RECIPE_SUFFIX",
    "ModelEntry",
    "Recipe",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_schema",
]
