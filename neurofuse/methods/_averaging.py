"""Shared pieces of the averaging-family baselines (vanilla, FedAvg, OTFusion, Git Re-Basin):
architecture checks, model weights, (per-neuron) weighted averaging of state dicts, and writing
the result into a model (the base models' values on the fusion set: :mod:`._activations`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.alignment import Space, permutation_spaces, reestimate_batchnorm
from neurofuse.alignment.repair import StatsTarget, repair_to
from neurofuse.alignment.repair import repair as repair_statistics
from neurofuse.graph import trace
from neurofuse.methods._plan import LazySequence
from neurofuse.methods.registry import FusionContext

State = dict[str, Tensor]


def states_of(models: Sequence[nn.Module]) -> list[State]:
    """Each model's ``state_dict`` (detached tensors; never modified in place)."""
    return [dict(m.state_dict()) for m in models]


def check_same_layers(states: Sequence[State], method: str, same_shapes: bool = True) -> None:
    """Every model has the parameters of model 0 (same names, same number of axes) and, with
    ``same_shapes``, the same shapes; the error names the first difference."""
    ref = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        keys = list(state)
        if keys != ref:
            j = next(
                j
                for j, (a, b) in enumerate(zip(ref + [None], keys + [None], strict=False))
                if a != b
            )
            mine = keys[j] if j < len(keys) else "nothing (it has fewer parameters)"
            theirs = ref[j] if j < len(ref) else "nothing (it has fewer parameters)"
            raise ValueError(
                f"models[{i}] does not have the layers of models[0]: parameter #{j} is {mine!r} "
                f"in models[{i}] but {theirs!r} in models[0] (different depth or architecture). "
                f"{method} needs models with the same layers; use kf_linear, kf_gradient or kd "
                "for models of different architectures."
            )
        for key in ref:
            a, b = states[0][key], state[key]
            if a.dim() != b.dim() or (same_shapes and a.shape != b.shape):
                raise ValueError(
                    f"models[{i}] parameter {key!r} has shape {tuple(b.shape)} but models[0] has "
                    f"{tuple(a.shape)}. {method} needs models of equal widths; use otfusion or "
                    "kf_linear for models of different widths."
                )


def check_same_graphs(
    models: Sequence[nn.Module], method: str, tracer: Callable[[nn.Module], fx.GraphModule] = trace
) -> list[fx.GraphModule]:
    """Trace every model (with ``tracer``: the fusion's cache); the error names the first fx
    node where two graphs differ."""
    gms = [tracer(m) for m in models]

    def describe(gm: fx.GraphModule) -> list[str]:
        out = []
        for n in gm.graph.nodes:
            what = type(gm.get_submodule(str(n.target))).__name__ if n.op == "call_module" else n.op
            out.append(f"{n.name} ({what})")
        return out

    ref = describe(gms[0])
    for i, gm in enumerate(gms[1:], start=1):
        mine = describe(gm)
        if mine != ref:
            a, b = next((a, b) for a, b in zip(ref + [None], mine + [None], strict=False) if a != b)
            raise ValueError(
                f"models[{i}] does not have the architecture of models[0]: its graph has node "
                f"{b or 'nothing'} where models[0] has {a or 'nothing'}. {method} needs models "
                "with the same layers."
            )
    return gms


def matched_spaces(
    models: Sequence[nn.Module],
    method: str,
    equal_widths: bool,
    example: Tensor | None = None,
    tracer: Callable[[nn.Module], fx.GraphModule] = trace,
) -> list[list[Space]]:
    """The permutation spaces of every model; they must agree in structure (names, members,
    fixed flags), fixed spaces in size, and with ``equal_widths`` every space in size.
    ``example``: an input batch (see :func:`neurofuse.alignment.permutation_spaces`)."""
    all_spaces = [permutation_spaces(m, example=example, gm=tracer(m)) for m in models]
    ref = all_spaces[0]
    for i, spaces in enumerate(all_spaces[1:], start=1):
        for a, b in zip(ref, spaces, strict=False):
            same = (
                a.name == b.name
                and [(m.key, m.axis) for m in a.members] == [(m.key, m.axis) for m in b.members]
                and a.fixed == b.fixed
            )
            if not same:
                raise ValueError(
                    f"models[{i}] does not have the architecture of models[0]: its neuron space "
                    f"{b.name!r} differs from {a.name!r} of models[0]. {method} needs models "
                    "with the same layers."
                )
            if a.size != b.size and (a.fixed or equal_widths):
                why = "it cannot be permuted, so it" if a.fixed else method
                raise ValueError(
                    f"space {a.name!r} has {b.size} neurons in models[{i}] but {a.size} in "
                    f"models[0]; {why} needs equal widths. Use otfusion or kf_linear for models "
                    "of different widths."
                )
        if len(spaces) != len(ref):
            raise ValueError(
                f"models[{i}] has {len(spaces)} neuron spaces but models[0] has {len(ref)}; "
                f"{method} needs models with the same layers."
            )
    return all_spaces


def model_weights(weights: Sequence[float] | None, n: int, name: str = "weights") -> Tensor:
    """Convex model weights (float64, sum 1) from user weights (default uniform)."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.numel() != n:
        raise ValueError(f"{name} has {w.numel()} entries for {n} models; give one per model")
    if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(
            f"{name} must be finite, non-negative and not all zero, got {list(weights)}"
        )
    return w / w.sum()


def average_states(
    states: Sequence[State],
    weights: Tensor,
    per_neuron: Mapping[str, Sequence[Tensor]] | None = None,
) -> State:
    """``sum_k c_k t_k / sum_k c_k`` for every floating-point tensor.

    ``c_k`` is the model weight ``weights[k]``, or, for keys in ``per_neuron``, the model weight
    times a per-row coefficient (``per_neuron[key][k]`` of shape ``(rows,)``: importance-
    weighted averaging of each neuron). Integer buffers (``num_batches_tracked``) come from
    model 0.

    The states are read once each, in order, and summed as they come (the same additions in
    the same order as summing per key): ``states`` may make each one on demand
    (:class:`neurofuse.methods._plan.LazySequence`), so that one aligned copy is alive at a
    time instead of one per model.
    """
    num: dict[str, Tensor] = {}
    den: dict[str, Tensor] = {}
    out: State = {}
    dtypes: dict[str, torch.dtype] = {}
    for k in range(len(states)):
        state = states[k]
        for key, t in state.items():
            if k == 0:
                if not t.is_floating_point():
                    out[key] = t.clone()
                    continue
                dtypes[key] = t.dtype
            elif key not in dtypes:
                continue
            c = weights[k].to(t.device)
            if per_neuron is not None and key in per_neuron:
                shape = (-1,) + (1,) * (t.dim() - 1)
                c = c * per_neuron[key][k].to(t.device, torch.float64).view(shape)
            term = c * t.to(torch.float64)
            num[key] = term if k == 0 else num[key] + term
            den[key] = c if k == 0 else den[key] + c
        del state
    for key, dtype in dtypes.items():
        out[key] = (num.pop(key) / den.pop(key)).to(dtype)
    return out


def check_aligned_shapes(aligned: Sequence[State], reference: State) -> None:
    """After alignment every model's tensors have the reference's shapes (only neuron counts
    may differ between models: not kernel sizes or inputs)."""
    for key, t in reference.items():
        for k, state in enumerate(aligned):
            if state[key].shape != t.shape:
                raise ValueError(
                    f"after alignment, models[{k}] parameter {key!r} has shape "
                    f"{tuple(state[key].shape)} but the reference has {tuple(t.shape)}: only "
                    "neuron counts may differ between the models (not kernel sizes or inputs)"
                )


def write_state(target: nn.Module, state: State, method: str) -> nn.Module:
    """Load ``state`` into ``target`` (the fused template); a shape mismatch names the fix."""
    own = target.state_dict()
    for key, t in state.items():
        if key not in own or own[key].shape != t.shape:
            have = tuple(own[key].shape) if key in own else "no such parameter"
            raise ValueError(
                f"the fused template's {key!r} is {have}, but {method} produced "
                f"{tuple(t.shape)}; {method} fuses into the models' own architecture, so "
                "leave target=None (or pass a model with the reference model's shapes)"
            )
    target.load_state_dict(state)
    return target


def finish(
    ctx: FusionContext,
    fused: nn.Module,
    reset_bn: bool,
    repair: bool = False,
    aligned: Sequence[State] = (),
    weights: Sequence[float] | Tensor | None = None,
    target: Callable[[], StatsTarget] | None = None,
) -> nn.Module:
    """The repairs of an averaged or merged model, on the fusion set: re-estimate BatchNorm
    statistics (``reset_bn``), then REPAIR: every hidden neuron's mean and spread set to the
    ``weights``-interpolation of the ``aligned`` base models'
    (:func:`neurofuse.alignment.repair.repair`), or, for merges whose neurons are not one per
    model, to what ``target()`` asks (:func:`neurofuse.alignment.repair.repair_to`, the
    factory called only when ``repair``); eval mode."""
    if reset_bn:
        reestimate_batchnorm(fused, ctx.inputs)
        ctx.report["reset_bn"] = True
    if repair and target is not None:
        with ctx.timer("repair"):
            ctx.report["repair_collapse"] = repair_to(fused, ctx.inputs, target())
    elif repair:
        if not aligned:
            raise ValueError("repair=True needs the aligned base models' states")

        def base(k: int) -> nn.Module:  # one aligned base model at a time, made on demand
            model = copy.deepcopy(fused)
            model.load_state_dict(aligned[k])
            return model

        bases = LazySequence(len(aligned), base)
        w = None if weights is None else [float(v) for v in weights]
        with ctx.timer("repair"):
            ctx.report["repair_collapse"] = repair_statistics(fused, bases, ctx.inputs, w)
    return fused.eval()


def template_for(ctx: FusionContext, reference: int, method: str) -> nn.Module:
    """The model to write the fused weights into: ``ctx.target`` when it has the reference
    model's shapes, else a copy of the reference model (the default template is models[0])."""
    ref = ctx.models[reference].state_dict()
    tgt = ctx.target.state_dict()
    if list(ref) == list(tgt) and all(ref[k].shape == tgt[k].shape for k in ref):
        return ctx.target
    first = ctx.models[0].state_dict()
    if list(first) == list(tgt) and all(first[k].shape == tgt[k].shape for k in first):
        return copy.deepcopy(ctx.models[reference])
    raise ValueError(
        f"{method} fuses into the widths of the reference model; the given target has other "
        "shapes. Leave target=None, or pass a model shaped like models[reference]."
    )


def check_reference(reference: int, n: int) -> int:
    if not 0 <= reference < n:
        raise ValueError(f"reference={reference} is not a model index; use 0..{n - 1}")
    return reference


# ---------------------------------------------------------------------------- neuron features


__all__ = [
    "State",
    "alignment_setup",
    "average_states",
    "check_aligned_shapes",
    "check_reference",
    "check_same_graphs",
    "check_same_layers",
    "finish",
    "model_weights",
    "states_of",
    "template_for",
    "write_state",
]


def alignment_setup(
    ctx: FusionContext,
    method: str,
    reference: int,
    weights: Sequence[float] | None,
    equal_widths: bool,
) -> tuple[int, Tensor, list[State], list[list[Space]]]:
    """What the alignment baselines (OTFusion, Git Re-Basin) check and derive before aligning:
    the reference index, the averaging weights, the models' states and their matched
    permutation spaces (same layers, same fx graphs; equal widths where ``equal_widths``)."""
    n = len(ctx.models)
    ref = check_reference(reference, n)
    model_w = model_weights(weights, n)
    states = states_of(ctx.models)
    check_same_layers(states, method, same_shapes=False)
    check_same_graphs(ctx.models, method, ctx.trace)
    spaces = matched_spaces(
        ctx.models, method, equal_widths=equal_widths, example=ctx.inputs[:2], tracer=ctx.trace
    )
    if equal_widths:
        check_same_layers(states, method)
    return ref, model_w, states, spaces
