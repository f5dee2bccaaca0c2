"""Permutation spaces found from the fx graph: permuting every free space keeps the function."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from toys import cnn_bn, mlp, permute_sequential, randomise_batchnorm, relative_error

from neurofuse.alignment import (
    Member,
    Space,
    apply_permutation,
    permutation_spaces,
    random_permutation,
    reestimate_batchnorm,
)
from neurofuse.models import build

# (architecture, kwargs, input shape, expected number of free spaces)
ZOO = [
    ("mlp", dict(in_features=12, hidden=[16, 16]), (6, 12), 2),
    (
        "vgg",
        dict(config="vgg_small", input_size=16, batch_norm=True, classifier=[16]),
        (4, 3, 16, 16),
        5,
    ),
    ("vgg", dict(config="vgg_small", input_size=16, batch_norm=False), (4, 3, 16, 16), 4),
    ("resnet18", dict(width=4), (4, 3, 8, 8), 12),  # 4 residual streams + 8 block-hidden spaces
    # the token stream, and per block the attention heads and the MLP hidden space
    ("vit_tiny", dict(image_size=16), (4, 3, 16, 16), 5),
    ("resmlp", dict(in_features=12, dim=16, hidden=[24, 24]), (5, 12), 3),
    ("cnn1d", dict(channels=[8, 8], hidden=[16]), (4, 1, 40), 3),
    ("cnn1d", dict(channels=[8, 8], batch_norm=True), (4, 1, 40), 2),
]


def random_perms(spaces: list[Space], seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s.name: random_permutation(s, g) for s in spaces if not s.fixed}


def permuted(model: nn.Module, spaces: list[Space], perms: dict[str, Tensor]) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_permutation(model.state_dict(), spaces, perms))
    return twin.eval()


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(
    "name,kwargs,shape,free", ZOO, ids=[f"{z[0]}-{i}" for i, z in enumerate(ZOO)]
)
def test_random_permutation_of_every_free_space_keeps_the_function(name, kwargs, shape, free):
    model = randomise_batchnorm(build(name, **kwargs))
    spaces = permutation_spaces(model)
    assert sum(not s.fixed for s in spaces) == free
    perms = random_perms(spaces)
    twin = permuted(model, spaces, perms)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, twin.state_dict()[k])]
    assert moved  # something really was permuted
    x = torch.randn(*shape)
    assert relative_error(logits(twin, x), logits(model, x)) < 1e-5


@pytest.mark.parametrize("index", [1, 3], ids=["vgg-bn", "resnet18"])
def test_a_missed_member_breaks_the_function(index):
    """The function check above can fail: drop one coupled parameter from a space."""
    name, kwargs, shape, _ = ZOO[index]
    model = randomise_batchnorm(build(name, **kwargs))
    spaces = permutation_spaces(model)
    perms = random_perms(spaces)
    x = torch.randn(*shape)
    for drop in ("running_var", "weight"):  # a BatchNorm statistic; a consumer's columns
        damaged = copy.deepcopy(spaces)
        space = next(s for s in damaged if not s.fixed)
        axis = 0 if drop == "running_var" else 1
        victim = next(m for m in space.members if m[0].endswith(drop) and m[1] == axis)
        space.members.remove(victim)
        twin = permuted(model, damaged, perms)
        assert relative_error(logits(twin, x), logits(model, x)) > 1e-3


def test_spaces_of_a_resnet_stage_and_the_flatten_repeat():
    resnet = permutation_spaces(build("resnet18", width=4))
    stem = resnet[0]
    assert not stem.fixed and stem.size == 4
    keys = {m.key for m in stem.members}
    # stem conv + bn, both blocks' conv2/bn2 (outgoing), both blocks' conv1 and the next
    # stage's conv1 and downsample (incoming)
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
    ):
        assert key in keys
    assert Member("layer1.0.conv2.weight", 0, 1) in stem.members
    assert Member("layer1.0.conv1.weight", 1, 1) in stem.members
    assert resnet[-1].fixed and resnet[-1].name == "fc"
    vgg = permutation_spaces(build("vgg", config=[4, "M", 6, "M"], input_size=12, batch_norm=True))
    last = [s for s in vgg if not s.fixed][-1]
    assert Member("head.weight", 1, 9) in last.members  # 6 channels x 3 x 3 positions
    assert last.name == "features_5"  # the BatchNorm that ends the unit


def test_vit_spaces_are_the_token_stream_the_heads_and_the_mlp_units():
    spaces = permutation_spaces(build("vit_tiny", image_size=16))
    by = {s.name: s for s in spaces}
    stream = spaces[0]
    assert not stream.fixed and stream.stream and stream.size == 32 and stream.heads == 1
    for member in (
        Member("embed.proj.weight", 0),
        Member("embed.cls_token", 2),  # the class token and position embeddings join it
        Member("embed.pos_embedding", 2),
        Member("blocks.0.norm1.weight", 0),
        Member("blocks.0.attn.qkv.weight", 1),
        Member("blocks.1.mlp.fc2.bias", 0),
        Member("norm.bias", 0),
        Member("head.weight", 1),
    ):
        assert member in stream.members
    heads = by["blocks_0_attn_qkv"]
    assert not heads.fixed and heads.heads == 2 and heads.size == 32 and heads.head_dim == 16
    assert set(heads.members) == {
        Member("blocks.0.attn.qkv.weight", 0, 1, 3),  # query, key and value rows alike
        Member("blocks.0.attn.qkv.bias", 0, 1, 3),
        Member("blocks.0.attn.proj.weight", 1, 1, 1),  # the value's dimensions
    }
    assert set(by["blocks_1_mlp_fc1"].members) == {
        Member("blocks.1.mlp.fc1.weight", 0),
        Member("blocks.1.mlp.fc1.bias", 0),
        Member("blocks.1.mlp.fc2.weight", 1),
    }
    assert by["head"].fixed and len(spaces) == 6


@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_a_permutation_that_splits_a_head_breaks_attention(arch):
    """Heads really are units: moving one dimension to another head changes the function, and
    apply_permutation refuses such a permutation."""
    if arch == "vit":
        model, x = build("vit_tiny", image_size=16).eval(), torch.randn(4, 3, 16, 16)
    else:
        model = build("gpt", vocab_size=20, max_len=8, dim=16, heads=4, mlp_dim=24).eval()
        x = torch.randint(0, 20, (4, 7)).float()
    spaces = permutation_spaces(model, example=x)
    heads = next(s for s in spaces if s.heads > 1)
    swap = torch.arange(heads.size)
    swap[[0, heads.head_dim]] = swap[[heads.head_dim, 0]]  # dimension 0 of heads 0 and 1
    with pytest.raises(ValueError, match="splits an attention head"):
        apply_permutation(model.state_dict(), spaces, {heads.name: swap})
    forced = copy.deepcopy(heads)
    forced.heads = 1
    twin = permuted(model, [forced], {heads.name: swap})
    assert relative_error(logits(twin, x), logits(model, x)) > 1e-3
    kept = permuted(model, spaces, {heads.name: random_permutation(heads)})
    assert relative_error(logits(kept, x), logits(model, x)) < 1e-5


def test_gpt_spaces_from_an_example_input():
    model = build("gpt", vocab_size=20, max_len=8, dim=16, heads=4, mlp_dim=24).eval()
    x = torch.randint(0, 20, (4, 7)).float()
    spaces = permutation_spaces(model, example=x)
    assert [(s.name, s.heads, s.fixed) for s in spaces] == [
        ("add_1", 1, False),  # token stream: embedding columns and position rows
        ("blocks_0_attn_qkv", 4, False),
        ("blocks_0_mlp_fc1", 1, False),
        ("blocks_1_attn_qkv", 4, False),
        ("blocks_1_mlp_fc1", 1, False),
        ("head", 1, True),
    ]
    assert Member("embed.tok.weight", 1) in spaces[0].members
    assert Member("embed.pos", 2) in spaces[0].members
    twin = permuted(model, spaces, random_perms(spaces))
    assert relative_error(logits(twin, x), logits(model, x)) < 1e-5
    # without an example the rank after the token lookup is unknown, so split(dim=2) cannot be
    # followed: the attention spaces are left unpermuted, which is safe
    blind = permutation_spaces(model)
    assert [s.fixed for s in blind] == [False, True, False, True, False, True]


class Odd(nn.Module):
    """Constructs the analysis must see through (or must refuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise: keeps the space
        self.gate_a = nn.Conv2d(6, 5, 1)
        self.gate_b = nn.Conv2d(6, 5, 1)
        self.gn = nn.GroupNorm(1, 5)
        self.shared = nn.Linear(5, 5)  # called twice: couples its input and output
        self.offset = nn.Parameter(torch.randn(7))
        self.fc = nn.Linear(5, 7)
        self.side = nn.Linear(5, 4)
        self.out = nn.Linear(11, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.dw(self.conv(x)))
        g = self.gate_a(h) * torch.sigmoid(self.gate_b(h))  # gating unions two spaces
        g = self.gn(g).mean((2, 3))  # reduction over positions keeps the channels
        s = self.shared(self.shared(g).relu())
        t = self.fc(s) + self.offset  # a raw parameter joins fc's space, which cat fixes
        u = self.side(s).view(s.size(0), -1)
        return self.out(torch.cat([t, u], dim=1))  # cat: fixed


def test_odd_constructs_keep_the_function_and_fix_what_they_must():
    torch.manual_seed(0)
    model = Odd().eval()
    with torch.no_grad():
        for p in model.gn.parameters():
            p.add_(torch.randn_like(p))
    spaces = permutation_spaces(model)
    by = {s.name: s for s in spaces}
    assert not by["conv"].fixed and Member("dw.weight", 0) in by["conv"].members
    gate = next(s for s in spaces if Member("gate_b.weight", 0) in s.members)
    assert (
        not gate.fixed
        and Member("gate_a.weight", 0) in gate.members
        and Member("gn.weight", 0) in gate.members
    )
    # shared(shared(g)): g, shared(g) and the result all meet the same weight, so one space
    assert {Member("shared.weight", 0), Member("shared.weight", 1), Member("fc.weight", 1)} <= set(
        gate.members
    )
    assert by["fc"].fixed and by["side"].fixed and by["out"].fixed
    perms = random_perms(spaces)
    assert set(perms) == {"conv", gate.name}
    x = torch.randn(4, 3, 6, 6)
    assert relative_error(logits(permuted(model, spaces, perms), x), logits(model, x)) < 1e-5


def test_spaces_match_the_hand_written_toy_permutations():
    """The derived free spaces hold exactly the parameters that tests/toys.py's hand-written
    permute_sequential moves (an independent account of the same coupling)."""
    for model, repeat in ((mlp(), 1), (cnn_bn(), 4)):
        model = randomise_batchnorm(model)
        twin = permute_sequential(model, flatten_repeat=repeat)
        moved = {
            k for k, v in model.state_dict().items() if not torch.equal(v, twin.state_dict()[k])
        }
        derived = {m.key for s in permutation_spaces(model) if not s.fixed for m in s.members}
        assert moved == derived


def test_apply_permutation_checks_its_input_and_copies():
    model = build("mlp", in_features=4, hidden=[5])
    spaces = permutation_spaces(model)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    out = apply_permutation(state, spaces, {"fc1": torch.tensor([4, 3, 2, 1, 0])})
    assert torch.equal(out["fc1.weight"], before["fc1.weight"].flip(0))
    assert torch.equal(out["head.weight"], before["head.weight"].flip(1))
    assert all(torch.equal(state[k], before[k]) for k in state)  # the input is untouched
    with pytest.raises(ValueError, match="fixed"):
        apply_permutation(state, spaces, {"head": torch.arange(10)})
    with pytest.raises(ValueError, match="permutation of range"):
        apply_permutation(state, spaces, {"fc1": torch.tensor([0, 0, 1, 2, 3])})
    with pytest.raises(ValueError, match="no space named"):
        apply_permutation(state, spaces, {"fc9": torch.arange(5)})


def test_hand_written_spec_is_checked_and_used():
    model = mlp(d_in=4, hidden=(5,), classes=2)
    spec = [Space("h", 5, [("1.weight", 0, 1), ("1.bias", 0, 1), ("3.weight", 1, 1)], [], False)]
    assert permutation_spaces(model, spec) == spec
    with pytest.raises(ValueError, match="not in the model's state_dict"):
        permutation_spaces(model, [Space("h", 5, [("9.weight", 0, 1)], [], False)])
    with pytest.raises(ValueError, match="cannot hold"):
        permutation_spaces(model, [Space("h", 6, [("1.weight", 0, 1)], [], False)])


def test_reestimate_batchnorm_gives_the_fusion_set_statistics():
    torch.manual_seed(0)
    model = randomise_batchnorm(cnn_bn())
    model[0].weight.data.mul_(3.0)
    x = torch.randn(64, 1, 8, 8) + 0.5
    bn = model[1]
    momentum = bn.momentum
    reestimate_batchnorm(model, x, batch_size=len(x))
    with torch.no_grad():
        z = model[0](x)  # the first BatchNorm's input
    mean = z.mean((0, 2, 3))
    var = z.var((0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert not model.training and bn.momentum == momentum
    # the second BatchNorm saw its input as the first one (now re-estimated) normalises it
    with torch.no_grad():
        z2 = model[4](model[3](model[2](model[1](z))))
    assert torch.allclose(model[5].running_mean, z2.mean((0, 2, 3)), atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- soundness


class NanoGPTBlock(nn.Module):
    """nanoGPT's attention as written there (sizes from x.size(), C // n_head), with its
    position embedding looked up from torch.arange."""

    def __init__(self, vocab: int = 11, dim: int = 8, heads: int = 2, block: int = 6) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.ln = nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.n_head, self.n_embd = heads, dim

    def forward(self, idx: Tensor) -> Tensor:
        idx = idx.long()
        t = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(0, t, device=idx.device))
        h = self.ln(x)
        b, t, c = h.size(0), h.size(1), h.size(2)
        q, k, v = self.c_attn(h).split(self.n_embd, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return self.head(x)


class SeparateQKV(nn.Module):
    """Query, key and value from three layers (the Hugging Face layout)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o, self.head = nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.heads, self.hd = heads, dim // heads

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        b, t = h.size(0), h.size(1)
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.head(h + self.o(y))


class SinusoidalPE(nn.Module):
    """A position encoding computed in forward from sizes: a constant, not a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        pos = torch.arange(h.size(1), dtype=h.dtype)[:, None] * torch.arange(8, dtype=h.dtype)
        return self.out(torch.relu(h + torch.sin(0.3 * pos)))


class ParamReadTwice(nn.Module):
    """A parameter added to one space and read, unpermuted, by another layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out, self.side = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.randn(8))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x) + self.pos
        return self.out(torch.relu(h)) + self.side(self.pos.view(1, 8))


class VolatileBuffer(nn.Module):
    """A non-persistent buffer added to a space: it is not in the state dict to permute."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(5, 8), nn.Linear(8, 3)
        self.register_buffer("pe", torch.randn(8), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.inp(x) + self.pe))


HOSTILE = {
    "nanogpt": (NanoGPTBlock, lambda: torch.randint(0, 11, (4, 6)).float(), {"c_attn", "add"}),
    "separate_qkv": (SeparateQKV, lambda: torch.randn(4, 6, 5), {"q"}),
    "sinusoidal": (SinusoidalPE, lambda: torch.randn(4, 6, 5), set()),
    "param_read_twice": (ParamReadTwice, lambda: torch.randn(4, 5), set()),
    "volatile_buffer": (VolatileBuffer, lambda: torch.randn(4, 5), set()),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_permuting_every_free_space_of_unusual_models_keeps_the_function(name):
    """The analysis may leave a space fixed when in doubt, never free when permuting it would
    change the output; ``free`` lists spaces (by name prefix) it must still find."""
    make, inputs, free = HOSTILE[name]
    torch.manual_seed(0)
    model, x = make().eval(), inputs()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    spaces = permutation_spaces(model, example=x)
    found = {s.name for s in spaces if not s.fixed}
    assert all(any(f.startswith(prefix) for f in found) for prefix in free), found
    for seed in range(3):
        twin = permuted(model, spaces, random_perms(spaces, seed))
        assert relative_error(logits(twin, x), logits(model, x)) < 1e-5


def test_an_example_input_leaves_a_training_model_untouched():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permutation_spaces(model, example=torch.randn(8, 4))
    assert model.training and model[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
