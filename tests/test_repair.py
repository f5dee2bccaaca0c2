"""REPAIR and the averaging methods' repairs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from toys import cnn_bn, mlp, permuted_by_analysis, randomise_batchnorm

import neurofuse as nf


def _unit_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Outputs of every affine unit (the layer, or the BatchNorm right after it) but the last,
    by forward hooks (independent of the graph toolkit REPAIR uses)."""
    mods = list(model.modules())
    ends = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear | nn.Conv2d):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            ends.append(nxt if isinstance(nxt, nn.BatchNorm2d | nn.BatchNorm1d) else m)
    ends = ends[:-1]  # the classifier is not repaired
    seen: list[Tensor] = []
    hooks = [e.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for e in ends]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


def _stats(y: Tensor) -> tuple[Tensor, Tensor]:
    rows = y.transpose(0, 1).reshape(y.shape[1], -1).double()
    return rows.mean(1), rows.std(1, unbiased=False)


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
@pytest.mark.parametrize("method,options", [("vanilla", {}), ("fedavg", {"sample_counts": [3, 1]})])
def test_repair_restores_the_interpolated_neuron_statistics(arch, method, options):
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if arch == "mlp":
            return mlp(d_in=10, hidden=(16, 16)).eval()
        return randomise_batchnorm(cnn_bn(), seed)

    models = [build(0), build(1)]
    x = torch.randn(64, 10) if arch == "mlp" else torch.randn(64, 1, 8, 8)
    w = [0.75, 0.25] if method == "fedavg" else [0.5, 0.5]
    fused = nf.fuse(models, x, method=method, repair=True, **options)
    plain = nf.fuse(models, x, method=method, **options)
    base = [_unit_outputs(m, x) for m in models]
    got, before = _unit_outputs(fused, x), _unit_outputs(plain, x)
    assert len(got) == len(base[0]) >= 2
    for j, y in enumerate(got):
        mean, sd = _stats(y)
        target_mean = sum(wk * _stats(b[j])[0] for wk, b in zip(w, base, strict=True))
        target_sd = sum(wk * _stats(b[j])[1] for wk, b in zip(w, base, strict=True))
        torch.testing.assert_close(mean, target_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sd, target_sd, atol=1e-4, rtol=1e-4)
    # averaging unrelated neurons collapsed their spread; the report says by how much
    collapse = fused.neurofuse_report["repair_collapse"]
    assert len(collapse) == len(got) and min(collapse.values()) < 0.95
    assert _stats(before[-1])[1].mean() < _stats(got[-1])[1].mean()


def test_repair_keeps_a_permuted_copy_exact():
    torch.manual_seed(0)
    model, x = randomise_batchnorm(cnn_bn(), 3), torch.randn(48, 1, 8, 8)
    twin = permuted_by_analysis(model, seed=2, example=x[:2])
    for method in ("git_rebasin", "otfusion"):
        fused = nf.fuse([model, twin], x, method=method, repair=True)
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
        assert all(abs(r - 1) < 1e-4 for r in fused.neurofuse_report["repair_collapse"].values())


def test_repair_never_touches_the_base_models():
    models = [mlp(d_in=10).eval(), mlp(d_in=10).eval()]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    nf.fuse(models, torch.randn(32, 10), method="git_rebasin", repair=True)
    for m, state in zip(models, before, strict=True):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
def test_repair_gathers_the_base_statistics_in_chunks(arch, monkeypatch):
    """The aligned base models' statistics, and the fused model's, are summed over chunks of
    the data, one model at a time: chunks of 7 samples give the repair of the whole set at
    once, and the chunked sums keep a neuron whose mean is far above its spread exact."""
    from neurofuse.alignment import repair as module

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if arch == "mlp":
            return mlp(d_in=10, hidden=(16, 16)).eval()
        return randomise_batchnorm(cnn_bn(), seed)

    models = [build(0), build(1), build(2)]
    x = torch.randn(50, 10) if arch == "mlp" else torch.randn(50, 1, 8, 8)
    whole = nf.fuse(models, x, method="vanilla", repair=True)
    monkeypatch.setattr(module, "STATS_CHUNK", 7)
    chunked = nf.fuse(models, x, method="vanilla", repair=True)
    pairs = zip(whole.state_dict().items(), chunked.state_dict().items(), strict=True)
    for (k, v), (k2, v2) in pairs:
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-7)  # float32: one ulp apart
    assert chunked.neurofuse_report["repair_collapse"] == pytest.approx(
        whole.neurofuse_report["repair_collapse"], rel=1e-9
    )
    # chunking really happened: 50 samples in eight even chunks of at most 7, per unit and
    # model, and per unit on the fused side (rerun up to the unit on each chunk); no
    # evaluation of more than a chunk
    added, seen = [], []
    real_add, real_runner = module.MomentSums.add, module.GraphRunner.__init__
    monkeypatch.setattr(
        module.MomentSums, "add", lambda self, r: added.append(r.shape[1]) or real_add(self, r)
    )
    monkeypatch.setattr(
        module.GraphRunner,
        "__init__",
        lambda self, gm, inputs: seen.append(len(inputs)) or real_runner(self, gm, inputs),
    )
    nf.fuse(models[:1] * 2, x, method="vanilla", repair=True)
    units = len(chunked.neurofuse_report["repair_collapse"])
    assert len(added) == 8 * (2 + 1) * units
    assert seen and max(seen) <= 7
    rows = torch.randn(3, 50, dtype=torch.float64)
    rows[1] = 1e7 + 1e-3 * rows[1]
    sums = module.MomentSums()
    for lo in range(0, 50, 7):
        sums.add(rows[:, lo : lo + 7])
    mean, sd = sums.stats()
    torch.testing.assert_close(mean, rows.mean(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(sd, rows.std(1, unbiased=False), rtol=1e-6, atol=0)


def test_repair_holds_one_aligned_base_model_at_a_time():
    """``repair`` reads the aligned models once, in order: a model made on demand, and its
    parameters, are freed before the next is made (no garbage collection needed: its trace
    holds it in no reference cycle)."""
    import gc
    import weakref

    from neurofuse.alignment.repair import repair
    from neurofuse.methods._plan import LazySequence

    torch.manual_seed(0)
    models = [mlp(d_in=10, hidden=(16, 16)).eval() for _ in range(3)]
    states = [m.state_dict() for m in models]
    fused = nf.fuse(models, torch.randn(40, 10), method="vanilla")
    made: list[weakref.ref] = []

    def make(k: int) -> nn.Module:
        assert all(r() is None for r in made), "an earlier base model is still alive"
        model = mlp(d_in=10, hidden=(16, 16)).eval()
        model.load_state_dict(states[k])
        made.extend([weakref.ref(model), weakref.ref(next(model.parameters()))])
        return model

    gc.disable()  # only reference counts may free them
    try:
        repair(fused, LazySequence(3, make), torch.randn(40, 10))
    finally:
        gc.enable()
    assert len(made) == 6


def test_even_chunks_cover_the_samples_in_as_few_near_equal_chunks_as_the_size_allows():
    from neurofuse.utils import even_chunks

    for n, size in ((50, 7), (513, 512), (512, 512), (1, 512), (1025, 512), (3, 1)):
        sizes = [c.stop - c.start for c in even_chunks(n, size)]
        starts = [c.start for c in even_chunks(n, size)]
        assert sum(sizes) == n and starts[0] == 0 and max(sizes) <= size
        assert len(sizes) == -(-n // size) and max(sizes) - min(sizes) <= 1
        assert starts == [sum(sizes[:i]) for i in range(len(sizes))]
    assert [c.stop - c.start for c in even_chunks(513, 512)] == [257, 256]  # no 1-sample chunk
