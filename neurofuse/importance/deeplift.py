"""DeepLIFT's Rescale rule as autograd, so one backward pass gives the multipliers of every node.

DeepLIFT (Shrikumar et al. 2017) explains ``F(x) - F(x_0)`` by multipliers ``m`` that follow the
chain rule, except that a nonlinearity ``y = f(u)`` passes ``dF/dy * (y - y_0) / (u - u_0)``
instead of ``dF/dy * f'(u)`` (the *Rescale* rule; the ordinary gradient where ``|u - u_0| <
eps``). The contribution of node ``z`` is ``(z - z_0) * m_z``. The input and the baseline run
together as one batch ``[x; x_0]`` so every nonlinearity sees both.

Captum's ``LayerDeepLift`` applies the rules with module hooks and attributes one layer per call;
here each nonlinearity of a probe copy is wrapped so that its backward *is* the rule, and all
probes get their multipliers from one backward pass. The rules (ReLU, ELU, LeakyReLU, Sigmoid,
Tanh, Softplus, max-pooling, softmax modules; functional relu/sigmoid/tanh/... become modules in
the probe copy) are Captum's; every other op (GELU, attention, ...) passes the ordinary gradient,
as in Captum. The numbers agree with ``LayerDeepLift`` on networks without max-pooling. With
max-pooling they agree at the nodes after the last pool; at earlier nodes Captum's attributions
no longer add up to ``F(x) - F(x_0)`` (they even change across a BatchNorm, which is affine),
while these keep DeepLIFT's summation-to-delta property at every node (tested).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-10


def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
    a, b = t.chunk(2)
    return a, b


def _elementwise(m: nn.Module, x: Tensor, y: Tensor, g_in: Tensor, g_out: Tensor) -> Tensor:
    x1, x0 = _halves(x)
    y1, y0 = _halves(y)
    d_in, d_out = torch.cat([x1 - x0] * 2), torch.cat([y1 - y0] * 2)
    return torch.where(d_in.abs() < EPS, g_in, g_out * d_out / d_in)


def _softmax(m: nn.Module, x: Tensor, y: Tensor, g_in: Tensor, g_out: Tensor) -> Tensor:
    unnormalised = _elementwise(m, x, y, g_in, g_out)
    return unnormalised - unnormalised.sum() / g_in.numel()


def _maxpool(pool: Callable[..., Any], unpool: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Contributions routed through the arg-max of input and baseline, whichever is larger."""

    def rule(m: nn.Module, x: Tensor, y: Tensor, g_in: Tensor, g_out: Tensor) -> Tensor:
        x1, x0 = _halves(x)
        y1, y0 = _halves(y)
        d_in = torch.cat([x1 - x0] * 2)
        y_max = torch.max(y1, y0)
        d_out = torch.cat([y_max - y0, y1 - y_max])
        geometry = (m.kernel_size, m.stride, m.padding)
        _, idx = pool(x, *geometry, m.dilation, m.ceil_mode, True)
        routed = unpool(g_out * d_out, idx, *geometry, list(x.shape))
        a, b = routed.chunk(2)
        routed = torch.cat([a + b] * 2)
        return torch.where(d_in.abs() < EPS, g_in, routed / d_in)

    return rule


RULES: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.ReLU: _elementwise,
    nn.ELU: _elementwise,
    nn.LeakyReLU: _elementwise,
    nn.Sigmoid: _elementwise,
    nn.Tanh: _elementwise,
    nn.Softplus: _elementwise,
    nn.MaxPool1d: _maxpool(F.max_pool1d, F.max_unpool1d),
    nn.MaxPool2d: _maxpool(F.max_pool2d, F.max_unpool2d),
    nn.Softmax: _softmax,
}


class _OutputTap(torch.autograd.Function):
    """Identity; its backward records ``dF/dy`` for the matching input tap."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, state: dict) -> Tensor:
        ctx.state = state
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.state["grad_out"] = grad
        return grad, None


class _InputTap(torch.autograd.Function):
    """Identity; its backward replaces ``dF/dy * f'(u)`` by the DeepLIFT rule."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, state: dict) -> Tensor:
        ctx.state = state
        return u.view_as(u)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        s = ctx.state
        return s["rule"](s["module"], s["u"], s["y"], grad, s["grad_out"]), None


class Rescaled(nn.Module):
    """A nonlinearity whose backward pass applies DeepLIFT's rule to the batch ``[x; x_0]``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.rule = RULES[type(module)]

    def forward(self, u: Tensor) -> Tensor:
        if not u.requires_grad:
            return self.module(u)
        state: dict[str, Any] = {"rule": self.rule, "module": self.module, "u": u.detach()}
        y = self.module(_InputTap.apply(u, state))
        state["y"] = y.detach()
        return _OutputTap.apply(y, state)


def apply_rules(gm: fx.GraphModule) -> fx.GraphModule:
    """Make every nonlinearity module that ``gm`` calls a :class:`Rescaled` copy (in place on
    ``gm``'s graph; the original modules, possibly shared with a model, are left alone)."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if type(module) in RULES:
            attr = f"_neurofuse_rescaled_{node.name}"
            gm.add_submodule(attr, Rescaled(copy.deepcopy(module)))
            node.target = attr
    gm.recompile()
    return gm
