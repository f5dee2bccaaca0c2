"""The Linear variants' ``sample_chunk``: the models evaluated chunk by chunk, never on the whole
fusion set, with the fit of the whole set (issue 13: memory bounded in the fusion samples)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from toys import TinyResNet, cnn_bn, mlp, permuted_by_analysis, randomise_batchnorm, relative_error

import neurofuse as nf
from neurofuse.methods import _linear_values
from neurofuse.models import build


def _inputs(arch: str, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch == "gpt":
        return torch.randint(0, 13, (n, 6), generator=g).float()  # token ids
    shape = {"mlp": (10,), "resmlp": (10,), "vit": (3, 8, 8)}.get(arch, (1, 8, 8))
    return torch.randn(n, *shape, generator=g)


def _model(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    make = {
        "mlp": lambda: mlp(),
        "cnn_bn": lambda: randomise_batchnorm(cnn_bn(), seed),
        "resnet": lambda: randomise_batchnorm(TinyResNet(), seed),
        "resmlp": lambda: build("resmlp", in_features=10, dim=12, hidden=[16, 16], num_classes=4),
        "vit": lambda: build(
            "vit", image_size=8, patch_size=4, dim=16, depth=2, heads=4, mlp_dim=24
        ),
        "gpt": lambda: build("gpt", vocab_size=13, max_len=8, dim=16, depth=2, heads=4, mlp_dim=24),
    }[arch]
    return make().eval()


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


ARCHS = ["mlp", "cnn_bn", "resnet", "resmlp", "vit", "gpt"]


@pytest.fixture
def chunk_sizes(monkeypatch):
    """The number of samples of every evaluation the engine makes."""
    seen: list[int] = []
    real = _linear_values.GraphRunner.__init__

    def spy(self, gm, inputs):
        seen.append(int(inputs.shape[0]))
        real(self, gm, inputs)

    monkeypatch.setattr(_linear_values.GraphRunner, "__init__", spy)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["kf_linear", "hf_linear"])
def test_chunks_give_the_whole_set_fit_and_never_see_more_samples(arch, method, chunk_sizes):
    """Two independent models (groupings that are not a permutation): the fused model of
    uneven chunks of 17 samples is that of the whole set, and no evaluation held more than one
    chunk; transformers group their residual stream on every addition (``stream="all"``), which
    chunks reach through Gram matrices. (K-means starts from a matching: greedy k-means++
    meets exact ties, two mutually nearest points, that rounding in the last digit decides.)"""
    a, b = _model(arch, 0), _model(arch, 1)
    x, x_test = _inputs(arch, 80, 2), _inputs(arch, 40, 3)
    extra: dict = {"stream": "all"} if arch in ("vit", "gpt", "resmlp") else {}
    if method == "kf_linear":
        extra["kmeans_seeding"] = "matching"
    whole = nf.fuse([a, b], x, method=method, **extra)
    chunk_sizes.clear()
    chunked = nf.fuse([a, b], x, method=method, sample_chunk=17, **extra)
    assert chunk_sizes and max(chunk_sizes) <= 17
    assert relative_error(_logits(chunked, x_test), _logits(whole, x_test)) < 1e-6
    assert whole.neurofuse_report["grouping_cost"] == pytest.approx(
        chunked.neurofuse_report["grouping_cost"], rel=1e-6
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_chunks_recover_a_permuted_model(arch):
    model = _model(arch, 0)
    x, x_test = _inputs(arch, 60, 2), _inputs(arch, 40, 3)
    twin = permuted_by_analysis(model, 1, example=x[:2])
    fused = nf.fuse([model, twin], x, method="kf_linear", sample_chunk=16)
    assert relative_error(_logits(fused, x_test), _logits(model, x_test)) < 1e-4


def test_named_scores_come_from_the_inputs_and_a_callable_is_refused(chunk_sizes):
    a, b = _model("cnn_bn", 0), _model("cnn_bn", 1)
    x = _inputs("cnn_bn", 50, 2)
    whole = nf.fuse([a, b], x, method="kf_linear", importance="activation")
    chunked = nf.fuse([a, b], x, method="kf_linear", importance="activation", sample_chunk=12)
    x_test = _inputs("cnn_bn", 30, 3)
    assert relative_error(_logits(chunked, x_test), _logits(whole, x_test)) < 1e-6

    def mean_abs(model: nn.Module, name: str, output: Tensor) -> Tensor:
        return output.abs().transpose(0, 1).flatten(1).mean(1)  # per channel

    with pytest.raises(ValueError, match="this fusion never holds"):
        nf.fuse([a, b], x, method="kf_linear", importance=mean_abs, sample_chunk=12)
    # without chunks the callable reads the values as before
    nf.fuse([a, b], x[:20], method="hf_linear", importance=mean_abs)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (0, ValueError, "sample_chunk must be a positive number"),
        (-3, ValueError, "sample_chunk must be a positive number"),
        (2.5, TypeError, "sample_chunk.*expected an int"),
        ("64", TypeError, "sample_chunk.*expected an int"),
    ],
)
def test_sample_chunk_is_checked(bad, error, match):
    with pytest.raises(error, match=match):
        nf.fuse([mlp(), mlp()], torch.randn(20, 10), method="kf_linear", sample_chunk=bad)


def test_a_chunk_as_large_as_the_set_is_the_whole_set(chunk_sizes):
    a, b = mlp(), mlp()
    x = torch.randn(30, 10)
    nf.fuse([a, b], x, method="kf_linear", sample_chunk=30)
    assert 30 in chunk_sizes  # one evaluation of every sample: the default path


def test_the_finite_check_reads_blocks_and_finds_a_nan_in_the_last_one():
    from neurofuse.utils import all_finite

    x = torch.randn(1000, 3, 4)
    assert all_finite(x, block=50)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[-1, 2, 3] = bad  # the last row of the last block
        assert not all_finite(y, block=50) and not all_finite(y)
    assert all_finite(torch.tensor(1.0)) and not all_finite(torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf.fuse([mlp(), mlp()], y.reshape(1000, 12)[:, 2:], method="kf_linear")


class _Rows(nn.Module):
    """Reads several rows per sample through a reshape: ``fc1`` sees 8 rows of each sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x.reshape(-1, 4)).relu()).reshape(-1, 24)


def test_a_row_sketch_counts_the_rows_a_layer_reads_not_the_samples(monkeypatch):
    """``row_budget`` keeps about ``budget x fan-in`` rows of the layer's input, whose rows
    are samples x 8 here, in chunks as on the whole set."""
    from neurofuse.fitting import LeastSquares

    torch.manual_seed(0)
    a, b = _Rows().eval(), _Rows().eval()
    x = torch.randn(200, 8, 4)
    rows: list[int] = []
    real = LeastSquares.add
    monkeypatch.setattr(
        LeastSquares, "add", lambda self, xr, yr: (rows.append(len(xr)), real(self, xr, yr))
    )
    whole = nf.fuse([a, b], x, method="hf_linear", row_budget=4)
    kept = sum(rows)
    assert kept < 3 * 4 * (4 + 16 + 2)  # fc1: ~4 x 5 of 1,600 rows; fc2: ~4 x 17
    rows.clear()
    chunked = nf.fuse([a, b], x, method="hf_linear", row_budget=4, sample_chunk=64)
    assert sum(rows) == kept
    x_test = torch.randn(30, 8, 4)
    assert relative_error(_logits(chunked, x_test), _logits(whole, x_test)) < 1e-6


def test_a_lean_pass_keeps_only_its_targets():
    """``GraphRunner.compute(lean=True)`` (what a chunk uses) gives the values of a memoised
    pass but holds, afterwards, only the inputs, the targets and what it knew before."""
    from neurofuse.graph import GraphRunner, trace

    model = _model("vit", 0)
    x = _inputs("vit", 6, 1)
    gm = trace(model)
    nodes = list(gm.graph.nodes)
    targets = [nodes[len(nodes) // 3], nodes[-2]]
    full = GraphRunner(gm, x)
    want = [full.value(n) for n in targets]
    lean = GraphRunner(gm, x)
    known = nodes[5]
    lean.value(known)
    before = set(lean.values)
    got = lean.compute(targets, lean=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(lean.values) == before | set(targets)
    assert len(full.values) > len(lean.values) + 10  # the memoised pass kept its ancestors


def test_a_streamed_pass_gives_every_value_and_holds_only_what_is_still_read():
    """``GraphRunner.stream()`` yields each node's value in graph order, equal to the memoised
    pass, and after each step holds only values that a node not yet run still reads (a
    residual block's input stays until its skip is added, a plain chain's does not)."""
    from neurofuse.graph import GraphRunner, trace

    model = _model("vit", 0)
    x = _inputs("vit", 6, 1)
    gm = trace(model)
    full = GraphRunner(gm, x)
    streamed = GraphRunner(gm, x)
    order = [n for n in gm.graph.nodes if n.op != "output"]
    seen = []
    widest = 0
    for node, value in streamed.stream():
        seen.append(node)
        want = full.value(node)
        if isinstance(want, Tensor):
            torch.testing.assert_close(value, want, rtol=0, atol=0)
        ran = set(seen)
        for held in streamed.values:
            # (the current node's inputs go when the walk moves on)
            current = held is node or held in node.all_input_nodes
            assert current or any(u not in ran for u in held.users), held.name
        widest = max(widest, len(streamed.values))
    assert seen == order
    assert widest < len(order) // 4  # not every value: about the widest cut of the graph
    assert streamed.values == {}


def _batch_spy(models: list[nn.Module]) -> list[int]:
    """The batch sizes of every evaluation (a call without autograd) of a Linear or Conv layer
    of ``models`` or of the copies that carry the hook along (the engine's copies of the base
    models, and the fused model); the calls that train a level are not counted."""
    seen: list[int] = []

    def spy(_module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            seen.append(args[0].shape[0])

    for model in models:
        for layer in model.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                layer.register_forward_pre_hook(spy)
    return seen


@pytest.mark.parametrize("arch", ["mlp", "vit"])
@pytest.mark.parametrize("method", ["kf_gradient", "hf_gradient"])
def test_gradient_chunks_train_as_on_the_whole_set_and_never_see_more_samples(arch, method):
    """The Gradient variants with ``sample_chunk``: every level's inputs and targets are
    recomputed batch by batch, so no layer of the base models ever runs on more than one chunk,
    and the levels are trained on the same values in the same order as on the whole set (a
    ViT's blocks are trained; the MLP's head is, with the KL loss)."""
    a, b = _model(arch, 0), _model(arch, 1)
    x, x_test = _inputs(arch, 70, 2), _inputs(arch, 30, 3)
    extra: dict = {"epochs": 3, "last_epochs": 3}
    if arch == "mlp":
        extra["head_loss"] = "kl"
    if method == "kf_gradient":
        extra["kmeans_seeding"] = "matching"
    seen = _batch_spy([a, b])
    whole = nf.fuse([a, b], x, method=method, seed=0, **extra)
    assert max(seen) == 70  # (the spy sees the whole set where it is evaluated at once)
    seen.clear()
    chunked = nf.fuse([a, b], x, method=method, seed=0, sample_chunk=13, **extra)
    assert seen and max(seen) <= 13
    trained = [h for h in chunked.neurofuse_report["levels"] if "closed_form" not in h]
    assert trained  # the comparison covers trained levels, not only closed-form ones
    assert relative_error(_logits(chunked, x_test), _logits(whole, x_test)) < 1e-4


def test_gradient_chunks_need_the_closed_form_start_and_a_valid_size():
    a, b = mlp(), mlp()
    x = torch.randn(40, 10)
    with pytest.raises(ValueError, match="sample_chunk needs the closed-form start"):
        nf.fuse([a, b], x, method="kf_gradient", preset="setting1", sample_chunk=8)
    with pytest.raises(ValueError, match="sample_chunk must be a positive number"):
        nf.fuse([a, b], x, method="hf_gradient", sample_chunk=0)
