"""Vanilla weight averaging: the fused model's every parameter is the mean of the models'.

The naive baseline of model fusion (e.g. Utans 1996; the OTFusion and Git Re-Basin papers use it
as the reference point): it ignores that hidden neurons are only defined up to a permutation,
so models trained from different initialisations average into a much worse network. BatchNorm
running statistics are averaged like the weights; ``reset_bn`` recomputes them on the fusion
set instead (the averaged statistics no longer describe the averaged network's activations).
"""

from __future__ import annotations

from dataclasses import dataclass

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
class VanillaOptions:
    """Options of ``vanilla``.

    Attributes:
        reset_bn: re-estimate BatchNorm running statistics on the fusion set after averaging.
        repair: REPAIR (Jordan et al. 2022): rescale every hidden neuron so that its mean and
            standard deviation on the fusion set are the interpolation of the aligned base
            models' (undoes the variance collapse of averaging; after ``reset_bn`` if both).
    """

    reset_bn: bool = False
    repair: bool = False


@register_method(
    "vanilla",
    "Vanilla averaging: the plain mean of every parameter and float buffer, no alignment",
    VanillaOptions,
    Capabilities(equal_widths=True, target="same", tied_weights=True, fits_data=False),
)
def vanilla(ctx: FusionContext) -> nn.Module:
    opt: VanillaOptions = ctx.options
    states = states_of(ctx.models)
    check_same_layers(states, "vanilla")
    fused = average_states(states, model_weights(None, len(states)))
    fused_model = write_state(ctx.target, fused, "vanilla")
    return finish(ctx, fused_model, opt.reset_bn, opt.repair, states)
