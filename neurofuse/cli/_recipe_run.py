"""Running a fusion recipe (what ``neurofuse fuse`` does, from the command line or from
``--config``): load the base models, draw or read the fusion set, fuse, evaluate, save the model
with its provenance and the recipe that reproduces it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurofuse import cli
from neurofuse.checkpoint import file_sha256, save_checkpoint
from neurofuse.cli._common import (
    dataset_spec,
    load_checkpoints,
    load_dataset,
    metric_cells,
    metrics_table,
    resolve_dataset,
)
from neurofuse.cli._partition import fusion_set
from neurofuse.pretrained import RECIPE_FILE
from neurofuse.recipe import RECIPE_SUFFIX, ModelEntry, dump_recipe
from neurofuse.utils import to_jsonable


@dataclass
class _Run:
    """What the stages of a recipe run hand on to each other."""

    recipe: Any
    say: Callable[..., None]
    device: Any
    info: Any
    spec: Any
    options: dict[str, Any]
    loaded: list[Any] = field(default_factory=list)
    dataset: dict[str, Any] | None = None
    splits: Any = None
    fusion_data: Any = None
    set_info: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)
    importance: str | None = None
    fused: Any = None
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


def run_recipe(recipe: Any, as_json: bool = False) -> dict[str, Any]:
    """Run one fusion recipe: load, fuse, evaluate, save (with the recipe it ran). Returns
    what ``--json`` prints."""
    import neurofuse as nf
    from neurofuse.sources import ModelSpec
    from neurofuse.utils import resolve_device

    info = nf.method_info(recipe.method)  # unknown method: fail before loading anything
    saving = recipe.output is not None or recipe.save_pretrained is not None
    if saving and info.caps.target == "none":
        raise ValueError(
            f"method {recipe.method!r} returns the base models together (not one model of "
            "their architecture), so it cannot be saved; drop --out/--save-pretrained (its "
            "metrics are shown without saving)"
        )
    run = _Run(
        recipe=recipe,
        say=cli.err_console.print if as_json else cli.console.print,
        device=resolve_device(recipe.device),
        info=info,
        spec=ModelSpec(target=recipe.model, arch=recipe.arch, kwargs=recipe.model_kwargs),
        options=dict(recipe.options),
    )
    _load(run)
    _fusion_set(run)
    _fuse(run)
    _evaluate(run, show_table=not as_json)
    result: dict[str, Any] = {
        "method": recipe.method,
        "models": [str(m.path) for m in run.loaded],
        "seconds": round(run.seconds, 3),
        "fusion_set": {k: v for k, v in run.set_info.items() if k != "indices"},
        "metrics": run.metrics,
        "saved": [],
    }
    if not saving:
        run.say(
            "[dim]not saved: pass --out FILE.safetensors or --save-pretrained DIR to keep it[/dim]"
        )
        return result
    result["saved"] = _save(run)
    return result


def _load(run: _Run) -> None:
    """The base models (hash-checked against the recipe), the dataset, recorded options."""
    recipe = run.recipe
    early_spec, early = None, None
    if recipe.dataset is not None and run.spec.arch is not None:  # sizes of a zoo --arch
        early_spec = dataset_spec(recipe.dataset, recipe.dataset_kwargs, recipe.seed, recipe.root)
        early = load_dataset(early_spec)
    entries = recipe.entries()
    run.loaded = load_checkpoints([e.path for e in entries], run.device, run.spec, early)
    _check_hashes(entries, run.loaded)
    if len(run.loaded) < 2 and not run.info.caps.single_model:
        raise ValueError(f"fusion needs two or more models, got {len(run.loaded)}")
    first = run.loaded[0]
    if recipe.dataset is None and recipe.data is not None and not first.sidecar.get("dataset"):
        run.dataset = None  # a fusion set from a file, no test set
    else:
        run.dataset = resolve_dataset(
            first.sidecar.get("dataset"),
            recipe.dataset,
            dict(recipe.dataset_kwargs),
            recipe.seed,
            None if recipe.root is None else Path(recipe.root),
            str(first.path),
        )
    if run.dataset is not None:  # the one loaded for --arch when it is the same
        run.splits = early if run.dataset == early_spec else load_dataset(run.dataset)
    takes = run.info.option_names()
    if "sample_counts" in takes and "sample_counts" not in run.options:
        counts = recorded_sample_counts([m.sidecar for m in run.loaded])
        if counts is not None:
            run.options["sample_counts"] = counts
            run.say(f"[dim]sample_counts {counts} (from the checkpoints' metadata)[/dim]")


def _fusion_set(run: _Run) -> None:
    """The fusion set: read from the recipe's file, or drawn from the dataset."""
    from neurofuse.data import load_fusion_file

    recipe, dev = run.recipe, run.device
    if recipe.data is not None:
        x, y = load_fusion_file(recipe.data)
        if recipe.fusion_samples is not None and recipe.fusion_samples < len(x):
            import torch

            gen = torch.Generator().manual_seed(recipe.seed)
            pick = torch.randperm(len(x), generator=gen)[: recipe.fusion_samples]
            x, y = x[pick], None if y is None else y[pick]
        path = Path(recipe.data)
        run.set_info = {
            "size": len(x),
            "source": f"file {recipe.data}",
            "sha256": file_sha256(path) if path.is_file() else None,
            "labelled": y is not None,
            "seed": recipe.seed,
        }
        run.fusion_data = x.to(dev) if y is None else (x.to(dev), y.to(dev))
        return
    assert run.splits is not None and run.dataset is not None
    n = recipe.fusion_samples or 400
    idx, run.set_info = fusion_set(
        run.splits, run.dataset, run.loaded[0], n, recipe.seed, recipe.from_part
    )
    run.fusion_data = (run.splits.x_train[idx].to(dev), run.splits.y_train[idx].to(dev))
    run.resolved["fusion_samples"] = n
    if "from_part" in run.set_info:
        run.resolved["from_part"] = run.set_info["from_part"]


def _fuse(run: _Run) -> None:
    import neurofuse as nf

    recipe = run.recipe
    # what the user gave goes to nf.fuse as given (it refuses, in one line, an argument the
    # method would ignore); the CLI's own default importance only to a method that uses it
    run.importance = recipe.importance
    if run.importance is None and run.info.caps.importance:
        run.importance = "uniform"
    given: dict[str, Any] = {"importance": run.importance} if run.importance is not None else {}
    if recipe.levels is not None:
        given["levels"] = list(recipe.levels)
    of = f" of {run.dataset['name']}" if run.dataset is not None and recipe.data is None else ""
    run.say(
        f"Fusing {len(run.loaded)} models with [bold]{recipe.method}[/bold]"
        + (f" (importance {run.importance})" if run.importance is not None else "")
        + f" on {run.set_info['size']} samples from the {run.set_info['source']}{of}"
    )
    start = time.perf_counter()
    run.fused = nf.fuse(
        [m.model for m in run.loaded],
        run.fusion_data,
        method=recipe.method,
        seed=recipe.seed,
        device=run.device,
        progress=cli.err_console.is_terminal,
        **given,
        **run.options,
    )
    run.seconds = time.perf_counter() - start


def _evaluate(run: _Run, show_table: bool) -> None:
    """Test metrics of every base model, their ensemble and the fused model."""
    from neurofuse.evaluate import evaluate, evaluate_ensemble

    if run.splits is None or run.dataset is None:
        run.say(
            f"[dim]fusion took {run.seconds:.2f} s; no test set (pass --dataset NAME to "
            "evaluate)[/dim]"
        )
        return
    x, y, dev = run.splits.x_test, run.splits.y_test, run.device
    table = metrics_table(f"Test set of {run.dataset['name']}", "model")
    for m in run.loaded:
        got = evaluate(m.model, x, y, device=dev)
        run.metrics[str(m.path)] = got.to_dict()
        table.add_row(str(m.path), *metric_cells(got))
    ensemble = evaluate_ensemble([m.model for m in run.loaded], x, y, device=dev)
    run.metrics["ensemble"] = ensemble.to_dict()
    table.add_row(f"ensemble ({len(run.loaded)}x cost)", *metric_cells(ensemble), style="blue")
    got = evaluate(run.fused, x, y, device=dev)
    run.metrics["fused"] = got.to_dict()
    table.add_row(f"fused: {run.recipe.method}", *metric_cells(got), style="bold green")
    table.caption = f"fusion took {run.seconds:.2f} s on {dev}"
    if show_table:
        cli.console.print(table)


def _save(run: _Run) -> list[str]:
    """The checkpoint and/or model folder, each with the recipe that reproduces it."""
    import neurofuse as nf

    recipe, ds = run.recipe, run.dataset
    _check_saveable(run.fused, run.loaded[0].model, recipe.method, run.spec)
    ran = recipe.model_copy(
        update={
            "models": [ModelEntry(path=str(m.path), sha256=m.sha256) for m in run.loaded],
            "dataset": None if ds is None else ds["name"],
            "dataset_kwargs": {} if ds is None else dict(ds.get("kwargs") or {}),
            "root": None if ds is None else ds.get("root"),
            "importance": run.importance,
            "options": dict(run.options),
            **run.resolved,
        }
    )
    report = dict(getattr(run.fused, "neurofuse_report", {}))
    inputs = [
        {
            "path": str(m.path),
            "sha256": m.sha256,
            "kind": m.kind,
            "model": m.sidecar.get("model"),
            "partition": m.sidecar.get("partition"),
        }
        for m in run.loaded
    ]
    model_class = run.spec.describe() if run.spec.target is not None else None
    saved: list[str] = []
    if recipe.output is not None:
        out = Path(recipe.output)
        metadata = {
            "dataset": ds,
            "fusion": {
                "method": recipe.method,
                "options": to_jsonable(report.pop("options", run.options)),
                "importance": run.importance,
                "levels": recipe.levels,
                "seed": recipe.seed,
                "seconds": round(run.seconds, 3),
                "device": str(run.device),
                "fusion_set": run.set_info,
            },
            "inputs": [{**i, "path": _relative_to(Path(i["path"]), out)} for i in inputs],
            "model_class": model_class,
            "metrics": {
                "test": run.metrics.get("fused"),
                "ensemble_test": run.metrics.get("ensemble"),
            },
            "report": _jsonable_or_repr(report),
        }
        path = save_checkpoint(run.fused, out, metadata=metadata)
        recipe_path = dump_recipe(
            ran.model_copy(update={"output": str(path), "save_pretrained": None}),
            recipe_file_for(path),
        )
        run.say(
            f"saved [bold]{path}[/bold] (+ {path.with_suffix('.json').name}, {recipe_path.name})"
        )
        saved += [str(path), str(recipe_path)]
    if recipe.save_pretrained is not None:
        folder = Path(recipe.save_pretrained)
        folder.mkdir(parents=True, exist_ok=True)
        text_path = dump_recipe(
            ran.model_copy(update={"output": None, "save_pretrained": str(folder)}),
            folder / RECIPE_FILE,
        )
        nf.save_pretrained(
            run.fused,
            folder,
            model_class=model_class,
            card={
                "method": recipe.method,
                "inputs": [
                    {**i, "path": _relative_to(Path(i["path"]), folder / "x")} for i in inputs
                ],
                "fusion_set": {k: v for k, v in run.set_info.items() if k != "indices"},
                "metrics": run.metrics,
            },
            recipe_text=text_path.read_text(encoding="utf-8"),
        )
        run.say(
            f"saved [bold]{folder}[/bold] (config.json, model.safetensors, README.md, recipe.yaml)"
        )
        saved.append(str(folder))
    return saved


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
