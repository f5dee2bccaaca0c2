"""The name table of importance scores.

A score is registered as a *factory* ``factory(models, inputs, labels, **options)`` that returns a
score function ``f(model, node_name, output) -> Tensor``: one non-negative score per neuron of
``output``, the value of graph node ``node_name`` of ``model`` on ``inputs``. The factory sees the
data once, so a score can compute what it needs for every node of a model in one pass.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

ScoreFunction = Callable[[nn.Module, str, Tensor], Tensor]
ScoreFactory = Callable[..., ScoreFunction]

_SCORES: dict[str, tuple[ScoreFactory, str]] = {}


def register_importance(name: str, description: str) -> Callable[[ScoreFactory], ScoreFactory]:
    """Register ``factory(models, inputs, labels, **options) -> ScoreFunction`` under ``name``.

    Example::

        @register_importance("weight_norm", "L2 norm of each neuron's incoming weights")
        def weight_norm(models, inputs, labels):
            def score(model, name, output):
                ...
            return score
    """
    if not isinstance(name, str) or not name:
        raise TypeError("an importance score needs a non-empty string name")

    def deco(factory: ScoreFactory) -> ScoreFactory:
        if name in _SCORES and _SCORES[name][0] is not factory:
            raise ValueError(f"importance score {name!r} is already registered")
        _SCORES[name] = (factory, description)
        return factory

    return deco


def available_importance() -> dict[str, str]:
    """Every registered score name with its one-line description."""
    return {k: v[1] for k, v in sorted(_SCORES.items())}


def get_factory(name: str) -> ScoreFactory:
    if name not in _SCORES:
        raise ValueError(
            f"unknown importance {name!r}; valid names: {', '.join(sorted(_SCORES))}, "
            "or pass a callable f(model, name, output) or precomputed scores"
        )
    return _SCORES[name][0]
