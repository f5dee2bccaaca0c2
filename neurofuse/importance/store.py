"""Scores of every model at every level, computed in one call, and kept beside a checkpoint.

Two places to compute importance (paper appendix F.4.2):

- on the **fusion set**, by whoever fuses: ``fuse(models, data, importance="conductance")`` does
  it on the fly, or ``compute_importance(models, fusion_data, "conductance")`` ahead of time;
- by **each model's owner on its own data** (more reliable: a model is explained on the data it
  learned from; natural in federated learning, where data stays with its client)::

      scores = compute_importance([model], (x_own, y_own), "conductance")[0]
      save_importance(importance_path("client3/model"), scores, {"samples": len(x_own)})
      ...  # the server
      table = [load_importance(importance_path(p))[0] for p in checkpoints]
      fused = fuse(models, fusion_data, importance=table)

Scores are stored as ``{node_name: (d,) float32}``, normalised to mean 1 per node; node names are
those of ``neurofuse.graph.trace(model)``, the same for every model of one architecture.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neurofuse.checkpoint import CheckpointError, checkpoint_paths, load_tensors, save_tensors
from neurofuse.importance import attribution as attr
from neurofuse.importance.probes import default_nodes, probe
from neurofuse.importance.provider import (
    Importance,
    ImportanceSpec,
    build_score_function,
    normalise,
)
from neurofuse.importance.scores import NodeScores

CONTENT = "neurofuse-importance"
SUFFIX = ".importance"


def _coerce_data(data: Any, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        if labels is not None:
            raise ValueError("labels given twice: in data=(inputs, labels) and as labels=")
        data, labels = data
        labels = torch.as_tensor(labels)
    if not isinstance(data, Tensor):
        raise TypeError(
            "data must be an inputs tensor or an (inputs, labels) pair; stack a Dataset or "
            f"DataLoader into tensors first (got {type(data).__name__})"
        )
    if data.shape[0] == 0:
        raise ValueError("data is empty: give at least one sample")
    x = data if data.is_floating_point() else data.float()
    if not torch.isfinite(x).all():
        raise ValueError("data contains NaN or Inf values; clean or drop those samples")
    if labels is not None:
        labels = labels.to(x.device)
    return x, labels


def _private(model: nn.Module, device: torch.device) -> nn.Module:
    clone = copy.deepcopy(model).to(device).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def compute_importance(
    models: nn.Module | Sequence[nn.Module],
    data: Any,
    method: ImportanceSpec = "conductance",
    *,
    nodes: str | Sequence[str] = "auto",
    labels: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Importance scores of every model at every node, normalised to mean 1 per node.

    Args:
        models: one model or a list (never modified: the work is done on copies).
        data: inputs ``(B, ...)`` or an ``(inputs, labels)`` pair, on the device to compute on.
        method: a registered score name, ``(name, {options})``, an :class:`Importance`, or a
            callable ``f(model, node_name, output) -> (d,)``. ``mix``/``power`` are not applied
            here (scores are stored plain); ``fuse()`` applies its own when it uses them.
        nodes: ``"auto"`` (every node the fusion engines ask for, see
            :func:`neurofuse.importance.default_nodes`) or a list of fx node names.
        labels: class labels (the attribution target); default: each model's prediction.

    Returns:
        One ``{node_name: (d,) float32 CPU tensor}`` dict per model, ready for
        ``fuse(..., importance=...)`` or :func:`save_importance`.
    """
    model_list = [models] if isinstance(models, nn.Module) else list(models)
    if not model_list or not all(isinstance(m, nn.Module) for m in model_list):
        raise TypeError("models must be an nn.Module or a non-empty list of them")
    x, y = _coerce_data(data, labels)
    spec = Importance.coerce(method)
    if not isinstance(spec.score, str) and not callable(spec.score):
        raise TypeError("method must be a score name, (name, {options}), Importance or callable")
    copies = [_private(m, x.device) for m in model_list]
    fn = None
    if isinstance(spec.score, str):
        fn = build_score_function(spec.score, copies, x, y, spec.options)
    else:
        fn = spec.score
    out = []
    for model in copies:
        names = default_nodes(model) if nodes == "auto" else list(nodes)
        if isinstance(nodes, str) and nodes != "auto":
            raise ValueError(f"nodes must be 'auto' or a list of node names, got {nodes!r}")
        if isinstance(fn, NodeScores):
            raw = fn.compute(model, names)
        else:
            raw = _call_per_node(fn, model, x, names)
        out.append({n: normalise(s).cpu() for n, s in raw.items()})
    return out


def _call_per_node(fn: Any, model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    """A plain score function, given each node's value on all of ``x`` (one forward pass)."""
    probed = probe(model, names)
    with torch.no_grad(), attr.capture(probed.probes) as store:
        probed.module(x)
    raw = {}
    for n in names:
        value = store[n]
        width = value.shape[attr.neuron_axis_of(probed.module, n, value)]
        s = torch.as_tensor(fn(model, n, value))
        s = torch.ones(width) if s.numel() == 0 else s.flatten()
        if s.numel() != width:
            raise ValueError(
                f"the score function gave {s.numel()} scores at {n!r}, which has {width} neurons"
            )
        raw[n] = s
    return raw


def importance_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where a checkpoint's scores live: ``run/model`` -> ``run/model.importance`` (that is,
    ``run/model.importance.safetensors`` and ``run/model.importance.json``)."""
    weights, _ = checkpoint_paths(checkpoint)
    stem = weights.with_suffix("")
    return stem.with_name(stem.name + SUFFIX)


def save_importance(
    path: str | os.PathLike[str],
    scores: Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save one model's ``{node_name: (d,) scores}`` (safetensors + JSON sidecar, via
    :func:`neurofuse.checkpoint.save_tensors`); ``metadata`` records how they were computed
    (score name and options, data, sample count). Returns the safetensors path."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty {node_name: tensor} mapping (one model's)")
    for name, s in scores.items():
        _check_scores(name, torch.as_tensor(s), path)
    meta = dict(metadata or {})
    if "content" in meta:
        raise ValueError("metadata key 'content' is reserved for the importance file marker")
    meta["content"] = CONTENT
    return save_tensors(path, {k: torch.as_tensor(v).float() for k, v in scores.items()}, meta)


def load_importance(
    path: str | os.PathLike[str], *, device: str | torch.device | None = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load scores saved by :func:`save_importance`; return ``(scores, sidecar)``."""
    tensors, sidecar = load_tensors(path, device=device)
    if sidecar.get("content") != CONTENT:
        raise CheckpointError(
            f"{path}: holds tensors, but not importance scores (content={sidecar.get('content')!r})"
        )
    for name, s in tensors.items():
        _check_scores(name, s, path)
    return tensors, sidecar


def _check_scores(name: str, s: Tensor, where: Any) -> None:
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(
            f"{where}: scores {name!r} must be a non-empty vector, got shape {tuple(s.shape)}"
        )
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"{where}: scores {name!r} must be finite and non-negative")
