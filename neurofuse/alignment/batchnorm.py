"""Re-estimating BatchNorm running statistics of a model whose weights were averaged."""

from __future__ import annotations

import torch
from torch import Tensor, nn

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def reestimate_batchnorm(model: nn.Module, inputs: Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics on ``inputs``, in place.

    Weight averaging shrinks and shifts the activations feeding each BatchNorm, so the
    averaged running statistics no longer describe them (the "variance collapse" of averaged
    networks). The statistics are reset and re-accumulated as a cumulative average over batches
    (``momentum=None``): the network runs forward in training mode for its BatchNorms only
    (dropout stays off), so each BatchNorm sees its input as normalised by the ones before it.
    With one batch, ``running_mean`` is the mean of the BatchNorm's input and ``running_var``
    its unbiased variance. The model is left in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.track_running_stats]
    model.eval()
    if not norms:
        return
    n = inputs.shape[0]
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:  # a batch of one has no batch statistics
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [n], strict=True))
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for lo, hi in bounds:
                model(inputs[lo:hi])
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
