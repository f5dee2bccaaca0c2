"""Cutting models into levels and finding neuron axes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse as nf
from neurofuse.graph import (
    GraphRunner,
    Levels,
    TraceError,
    from_neurons,
    neuron_axis,
    register_elementwise,
    split,
    to_neurons,
    trace,
)
from neurofuse.models import build


def _compose(levels, x):
    for level in levels:
        x = level(x)
    return x


def test_auto_levels_end_at_every_affine_layer_pre_activation():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
    )
    gm = trace(model)
    cuts = [n.target for n in Levels().cut_nodes(gm)]
    assert cuts == ["1", "3", "5"]
    post = [n.target for n in Levels(cut="post").cut_nodes(gm)]
    assert post == ["2", "4", "5"]
    x = torch.randn(7, 6)
    parts = split(model, Levels())
    torch.testing.assert_close(_compose(parts, x), model(x))
    # the second level starts with the activation (pre-activation cut)
    assert any(isinstance(m, nn.ReLU) for m in parts[1].modules())


def test_batchnorm_joins_its_layer_and_residual_blocks_become_one_level():
    model = build("resnet18", in_channels=3, num_classes=4, width=4).eval()
    gm = trace(model)
    cuts = Levels().cut_nodes(gm)
    # stem conv+bn, then one level per block (8 blocks), then the head
    assert len(cuts) == 1 + 8 + 1
    assert cuts[0].target == "bn1"
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_compose(split(model, Levels()), x), model(x))


def test_explicit_levels_by_module_name_and_errors():
    model = build("resnet18", in_channels=3, num_classes=4, width=4).eval()
    levels = Levels(["layer1", "layer2", "layer3", "layer4"])
    parts = split(model, levels)
    assert len(parts) == 5
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_compose(parts, x), model(x))
    with pytest.raises(ValueError, match="skip connection"):
        Levels(["layer1.0.bn1"]).cut_nodes(trace(model))
    with pytest.raises(ValueError, match="neither a module"):
        Levels(["layer9"]).cut_nodes(trace(model))


def test_vit_block_levels_compose():
    model = build("vit_tiny", image_size=16, patch_size=4, num_classes=5).eval()
    names = ["embed"] + [f"blocks.{i}" for i in range(2)]
    parts = split(model, Levels(names))
    assert len(parts) == 4
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(_compose(parts, x), model(x))
    assert parts[1](parts[0](x)).dim() == 3  # token tensors (B, T, C)


def test_untraceable_model_error_recommends_only_what_works():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = F.relu(x)
            return self.b(self.a(x))

    with pytest.raises(TraceError, match="register_elementwise") as info:
        split(Branchy(), Levels())
    assert "from_modules" not in str(info.value)


def test_registered_elementwise_module_is_traced_as_one_call():
    class Branchy(nn.Module):  # per-neuron, but its forward cannot be traced
        def forward(self, x):
            return F.relu(x) if x.sum() > 0 else x

    model = nn.Sequential(nn.Linear(4, 4), Branchy(), nn.Linear(4, 3))
    with pytest.raises(TraceError):
        split(model, Levels())
    register_elementwise(Branchy)
    parts = split(model, Levels())
    x = torch.randn(5, 4) + 1.0
    assert len(parts) == 2  # a level per Linear: the module is an activation between them
    torch.testing.assert_close(_compose(parts, x), model(x))
    assert any(isinstance(m, Branchy) for m in parts[1].modules())  # cut before it
    post = split(model, Levels(cut="post"))  # cut="post" moves the cut past the activation
    assert any(isinstance(m, Branchy) for m in post[0].modules())
    assert not any(isinstance(m, Branchy) for m in post[1].modules())


@pytest.mark.parametrize(
    "shape,hint,channels_first,axis",
    [
        ((4, 7), None, True, 1),
        ((4, 7, 9), 7, True, 1),
        ((4, 7, 9, 9), None, True, 1),
        ((4, 17, 32), 32, False, 2),
        ((4, 8, 8), 8, False, 2),
        ((4, 8, 8), 8, True, 1),
    ],
)
def test_neuron_axis(shape, hint, channels_first, axis):
    assert neuron_axis(torch.zeros(shape), hint, channels_first) == axis


def test_neuron_rows_round_trip():
    y = torch.randn(3, 5, 4, 2)
    rows = to_neurons(y, 1)
    assert rows.shape == (5, 3 * 4 * 2)
    torch.testing.assert_close(rows[2], y[:, 2].reshape(-1))
    torch.testing.assert_close(from_neurons(rows, y, 1), y)
    tokens = torch.randn(3, 6, 8)
    torch.testing.assert_close(from_neurons(to_neurons(tokens, 2), tokens, 2), tokens)


def test_graph_runner_computes_each_node_once():
    calls = {"n": 0}

    class Counting(nn.Linear):
        def forward(self, x):
            calls["n"] += 1
            return super().forward(x)

    model = nn.Sequential(nn.Linear(3, 3), Counting(3, 3), nn.Linear(3, 2))
    gm = trace(model)
    runner = GraphRunner(gm, torch.randn(4, 3))
    nodes = list(gm.graph.nodes)
    out = runner.value(nodes[-2])
    again = runner.value(nodes[-2])
    assert out is again
    assert calls["n"] == 1
    torch.testing.assert_close(out, model(runner.values[nodes[0]]))


class _InPlace(nn.Module):
    """Every way a network writes into a value that fusion reads: an in-place module, an
    in-place operator, an in-place method, a functional with ``inplace`` by position."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.a = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=inplace)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h = self.act(h)
        z = self.b(h)
        if self.inplace:
            z += h
            z = z.tanh_()
            z = torch.nn.functional.leaky_relu(z, 0.1, True)
        else:
            z = z + h
            z = z.tanh()
            z = torch.nn.functional.leaky_relu(z, 0.1)
        return self.c(z)


def test_graph_runner_keeps_values_that_later_nodes_would_overwrite_in_place():
    """A node that writes into its input (``nn.ReLU(inplace=True)``, ``+=``, ``tanh_()``,
    ``leaky_relu(..., True)``) runs on a copy: every kept value is the one the network
    computed at that node, as in the same network without in-place operations, and the fused
    models of both agree."""
    torch.manual_seed(0)
    inplace, plain = _InPlace(True).eval(), _InPlace(False).eval()
    plain.load_state_dict(inplace.state_dict())
    x = torch.randn(16, 4)
    runs = []
    for model in (inplace, plain):
        gm = trace(model)
        runner = GraphRunner(gm, x)
        nodes = [n for n in gm.graph.nodes if n.op not in ("output", "placeholder")]
        runner.compute(nodes)
        runs.append([runner.values[n] for n in nodes])
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs, strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _InPlace(True).eval()
    other_plain = _InPlace(False).eval()
    other_plain.load_state_dict(other.state_dict())
    for method in ("otfusion", "zipit", "kf_linear"):
        a = nf.fuse([inplace, other], x, method=method)
        b = nf.fuse([plain, other_plain], x, method=method)
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-7, msg=f"{method} {k}")
