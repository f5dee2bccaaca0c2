"""Compression: fusing one model into a smaller template (paper section 5.5.2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from toys import mlp, relative_error, toy_task, train

import neurofuse as nf


def duplicated(small: nn.Sequential) -> nn.Sequential:
    """A twice-as-wide MLP that computes exactly what ``small`` computes: every hidden neuron
    appears twice (neurons i and i + h are copies) and each copy carries half the outgoing
    weight."""
    linears = [m for m in small if isinstance(m, nn.Linear)]
    hidden = tuple(lin.out_features for lin in linears[:-1])
    wide = mlp(
        d_in=linears[0].in_features,
        hidden=tuple(2 * h for h in hidden),
        classes=linears[-1].out_features,
    )
    wide_linears = [m for m in wide if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for k, (src, dst) in enumerate(zip(linears, wide_linears, strict=True)):
            w = src.weight
            if k > 0:  # inputs are duplicated neurons: split the weight between the copies
                w = torch.cat([w / 2, w / 2], dim=1)
            b = src.bias
            if k < len(linears) - 1:  # outputs are duplicated
                w = torch.cat([w, w], dim=0)
                b = torch.cat([b, b])
            dst.weight.copy_(w)
            dst.bias.copy_(b)
    return wide.eval()


@pytest.fixture(scope="module")
def small_and_wide():
    x, y = toy_task(n=600)
    small = train(mlp(hidden=(8, 8)), x, y, epochs=20)
    wide = duplicated(small)
    with torch.no_grad():
        assert relative_error(wide(x), small(x)) < 1e-5  # the construction is exact
    return small, wide, x


def test_kf_linear_compresses_a_redundant_model_exactly(small_and_wide):
    small, wide, x = small_and_wide
    template = mlp(hidden=(8, 8))  # random weights: the Linear variant refits every level
    state = copy.deepcopy(wide.state_dict())
    fused = nf.fuse([wide], x, method="kf_linear", target=template)
    with torch.no_grad():
        assert relative_error(fused(x), small(x)) < 1e-4
    assert [m.out_features for m in fused if isinstance(m, nn.Linear)] == [8, 8, 3]
    for k, v in wide.state_dict().items():  # the base model is untouched
        assert torch.equal(v, state[k])


def test_kf_gradient_can_start_from_the_template_weights(small_and_wide):
    """With ``init_model=None`` and no noise, a template that already computes the centroids
    is kept: the groups are ordered like the template's own neurons, so its starting loss is
    zero. Ordering them any other way would leave a large error after 2 epochs."""
    small, wide, x = small_and_wide
    fused = nf.fuse(
        [wide],
        x,
        method="kf_gradient",
        target=copy.deepcopy(small),
        init_model=None,
        eps=0.0,
        epochs=2,
        last_epochs=2,
    )
    with torch.no_grad():
        assert relative_error(fused(x), small(x)) < 1e-5


def test_kd_distils_one_teacher_into_the_template(small_and_wide):
    small, wide, x = small_and_wide
    student = mlp(hidden=(8, 8))
    fused = nf.fuse([wide], x, method="kd", target=student, init_model=None, epochs=30)
    with torch.no_grad():
        agree = (fused(x).argmax(1) == wide(x).argmax(1)).float().mean()
    assert agree > 0.9


def test_one_model_needs_a_target_and_a_method_that_compresses():
    x, _ = toy_task(n=50)
    model = mlp()
    with pytest.raises(ValueError, match="needs a target"):
        nf.fuse([model], x, method="kf_linear")
    for method in ("vanilla", "hf_linear", "otfusion"):
        with pytest.raises(ValueError, match="kf_linear"):
            nf.fuse([model], x, method=method, target=mlp(hidden=(8, 8)))
    with pytest.raises(ValueError, match="none"):
        nf.fuse([], x)


def test_init_model_out_of_range_names_the_valid_choices():
    x, _ = toy_task(n=50)
    with pytest.raises(ValueError, match="None"):
        nf.fuse([mlp(), mlp()], x, method="kf_gradient", init_model=5)
