"""The ``fuse`` command: fuse checkpoints into one model, evaluate it, save it with its
provenance (inputs and their hashes, options, fusion set, metrics, the method's report)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from neurofuse import cli
from neurofuse.checkpoint import save_checkpoint
from neurofuse.cli._common import (
    ArchOption,
    DataKwOption,
    ModelKwOption,
    ModelOption,
    RootOption,
    _int_list,
    dataset_spec,
    load_checkpoints,
    load_dataset,
    metric_cells,
    metrics_table,
    parse_pairs,
    resolve_dataset,
)
from neurofuse.cli._partition import FULL, PARTITION_FILE, read_partition_file
from neurofuse.pretrained import RECIPE_FILE
from neurofuse.recipe import RECIPE_SUFFIX, ModelEntry, dump_recipe
from neurofuse.utils import to_jsonable


def fusion_set(
    splits: Any,
    spec: dict[str, Any],
    first: Any,
    n: int,
    seed: int,
    from_part: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Indices of the fusion set and where they came from.

    ``from_part=K`` draws from part ``K`` of the ``partition.json`` beside the first model
    (the non-IID training run's split of this very dataset). Without it, the set comes from the
    first model's own part when its checkpoint records one of that partition (what the first
    client could hold), otherwise from the whole training split.
    """
    from neurofuse import data

    path, sidecar = first.path, first.sidecar
    record = read_partition_file(path.parent / PARTITION_FILE)
    recorded = sidecar.get("partition") or {}
    if from_part is not None:
        if record is None:
            raise ValueError(
                f"--from-part {from_part} needs the {PARTITION_FILE} of the training run beside "
                f"the first model ({path.parent / PARTITION_FILE} does not exist)"
            )
        if record.get("dataset") != spec:
            raise ValueError(
                f"{path.parent / PARTITION_FILE} partitions {record.get('dataset')}, not the "
                f"dataset of this fusion {spec}; --from-part would index another dataset"
            )
        part_index = from_part
    elif (
        record is not None
        and record.get("scheme") not in ("iid", FULL)
        and record.get("dataset") == spec
        and isinstance(recorded.get("part"), int)
        and 0 <= recorded["part"] < len(record["indices"])
    ):
        part_index = recorded["part"]
    else:
        idx = data.fusion_indices(splits.y_train, None, n, seed=seed)
        return idx, {
            "size": len(idx),
            "source": "whole training split",
            "seed": seed,
            "indices": _int_list(idx),
        }
    assert record is not None
    part = data.Partition.from_dict(record)
    idx = data.fusion_indices(splits.y_train, part, n, seed=seed, from_part=part_index)
    source = {
        "source": f"part {part_index} of the {record['scheme']} partition",
        "partition_file": str(path.parent / PARTITION_FILE),
        "scheme": record["scheme"],
        "from_part": part_index,
    }
    return idx, {"size": len(idx), **source, "seed": seed, "indices": _int_list(idx)}


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


def _say(as_json: bool) -> Any:
    return cli.err_console.print if as_json else cli.console.print


def run_recipe(recipe: Any, as_json: bool = False) -> dict[str, Any]:
    """Run one fusion recipe: load, fuse, evaluate, save (with the recipe it ran)."""
    import neurofuse as nf
    from neurofuse.data import load_fusion_file
    from neurofuse.evaluate import evaluate, evaluate_ensemble
    from neurofuse.sources import ModelSpec
    from neurofuse.utils import resolve_device

    say = _say(as_json)
    dev = resolve_device(recipe.device)
    method = recipe.method
    takes = nf.method_options(method)  # unknown method: fail before loading anything
    info = nf.method_info(method)
    options = dict(recipe.options)
    saving = recipe.output is not None or recipe.save_pretrained is not None
    if saving and info.caps.target == "none":
        raise ValueError(
            f"method {method!r} returns the base models together (not one model of their "
            "architecture), so it cannot be saved; drop --out/--save-pretrained (its metrics "
            "are shown without saving)"
        )
    spec = ModelSpec(target=recipe.model, arch=recipe.arch, kwargs=recipe.model_kwargs)
    named = None
    if recipe.dataset is not None:
        named = dataset_spec(recipe.dataset, recipe.dataset_kwargs, recipe.seed, recipe.root)
    early = load_dataset(named) if named is not None and spec.arch is not None else None
    entries = recipe.entries()
    loaded = load_checkpoints([e.path for e in entries], dev, spec, early)
    _check_hashes(entries, loaded)
    if len(loaded) < 2 and not info.caps.single_model:
        raise ValueError(f"fusion needs two or more models, got {len(loaded)}")
    first = loaded[0]
    if recipe.dataset is None and recipe.data is not None and not first.sidecar.get("dataset"):
        ds = None  # a fusion set from a file, no test set
    else:
        ds = resolve_dataset(
            first.sidecar.get("dataset"),
            recipe.dataset,
            dict(recipe.dataset_kwargs),
            recipe.seed,
            None if recipe.root is None else Path(recipe.root),
            str(first.path),
        )
    if "sample_counts" in takes and "sample_counts" not in options:
        counts = recorded_sample_counts([m.sidecar for m in loaded])
        if counts is not None:
            options["sample_counts"] = counts
            say(f"[dim]sample_counts {counts} (from the checkpoints' metadata)[/dim]")
    splits = load_dataset(ds) if ds is not None else None
    resolved: dict[str, Any] = {}
    if recipe.data is not None:
        x, y = load_fusion_file(recipe.data)
        rows = len(x)
        if recipe.fusion_samples is not None and recipe.fusion_samples < rows:
            import torch

            pick = torch.randperm(rows, generator=torch.Generator().manual_seed(recipe.seed))
            x, y = (
                x[pick[: recipe.fusion_samples]],
                None if y is None else y[pick[: recipe.fusion_samples]],
            )
        set_info: dict[str, Any] = {
            "size": len(x),
            "source": f"file {recipe.data}",
            "sha256": file_sha256(Path(recipe.data)) if Path(recipe.data).is_file() else None,
            "labelled": y is not None,
            "seed": recipe.seed,
        }
        fusion_data: Any = x.to(dev) if y is None else (x.to(dev), y.to(dev))
    else:
        assert splits is not None and ds is not None
        n = recipe.fusion_samples or 400
        idx, set_info = fusion_set(splits, ds, first, n, recipe.seed, recipe.from_part)
        fusion_data = (splits.x_train[idx].to(dev), splits.y_train[idx].to(dev))
        resolved["fusion_samples"] = n
        if "from_part" in set_info:
            resolved["from_part"] = set_info["from_part"]
    models = [m.model for m in loaded]
    # what the user gave goes to nf.fuse as given (it refuses, in one line, an argument the
    # method would ignore); the CLI's own default importance only to a method that uses it
    importance = recipe.importance
    if importance is None and info.caps.importance:
        importance = "uniform"
    given: dict[str, Any] = {"importance": importance} if importance is not None else {}
    if recipe.levels is not None:
        given["levels"] = list(recipe.levels)
    say(
        f"Fusing {len(models)} models with [bold]{method}[/bold]"
        + (f" (importance {importance})" if importance is not None else "")
        + f" on {set_info['size']} samples from the {set_info['source']}"
        + (f" of {ds['name']}" if ds is not None and recipe.data is None else "")
    )
    start = time.perf_counter()
    fused = nf.fuse(
        models,
        fusion_data,
        method=method,
        seed=recipe.seed,
        device=dev,
        progress=cli.err_console.is_terminal,
        **given,
        **options,
    )
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {}
    if splits is not None:
        assert ds is not None
        table = metrics_table(f"Test set of {ds['name']}", "model")
        for m in loaded:
            got = evaluate(m.model, splits.x_test, splits.y_test, device=dev)
            metrics[str(m.path)] = got.to_dict()
            table.add_row(str(m.path), *metric_cells(got))
        ensemble = evaluate_ensemble(models, splits.x_test, splits.y_test, device=dev)
        metrics["ensemble"] = ensemble.to_dict()
        table.add_row(f"ensemble ({len(models)}x cost)", *metric_cells(ensemble), style="blue")
        got = evaluate(fused, splits.x_test, splits.y_test, device=dev)
        metrics["fused"] = got.to_dict()
        table.add_row(f"fused: {method}", *metric_cells(got), style="bold green")
        table.caption = f"fusion took {seconds:.2f} s on {dev}"
        if not as_json:
            cli.console.print(table)
    else:
        say(
            f"[dim]fusion took {seconds:.2f} s; no test set (pass --dataset NAME to evaluate)[/dim]"
        )
    ran = recipe.model_copy(
        update={
            "models": [ModelEntry(path=str(m.path), sha256=m.sha256) for m in loaded],
            "dataset": None if ds is None else ds["name"],
            "dataset_kwargs": {} if ds is None else dict(ds.get("kwargs") or {}),
            "root": None if ds is None else ds.get("root"),
            "importance": importance,
            "options": {k: v for k, v in options.items()},
            **resolved,
        }
    )
    result: dict[str, Any] = {
        "method": method,
        "models": [str(m.path) for m in loaded],
        "seconds": round(seconds, 3),
        "fusion_set": {k: v for k, v in set_info.items() if k != "indices"},
        "metrics": metrics,
        "saved": [],
    }
    if not saving:
        say("[dim]not saved: pass --out FILE.safetensors or --save-pretrained DIR to keep it[/dim]")
        return result
    _check_saveable(fused, models[0], method, spec)
    report = dict(getattr(fused, "neurofuse_report", {}))
    inputs = [
        {
            "path": str(m.path),
            "sha256": m.sha256,
            "kind": m.kind,
            "model": m.sidecar.get("model"),
            "partition": m.sidecar.get("partition"),
        }
        for m in loaded
    ]
    model_class = spec.describe() if spec.target is not None else None
    if recipe.output is not None:
        out = Path(recipe.output)
        metadata = {
            "dataset": ds,
            "fusion": {
                "method": method,
                "options": to_jsonable(report.pop("options", options)),
                "importance": importance,
                "levels": recipe.levels,
                "seed": recipe.seed,
                "seconds": round(seconds, 3),
                "device": str(dev),
                "fusion_set": set_info,
            },
            "inputs": [{**i, "path": _relative_to(Path(i["path"]), out)} for i in inputs],
            "model_class": model_class,
            "metrics": {
                "test": metrics.get("fused"),
                "ensemble_test": metrics.get("ensemble"),
            },
            "report": _jsonable_or_repr(report),
        }
        path = save_checkpoint(fused, out, metadata=metadata)
        recipe_path = dump_recipe(
            ran.model_copy(update={"output": str(path), "save_pretrained": None}),
            recipe_file_for(path),
        )
        say(f"saved [bold]{path}[/bold] (+ {path.with_suffix('.json').name}, {recipe_path.name})")
        result["saved"] += [str(path), str(recipe_path)]
    if recipe.save_pretrained is not None:
        folder = Path(recipe.save_pretrained)
        folder.mkdir(parents=True, exist_ok=True)
        text_path = dump_recipe(
            ran.model_copy(update={"output": None, "save_pretrained": str(folder)}),
            folder / RECIPE_FILE,
        )
        nf.save_pretrained(
            fused,
            folder,
            model_class=model_class,
            card={
                "method": method,
                "inputs": [
                    {**i, "path": _relative_to(Path(i["path"]), folder / "x")} for i in inputs
                ],
                "fusion_set": {k: v for k, v in set_info.items() if k != "indices"},
                "metrics": metrics,
            },
            recipe_text=text_path.read_text(encoding="utf-8"),
        )
        say(f"saved [bold]{folder}[/bold] (config.json, model.safetensors, README.md, recipe.yaml)")
        result["saved"].append(str(folder))
    return result


def recipe_file_for(weights: Path) -> Path:
    """``run/fused.safetensors`` -> ``run/fused.recipe.yaml``."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + RECIPE_SUFFIX)


def _check_hashes(entries: Sequence[Any], loaded: Sequence[Any]) -> None:
    """A recipe that records a model's SHA-256 refuses a file that changed since."""
    if len(entries) != len(loaded):
        if any(e.sha256 for e in entries):
            raise ValueError(
                "the recipe records SHA-256 hashes but its model paths now name "
                f"{len(loaded)} files instead of {len(entries)}; list the files one by one"
            )
        return
    for entry, got in zip(entries, loaded, strict=True):
        if entry.sha256 and entry.sha256 != got.sha256:
            raise ValueError(
                f"{got.path} changed since the recipe was written (SHA-256 {got.sha256[:12]}..., "
                f"recipe {entry.sha256[:12]}...); restore that file or drop its sha256 from the "
                "recipe to fuse the new one"
            )


def _check_saveable(fused: Any, reference: Any, method: str, spec: Any) -> None:
    if getattr(fused, "neurofuse_config", None) is not None:
        return
    if spec.target is not None and type(fused) is type(reference):
        return
    raise ValueError(
        f"method {method!r} returned a {type(fused).__name__}, not a model of the base "
        "models' architecture, so it cannot be saved as one model; its metrics are shown "
        "above, and the base models already hold all of its weights"
    )


def file_sha256(path: Path) -> str:
    from neurofuse.sources import _sha256

    return _sha256(path)


def recorded_sample_counts(sidecars: Sequence[dict[str, Any]]) -> list[int] | None:
    """Training samples of each checkpoint (the sum of its recorded class counts), for
    methods that weigh models by data size (FedAvg); None when one checkpoint lacks them."""
    counts = []
    for sidecar in sidecars:
        class_counts = (sidecar.get("partition") or {}).get("class_counts")
        if not isinstance(class_counts, list) or not class_counts:
            return None
        counts.append(int(sum(class_counts)))
    return counts


def _relative_to(path: Path, out: Path) -> str:
    """``path`` as seen from the folder of ``out`` (portable when both move together)."""
    return os.path.relpath(path.resolve(), Path(out).resolve().parent)


def _jsonable_or_repr(report: dict[str, Any]) -> dict[str, Any]:
    """The method's diagnostics as JSON; values that do not convert are kept as ``repr``."""
    from neurofuse.utils import to_jsonable

    clean = {}
    for key, value in report.items():
        try:
            clean[str(key)] = to_jsonable(value)
        except TypeError:
            clean[str(key)] = repr(value)
    return clean
