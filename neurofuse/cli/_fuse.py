"""The ``fuse`` command: fuse models into one, evaluate it, save it with its provenance and
the recipe that reproduces it (the work is done by :mod:`._recipe_run`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from neurofuse.cli._common import (
    ArchOption,
    DataKwOption,
    ModelKwOption,
    ModelOption,
    RootOption,
    parse_pairs,
)
from neurofuse.cli._recipe_run import run_recipe

_INPUTS_HELP = """Fuse models into one, evaluate it and save it with its provenance and recipe.

Models (CHECKPOINTS) may be given in any of these forms, mixed:

- neurofuse checkpoints (`run/model_0`, `.safetensors` + `.json` sidecar: the architecture and
  dataset are recorded);
- plain state dicts (`.pt`, `.pth`, `.bin`, read with `torch.load(weights_only=True)` only) and
  plain `.safetensors` files: name the architecture with `--model package.module:ClassName`
  (your class; `--model-kw key=value` for its arguments) or `--arch NAME` (a neurofuse one);
- a model folder written by `--save-pretrained`;
- a folder: every model file in it, in natural order of names (`m2` before `m10`).

The fusion set is drawn from `--dataset` (or the checkpoints' recorded one): `--fusion-samples N`
from the training split, or from part K of the training run's partition with `--from-part K`;
or read from `--data FILE` (`.npz` with `x` and optional `y`, `.pt` tensors, a dataset folder),
given exactly as the models expect their inputs.

`--config recipe.yaml` runs a recipe instead (models, model/arch, dataset, data, method,
importance, levels, options, seed, output); every saved fusion writes the recipe it ran beside
its output, and running it again gives bit-identical weights.
"""


def fuse(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(help="Base models: checkpoints, weights files or folders (see above)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Run a fusion recipe (YAML or JSON)."),
    ] = None,
    model: ModelOption = None,
    model_kw: ModelKwOption = None,
    arch: ArchOption = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="Fusion method [default: kf_linear].")
    ] = None,
    importance: Annotated[
        str | None,
        typer.Option(
            "--importance",
            "-i",
            help="Neuron importance score (default: uniform, for methods that use importance).",
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Dataset (default: the checkpoints' own)."),
    ] = None,
    data_file: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Fusion set from a file (.npz x[, y]; .pt tensors) or dataset folder."
        ),
    ] = None,
    data_kw: DataKwOption = None,
    root: RootOption = None,
    fusion_samples: Annotated[
        int | None,
        typer.Option(
            help="Fusion set size [default: 400 from a dataset; every row of a --data file]."
        ),
    ] = None,
    from_part: Annotated[
        int | None,
        typer.Option(help="Draw the fusion set from part K of the training run's partition."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seeds the fusion set and the method [default: 0].")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Save the fused model as a checkpoint (.safetensors).")
    ] = None,
    save_pretrained: Annotated[
        Path | None,
        typer.Option(
            "--save-pretrained",
            help="Save the fused model as a folder: config.json, model.safetensors, README.md "
            "card, recipe.yaml.",
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            metavar="KEY=VALUE",
            help="Method option, JSON value, repeatable (see: neurofuse methods --options M).",
        ),
    ] = None,
    levels: Annotated[
        str | None,
        typer.Option(help="Comma-separated module names, each ending a level (default: auto)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda | cuda:N [default: auto].")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
    ] = False,
) -> None:
    from neurofuse.recipe import load_recipe, parse_recipe

    if config is not None:
        given = {
            "CHECKPOINTS": checkpoints,
            "--model": model,
            "--model-kw": model_kw,
            "--arch": arch,
            "--method": method,
            "--importance": importance,
            "--dataset": dataset,
            "--data": data_file,
            "--data-kw": data_kw,
            "--root": root,
            "--fusion-samples": fusion_samples,
            "--from-part": from_part,
            "--seed": seed,
            "--option": option,
            "--levels": levels,
        }
        clash = [flag for flag, value in given.items() if value]
        if clash:
            raise ValueError(
                f"--config runs the recipe as written; {', '.join(clash)} would change it. Edit "
                "the recipe instead (--out, --save-pretrained and --device may be given)"
            )
        recipe = load_recipe(config)
        update: dict[str, Any] = {}
        if out is not None:
            update["output"] = str(out)
        if save_pretrained is not None:
            update["save_pretrained"] = str(save_pretrained)
        if device is not None:
            update["device"] = device
        recipe = recipe.model_copy(update=update)
    else:
        if not checkpoints:
            raise ValueError("give the base models (two or more paths) or --config recipe.yaml")
        fields: dict[str, Any] = {
            "models": [str(p) for p in checkpoints],
            "model": model,
            "arch": arch,
            "model_kwargs": parse_pairs(model_kw, "--model-kw"),
            "dataset": dataset,
            "dataset_kwargs": parse_pairs(data_kw, "--data-kw"),
            "root": None if root is None else str(root),
            "data": None if data_file is None else str(data_file),
            "fusion_samples": fusion_samples,
            "from_part": from_part,
            "method": method or "kf_linear",
            "importance": importance,
            "levels": [n.strip() for n in levels.split(",") if n.strip()] if levels else None,
            "options": parse_pairs(option, "--option"),
            "seed": 0 if seed is None else seed,
            "device": device or "auto",
            "output": None if out is None else str(out),
            "save_pretrained": None if save_pretrained is None else str(save_pretrained),
        }
        if fields["model_kwargs"] and model is None and arch is None:
            raise ValueError("--model-kw needs --model MODULE:CLASS or --arch NAME")
        recipe = parse_recipe(fields, "command line")
    result = run_recipe(recipe, as_json=as_json)
    if as_json:
        print(json.dumps(result, indent=2))


fuse.__doc__ = _INPUTS_HELP
