"""The built-in importance scores, registered by name.

Each scores neuron ``j`` of a node by a mean over samples and non-neuron positions of:

- ``uniform``: 1 (every neuron alike); free.
- ``activation``: ``|z_j|``; one forward pass.
- ``variance``: the variance of ``z_j`` (not a mean of anything); one forward pass.
- ``grad_x_activation``: ``|z_j dF_t/dz_j|``; one forward and backward pass.
- ``deeplift``: ``|(z_j - z_j^0) m_j|`` with DeepLIFT multipliers ``m`` (Captum's
  ``LayerDeepLift`` rules); one forward and backward pass over input and baseline.
- ``conductance``: ``|sum_i dF_t/dz_j(x_i) (z_j(x_{i+1}) - z_j(x_i))|`` along the path from
  the baseline to the input (Captum's ``LayerConductance``); one pass over n_steps+1 path points.

``F_t`` is the output of the target class: the true label when labels are given, else the
model's own prediction (option ``target``); ``z^0`` and the path start at the baseline input
(option ``baseline``, default the all-zero input). Scores that need the model compute every node a
fusion asks for (:func:`neurofuse.importance.probes.default_nodes`) in one go on first use, and
serve the rest from a cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neurofuse.checks import positive_int
from neurofuse.graph import GraphCache
from neurofuse.importance import attribution as attr
from neurofuse.importance import reference
from neurofuse.importance.probes import Probed, default_nodes, probe
from neurofuse.importance.registry import register_importance
from neurofuse.progress import status

Compute = Callable[[Probed, Tensor, "Tensor | None", Sequence[str]], dict[str, Tensor]]


class NodeScores:
    """A score function over the nodes of models, computed per model in one pass and cached.

    ``compute(probed, inputs, targets, names)`` returns the scores of all ``names`` at once.
    Called as ``f(model, name, output)``, the first request for a model computes ``name`` together
    with every node the fusion engines will ask for; :meth:`compute` gives any set directly.
    ``output`` is never read (it may be ``None``): the scores come from the inputs.
    """

    #: (ImportanceProvider.raw: the engine may call it without a node's values)
    computes_from_inputs = True

    def __init__(
        self,
        inputs: Tensor,
        labels: Tensor | None,
        compute: Compute,
        *,
        target: str | None = "auto",
        deeplift: bool = False,
    ) -> None:
        if target is not None and target not in attr.TARGETS:
            raise ValueError(f"target must be one of {attr.TARGETS}, got {target!r}")
        self.inputs, self.labels = inputs, labels
        self._compute, self.target, self.deeplift = compute, target, deeplift
        self._cache: dict[int, tuple[nn.Module, dict[str, Tensor]]] = {}
        #: traces of the models; the fusion replaces it with its own (one trace per model)
        self.graphs = GraphCache()
        #: show a status line on stderr while a model's scores are computed (set by the fusion)
        self.progress = False

    def compute(self, model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
        """Scores ``(d,)`` of the nodes ``names`` of ``model`` on the factory's inputs."""
        names = list(dict.fromkeys(names))
        probed = probe(model, names, deeplift=self.deeplift, gm=self.graphs(model))
        targets = None
        if self.target is not None:
            targets = attr.resolve_targets(model, self.inputs, self.labels, self.target)
        return {
            n: s.detach() for n, s in self._compute(probed, self.inputs, targets, names).items()
        }

    def __call__(self, model: nn.Module, name: str, output: Tensor | None) -> Tensor:
        _, cache = self._cache.setdefault(id(model), (model, {}))
        if name not in cache:
            names = [name]
            if not cache:  # first request: everything the engines will ask for, in one pass
                names += [n for n in default_nodes(self.graphs(model)) if n != name]
            with status(self.progress, f"importance: scoring {len(names)} nodes of a model"):
                cache.update(self.compute(model, names))
        return cache[name]


class ActivationScores(NodeScores):
    """Forward-only scores: computed from the node's value when the caller already has it."""

    def __init__(self, inputs: Tensor, labels: Tensor | None, stat: str, batch_size: int) -> None:
        super().__init__(
            inputs,
            labels,
            lambda p, x, t, names: attr.activation_stats(p, x, names, stat, batch_size),
            target=None,
        )
        self.stat = stat

    def __call__(self, model: nn.Module, name: str, output: Tensor | None) -> Tensor:
        if output is None:  # the caller does not hold it: from the inputs, in batches
            return super().__call__(model, name, output)
        return attr.reduce_output(self.graphs(model), name, output, self.stat)


@register_importance("uniform", "every neuron weighs the same")
def uniform(models: Sequence[nn.Module], inputs: Tensor, labels: Tensor | None) -> Any:
    def score(model: nn.Module, name: str, output: Tensor | None) -> Tensor:
        return torch.ones(0)  # the empty tensor means "uniform": filled in by ImportanceProvider

    score.computes_from_inputs = True  # type: ignore[attr-defined]
    return score


@register_importance("activation", "mean |activation| of each neuron (forward pass only)")
def activation(
    models: Sequence[nn.Module], inputs: Tensor, labels: Tensor | None, *, batch_size: int = 256
) -> NodeScores:
    return ActivationScores(inputs, labels, "abs", positive_int("batch_size", batch_size))


@register_importance("variance", "variance of each neuron's activation (forward pass only)")
def variance(
    models: Sequence[nn.Module], inputs: Tensor, labels: Tensor | None, *, batch_size: int = 256
) -> NodeScores:
    return ActivationScores(inputs, labels, "variance", positive_int("batch_size", batch_size))


@register_importance(
    "grad_x_activation", "mean |activation x gradient of the target logit| (one backward pass)"
)
def grad_x_activation(
    models: Sequence[nn.Module],
    inputs: Tensor,
    labels: Tensor | None,
    *,
    target: str = "auto",
    batch_size: int = 256,
) -> NodeScores:
    batch_size = positive_int("batch_size", batch_size)
    return NodeScores(
        inputs,
        labels,
        lambda p, x, t, names: attr.gradient_x_activation(p, x, t, names, batch_size),
        target=target,
    )


@register_importance("conductance", "mean |layer conductance| (Dhamdhere et al. 2018; Captum)")
def conductance(
    models: Sequence[nn.Module],
    inputs: Tensor,
    labels: Tensor | None,
    *,
    n_steps: int = 10,
    method: str = "gausslegendre",
    baseline: Any = "zeros",
    target: str = "auto",
    internal_batch_size: int = 256,
    backend: str = "fused",
) -> NodeScores:
    """``n_steps`` path steps (10, as in the paper's reference code; how far these scores are from
    a 100-step integral, and what more steps cost, is measured by
    ``benchmarks/importance_speed.py`` in ``benchmarks/results/importance_speed.md``, column
    "vs n_steps=100"; Captum's default is 50). ``internal_batch_size`` path points (samples x
    ``n_steps + 1``) are evaluated together: on a VGG-small pair with 400 samples, KF Linear with
    conductance grows the process by 257 MiB at 256 (the default) against 1,499 MiB at 2048,
    and is faster (2.7 s against 3.7 s): the activations kept for the backward pass are the
    memory, and small chunks stay in cache.
    ``backend="fused"`` attributes every node in one pass; ``"captum"`` calls Captum's
    ``LayerConductance`` once per node (same numbers, slower; for reference)."""
    positive_int("n_steps", n_steps)
    positive_int("internal_batch_size", internal_batch_size)
    attr.path_alphas(2, method)  # validates the method name
    x0 = attr.resolve_baseline(baseline, inputs)
    backends = {"fused": attr.conductance, "captum": reference.captum_conductance}
    if backend not in backends:
        raise ValueError(f"backend must be one of {sorted(backends)}, got {backend!r}")
    run = backends[backend]
    return NodeScores(
        inputs,
        labels,
        lambda p, x, t, names: run(p, x, t, x0, names, n_steps, method, internal_batch_size),
        target=target,
    )


@register_importance("deeplift", "mean |DeepLIFT attribution| (Shrikumar et al. 2017; Captum)")
def deeplift(
    models: Sequence[nn.Module],
    inputs: Tensor,
    labels: Tensor | None,
    *,
    baseline: Any = "zeros",
    target: str = "auto",
    batch_size: int = 256,
    backend: str = "fused",
) -> NodeScores:
    """``backend="fused"`` attributes every node in one pass; ``"captum"`` calls Captum's
    ``LayerDeepLift`` once per node (same numbers, slower; for reference)."""
    batch_size = positive_int("batch_size", batch_size)
    x0 = attr.resolve_baseline(baseline, inputs)
    backends = {"fused": attr.deeplift, "captum": reference.captum_deeplift}
    if backend not in backends:
        raise ValueError(f"backend must be one of {sorted(backends)}, got {backend!r}")
    if backend == "captum":
        reference.load_captum()  # fail early when Captum is missing
    run = backends[backend]
    return NodeScores(
        inputs,
        labels,
        lambda p, x, t, names: run(p, x, t, x0, names, batch_size),
        target=target,
        deeplift=True,
    )
