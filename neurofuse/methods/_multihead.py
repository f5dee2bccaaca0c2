"""A multi-head network: a merged trunk computed once, then every base model's own last layers.

ZipIt!'s partial zipping (Stoica et al. 2024, section 4.3) merges the first layers of the
models and keeps the rest per model: the merged features at the cut are *unmerged* (each base
neuron receives the value of the merged feature it joined) and fed to each model's remaining
layers, whose outputs are then combined like an ensemble's. The cut is any point in the graph,
not one of a fixed list of stage boundaries: the trunk is every node that does not depend on an
unmerged layer, and every value that crosses from the trunk into a head (the activation after
the last merged layer, a residual stream's skip connection) is unmerged on its neuron axis.

Built as one ``torch.fx.GraphModule`` so that the trunk runs once per input, the parameters are
exactly the trunk's plus each head's (what :func:`inference_cost` counts), and the result is an
ordinary ``nn.Module`` (``state_dict``, ``.to``, ``torch.export``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.graph import affine_nodes
from neurofuse.utils import parameter_count


def unmerge(x: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """Map ``x``'s merged features (on ``axis``) to one model's neurons: ``matrix`` is
    ``(d_model, d_merged)``, row ``j`` selecting the feature neuron ``j`` joined."""
    moved = torch.movedim(x, axis, -1)
    return torch.movedim(moved @ matrix.T.to(moved.dtype), -1, axis)


def combine_outputs(outputs: list[Tensor], mode: str) -> Tensor:
    """The heads' outputs combined as the ``ensemble`` method combines its members'."""
    from neurofuse.methods.ensemble import COMBINE

    return COMBINE[mode](outputs)


#: ``bridge(node, k)``: for a trunk node whose value a head reads, ``None`` when head ``k``
#: reads it as it is (the input, a shape, a space nobody merged), else the ``(d_k, d)``
#: unmerge matrix and the node's neuron axis.
Bridge = Callable[[fx.Node, int], tuple[Tensor, int] | None]


def tail_nodes(gm: fx.GraphModule, merged_layers: int) -> set[fx.Node]:
    """Every node computed from an affine layer after the first ``merged_layers`` of them (in
    execution order), the output node excepted; then, walking back, every parameter-free node
    whose users are all in the tail (a flatten or pooling before the first unmerged layer is
    recomputed by each head, so the value crossing the cut is a merged layer's neurons)."""
    units = affine_nodes(gm)
    tail: set[fx.Node] = set()
    stack = list(units[merged_layers:])
    while stack:
        n = stack.pop()
        if n not in tail and n.op != "output":
            tail.add(n)
            stack.extend(n.users)
    for n in reversed(list(gm.graph.nodes)):
        if n in tail or not n.users or not all(u in tail for u in n.users):
            continue
        if n.op in ("call_function", "call_method") or (
            n.op == "call_module" and _stateless(gm.get_submodule(str(n.target)))
        ):
            tail.add(n)
    return tail


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def build_multihead(
    trunk: nn.Module,
    trunk_gm: fx.GraphModule,
    heads: Sequence[nn.Module],
    merged_layers: int,
    bridge: Bridge,
    mode: str,
) -> fx.GraphModule:
    """One graph: ``trunk_gm``'s nodes before the cut (on ``trunk``'s parameters), then for
    every model ``k`` the nodes after it on a copy of ``heads[k]``'s parameters, fed by the
    trunk's values through ``bridge``; the output combines the heads' outputs (``mode`` as in
    :class:`neurofuse.methods.ensemble.Ensemble`). ``heads[k]`` must have ``trunk``'s graph
    (the same node names and module paths)."""
    tail = tail_nodes(trunk_gm, merged_layers)
    out_node = next(n for n in trunk_gm.graph.nodes if n.op == "output")
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        raise ValueError(
            "partial zipping combines the heads' outputs and needs a model that returns one "
            f"tensor; this one returns {type(result).__name__}. Use merge_layers=None"
        )
    root = nn.Module()
    root.trunk = trunk
    root.heads = nn.ModuleList(copy.deepcopy(h) for h in heads)
    graph = fx.Graph()
    trunk_env: dict[fx.Node, fx.Node] = {}

    def attr(prefix: str, n: fx.Node) -> str:
        return f"{prefix}.{n.target}"

    for n in trunk_gm.graph.nodes:
        if n in tail or n.op == "output":
            continue
        target = attr("trunk", n) if n.op in ("call_module", "get_attr") else n.target
        trunk_env[n] = graph.create_node(
            n.op,
            target,
            fx.map_arg(n.args, trunk_env.__getitem__),
            fx.map_arg(n.kwargs, trunk_env.__getitem__),
            name=n.name,
            type_expr=n.type,
        )
    outputs = []
    n_buffers = 0
    for k in range(len(heads)):
        env: dict[fx.Node, fx.Node] = {}
        bridged: dict[fx.Node, fx.Node] = {}

        def read(a: fx.Node, k: int = k, env: dict = env, bridged: dict = bridged) -> fx.Node:
            nonlocal n_buffers
            if a in env:
                return env[a]
            if a.op == "get_attr":  # head k's own parameter
                env[a] = graph.get_attr(attr(f"heads.{k}", a))
                return env[a]
            if a not in bridged:
                how = bridge(a, k)
                if how is None:
                    bridged[a] = trunk_env[a]
                else:
                    matrix, axis = how
                    name = f"unmerge_{n_buffers}"
                    n_buffers += 1
                    root.register_buffer(name, matrix.detach().clone())
                    bridged[a] = graph.call_function(
                        unmerge, (trunk_env[a], graph.get_attr(name), axis)
                    )
            return bridged[a]

        if result not in tail:  # nothing after the cut: every head is the trunk
            outputs.append(trunk_env[result])
            continue
        for n in trunk_gm.graph.nodes:
            if n not in tail:
                continue
            target = attr(f"heads.{k}", n) if n.op == "call_module" else n.target
            env[n] = graph.create_node(
                n.op,
                target,
                fx.map_arg(n.args, read),
                fx.map_arg(n.kwargs, read),
                name=f"h{k}_{n.name}",
                type_expr=n.type,
            )
        outputs.append(env[result])
    if result not in tail:
        graph.output(outputs[0])
    else:
        graph.output(graph.call_function(combine_outputs, (outputs, mode)))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="MultiHead")


def inference_cost(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Parameters of ``model`` and their ratio to ``reference``'s (one base model)."""
    own, base = parameter_count(model), parameter_count(reference)
    return {"parameters": float(own), "parameters_vs_one_model": own / max(base, 1)}


__all__ = ["build_multihead", "combine_outputs", "inference_cost", "tail_nodes", "unmerge"]
