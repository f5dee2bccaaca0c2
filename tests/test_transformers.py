"""Transformers as first-class citizens: paper-style levels, exact recovery of a permuted copy
by every alignment method and both Linear variants, finite fused outputs, untouched models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from toys import permuted_by_analysis, relative_error

import neurofuse as nf
from neurofuse.graph import Levels, trace
from neurofuse.models import build


def _vit() -> nn.Module:
    return build("vit", image_size=8, patch_size=4, dim=16, depth=2, heads=4, mlp_dim=24)


def _resmlp() -> nn.Module:
    return build("resmlp", in_features=10, dim=12, hidden=[16, 16], num_classes=4)


def _gpt() -> nn.Module:
    return build("gpt", vocab_size=13, max_len=8, dim=16, depth=2, heads=4, mlp_dim=24)


def _inputs(arch: str, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return torch.randn(n, 3, 8, 8, generator=g)
    if arch == "resmlp":
        return torch.randn(n, 10, generator=g)
    return torch.randint(0, 13, (n, 6), generator=g).float()  # token ids


ARCHS = {"vit": _vit, "resmlp": _resmlp, "gpt": _gpt}


def _random_model(arch: str, seed: int) -> nn.Module:
    """A model whose LayerNorms, class token and position embeddings are far from their
    initial values (so that folding and aligned averaging are really exercised)."""
    torch.manual_seed(seed)
    model = ARCHS[arch]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                "norm" in name
                or "ln" in name
                or name.endswith(("cls_token", "pos_embedding", "pos"))
            ):
                p.add_(0.5 * torch.randn_like(p))
    return model


def _permuted(model: nn.Module, x: Tensor, seed: int) -> nn.Module:
    return permuted_by_analysis(model, seed, example=x)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


RECOVERING = [
    ("kf_linear", {}),
    ("hf_linear", {}),
    ("git_rebasin", {"match": "acts"}),
    ("git_rebasin", {"match": "weights"}),
    ("otfusion", {"ground_metric": "acts"}),
    ("otfusion", {"ground_metric": "weights"}),
    ("otfusion", {"solver": "sinkhorn", "reg": 1e-3}),
    ("transformer_otfusion", {"solver": "emd"}),
    ("transformer_otfusion", {"solver": "emd", "heads": "units"}),
    ("transformer_otfusion", {"solver": "emd", "ground_metric": "wts"}),
    ("transformer_otfusion", {"solver": "sinkhorn", "reg": 1e-3, "residual": "weighted_scalar"}),
    ("transformer_otfusion", {"solver": "emd", "repair": True}),
    ("git_rebasin", {"match": "acts", "repair": True}),
]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(
    "method,options",
    RECOVERING,
    ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in RECOVERING],
)
def test_a_permuted_copy_is_recovered_exactly(arch, method, options):
    model = _random_model(arch, 0)
    x = _inputs(arch, 96, 1)
    twin = _permuted(model, x, seed=2)
    x_test = _inputs(arch, 64, 3)
    assert relative_error(_logits(twin, x_test), _logits(model, x_test)) < 1e-5  # same function
    assert relative_error(twin.state_dict()["head.weight"], model.state_dict()["head.weight"]) > 0.1
    fused = nf.fuse([model, twin], x, method=method, **options)
    assert relative_error(_logits(fused, x_test), _logits(model, x_test)) < 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_kmeans_fusion_of_three_permuted_copies(arch):
    model = _random_model(arch, 0)
    x = _inputs(arch, 96, 1)
    models = [model, _permuted(model, x, 2), _permuted(model, x, 3)]
    fused = nf.fuse(models, x, method="kf_linear")
    x_test = _inputs(arch, 64, 3)
    assert relative_error(_logits(fused, x_test), _logits(model, x_test)) < 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(
    "method",
    [
        "kf_linear",
        "hf_linear",
        "git_rebasin",
        "otfusion",
        "transformer_otfusion",
        "vanilla",
        "kf_gradient",
    ],
)
def test_independent_models_fuse_to_finite_outputs_and_stay_untouched(arch, method):
    models = [_random_model(arch, s) for s in (0, 1)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    x = _inputs(arch, 64, 1)
    options = {"epochs": 2, "last_epochs": 2} if method == "kf_gradient" else {}
    fused = nf.fuse(models, x, method=method, **options)
    out = _logits(fused, _inputs(arch, 16, 2))
    assert torch.isfinite(out).all()
    assert out.shape == _logits(models[0], _inputs(arch, 16, 2)).shape
    for m, state in zip(models, before, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("method", ["transformer_otfusion", "git_rebasin"])
def test_repair_rescales_fused_transformers(method):
    """REPAIR on two unrelated ViTs: every repaired neuron is reported, and the repaired model
    differs from the plain average (a permuted copy stays exact: test above)."""
    models = [_random_model("vit", s) for s in (0, 1)]
    x = _inputs("vit", 64, 1)
    plain = nf.fuse(models, x, method=method)
    fused = nf.fuse(models, x, method=method, repair=True)
    collapse = fused.neurofuse_report["repair_collapse"]
    assert collapse and all(v > 0 for v in collapse.values())
    assert "repair_collapse" not in plain.neurofuse_report
    assert relative_error(_logits(fused, x), _logits(plain, x)) > 1e-3


def test_automatic_levels_are_embedding_blocks_head():
    cases = {
        "vit": ["embed_drop", "add_2", "add_4", "head"],  # embed.drop ends the embedding
        "resmlp": ["embed", "add", "add_1", "head"],
        "gpt": ["embed_drop", "add_2", "add_4", "head"],
    }
    for arch, expected in cases.items():
        assert [n.name for n in Levels().cut_nodes(trace(ARCHS[arch]()))] == expected
    # explicit levels by module name still work (and name the same cuts)
    gm = trace(_vit())
    named = Levels(["embed", "blocks.0", "blocks.1", "head"]).cut_nodes(gm)
    assert [n.name for n in named] == cases["vit"]
    # models without LayerNorm or attention keep one level per affine layer
    mlp = build("mlp", in_features=4, hidden=[5, 6])
    assert [n.name for n in Levels().cut_nodes(trace(mlp))] == ["fc1", "fc2", "head"]


def test_heads_of_other_widths_are_refused_clearly():
    a = build("vit", image_size=8, patch_size=4, dim=16, depth=1, heads=4, mlp_dim=24).eval()
    b = build("vit", image_size=8, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=24).eval()
    with pytest.raises(ValueError, match="heads must have equal widths"):
        nf.fuse([a, b], _inputs("vit", 32, 0), method="kf_linear")


def test_transformer_otfusion_soft_alignment_is_soft_and_options_are_checked():
    """The paper's default (Sinkhorn, reg 0.08) blends neurons: a permuted copy is no longer
    recovered exactly, but closely; hard EMD is exact (above). Bad options name the choices."""
    model = _random_model("vit", 0)
    x = _inputs("vit", 96, 1)
    twin = _permuted(model, x, seed=2)
    x_test = _inputs("vit", 64, 3)
    fused = nf.fuse([model, twin], x, method="transformer_otfusion")
    err = relative_error(_logits(fused, x_test), _logits(model, x_test))
    assert 1e-4 < err < 0.2
    for bad in ({"residual": "max"}, {"heads": "some"}, {"ground_metric": "cka"}, {"reg": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            nf.fuse([model, twin], x, method="transformer_otfusion", **bad)


@pytest.mark.parametrize(
    "method,options",
    [
        ("git_rebasin", {}),
        ("otfusion", {}),
        ("otfusion", {"importance_in": "marginals"}),
        ("transformer_otfusion", {"solver": "emd"}),
        ("transformer_otfusion", {"solver": "emd", "importance_in": "marginals"}),
        ("kf_linear", {}),
        ("hf_linear", {}),
    ],
)
def test_importance_scores_of_attention_spaces(method, options):
    """Scores at a joint qkv projection come per query/key/value column (3x the space's
    neurons); every method reduces them to one per neuron and still recovers the copy."""
    model = _random_model("vit", 0)
    x = _inputs("vit", 96, 1)
    twin = _permuted(model, x, seed=2)
    fused = nf.fuse([model, twin], x, method=method, importance="activation", **options)
    x_test = _inputs("vit", 64, 3)
    assert relative_error(_logits(fused, x_test), _logits(model, x_test)) < 1e-4


@pytest.mark.parametrize("reference", [0, 1])
def test_transformer_otfusion_weighs_each_units_rows_with_the_carried_scores(
    monkeypatch, reference
):
    """``importance_in="average"``: model 1 is a noisy copy of model 0 with every space
    permuted, and its scores are model 0's carried by that permutation, times 3. Each linear
    unit's rows must then be averaged 1 : 3, as model weights 1 and 3 would (only if every
    score reaches the neuron it belongs to, through ``Q^T``), and the other parameters
    (embeddings, normalisations, the classifier) stay the plain mean."""
    from neurofuse import api
    from neurofuse.alignment import apply_permutation, permutation_spaces, random_permutation

    model = _random_model("vit", 0)
    x = _inputs("vit", 96, 1)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    spaces = permutation_spaces(model, example=x)
    g = torch.Generator().manual_seed(4)
    perms = {sp.name: random_permutation(sp, g) for sp in spaces if not sp.fixed}
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_permutation(noisy.state_dict(), spaces, perms))
    perm_of = {node: perms[sp.name] for sp in spaces if sp.name in perms for node in sp.nodes}
    models = [model, twin.eval()]
    opts = {"solver": "emd", "reference": reference}
    plain = nf.fuse(models, x, method="transformer_otfusion", **opts).state_dict()
    weighted = nf.fuse(
        models, x, method="transformer_otfusion", weights=[1.0, 3.0], **opts
    ).state_dict()

    def scores(self, k: int, name: str, output: Tensor, width: int) -> Tensor:
        own = torch.rand(width, generator=torch.Generator().manual_seed(width + len(name))) + 0.2
        if k == 0:
            return own
        perm = perm_of[name]  # twin neuron i is model neuron perm[i]
        return 3 * torch.cat([part[perm] for part in own.chunk(width // len(perm))])

    monkeypatch.setattr(api.ImportanceProvider, "scores", scores)
    fused = nf.fuse(models, x, method="transformer_otfusion", importance="activation", **opts)
    state = fused.state_dict()
    units = {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "blocks.1.mlp.fc2.weight"}
    others = {"blocks.0.norm1.weight", "embed.pos_embedding", "head.weight"}
    assert units <= state.keys() and others <= state.keys()
    for key in units:
        assert torch.allclose(state[key], weighted[key], atol=1e-6), key
        assert not torch.allclose(state[key], plain[key], atol=1e-5), key
    for key in others:
        assert torch.allclose(state[key], plain[key], atol=1e-6), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(
    "method,options",
    [
        ("kf_linear", {}),
        ("hf_linear", {}),
        ("git_rebasin", {}),
        ("transformer_otfusion", {"solver": "emd"}),
        ("kf_gradient", {"epochs": 2, "last_epochs": 2}),
    ],
)
def test_transformer_fusion_runs_on_cuda(arch, method, options):
    model = _random_model(arch, 0)
    x = _inputs(arch, 96, 1)
    twin = _permuted(model, x, seed=2)
    fused = nf.fuse([model.cuda(), twin.cuda()], x.cuda(), method=method, **options)
    assert next(fused.parameters()).is_cuda
    x_test = _inputs(arch, 64, 3).cuda()
    assert relative_error(_logits(fused, x_test), _logits(model, x_test)) < 1e-3


def _attention_maps(model: nn.Module, x: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) of every head at the model's attention call, (B, H, T, T)."""
    from neurofuse.graph.runner import GraphRunner

    gm = trace(model)
    runner = GraphRunner(gm, x)
    node = next(n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
    q, k = runner.value(node.args[0]), runner.value(node.args[1])
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1)


def test_transformer_otfusion_heads_as_units_moves_query_and_key_alike():
    """With separate query/key/value layers, heads="units" must match the heads once for all
    three: model 1 carried into model 0's neurons keeps every head's attention pattern."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_alignment import SeparateQKV

    torch.manual_seed(0)
    a, b = SeparateQKV().eval(), SeparateQKV().eval()
    x = torch.randn(32, 6, 5)
    carried = nf.fuse(
        [a, b], x, method="transformer_otfusion", solver="emd", heads="units", weights=[0, 1]
    )
    mine, theirs = _attention_maps(carried, x), _attention_maps(b, x)
    for h in range(mine.shape[1]):  # each fused head is one of model 1's heads, exactly
        assert min(float((mine[:, h] - theirs[:, g]).abs().max()) for g in range(2)) < 1e-5
    cross = nf.fuse([a, b], x, method="transformer_otfusion", solver="emd", weights=[0, 1])
    mixed = _attention_maps(cross, x)  # the reference's cross-head maps need not keep them
    assert mixed.shape == mine.shape


class _BiasedStream(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(5, 8), nn.Linear(8, 3)
        self.b = nn.Parameter(torch.randn(8))
        self.norm = nn.LayerNorm(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(self.inp(x) + self.b))


def test_transformer_otfusion_reads_a_vector_added_to_a_space_with_its_map():
    """A bias-like vector (one entry per neuron) added to a space has nothing to align it on:
    it is carried with the space's map (it used to be z-scored over one value: NaN)."""
    torch.manual_seed(0)
    model = _BiasedStream().eval()
    x = torch.randn(64, 5)
    twin = permuted_by_analysis(model, 1, example=x)
    for solver in ("emd", "sinkhorn"):
        fused = nf.fuse([model, twin], x, method="transformer_otfusion", solver=solver)
        out = _logits(fused, x)
        assert torch.isfinite(out).all()
        if solver == "emd":
            assert relative_error(out, _logits(model, x)) < 1e-5


def test_tied_weights_are_refused_by_per_layer_fits_and_kept_by_alignment():
    model = _gpt().eval()
    model.head.weight = model.embed.tok.weight  # a tied language-model head
    x = _inputs("gpt", 32, 0)
    for method in ("kf_linear", "kf_gradient", "hf_linear"):
        with pytest.raises(ValueError, match="tied parameter.*head.weight.*git_rebasin"):
            nf.fuse([model, _gpt().eval()], x, method=method)
    # a method that declares tied weights keeps them tied and the model's function
    fused = nf.fuse([model, model], x, method="git_rebasin")
    assert fused.head.weight is fused.embed.tok.weight
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def _nanogpt_attention(self, x: Tensor) -> Tensor:
    """nanoGPT's own attention code: the shape unpacked from ``x.size()``, heads by view."""
    B, T, C = x.size()  # noqa: N806 (nanoGPT's names)
    q, k, v = self.qkv(x).split(self.dim, dim=2)
    q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
    k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
    v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


@pytest.mark.parametrize("method", ["kf_linear", "git_rebasin"])
def test_nanogpt_style_shape_unpacking_keeps_heads_and_recovers(monkeypatch, method):
    from neurofuse.alignment import permutation_spaces
    from neurofuse.models.gpt import CausalSelfAttention

    monkeypatch.setattr(CausalSelfAttention, "forward", _nanogpt_attention)
    model = _random_model("gpt", 0)
    x = _inputs("gpt", 96, 1)
    assert sum(s.heads == 4 for s in permutation_spaces(model, example=x[:2])) == 2
    twin = _permuted(model, x, seed=2)
    x_test = _inputs("gpt", 64, 3)
    fused = nf.fuse([model, twin], x, method=method)
    assert relative_error(_logits(fused, x_test), _logits(model, x_test)) < 1e-4
