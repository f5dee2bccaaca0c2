"""Engine of the Linear variants (HF Linear, KF Linear): closed-form neuron interpolation.

Every affine unit (a Linear or Conv layer with the BatchNorm right after it, which in eval mode is
affine and is folded into the fit) is fitted in forward order, each from the input that the
*already fused* network gives it (paper section 4, appendix A/B):

1. the base models' unit outputs ``Y`` (one column per base neuron) are projected onto the
   column space of the fused input ``X``; the projection is represented by its coordinates
   ``L^{-1} X^T Y`` in p dimensions (:class:`neurofuse.fitting.LeastSquares`);
2. the projected neurons are grouped (Hungarian matching or importance-weighted k-means);
3. the weights whose outputs are the importance-weighted group centroids are solved in closed
   form: ``W = (X^T X)^{-1} X^T T``.

Residual additions ``out = unit(h) + skip`` tie the unit's neurons to the skip's: the group of the
sum is inherited from the skip (or found once for all the units summed together), and the unit is
fitted to ``T_sum - skip_fused``, which also absorbs the drift of the fused skip. The classifier
head's neurons (classes) are already aligned: its target is the importance-weighted mean of the
base logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from neurofuse.fitting import LeastSquares, affine_inputs, affine_output_rows, set_affine_weights
from neurofuse.grouping import group
from neurofuse.levels import (
    ACTIVATION_MODULES,
    ADD_FUNCTIONS,
    AFFINE_TYPES,
    NORM_TYPES,
    GraphRunner,
    affine_nodes,
    is_activation,
    module_of,
    trace,
    unit_end,
)
from neurofuse.methods.registry import FusionContext
from neurofuse.progress import progress_bar

# Ops that keep the neuron axis and act per neuron: a group found before them holds after them.
_PASS_THROUGH_MODULES = ACTIVATION_MODULES + (
    nn.Dropout,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)


@dataclass
class LinearOptions:
    """Options of the Linear variants.

    Attributes:
        ridge: relative ridge added to ``X^T X`` (times its mean diagonal) for rank-deficient
            inputs.
        chunk_size: samples per chunk when accumulating Gram matrices.
        n_init: k-means restarts (KF only).
        max_iter: Lloyd iterations per restart (KF only).
        local_search: refine k-means with Kanungo et al.'s swap local search (KF only).
        row_budget: if set, fit each layer on a uniform random sample of about
            ``row_budget * p`` of its rows (sample x position), ``p`` being the layer's fan-in:
            a sketch of the least-squares problem that bounds the Gram cost of wide
            convolutions. ``None`` (default) uses every row and is exact.
        precision: ``"float32"`` or ``"float64"``: the precision of the blockwise products that
            build ``X^T X`` and ``X^T Y`` (sums are always float64, on mean-shifted rows).
            float32 is faster (about twice on CPU, more on GPUs) but, with the tiny default ridge,
            loses the 1e-4 exactness of recovering a permuted model.
    """

    ridge: float = 1e-9
    chunk_size: int = 128
    n_init: int = 4
    max_iter: int = 100
    local_search: bool = False
    row_budget: int | None = None
    precision: str = "float64"

    def __post_init__(self) -> None:
        if self.row_budget is not None and self.row_budget < 2:
            raise ValueError(
                f"row_budget must be at least 2 (rows per weight), got {self.row_budget}"
            )
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {self.precision!r}")
        if self.ridge < 0 or self.chunk_size < 1 or self.n_init < 1 or self.max_iter < 1:
            raise ValueError("ridge must be >= 0 and chunk_size, n_init, max_iter positive")


def _check_supported(fgm: fx.GraphModule) -> None:
    covered: set[nn.Module] = set()
    for n in affine_nodes(fgm):
        covered.add(module_of(fgm, n))  # type: ignore[arg-type]
        end = unit_end(fgm, n)
        if end is not n:
            covered.add(module_of(fgm, end))  # type: ignore[arg-type]
    bad = [
        name
        for name, m in fgm.named_modules()
        if m not in covered and any(True for _ in m.parameters(recurse=False))
    ]
    bad += [n.name for n in fgm.graph.nodes if n.op == "get_attr"]
    if bad:
        raise ValueError(
            "the Linear variants fit models whose parameters all sit in Linear/Conv layers and "
            f"the BatchNorms right after them; these are not: {bad[:8]}. Use a gradient variant "
            "(kf_gradient or hf_gradient) for this model."
        )
    for n in affine_nodes(fgm):
        end = unit_end(fgm, n)
        bn = module_of(fgm, end)
        if end is not n and (bn.running_mean is None or not bn.affine):  # type: ignore[union-attr]
            raise ValueError(
                f"BatchNorm {end.target!r} has no running statistics or no affine parameters; "
                "the Linear variants need eval-mode BatchNorm with both. Use kf_gradient."
            )


def _set_unit(layer: nn.Module, bn: nn.Module | None, w: Tensor, intercept: Tensor | None) -> None:
    """Write fitted weights; a BatchNorm after the layer becomes the identity (it is folded)."""
    carries_bias = layer.bias is not None  # type: ignore[union-attr]
    set_affine_weights(layer, w, intercept if carries_bias else None)
    if bn is not None:
        with torch.no_grad():
            bn.weight.fill_(1.0)  # type: ignore[union-attr]
            bn.bias.zero_()  # type: ignore[union-attr]
            bn.running_mean.zero_()  # type: ignore[union-attr]
            bn.running_var.fill_(1.0 - bn.eps)  # type: ignore[union-attr]
            if intercept is not None and not carries_bias:
                bn.bias.copy_(intercept.to(bn.bias))  # type: ignore[union-attr]
    elif intercept is not None and not carries_bias:
        raise ValueError(f"{layer} has no bias and no BatchNorm to carry the fitted intercept")


class _LinearFusion:
    def __init__(self, ctx: FusionContext, grouping_method: str) -> None:
        self.ctx, self.method = ctx, grouping_method
        self.opt: LinearOptions = ctx.options
        self.fused = ctx.target
        self.fgm = trace(self.fused)
        self.bgms = [trace(m) for m in ctx.models]
        names = [n.name for n in self.fgm.graph.nodes]
        for i, g in enumerate(self.bgms):
            other = [n.name for n in g.graph.nodes]
            if other != names:
                diff = next(
                    (a, b) for a, b in zip(names + [None], other + [None], strict=False) if a != b
                )
                raise ValueError(
                    f"model {i} does not have the architecture of the fused model (graphs differ "
                    f"at {diff}); the Linear variants need models with the same layers (widths "
                    "may differ)"
                )
        _check_supported(self.fgm)
        # Every affine unit is fitted as its own level (a Linear-variant level must be affine in
        # its weights); explicit level names are still checked so that a typo is an error.
        ctx.levels.cut_nodes(self.fgm)
        self.fnode = {n.name: n for n in self.fgm.graph.nodes}
        self.bnode = [{n.name: n for n in g.graph.nodes} for g in self.bgms]
        self.frun = GraphRunner(self.fgm, ctx.inputs)
        self.bruns = [GraphRunner(g, ctx.inputs) for g in self.bgms]
        self.assignments: dict[fx.Node, Tensor] = {}  # node -> (k, d_M) group-averaging matrix
        out = next(n for n in self.fgm.graph.nodes if n.op == "output")
        self.final = out.args[0]
        self.n = ctx.inputs.shape[0]
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def base_rows(self, node: fx.Node, layer: nn.Module) -> tuple[Tensor, list[int], list[Tensor]]:
        with self.ctx.timer("forward"):
            ys = [r.value(self.bnode[i][node.name]) for i, r in enumerate(self.bruns)]
        rows = [affine_output_rows(layer, y.detach()) for y in ys]
        return torch.cat(rows, dim=1), [r.shape[1] for r in rows], ys

    def scores(self, node: fx.Node, ys: list[Tensor], widths: list[int]) -> Tensor:
        return torch.cat(
            [
                self.ctx.importance.scores(i, node.name, y, w)
                for i, (y, w) in enumerate(zip(ys, widths, strict=True))
            ]
        ).to(torch.float64)

    def fused_value(self, node: fx.Node) -> Tensor:
        with self.ctx.timer("forward"):
            return self.frun.value(node)

    def inherited(self, node: fx.Node) -> Tensor | None:
        """The grouping of ``node``'s neurons, following per-neuron ops back to where it was set."""
        while node not in self.assignments:
            m = module_of(self.fgm, node)
            passthrough = isinstance(m, _PASS_THROUGH_MODULES) or is_activation(self.fgm, node)
            inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
            if not passthrough or len(inputs) != 1:
                return None
            node = inputs[0]
        return self.assignments[node]

    def accumulate(
        self, layers: list[nn.Module], xs: list[Tensor], bias: bool, y_rows
    ) -> LeastSquares:
        """Normal equations of the joint fit ``sum_i X_i W_i (+ b) ~ Y`` over sample chunks;
        ``y_rows(lo, hi)`` gives the target rows of rows lo..hi."""
        feats = [affine_inputs(layer, x[:1]).shape for layer, x in zip(layers, xs, strict=True)]
        per_sample = feats[0][0]
        p = sum(f[1] for f in feats)
        first = y_rows(0, per_sample)
        ls = LeastSquares.empty(
            p,
            first.shape[1],
            bias,
            self.ctx.inputs.device,
            torch.float64,
            getattr(torch, self.opt.precision),
        )
        step = self.opt.chunk_size
        keep = 1.0
        if self.opt.row_budget is not None:
            keep = min(1.0, self.opt.row_budget * p / (self.n * per_sample))
        gen = torch.Generator(device="cpu").manual_seed(self.ctx.seed + p)
        for lo in range(0, self.n, step):
            hi = min(lo + step, self.n)
            xr = torch.cat(
                [affine_inputs(layer, x[lo:hi]) for layer, x in zip(layers, xs, strict=True)], dim=1
            )
            yr = y_rows(lo * per_sample, hi * per_sample)
            if keep < 1.0:  # a uniform row sketch of the least-squares problem
                rows = torch.rand(xr.shape[0], generator=gen) < keep
                rows = rows.nonzero().squeeze(1).to(xr.device)
                xr, yr = xr[rows], yr[rows]
            ls.add(xr, yr)
        return ls

    def group(self, coords: Tensor, s: Tensor, k: int, widths: list[int]) -> Tensor:
        with self.ctx.timer("grouping"):
            return self._group(coords, s, k, widths)

    def _group(self, coords: Tensor, s: Tensor, k: int, widths: list[int]) -> Tensor:
        if self.method == "hungarian":
            if len(widths) != 2 or widths[0] != widths[1] or widths[0] != k:
                raise ValueError(
                    f"Hungarian fusion needs two models of equal width fused into the same width; "
                    f"got base widths {widths} and fused width {k}. Use kf_linear instead."
                )
            g = group(coords, s, k, method="hungarian", sizes=widths)
        else:
            g = group(
                coords,
                s,
                k,
                method="kmeans",
                seed=self.ctx.seed,
                n_init=self.opt.n_init,
                max_iter=self.opt.max_iter,
                local_search=self.opt.local_search,
            )
        a = g.assignment_matrix(s).to(torch.float64)
        self.stats["grouping_cost"] = self.stats.get("grouping_cost", 0.0) + float(g.cost)
        return a

    def write(self, units: list[fx.Node], ls: LeastSquares, w: Tensor) -> None:
        start = 0
        intercept = w[-1] if ls.bias else None
        for j, u in enumerate(units):
            layer = module_of(self.fgm, u)
            p = affine_inputs(layer, self.fused_value(u.args[0])[:1]).shape[1]  # type: ignore[arg-type]
            end = unit_end(self.fgm, u)
            bn = module_of(self.fgm, end) if end is not u else None
            _set_unit(layer, bn, w[start : start + p], intercept if j == 0 else None)  # type: ignore[arg-type]
            start += p

    def can_carry_bias(self, u: fx.Node) -> bool:
        return module_of(self.fgm, u).bias is not None or unit_end(self.fgm, u) is not u  # type: ignore[union-attr]

    # ------------------------------------------------------------------ the three kinds of unit
    def fit_free(self, u: fx.Node) -> None:
        layer = module_of(self.fgm, u)
        end = unit_end(self.fgm, u)
        y, widths, ys = self.base_rows(end, layer)  # type: ignore[arg-type]
        k = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[union-attr]
        x = self.fused_value(u.args[0])  # type: ignore[arg-type]
        ls = self.accumulate([layer], [x], self.can_carry_bias(u), lambda lo, hi: y[lo:hi])  # type: ignore[list-item]
        chol = ls.factor(self.opt.ridge)
        coords = ls.coordinates(chol)  # (q, d_M)
        a = self.group(coords.T.contiguous(), self.scores(end, ys, widths), k, widths)
        w = LeastSquares.weights_from_coordinates(chol, coords @ a.T)
        self.write([u], ls, w)
        self.assignments[end] = a

    def fit_head(self, u: fx.Node) -> None:
        layer = module_of(self.fgm, u)
        end = unit_end(self.fgm, u)
        y, widths, ys = self.base_rows(end, layer)  # type: ignore[arg-type]
        c = widths[0]
        if any(w != c for w in widths):
            raise ValueError(
                f"the models have different numbers of classes {widths}; fusion needs the same classes"
            )
        s = self.scores(end, ys, widths).view(len(widths), c)
        s = s / s.sum(0, keepdim=True)  # per class, a convex combination of the models
        a = torch.cat([torch.diag(s[i]) for i in range(len(widths))], dim=1)  # (c, n*c)
        x = self.fused_value(u.args[0])  # type: ignore[arg-type]
        ls = self.accumulate(
            [layer], [x], self.can_carry_bias(u), lambda lo, hi: y[lo:hi] @ a.T.to(y)
        )  # type: ignore[list-item]
        self.write([u], ls, ls.solve(self.opt.ridge))
        self.assignments[end] = a

    def fit_sum(self, add: fx.Node) -> list[fx.Node]:
        """Units summed at a residual addition, fitted jointly to the grouped sum."""
        unit_of_end = {unit_end(self.fgm, u): u for u in affine_nodes(self.fgm)}
        units = [unit_of_end[a] for a in add.all_input_nodes if a in unit_of_end]
        fixed = [a for a in add.all_input_nodes if a not in unit_of_end]
        layer0 = module_of(self.fgm, units[0])
        y, widths, ys = self.base_rows(add, layer0)  # type: ignore[arg-type]
        layers = [module_of(self.fgm, u) for u in units]
        xs = [self.fused_value(u.args[0]) for u in units]  # type: ignore[arg-type]
        bias = self.can_carry_bias(units[0])
        if fixed:
            inherited = [self.inherited(f) for f in fixed]
            if any(a is None for a in inherited):
                raise ValueError(
                    f"residual addition {add.name!r} adds a value whose neurons the Linear "
                    "variants cannot trace back to a fitted layer; use kf_gradient"
                )
            a = inherited[0]
            skip = sum(
                affine_output_rows(layer0, self.fused_value(f)).to(torch.float64) for f in fixed
            )  # type: ignore[arg-type]
            ls = self.accumulate(
                layers, xs, bias, lambda lo, hi: y[lo:hi].to(a) @ a.T - skip[lo:hi]
            )  # type: ignore[union-attr,index]
            w = ls.solve(self.opt.ridge)
        else:
            k = layer0.out_features if isinstance(layer0, nn.Linear) else layer0.out_channels  # type: ignore[union-attr]
            ls = self.accumulate(layers, xs, bias, lambda lo, hi: y[lo:hi])  # type: ignore[arg-type]
            chol = ls.factor(self.opt.ridge)
            coords = ls.coordinates(chol)
            a = self.group(coords.T.contiguous(), self.scores(add, ys, widths), k, widths)
            w = LeastSquares.weights_from_coordinates(chol, coords @ a.T)
        self.write(units, ls, w)
        self.assignments[add] = a  # type: ignore[assignment]
        return units

    def sum_node(self, u: fx.Node) -> fx.Node | None:
        end = unit_end(self.fgm, u)
        users = list(end.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in ADD_FUNCTIONS:
            if all(isinstance(a, fx.Node) for a in users[0].args):
                return users[0]
        return None

    def run(self) -> nn.Module:
        done: set[fx.Node] = set()
        units = affine_nodes(self.fgm)
        with progress_bar(self.ctx.progress, "linear fusion", len(units)) as advance:
            for u in units:
                if u in done:
                    continue
                add = self.sum_node(u)
                with self.ctx.timer("fitting"):
                    if unit_end(self.fgm, u) is self.final:
                        self.fit_head(u)
                        done.add(u)
                    elif add is not None:
                        done.update(self.fit_sum(add))
                    else:
                        self.fit_free(u)
                        done.add(u)
                for r in self.bruns:
                    r.release_consumed()
                advance(len(done))
        self.ctx.report.update(self.stats)
        return self.fused.eval()


def fuse_linear(ctx: FusionContext, grouping_method: str) -> nn.Module:
    return _LinearFusion(ctx, grouping_method).run()


__all__ = ["LinearOptions", "fuse_linear", "AFFINE_TYPES", "NORM_TYPES"]
