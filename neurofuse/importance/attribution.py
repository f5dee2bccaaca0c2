"""Per-neuron attributions of many graph nodes of one model, computed in as few passes as possible.

Every function here takes a probe copy (:func:`neurofuse.importance.probes.probe`), the inputs,
and the node names, and returns ``{name: (d,) scores}``: for each neuron (a feature, a conv
channel, a token embedding dimension) the **mean absolute attribution** over every sample and
every non-neuron position,

    s_j = 1 / (B * P) * sum_b sum_p |a_{b, p, j}|.

Attributions ``a`` explain the output selected by a per-sample target class ``t_b`` (the true
label or the model's prediction, see :func:`resolve_targets`) relative to a baseline input
``x_0`` (:func:`resolve_baseline`):

- Conductance (Dhamdhere et al. 2018; Captum ``LayerConductance``): along the straight path
  ``x(alpha) = x_0 + alpha (x - x_0)``, a neuron ``z_j`` gets
  ``sum_i dF_t/dz_j (x(alpha_i)) * (z_j(x(alpha_{i+1})) - z_j(x(alpha_i)))``. All probed nodes are
  attributed in the same forward/backward pass over the path points (Captum attributes one layer
  per pass), which is exactly Captum's sum, at a fraction of its time.
- Gradient x activation: ``a = z_j(x) * dF_t/dz_j (x)``, one pass.
- DeepLIFT (Shrikumar et al. 2017, Rescale rule; Captum ``LayerDeepLift``):
  ``a = (z_j(x) - z_j(x_0)) * m_j`` with the DeepLIFT multipliers ``m``; all nodes in one pass
  (:mod:`neurofuse.importance.deeplift`), with Captum's rules.
- Activation statistics (no target, forward only): mean ``|z_j|`` and variance of ``z_j``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.graph import layer_width, neuron_axis, producing_layer
from neurofuse.importance.deeplift import apply_rules
from neurofuse.importance.probes import Probed
from neurofuse.utils import sample_chunks

TARGETS = ("auto", "label", "predicted")
BASELINES = ("zeros", "mean")
PATH_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right")


# ----------------------------------------------------------------------------- targets, baselines


def resolve_targets(
    model: nn.Module, inputs: Tensor, labels: Tensor | None, target: str, batch_size: int = 512
) -> Tensor | None:
    """The class each sample's attribution explains.

    ``"auto"``: the true label when labels are given, else the model's own prediction;
    ``"label"``: the true label (labels required); ``"predicted"``: ``argmax`` of the model's
    output. ``None`` when the model has a single output (nothing to choose).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "label" and labels is None:
        raise ValueError("target='label' needs labels: pass (inputs, labels) or use 'predicted'")
    if target in ("auto", "label") and labels is not None:
        if labels.shape[0] != inputs.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
        labels = labels.argmax(1) if labels.dim() == 2 else labels  # one-hot or soft labels
        return labels.to(device=inputs.device, dtype=torch.long)
    with torch.no_grad():
        outs = [model(inputs[s]) for s in sample_chunks(inputs.shape[0], batch_size)]
    out = torch.cat(outs)
    if out.dim() == 1 or out[0].numel() == 1:
        return None
    return out.reshape(out.shape[0], -1).argmax(1)


def resolve_baseline(baseline: Any, inputs: Tensor) -> Tensor:
    """The reference input ``x_0`` of Conductance and DeepLIFT, shaped ``(1, *sample_shape)``.

    ``"zeros"`` (default; the all-zero input, which for standardised data is the mean input),
    ``"mean"`` (the per-feature mean of ``inputs``), a number (a constant input), or a tensor of
    one sample's shape (or with a leading 1).
    """
    shape = (1, *inputs.shape[1:])
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros(shape, device=inputs.device, dtype=inputs.dtype)
        if baseline == "mean":
            return inputs.mean(0, keepdim=True)
        raise ValueError(
            f"baseline must be one of {BASELINES}, a number or a tensor; got {baseline!r}"
        )
    if isinstance(baseline, int | float) and not isinstance(baseline, bool):
        return torch.full(shape, float(baseline), device=inputs.device, dtype=inputs.dtype)
    if isinstance(baseline, Tensor):
        b = baseline.to(device=inputs.device, dtype=inputs.dtype)
        if tuple(b.shape) == tuple(inputs.shape[1:]):
            b = b.unsqueeze(0)
        if tuple(b.shape) != shape:
            raise ValueError(
                f"baseline tensor has shape {tuple(baseline.shape)}; give one sample's shape "
                f"{tuple(inputs.shape[1:])} (or {shape})"
            )
        if not torch.isfinite(b).all():
            raise ValueError("baseline contains NaN or Inf values")
        return b
    raise TypeError(
        f"baseline must be 'zeros', 'mean', a number or a tensor; got {type(baseline).__name__}"
    )


def path_alphas(points: int, method: str) -> list[float]:
    """Points ``alpha_0 < ... < alpha_{points-1}`` of the path integral (Captum's conventions)."""
    if method == "gausslegendre":
        return [float(a) for a in 0.5 * (1 + np.polynomial.legendre.leggauss(points)[0])]
    if method == "riemann_trapezoid":
        return [float(a) for a in np.linspace(0.0, 1.0, points)]
    if method == "riemann_left":
        return [i / points for i in range(points)]
    if method == "riemann_right":
        return [(i + 1) / points for i in range(points)]
    raise ValueError(f"method must be one of {PATH_METHODS}, got {method!r}")


# ----------------------------------------------------------------------------- reduction


class Accumulator:
    """Per-node running sums of ``|a|`` (or of ``z`` and ``z^2``) over samples and positions."""

    def __init__(self, probed: Probed, names: Sequence[str]) -> None:
        self.probed, self.names = probed, list(names)
        self.axes: dict[str, int] = {}
        self.sums: dict[str, Tensor] = {}
        self.squares: dict[str, Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(self.names, 0)

    def axis(self, name: str, value: Tensor) -> int:
        if name not in self.axes:
            self.axes[name] = neuron_axis_of(self.probed.module, name, value)
        return self.axes[name]

    def add(self, name: str, value: Tensor, *, absolute: bool = True, square: bool = False) -> None:
        axis = self.axis(name, value)
        v = value.detach().to(torch.float64)
        dims = [d for d in range(v.dim()) if d != axis]
        first = (v.abs() if absolute else v).sum(dims)
        self.sums[name] = self.sums.get(name, 0) + first
        if square:
            self.squares[name] = self.squares.get(name, 0) + v.square().sum(dims)
        self.counts[name] += v.numel() // v.shape[axis]

    def mean_abs(self) -> dict[str, Tensor]:
        return {n: (self.sums[n] / self.counts[n]).float() for n in self.names}

    def variance(self) -> dict[str, Tensor]:
        out = {}
        for n in self.names:
            mean = self.sums[n] / self.counts[n]
            out[n] = (self.squares[n] / self.counts[n] - mean.square()).clamp_min(0).float()
        return out


def neuron_axis_of(gm: fx.GraphModule, name: str, value: Tensor) -> int:
    """The neuron axis of node ``name``'s value, decided as the fusion engines decide it."""
    node = next(n for n in gm.graph.nodes if n.name == name)
    hint, channels_first = layer_width(producing_layer(gm, node))
    return neuron_axis(value, hint, channels_first)


@contextmanager
def capture(probes: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    store: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: store.__setitem__(name, out))
        for name, m in probes.items()
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _selected(out: Tensor, targets: Tensor | None) -> Tensor:
    """Sum over samples of the target output (the quantity being explained)."""
    if targets is None:
        return out.sum()
    flat = out.reshape(out.shape[0], -1)
    return flat.gather(1, targets.view(-1, 1)).sum()


def _gradients(out: Tensor, targets: Tensor | None, values: list[Tensor]) -> list[Tensor]:
    """Gradients of the selected output with respect to each value (zero where it has none)."""
    live = [i for i, v in enumerate(values) if v.requires_grad]
    found: list[Tensor | None] = [None] * len(values)
    if live:
        grads = torch.autograd.grad(
            _selected(out, targets), [values[i] for i in live], allow_unused=True
        )
        for i, g in zip(live, grads, strict=True):
            found[i] = g
    return [g if g is not None else torch.zeros_like(v) for g, v in zip(found, values, strict=True)]


# ----------------------------------------------------------------------------- the scores


def activation_stats(
    probed: Probed, inputs: Tensor, names: Sequence[str], stat: str, batch_size: int = 256
) -> dict[str, Tensor]:
    """Forward-only scores: ``"abs"`` (mean ``|z_j|``) or ``"variance"`` (variance of ``z_j``)
    over samples and positions."""
    acc = Accumulator(probed, names)
    with torch.no_grad(), capture({n: probed.probes[n] for n in names}) as store:
        for s in sample_chunks(inputs.shape[0], batch_size):
            probed.module(inputs[s])
            for n in names:
                acc.add(n, store[n], absolute=stat == "abs", square=stat == "variance")
    return acc.mean_abs() if stat == "abs" else acc.variance()


def reduce_output(gm: fx.GraphModule, name: str, output: Tensor, stat: str) -> Tensor:
    """:func:`activation_stats` of one node from its already computed value ``output``."""
    probed = Probed(gm, {name: nn.Identity()})
    acc = Accumulator(probed, [name])
    acc.add(name, output, absolute=stat == "abs", square=stat == "variance")
    return (acc.mean_abs() if stat == "abs" else acc.variance())[name]


def conductance(
    probed: Probed,
    inputs: Tensor,
    targets: Tensor | None,
    baseline: Tensor,
    names: Sequence[str],
    n_steps: int = 10,
    method: str = "gausslegendre",
    internal_batch_size: int = 256,
) -> dict[str, Tensor]:
    """Mean absolute layer conductance of every node in ``names``, all in one pass per chunk.

    ``internal_batch_size`` bounds the path points evaluated together (samples x (n_steps+1)).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    alphas = path_alphas(n_steps + 1, method)
    points = len(alphas)
    chunk = max(1, internal_batch_size // points)
    acc = Accumulator(probed, names)
    with capture({n: probed.probes[n] for n in names}) as store, torch.enable_grad():
        for s in sample_chunks(inputs.shape[0], chunk):
            x = inputs[s]
            x0 = baseline.expand_as(x)
            path = torch.cat([x0 + a * (x - x0) for a in alphas]).requires_grad_(True)
            out = probed.module(path)
            t = targets[s].repeat(points) if targets is not None else None
            values = [store[n] for n in names]
            grads = _gradients(out, t, values)
            for n, v, g in zip(names, values, grads, strict=True):
                v = v.detach().reshape(points, x.shape[0], *v.shape[1:])
                g = g.reshape(points, x.shape[0], *g.shape[1:])
                acc.add(n, ((v[1:] - v[:-1]) * g[:-1]).sum(0))
            store.clear()
    return acc.mean_abs()


def gradient_x_activation(
    probed: Probed,
    inputs: Tensor,
    targets: Tensor | None,
    names: Sequence[str],
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Mean ``|z_j * dF_t/dz_j|`` of every node in ``names`` (first-order Taylor importance)."""
    acc = Accumulator(probed, names)
    with capture({n: probed.probes[n] for n in names}) as store, torch.enable_grad():
        for s in sample_chunks(inputs.shape[0], batch_size):
            out = probed.module(inputs[s].detach().requires_grad_(True))
            values = [store[n] for n in names]
            grads = _gradients(out, targets[s] if targets is not None else None, values)
            for n, v, g in zip(names, values, grads, strict=True):
                acc.add(n, v.detach() * g)
            store.clear()
    return acc.mean_abs()


def deeplift_chunks(
    probed: Probed,
    inputs: Tensor,
    targets: Tensor | None,
    baseline: Tensor,
    names: Sequence[str],
    batch_size: int = 256,
) -> Iterator[dict[str, Tensor]]:
    """Signed DeepLIFT attributions ``(z - z_0) * m`` of every node, one chunk of samples at a
    time, in one forward/backward pass per chunk: input and baseline run as one batch, and the
    rules of :mod:`neurofuse.importance.deeplift` make the backward pass yield the multipliers.
    ``probed`` must come from ``probe(..., deeplift=True)``."""
    apply_rules(probed.module)
    with capture({n: probed.probes[n] for n in names}) as store, torch.enable_grad():
        for s in sample_chunks(inputs.shape[0], batch_size):
            x = inputs[s]
            b = x.shape[0]
            both = torch.cat([x, baseline.expand_as(x)]).requires_grad_(True)
            out = probed.module(both)
            values = [store[n] for n in names]
            # Both halves explain the target (the baseline half's gradient carries the part of
            # a max-pool's change that the rule routes through the baseline's arg-max).
            t = targets[s].repeat(2) if targets is not None else None
            grads = _gradients(out, t, values)
            yield {
                n: (v.detach()[:b] - v.detach()[b:]) * g[:b]
                for n, v, g in zip(names, values, grads, strict=True)
            }
            store.clear()


def deeplift(
    probed: Probed,
    inputs: Tensor,
    targets: Tensor | None,
    baseline: Tensor,
    names: Sequence[str],
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Mean absolute DeepLIFT (Rescale rule) attribution of every node (see
    :func:`deeplift_chunks`)."""
    acc = Accumulator(probed, names)
    for chunk in deeplift_chunks(probed, inputs, targets, baseline, names, batch_size):
        for n, a in chunk.items():
            acc.add(n, a)
    return acc.mean_abs()
