"""Tracing a model with torch.fx, once per model per fusion.

:func:`trace` traces with a tracer that keeps every module registered with
:func:`~neurofuse.graph.ops.register_elementwise` as one opaque call. :class:`GraphCache` holds
the traces of one fusion (it lives on the fusion context), so each model is traced once however
many parts of a method read its graph.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from neurofuse.graph.ops import registered_functions, registered_modules


class TraceError(TypeError):
    """Raised when torch.fx cannot trace a model."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, registered_modules()) or super().is_leaf_module(
            m, module_qualified_name
        )


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with torch.fx; the result shares parameters with ``model``."""
    tracer = _Tracer(autowrap_functions=registered_functions())
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many exception types
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. neurofuse reads a model's "
            "graph with torch.fx, so its forward must be traceable: no Python control flow that "
            "depends on tensor values (see torch.fx's documentation on symbolic tracing). If the "
            "untraceable part is a module acting on each neuron alone (a custom activation), "
            "declare it with neurofuse.register_elementwise(ThatModule): it is then traced as one "
            "call."
        ) from exc
    finally:
        # the tracer sits in a reference cycle of its own closures and holds the model and its
        # tensors: emptied, it no longer keeps a model alive after its last reference goes
        tracer.__dict__.clear()
    name = type(model).__name__
    return fx.GraphModule(model, graph, class_name=name)


def release(gm: fx.GraphModule) -> None:
    """Break the reference cycle between ``gm`` and its graph (fx's graph keeps its owning
    module), so that the modules and parameters ``gm`` shares are freed when their last
    reference goes instead of at the next garbage collection; ``gm`` is unusable afterwards."""
    gm.graph._owning_module = None


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph can be edited (probes) without touching ``gm``; the modules
    and parameters stay shared."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)


class GraphCache:
    """The fx traces of the models of one fusion, each traced on first use.

    Keyed by the model object (kept alive here, so an id is never reused while cached)."""

    def __init__(self) -> None:
        self._graphs: dict[int, tuple[nn.Module, fx.GraphModule]] = {}

    def __call__(self, model: nn.Module) -> fx.GraphModule:
        hit = self._graphs.get(id(model))
        if hit is None or hit[0] is not model:
            hit = (model, trace(model))
            self._graphs[id(model)] = hit
        return hit[1]

    def __len__(self) -> int:
        return len(self._graphs)
