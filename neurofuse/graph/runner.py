"""Memoised evaluation of a torch.fx graph: each node's value computed once, on demand."""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor


class GraphRunner:
    """Evaluates the nodes of an fx graph on one batch, computing each node once (memoised).

    Fusion needs the values of many intermediate nodes of each base model; this computes each
    on demand and keeps it, so no earlier part of a network is ever run twice.
    """

    def __init__(self, gm: fx.GraphModule, inputs: Tensor) -> None:
        self.gm = gm
        self.values: dict[fx.Node, Any] = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                self.values[n] = inputs

    def node(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def value(self, node: fx.Node) -> Any:
        """The value of ``node``, computing only its not-yet-known ancestors."""
        if node in self.values:
            return self.values[node]
        return self.compute([node])[0]

    def compute(self, nodes: Sequence[fx.Node], lean: bool = False) -> list[Any]:
        """The values of ``nodes``, computed in one pass over their not-yet-known ancestors.
        With ``lean``, an ancestor computed here is dropped as soon as every node of the pass
        that reads it has run (only ``nodes``, and values known before, are kept): the peak is
        then about the widest cut of the graph, not every intermediate value (a transient
        evaluation on a chunk of samples)."""
        needed: set[fx.Node] = set()
        stack = list(nodes)
        while stack:
            n = stack.pop()
            if n in needed or n in self.values:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        keep = set(nodes)
        readers = {n: sum(1 for u in n.users if u in needed) for n in needed} if lean else {}
        for n in self.gm.graph.nodes:  # graph order is a topological order
            if n not in needed:
                continue
            self.values[n] = self._run(n)
            for a in n.all_input_nodes if lean else ():
                if a in readers:
                    readers[a] -= 1
                    if readers[a] == 0 and a not in keep:
                        del self.values[a]
        return [self.values[n] for n in nodes]

    def stream(self) -> Iterator[tuple[fx.Node, Any]]:
        """Every node with its value, in graph order, each value dropped as soon as the nodes
        that read it have run: one pass over the whole graph in about the memory of its widest
        cut (a caller that wants a value past its readers keeps its own reference). Several
        runners of the same graph structure can be zipped to walk models side by side."""
        readers = {n: len(n.users) for n in self.gm.graph.nodes}
        for n in self.gm.graph.nodes:  # graph order is a topological order
            if n.op == "output":  # the graph's return value: its inputs were all yielded
                for a in n.all_input_nodes:
                    self.values.pop(a, None)
                return
            if n not in self.values:
                self.values[n] = self._run(n)
            yield n, self.values[n]
            for a in n.all_input_nodes:
                readers[a] -= 1
                if readers[a] == 0:
                    self.values.pop(a, None)
            if readers[n] == 0:  # read by nothing
                self.values.pop(n, None)

    def release_consumed(self) -> None:
        """Drop values whose every user has been computed (they will not be needed again)."""
        for n in list(self.values):
            if n.op != "placeholder" and n.users and all(u in self.values for u in n.users):
                del self.values[n]

    def forget(self, nodes: Iterable[fx.Node]) -> None:
        for n in nodes:
            self.values.pop(n, None)

    def _run(self, n: fx.Node) -> Any:
        args = fx.node.map_arg(n.args, lambda a: self.values[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.values[a])
        if args and isinstance(args[0], Tensor) and _writes_into_input(self.gm, n, args, kwargs):
            # a node that overwrites its input (``nn.ReLU(inplace=True)``, ``x += y``,
            # ``x.relu_()``) would change the value kept for the node before it, which fusion
            # reads too (a BatchNorm's output under its in-place ReLU): it gets a copy
            args = (args[0].clone(), *args[1:])
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "call_module":
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)  # type: ignore[operator]
        if n.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, str(n.target))(*rest, **kwargs)
        raise RuntimeError(f"unexpected node {n.op}")


#: In-place operators of Python (``x += y`` traces to ``operator.iadd``).
_INPLACE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in (
        "iadd isub imul imatmul itruediv ifloordiv imod ipow iand ior ixor ilshift irshift".split()
    )
)


def _writes_into_input(gm: fx.GraphModule, n: fx.Node, args: tuple, kwargs: dict) -> bool:
    """Whether the node ``n`` writes into its first argument: a module with ``inplace=True``,
    an in-place operator or a function or method named with a trailing underscore
    (``torch.relu_``, ``x.add_``), or a function called with ``inplace=True``."""
    if n.op == "call_module":
        return getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.startswith("_")
    if n.op != "call_function":
        return False
    if n.target in _INPLACE_OPERATORS:
        return True
    name = getattr(n.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    return _inplace_argument(n.target, args, kwargs)


def _inplace_argument(fn: Any, args: tuple, kwargs: dict) -> bool:
    """``fn(*args, **kwargs)`` is called with ``inplace=True`` (by keyword or position: the
    ``torch.nn.functional`` activations and dropouts take it positionally too)."""
    if kwargs.get("inplace") is True:
        return True
    params = _parameters(fn)
    if params is None or "inplace" not in params:
        return False
    at = params.index("inplace")
    return len(args) > at and args[at] is True


@functools.cache
def _parameters(fn: Any) -> list[str] | None:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
