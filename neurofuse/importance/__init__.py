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

Whatever the source, the engines get weights normalised per model and node to mean 1 and mixed
half-and-half with uniform (:func:`normalise`, ``mix=0.5``), and the classifier head stays uniform
(``head_mix=1``): a score shifts the balance between a model's neurons but never silences a model
or re-weights one class's logits against another's. ``benchmarks/results/importance_robustness.md``
has the measurements behind these defaults.

Which to use: ``conductance`` (the paper's choice; all levels in one pass over ``n_steps + 1``
path points) or ``deeplift`` (same rules as Captum's, one pass; both timed in
``benchmarks/results/importance_speed.md``) help most with the neuron-interpolation methods,
most of all when each model's owner computes them on its own data (:func:`compute_importance`,
saved beside the checkpoint with :func:`save_importance`). ``grad_x_activation`` is a one-pass
first-order proxy; ``activation`` and ``variance`` need neither labels nor gradients and change
little. OTFusion and Transformer OTFusion weigh their averages with the scores (their
transports keep uniform marginals); as marginals (``importance_in="marginals"``, the original
proposal) the scores make the plans split neurons and cost accuracy.
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
