"""Neuron Transplantation's surgery (:mod:`neurofuse.methods.transplant`): the hidden spaces
that can be concatenated, the block-diagonal wide model whose output is the mean of the
members' logits, and the pruning back to one width by neuron norm."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.alignment import Space, permutation_spaces
from neurofuse.graph import trace
from neurofuse.surgery import neuron_view, resize, select

#: Modules whose statistics mix the neurons of a space: concatenating them is not exact.
_MIXING_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)


# --------------------------------------------------------------------------- spaces


def _output_space_names(gm: fx.GraphModule, spaces: Sequence[Space]) -> set[str]:
    """Names of the spaces that carry the model's output (the classes)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = {a.name for a in out.all_input_nodes}
    return {s.name for s in spaces if returned & set(s.nodes)}


def hidden_spaces(
    models: Sequence[nn.Module],
    example: Tensor | None = None,
    tracer: Callable[[nn.Module], fx.GraphModule] = trace,
) -> tuple[list[Space], list[list[Space]]]:
    """The hidden spaces of every model (one list per model, in the same order) and the
    output spaces of model 0, after checking that they can be concatenated.

    Raises a ValueError naming the space when a hidden space is fixed or normalised jointly,
    or when the models' spaces differ in anything but width."""
    per_model = [permutation_spaces(m, example=example, gm=tracer(m)) for m in models]
    outputs = _output_space_names(tracer(models[0]), per_model[0])
    ref = per_model[0]
    for k, spaces in enumerate(per_model[1:], start=1):
        sig0 = [(s.name, s.fixed, sorted(s.members)) for s in ref]
        sigk = [(s.name, s.fixed, sorted(s.members)) for s in spaces]
        if sig0 != sigk:
            raise ValueError(
                f"models[{k}] does not have the structure of models[0] (their permutation spaces "
                "differ); transplant needs models of one architecture (widths may differ)"
            )
    modules = dict(models[0].named_modules())
    for s in ref:
        if s.name in outputs:
            continue
        if s.heads > 1 or any(m.parts > 1 for m in s.members):
            raise ValueError(
                f"transplant cannot concatenate attention space {s.name!r} ({s.heads} heads): "
                "pruning single dimensions would split heads. Use kd, lp, kf_linear or "
                "kf_gradient for transformers"
            )
        if s.fixed:
            raise ValueError(
                f"transplant cannot concatenate the models: hidden space {s.name!r} (size "
                f"{s.size}, nodes {s.nodes[:4]}{' ...' if len(s.nodes) > 4 else ''}) is fixed, "
                "i.e. an operation that cannot be permuted uses it (e.g. a transformer's "
                "residual stream, split into heads and layer-normalised). Neuron Transplantation "
                "supports MLPs, CNNs and ResNets; for transformers use kd, lp or kf_gradient"
            )
        for key, *_ in s.members:
            owner = modules.get(key.rpartition(".")[0])
            if isinstance(owner, _MIXING_NORMS):
                raise ValueError(
                    f"transplant cannot concatenate hidden space {s.name!r} exactly: "
                    f"{key.rpartition('.')[0]!r} is a {type(owner).__name__}, whose statistics "
                    "would mix the models' neurons. Use kd, lp or kf_gradient for this model"
                )
    hidden = [[s for s in spaces if s.name not in outputs] for spaces in per_model]
    return [s for s in ref if s.name in outputs], hidden


# --------------------------------------------------------------------------- merge


def _axes(spaces: Sequence[Space]) -> dict[str, dict[int, tuple[int, str]]]:
    """key -> {axis: (repeat, space name)}."""
    out: dict[str, dict[int, tuple[int, str]]] = {}
    for s in spaces:
        for key, axis, repeat, *_ in s.members:
            out.setdefault(key, {})[axis] = (repeat, s.name)
    return out


def concatenate(
    models: Sequence[nn.Module], hidden: list[list[Space]] | None = None
) -> tuple[nn.Module, list[Space]]:
    """The wide model of Neuron Transplantation's merge step, and its hidden spaces.

    Each hidden space has width ``sum_k d_k`` (model k's neurons at offset ``sum_{i<k} d_i``);
    model k's tensors fill the diagonal blocks, every other entry is zero. A tensor whose axis 0
    is not a hidden space (the head's weight and bias) is the sum of the members' tensors,
    each times ``1/n`` and placed on its own hidden-input block, so in eval mode

        wide(x) = (1/n) sum_k model_k(x).

    The models are not modified; the wide model is a new module (built from ``models[0]``).
    ``hidden`` are the models' hidden spaces from :func:`hidden_spaces` (computed if omitted).
    """
    if len(models) < 1:
        raise ValueError("concatenate needs at least one model")
    if hidden is None:
        hidden = hidden_spaces(models)[1]
    widths = {s.name: sum(h[i].size for h in hidden) for i, s in enumerate(hidden[0])}
    wide = resize(models[0], widths, hidden[0])
    wide_spaces = [dataclasses.replace(s, size=widths[s.name]) for s in hidden[0]]
    axes = _axes(hidden[0])
    offsets = [dict.fromkeys(widths, 0) for _ in models]
    for k in range(1, len(models)):
        for s in hidden[k - 1]:
            offsets[k][s.name] = offsets[k - 1][s.name] + s.size
    states = [m.state_dict() for m in models]
    n = len(models)
    merged = {}
    for key, template in wide.state_dict().items():
        tensors = [st[key] for st in states]
        touched = axes.get(key, {})
        if not template.is_floating_point():
            merged[key] = tensors[0].clone()
            continue
        if not touched:  # shared by the members: the mean (exact for the head's bias)
            merged[key] = torch.stack([t.to(template) for t in tensors]).mean(0)
            continue
        scale = 1.0 if 0 in touched else 1.0 / n
        out = torch.zeros_like(template)
        for k, t in enumerate(tensors):
            _place_block(out, t.to(template) * scale, touched, offsets[k], hidden[k], key)
        merged[key] = out
    wide.load_state_dict(merged)
    return wide.eval(), wide_spaces


def _place_block(
    out: Tensor,
    block: Tensor,
    touched: dict[int, tuple[int, str]],
    offsets: dict[str, int],
    spaces: Sequence[Space],
    key: str,
) -> None:
    """Write ``block`` into ``out`` at the given space offsets, in place."""
    sizes = {s.name: s.size for s in spaces}
    view_out, view_in = out, block
    for axis in sorted(touched, reverse=True):  # split later axes first: earlier ones keep index
        repeat = touched[axis][0]
        view_out = neuron_view(view_out, axis, repeat)
        view_in = neuron_view(view_in, axis, repeat)
    index: list[slice] = [slice(None)] * view_out.dim()
    for axis, (_, name) in touched.items():
        pos = axis + sum(1 for a in touched if a < axis)
        index[pos] = slice(offsets[name], offsets[name] + sizes[name])
    target = view_out[tuple(index)]
    if target.shape != view_in.shape:
        raise ValueError(
            f"cannot place {key!r}: block {tuple(view_in.shape)} vs {tuple(target.shape)}"
        )
    target.copy_(view_in)


# --------------------------------------------------------------------------- prune


def _incoming(param: Tensor, axis: int) -> bool:
    return axis == 0 and param.dim() >= 2


def _group(param: Tensor, axis: int) -> bool:
    return True


#: Which parameters of a space count towards a neuron's L2 norm.
CRITERIA: dict[str, Callable[[Tensor, int], bool]] = {"incoming": _incoming, "group": _group}


def neuron_norms(model: nn.Module, space: Space, criterion: str = "incoming") -> Tensor:
    """``||w_j||_2`` of each neuron ``j`` of ``space``: the square root of the sum of squares of
    its entries in every *parameter* (not buffer) member that ``criterion`` selects."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(sorted(CRITERIA))}")
    params = dict(model.named_parameters())
    total = None
    for key, axis, repeat, *_ in space.members:
        p = params.get(key)
        if p is None or not CRITERIA[criterion](p, axis):
            continue
        v = neuron_view(p.detach(), axis, repeat).movedim(axis, 0)
        sq = v.reshape(v.shape[0], -1).double().pow(2).sum(1)
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError(
            f"space {space.name!r} has no parameter that criterion {criterion!r} counts; "
            f"try criterion='group'"
        )
    return total.sqrt()


def prune(
    wide: nn.Module, spaces: Sequence[Space], widths: dict[str, int], criterion: str = "incoming"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Keep the ``widths[name]`` largest-norm neurons of each space (in their original order).

    Returns the pruned state dict and the kept indices per space."""
    keep: dict[str, Tensor] = {}
    for s in spaces:
        norms = neuron_norms(wide, s, criterion)
        order = torch.argsort(norms.cpu(), descending=True, stable=True)
        keep[s.name] = torch.sort(order[: widths[s.name]]).values
    return select(wide.state_dict(), spaces, keep), keep


__all__ = ["CRITERIA", "concatenate", "hidden_spaces", "neuron_norms", "prune"]
