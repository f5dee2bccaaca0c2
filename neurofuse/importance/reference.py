"""Captum's own layer attributions, one call per node: the reference the one-pass scores of
:mod:`neurofuse.importance.attribution` are tested against (``backend="captum"``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from neurofuse.importance.attribution import Accumulator
from neurofuse.importance.probes import Probed
from neurofuse.utils import sample_chunks


def load_captum() -> Any:
    """``captum.attr``, or an ImportError that says how to install it."""
    try:
        import captum.attr
    except ImportError as exc:  # pragma: no cover - captum is an optional dependency
        raise ImportError(
            "this importance score uses Captum; install it with `pip install captum` "
            "(or `pip install neurofuse[importance]`)"
        ) from exc
    return captum.attr


def captum_deeplift(
    probed: Probed,
    inputs: Tensor,
    targets: Tensor | None,
    baseline: Tensor,
    names: Sequence[str],
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """:func:`~neurofuse.importance.attribution.deeplift` by one Captum ``LayerDeepLift`` call
    per node. ``probed`` must come from ``probe(..., deeplift=True)``."""
    attr = load_captum()
    acc = Accumulator(probed, names)
    for n in names:
        method = attr.LayerDeepLift(probed.module, probed.probes[n], multiply_by_inputs=True)
        for s in sample_chunks(inputs.shape[0], batch_size):
            x = inputs[s].detach().requires_grad_(True)  # Captum hooks need a graph
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore")  # Captum warns that it sets hooks, every call
                a = method.attribute(
                    x,
                    baselines=baseline.expand_as(x).contiguous(),
                    target=targets[s] if targets is not None else None,
                )
            acc.add(n, a)
    return acc.mean_abs()


def captum_conductance(
    probed: Probed,
    inputs: Tensor,
    targets: Tensor | None,
    baseline: Tensor,
    names: Sequence[str],
    n_steps: int = 10,
    method: str = "gausslegendre",
    internal_batch_size: int = 256,
) -> dict[str, Tensor]:
    """:func:`~neurofuse.importance.attribution.conductance` by one Captum ``LayerConductance``
    call per node (slower by about the number of nodes)."""
    attr = load_captum()
    acc = Accumulator(probed, names)
    chunk = max(1, internal_batch_size // (n_steps + 1))
    for n in names:
        lc = attr.LayerConductance(probed.module, probed.probes[n])
        for s in sample_chunks(inputs.shape[0], chunk):
            x = inputs[s].detach()
            with torch.enable_grad():
                a = lc.attribute(
                    x,
                    baselines=baseline.expand_as(x).contiguous(),
                    target=targets[s] if targets is not None else None,
                    n_steps=n_steps,
                    method=method,
                )
            acc.add(n, a)
    return acc.mean_abs()
