"""FedAvg aggregation: parameters averaged with weights proportional to each client's data.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data": the server's model is ``sum_k (n_k / n) w_k``, where client ``k`` trained on ``n_k`` of
the ``n`` samples. Used here one-shot (a single round), the setting in which the
neuron-interpolation paper compares against it: without alignment it fails on models trained
from different initialisations or on non-IID data.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch
from torch import nn

from neurofuse.methods._averaging import (
    average_states,
    check_same_layers,
    finish,
    model_weights,
    states_of,
    write_state,
)
from neurofuse.methods.registry import Capabilities, FusionContext, register_method


@dataclass
class FedAvgOptions:
    """Options of ``fedavg``.

    Attributes:
        sample_counts: number of training samples of each model (client), one per model;
            required. Model ``k`` weighs ``sample_counts[k] / sum(sample_counts)``.
        reset_bn: re-estimate BatchNorm running statistics on the fusion set after averaging.
        repair: REPAIR (Jordan et al. 2022): rescale every hidden neuron so that its mean and
            standard deviation on the fusion set are the interpolation of the aligned base
            models' (undoes the variance collapse of averaging; after ``reset_bn`` if both).
    """

    sample_counts: list[int] | None = None
    reset_bn: bool = False
    repair: bool = False

    def __post_init__(self) -> None:
        if self.sample_counts is None:
            return
        counts = self.sample_counts
        if isinstance(counts, str | bytes) or not hasattr(counts, "__len__"):
            raise TypeError(f"sample_counts must be a list of positive integers, got {counts!r}")
        counts = [c.item() if isinstance(c, torch.Tensor) else c for c in counts]
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, Integral) or c <= 0]
        if bad:
            raise ValueError(
                f"sample_counts must be positive integers (each client's number of training "
                f"samples), got {list(self.sample_counts)}"
            )
        self.sample_counts = [int(c) for c in counts]


@register_method(
    "fedavg",
    "FedAvg (McMahan et al. 2017): parameters averaged in proportion to each model's sample count",
    FedAvgOptions,
    Capabilities(equal_widths=True, target="same", tied_weights=True, fits_data=False),
)
def fedavg(ctx: FusionContext) -> nn.Module:
    opt: FedAvgOptions = ctx.options
    n = len(ctx.models)
    if opt.sample_counts is None:
        raise ValueError(
            "fedavg needs sample_counts: the number of training samples of each model, e.g. "
            f"fuse(models, data, method='fedavg', sample_counts=[{', '.join(['1000'] * n)}])"
        )
    if len(opt.sample_counts) != n:
        raise ValueError(
            f"sample_counts has {len(opt.sample_counts)} entries for {n} models; give one count "
            "per model"
        )
    states = states_of(ctx.models)
    check_same_layers(states, "fedavg")
    weights = model_weights(opt.sample_counts, n, "sample_counts")
    ctx.report["model_weights"] = weights.tolist()
    fused = average_states(states, weights)
    fused_model = write_state(ctx.target, fused, "fedavg")
    return finish(ctx, fused_model, opt.reset_bn, opt.repair, states, weights)
