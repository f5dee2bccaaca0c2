"""What the fusion engines see of importance: normalised, safely mixed scores per node.

The engines ask ``provider.scores(model_index, node_name, output, width)`` and get ``width``
positive weights with mean 1. Raw scores become weights in three steps:

1. **scale**: divide by their mean, per model and per node. Raw attributions of the models differ
   in scale (on a sharded fusion set, the second model's Conductance is a small fraction of the
   first's: the data are not its classes); weighting by raw scale all but drops that model, which
   is how the reference code loses accuracy with Conductance (the scale ratios and the loss are
   measured in ``benchmarks/results/importance_robustness.md``, "Why scores hurt", item 1);
2. **temper** (``power``): ``s <- s**power / mean(s**power)``; ``power < 1`` flattens the heavy
   tail of attribution scores (``0.5`` is a square root, ``0`` is uniform);
3. **mix** with uniform: ``s <- (1 - mix) s + mix`` (default ``mix=0.5``), so every neuron keeps
   at least ``mix`` of an average neuron's weight: scores computed on data a model never saw
   call its specialised neurons unimportant, and k-means would merge them away.

At the classifier head the "neurons" are classes, aligned across models, and the engines turn
the scores into per-class convex combinations of the models' logits. Those re-weight one class's
logits against another's; wherever the fusion set misses classes they are unreliable (what they
cost, depending on the target: item 2 of the same section). The default ``head_mix=1`` keeps the
head uniform: the plain mean of the logits, as in an ensemble.
``benchmarks/results/importance_robustness.md`` has the measurements behind all three defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neurofuse.graph import GraphCache, TraceError
from neurofuse.importance.registry import ScoreFunction, get_factory

#: Default share of uniform weight mixed into every non-uniform score (see module docstring).
DEFAULT_MIX = 0.5
#: Default tempering exponent.
DEFAULT_POWER = 1.0
#: Default share of uniform weight at the classifier head (1: per-class scores are ignored).
DEFAULT_HEAD_MIX = 1.0
FLOOR = 1e-6


def normalise(scores: Tensor, *, power: float = 1.0, mix: float = 0.0) -> Tensor:
    """Per-node weights from raw scores: ``s / mean(s)``, tempered by ``power``, mixed with
    uniform by ``mix``, floored at 1e-6 (a neuron with score 0 still needs a group).

    ``normalise(s)`` alone is the plain mean-1 scaling. All-zero scores become uniform.
    """
    s = scores.detach().to(torch.float32).flatten()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("importance scores must be finite and non-negative")
    mean = s.mean() if s.numel() else s.new_zeros(())
    if float(mean) <= 0:
        return torch.ones_like(s)
    s = s / mean
    if power != 1.0:
        s = s.pow(power)
        s = s / s.mean()
    if mix:
        s = (1.0 - mix) * s + mix
    return s.clamp_min(FLOOR)


class Importance:
    """An importance score with its options: the full form of ``importance=`` in ``fuse()``.

    Args:
        score: a registered name (:func:`available_importance`), a callable
            ``f(model, node_name, output) -> (d,)`` scores, or precomputed scores (one
            ``{node_name: (d,) tensor}`` dict per model, e.g. from :func:`compute_importance`
            or :func:`load_importance`).
        mix: share of uniform weight mixed in, in [0, 1] (0: the raw normalised score).
        power: tempering exponent >= 0 applied before mixing (1: none).
        head_mix: ``mix`` at the model's output node (the classifier head, whose "neurons" are
            classes). Default 1: the head target is the plain mean of the models' logits, as in
            an ensemble; per-class weights rescale logits of some classes against others.
        **options: options of the named score, e.g. ``n_steps=32`` or ``baseline="mean"`` for
            ``"conductance"``; the error for an unknown one lists the valid ones.

    ``fuse(..., importance=("conductance", {"n_steps": 32, "mix": 0}))`` is the same as
    ``importance=Importance("conductance", n_steps=32, mix=0)``.
    """

    def __init__(
        self,
        score: Any = "uniform",
        *,
        mix: float = DEFAULT_MIX,
        power: float = DEFAULT_POWER,
        head_mix: float = DEFAULT_HEAD_MIX,
        **options: Any,
    ) -> None:
        if isinstance(score, Importance):
            raise TypeError("score is already an Importance; pass it directly")
        for label, value in (("mix", mix), ("head_mix", head_mix)):
            if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{label} must be a number in [0, 1], got {value!r}")
        if not isinstance(power, int | float) or float(power) < 0.0:
            raise ValueError(f"power must be a number >= 0, got {power!r}")
        if options and not isinstance(score, str):
            raise ValueError(
                f"options {sorted(options)} apply to named scores only; a callable or "
                "precomputed score takes only mix, power and head_mix"
            )
        self.score, self.options = score, options
        self.mix, self.power, self.head_mix = float(mix), float(power), float(head_mix)

    @classmethod
    def coerce(cls, spec: Any) -> Importance:
        """An :class:`Importance` from any accepted ``importance=`` value."""
        if isinstance(spec, Importance):
            return spec
        if (
            isinstance(spec, tuple)
            and len(spec) == 2
            and (isinstance(spec[0], str) or callable(spec[0]))
            and isinstance(spec[1], Mapping)
        ):
            return cls(spec[0], **dict(spec[1]))
        return cls(spec)

    @property
    def name(self) -> str:
        if isinstance(self.score, str):
            return self.score
        return "callable" if callable(self.score) else "precomputed"

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"Importance({self.name!r}, mix={self.mix}, power={self.power}, "
            f"head_mix={self.head_mix}{opts})"
        )

    def to_dict(self) -> dict[str, Any]:
        treatment = {"mix": self.mix, "power": self.power, "head_mix": self.head_mix}
        return {"score": self.name, **treatment, **self.options}


ImportanceSpec = (
    str
    | ScoreFunction
    | Sequence[Mapping[str, Tensor]]
    | Importance
    | tuple[str, Mapping[str, Any]]
)


def build_score_function(
    name: str,
    models: Sequence[nn.Module],
    inputs: Tensor,
    labels: Tensor | None,
    options: Mapping[str, Any],
) -> ScoreFunction:
    """Call the factory of score ``name``, checking ``options`` against its signature."""
    factory = get_factory(name)
    params = inspect.signature(factory).parameters
    valid = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    takes_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
    unknown = sorted(set(options) - set(valid))
    if unknown and not takes_any:
        raise ValueError(
            f"unknown option(s) {unknown} for importance {name!r}; valid options: "
            f"{', '.join(valid) if valid else 'none'}, plus mix, power and head_mix for every score"
        )
    return factory(models, inputs, labels, **options)


class ImportanceProvider:
    """Looks up, normalises and tempers the scores of a node's neurons for each base model."""

    def __init__(
        self,
        spec: ImportanceSpec,
        models: Sequence[nn.Module],
        inputs: Tensor,
        labels: Tensor | None,
        graphs: GraphCache | None = None,
        progress: bool = False,
    ) -> None:
        self.spec = Importance.coerce(spec)
        self.graphs = graphs if graphs is not None else GraphCache()
        self.models = list(models)
        self.name = self.spec.name
        self._fn: ScoreFunction | None = None
        self._table: list[Mapping[str, Tensor]] | None = None
        self._heads: dict[int, str | None] = {}
        score = self.spec.score
        self.uniform = score == "uniform"
        if isinstance(score, str):
            self._fn = build_score_function(score, self.models, inputs, labels, self.spec.options)
            if isinstance(getattr(self._fn, "graphs", None), GraphCache):
                setattr(self._fn, "graphs", self.graphs)  # noqa: B010  (one trace per model)
            if hasattr(self._fn, "progress"):
                setattr(self._fn, "progress", progress)  # noqa: B010
        elif callable(score):
            self._fn = score
        elif isinstance(score, Sequence) and all(isinstance(t, Mapping) for t in score):
            if len(score) != len(self.models):
                raise ValueError(
                    f"precomputed importance has {len(score)} entries for {len(self.models)} "
                    "models; give one {node_name: scores} dict per model"
                )
            self._table = list(score)
        else:
            raise TypeError(
                "importance must be a name, a callable f(model, name, output) -> scores, a list "
                "of {name: scores} dicts (one per model), an Importance, or (name, {options}); "
                f"got {type(score).__name__}"
            )

    def raw(self, model_index: int, name: str, output: Tensor | None) -> Tensor:
        """The score as computed or given, before normalisation. ``output`` is the node's value
        on the whole fusion set, or ``None`` where the caller never holds it (the Linear
        variants' ``sample_chunk``): a score function whose ``computes_from_inputs`` attribute
        is true (every built-in one) then computes it from the inputs in batches; any other,
        which may read ``output``, is refused."""
        if self._table is not None:
            table = self._table[model_index]
            if name not in table:
                raise ValueError(
                    f"precomputed importance of model {model_index} has no entry {name!r} (it has "
                    f"{sorted(table)[:12]}); compute it with neurofuse.importance."
                    f"compute_importance(models, data, method, nodes=[..., {name!r}])"
                )
            return torch.as_tensor(table[name])
        assert self._fn is not None
        if output is None and not getattr(self._fn, "computes_from_inputs", False):
            raise ValueError(
                "an importance function f(model, name, output) reads each level's values on the "
                "whole fusion set, which this fusion never holds (the Linear variants' "
                "sample_chunk, or OTFusion and Git Re-Basin on more than 512 samples); pass its "
                "scores as a table (one {node_name: scores} dict per model, e.g. from "
                "neurofuse.importance.compute_importance), or leave sample_chunk unset"
            )
        return torch.as_tensor(self._fn(self.models[model_index], name, output))  # type: ignore[arg-type]  # (None: checked above)

    def scores(self, model_index: int, name: str, output: Tensor | None, width: int) -> Tensor:
        """Weights ``(width,)`` with mean 1 of model ``model_index``'s neurons at node ``name``
        (on ``output``'s device; ``output`` may be ``None``: :meth:`raw`)."""
        device = output.device if output is not None else None
        mix = self.spec.head_mix if name == self.head(model_index) else self.spec.mix
        if self.uniform or mix == 1.0:
            return torch.ones(width, device=device)
        raw = self.raw(model_index, name, output)
        if raw.numel() == 0:
            return torch.ones(width, device=device)
        if raw.numel() != width:
            raise ValueError(
                f"importance for model {model_index} at {name!r} has {raw.numel()} entries, but "
                f"that level has {width} neurons"
            )
        return normalise(raw, power=self.spec.power, mix=mix).to(device)

    def head(self, model_index: int) -> str | None:
        """The name of model ``model_index``'s output node (None if it cannot be traced)."""
        if model_index not in self._heads:
            try:
                out = next(
                    n for n in self.graphs(self.models[model_index]).graph.nodes if n.op == "output"
                )
                self._heads[model_index] = getattr(out.args[0], "name", None)
            except TraceError:
                self._heads[model_index] = None
        return self._heads[model_index]


def describe(spec: Any) -> str:
    """A short name of an ``importance=`` value, for reports."""
    try:
        return repr(Importance.coerce(spec))
    except (TypeError, ValueError):
        return type(spec).__name__
