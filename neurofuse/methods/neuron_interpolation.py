"""The neuron-interpolation family (the paper's four methods), registered from one place:
two engines (Linear: closed-form refit; Gradient: each level trained to its targets) times two
groupings (:class:`~neurofuse.grouping.strategy.NeuronGrouping`: K-means or Hungarian), and
each of the four followed by distillation (``+kd``, :mod:`.distilled`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from neurofuse.grouping.strategy import PREFIX, GroupingKind
from neurofuse.methods._gradient import GradientOptions, fuse_gradient
from neurofuse.methods._linear import LinearOptions, fuse_linear
from neurofuse.methods.distilled import register_distilled
from neurofuse.methods.registry import Capabilities, FusionContext, register

#: (engine, options, what the engine does) of each variant.
ENGINES: dict[str, tuple[Callable[[FusionContext, GroupingKind], nn.Module], type, str]] = {
    "linear": (fuse_linear, LinearOptions, "closed-form refit of every layer"),
    "gradient": (fuse_gradient, GradientOptions, "each level trained to the grouped targets"),
}
GROUPINGS: dict[GroupingKind, str] = {
    "kmeans": "K-means Fusion: importance-weighted k-means of any number of models",
    "hungarian": "Hungarian Fusion: one-to-one matching of two equal-width models",
}


def capabilities(grouping: GroupingKind, variant: str) -> Capabilities:
    kmeans = grouping == "kmeans"
    return Capabilities(
        levels=variant == "gradient",  # the Linear variants fit every affine layer as a level
        importance=True,
        equal_widths=not kmeans,
        target="any" if kmeans else "same",
        single_model=kmeans,
        exact=True,
    )


def _bind(
    engine: Callable[[FusionContext, GroupingKind], nn.Module], grouping: GroupingKind
) -> Callable[[FusionContext], nn.Module]:
    def method(ctx: FusionContext) -> nn.Module:
        return engine(ctx, grouping)

    return method


#: the K-means knobs of each engine's options, which the Hungarian variants never read
KMEANS_ONLY: dict[str, frozenset[str]] = {
    "linear": frozenset({"n_init", "max_iter", "local_search", "kmeans_seeding", "kmeans_weights"}),
    "gradient": frozenset({"n_init", "max_iter", "kmeans_seeding", "kmeans_weights"}),
}
#: the Hungarian knobs, which the K-means variants never read
HUNGARIAN_ONLY: dict[str, frozenset[str]] = {
    "linear": frozenset({"matching"}),
    "gradient": frozenset({"matching"}),
}

for _grouping, _about in GROUPINGS.items():
    for _variant, (_engine, _options, _what) in ENGINES.items():
        _name = f"{PREFIX[_grouping]}_{_variant}"
        _caps = capabilities(_grouping, _variant)
        _unused = (KMEANS_ONLY if _grouping == "hungarian" else HUNGARIAN_ONLY)[_variant]
        register(
            _name,
            f"{_about.split(':')[0]}, {_variant.title()}: {_about.split(': ')[1]}, {_what}",
            _bind(_engine, _grouping),
            _options,
            _caps,
            _unused,
        )
        register_distilled(_name, _options, _caps, _unused)
