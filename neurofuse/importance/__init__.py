"""Neuron importance scores as fusion sees them: one non-negative weight per neuron.

``importance`` given to :func:`neurofuse.fuse` may be

- a registered name: ``"uniform"``, ``"activation"``, ``"variance"``, ``"grad_x_activation"``,
  ``"conductance"``, ``"deeplift"`` (:func:`available_importance`; add your own with
  :func:`register_importance`);
- ``(name, {options})`` or :class:`Importance` ``(name, mix=..., power=..., **options)``;
- a callable ``f(model, node_name, output) -> Tensor`` with one score per neuron of ``output``
  (the value of that fx node of ``model`` on the fusion set);
- precomputed scores: one ``{node_name: Tensor}`` dict per model (:func:`compute_importance`,
  :func:`load_importance`).

Whatever the source, the engines get weights normalised per model and node to mean 1, tempered
and mixed with uniform (:func:`normalise`; default ``mix=0.5``), so that a score can shift the
balance between neurons but never silence a model.
"""

from __future__ import annotations

from neurofuse.importance import scores as _scores  # noqa: F401  (registers the built-ins)
from neurofuse.importance.probes import default_nodes, node_names, probe
from neurofuse.importance.provider import (
    DEFAULT_MIX,
    DEFAULT_POWER,
    Importance,
    ImportanceProvider,
    ImportanceSpec,
    describe,
    normalise,
)
from neurofuse.importance.registry import (
    ScoreFunction,
    available_importance,
    register_importance,
)
from neurofuse.importance.scores import NodeScores
from neurofuse.importance.store import (
    compute_importance,
    importance_path,
    load_importance,
    save_importance,
)

__all__ = [
    "DEFAULT_MIX",
    "DEFAULT_POWER",
    "Importance",
    "ImportanceProvider",
    "ImportanceSpec",
    "NodeScores",
    "ScoreFunction",
    "available_importance",
    "compute_importance",
    "default_nodes",
    "describe",
    "importance_path",
    "load_importance",
    "node_names",
    "normalise",
    "probe",
    "register_importance",
    "save_importance",
]
