"""Neuron importance scores as fusion sees them: one non-negative weight per neuron.

``importance`` given to :func:`neurofuse.fuse` may be

- a registered name (``"uniform"``; more scores register themselves with
  :func:`register_importance`);
- a callable ``f(model, name, output) -> Tensor`` returning one score per neuron of ``output``
  (the value of the named node of ``model`` on the fusion set);
- precomputed scores: a list with one ``{name: Tensor}`` dict per model.

Scores are normalised per model and per level to mean 1 (so neither their scale nor a model's
width changes a fit), and floored at a tiny positive value so that no neuron is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

ScoreFunction = Callable[[nn.Module, str, Tensor], Tensor]
ImportanceSpec = Union[str, ScoreFunction, Sequence[Mapping[str, Tensor]]]

_SCORES: dict[str, tuple[Callable[..., ScoreFunction], str]] = {}


def register_importance(name: str, description: str):
    """Register ``factory(models, inputs, labels, **kw) -> ScoreFunction`` under ``name``."""

    def deco(factory: Callable[..., ScoreFunction]) -> Callable[..., ScoreFunction]:
        _SCORES[name] = (factory, description)
        return factory

    return deco


def available_importance() -> dict[str, str]:
    return {k: v[1] for k, v in sorted(_SCORES.items())}


@register_importance("uniform", "every neuron weighs the same (1/d per neuron)")
def _uniform(models: Sequence[nn.Module], inputs: Tensor, labels: Tensor | None) -> ScoreFunction:
    def score(model: nn.Module, name: str, output: Tensor) -> Tensor:
        return torch.ones(0)  # the empty tensor means "uniform": filled in by ImportanceProvider

    return score


def normalise(scores: Tensor) -> Tensor:
    """Scale to mean 1 and floor at 1e-6 (a neuron with score 0 still needs a group)."""
    s = scores.detach().to(torch.float32).flatten()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("importance scores must be finite and non-negative")
    mean = s.mean()
    if float(mean) <= 0:
        return torch.ones_like(s)
    return (s / mean).clamp_min(1e-6)


class ImportanceProvider:
    """Looks up (and normalises) the scores of a node's neurons for each base model."""

    def __init__(
        self,
        spec: ImportanceSpec,
        models: Sequence[nn.Module],
        inputs: Tensor,
        labels: Tensor | None,
    ) -> None:
        self.models = list(models)
        self.name = spec if isinstance(spec, str) else type(spec).__name__
        self._fn: ScoreFunction | None = None
        self._table: list[Mapping[str, Tensor]] | None = None
        if isinstance(spec, str):
            if spec not in _SCORES:
                raise ValueError(
                    f"unknown importance {spec!r}; valid names: {', '.join(sorted(_SCORES))}, "
                    "or pass a callable f(model, name, output) or precomputed scores"
                )
            self._fn = _SCORES[spec][0](models, inputs, labels)
            self.uniform = spec == "uniform"
        elif callable(spec):
            self._fn, self.uniform = spec, False
        elif isinstance(spec, Sequence) and all(isinstance(t, Mapping) for t in spec):
            if len(spec) != len(models):
                raise ValueError(
                    f"precomputed importance has {len(spec)} entries for {len(models)} models; "
                    "give one {name: scores} dict per model"
                )
            self._table, self.uniform = list(spec), False
        else:
            raise TypeError(
                "importance must be a name, a callable f(model, name, output) -> scores, or a "
                "list of {name: scores} dicts (one per model)"
            )

    def scores(self, model_index: int, name: str, output: Tensor, width: int) -> Tensor:
        """Normalised scores (``width``,) of model ``model_index`` at node ``name``."""
        if self._table is not None:
            table = self._table[model_index]
            if name not in table:
                raise ValueError(
                    f"precomputed importance of model {model_index} has no entry {name!r}; "
                    f"it has {sorted(table)}"
                )
            raw = table[name]
        else:
            assert self._fn is not None
            raw = self._fn(self.models[model_index], name, output)
        raw = torch.as_tensor(raw)
        if raw.numel() == 0:
            return torch.ones(width, device=output.device)
        if raw.numel() != width:
            raise ValueError(
                f"importance for model {model_index} at {name!r} has {raw.numel()} entries, but "
                f"that level has {width} neurons"
            )
        return normalise(raw).to(output.device)


def describe(spec: Any) -> str:
    return spec if isinstance(spec, str) else ("callable" if callable(spec) else "precomputed")
