"""Model zoo: every registered architecture builds, trains, traces and rebuilds from its config."""

from __future__ import annotations

import json
import math
import operator

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neurofuse import models
from neurofuse.models import (
    EncoderBlock,
    MultiHeadSelfAttention,
    architecture_factory,
    available_architectures,
    build,
    build_from_config,
    model_config,
    register_architecture,
)
from neurofuse.models import registry as registry_module

# name -> (small kwargs, per-sample input shape, expected number of classes)
SMALL: dict[str, tuple[dict, tuple[int, ...], int]] = {
    "mlp": (dict(input_shape=(1, 6, 6), hidden=[16, 8], num_classes=5), (1, 6, 6), 5),
    "vgg": (
        dict(config="vgg_small", in_channels=1, input_size=28, batch_norm=True, classifier=[16]),
        (1, 28, 28),
        10,
    ),
    "resnet18": (dict(width=8, num_classes=7), (3, 16, 16), 7),
    "resnet34": (dict(width=4, in_channels=1), (1, 16, 16), 10),
    "vit": (
        dict(image_size=16, patch_size=4, dim=16, depth=2, heads=4, mlp_dim=32, num_classes=6),
        (3, 16, 16),
        6,
    ),
    "vit_tiny": ({}, (3, 32, 32), 10),
    "vit_cifar": (dict(dim=24, depth=1, heads=3, mlp_dim=16), (3, 32, 32), 100),
    "cnn1d": (dict(channels=[8, 8], hidden=[16], batch_norm=True), (1, 40), 10),
    "resmlp": (dict(input_shape=(1, 6, 6), dim=12, hidden=[16, 8], num_classes=5), (1, 6, 6), 5),
    # token ids in, next-token logits (B, T, vocab) out
    "gpt": (dict(vocab_size=11, max_len=8, dim=12, depth=2, heads=3, mlp_dim=16), (6,), 11),
}

TOP_LEVEL_CHILDREN = {
    "mlp": ["flatten", "fc1", "act1", "fc2", "act2", "head"],
    "vgg": ["features", "flatten", "classifier", "head"],
    "cnn1d": ["features", "flatten", "classifier", "head"],
    "resnet18": ["conv1", "bn1", "relu"]
    + [f"layer{i}" for i in range(1, 5)]
    + ["avgpool", "flatten", "fc"],
    "vit": ["embed", "blocks", "norm", "pool", "head"],
    "resmlp": ["flatten", "embed", "blocks", "norm", "head"],
    "gpt": ["embed", "blocks", "norm", "head"],
}
TOP_LEVEL_CHILDREN["resnet34"] = TOP_LEVEL_CHILDREN["resnet18"]
TOP_LEVEL_CHILDREN["vit_tiny"] = TOP_LEVEL_CHILDREN["vit_cifar"] = TOP_LEVEL_CHILDREN["vit"]

NAMES = sorted(SMALL)


def _small(name: str, batch: int = 4) -> tuple[nn.Module, torch.Tensor, int]:
    kwargs, shape, classes = SMALL[name]
    if name == "gpt":  # token ids, as floats (the model casts them)
        x = torch.randint(0, classes, (batch, *shape), generator=torch.Generator().manual_seed(0))
        return build(name, **kwargs), x.float(), classes
    return build(name, **kwargs), torch.randn(batch, *shape), classes


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(registry_module, "_ARCHITECTURES", dict(registry_module._ARCHITECTURES))


def test_every_registered_architecture_is_covered_here() -> None:
    assert set(available_architectures()) == set(SMALL)
    assert all(
        isinstance(d, str) and d and "\n" not in d for d in available_architectures().values()
    )


@pytest.mark.parametrize("name", NAMES)
def test_named_children_follow_the_contract(name: str) -> None:
    model, _, _ = _small(name)
    assert [child for child, _ in model.named_children()] == TOP_LEVEL_CHILDREN[name]


@pytest.mark.parametrize("name", NAMES)
def test_slices_compose_to_the_whole_model(name: str) -> None:
    model, x, _ = _small(name)
    model.eval()
    cut = len(model) // 2
    head, tail = model[:cut], model[cut:]
    assert list(head._modules) + list(tail._modules) == TOP_LEVEL_CHILDREN[name]
    torch.testing.assert_close(tail(head(x)), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_every_parameter(name: str) -> None:
    model, x, classes = _small(name)
    model.train()
    logits = model(x)
    if logits.dim() == 3:  # a language model: one prediction per position
        assert logits.shape == (*x.shape, classes)
        logits = logits.reshape(-1, classes)
    else:
        assert logits.shape == (x.shape[0], classes)
    F.cross_entropy(logits, torch.arange(logits.shape[0]) % classes).backward()
    total = 0.0
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {param_name}"
        total += param.grad.abs().sum().item()
    assert total > 0


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_and_exposes_every_weighted_layer(name: str) -> None:
    model, x, _ = _small(name)
    model.eval()
    traced = fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    called = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    weighted_leaves = {
        module_name
        for module_name, module in model.named_modules()
        if not list(module.children()) and list(module.parameters(recurse=False))
    }
    assert weighted_leaves <= called, f"hidden from fx: {sorted(weighted_leaves - called)}"


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_rebuilds_the_same_architecture(name: str) -> None:
    model, x, _ = _small(name)
    model.train()
    model(x)  # move BatchNorm running statistics away from their initial values
    config = json.loads(json.dumps(model_config(model)))
    assert config["name"] == name
    twin = build_from_config(config)
    assert type(twin) is type(model)
    assert model_config(twin) == model_config(model)
    model.eval()
    twin.eval()
    assert not torch.allclose(twin(x), model(x))  # fresh weights until loaded
    twin.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(twin(x), model(x))


def test_config_is_json_with_tuples_as_lists_and_a_private_copy() -> None:
    model = build("mlp", input_shape=(1, 4, 4), hidden=(8,), in_features=np.int64(16))
    config = model_config(model)
    assert config == {
        "name": "mlp",
        "kwargs": {"input_shape": [1, 4, 4], "hidden": [8], "in_features": 16},
    }
    assert type(config["kwargs"]["in_features"]) is int
    assert json.loads(json.dumps(config)) == config
    config["kwargs"]["hidden"].append(3)
    assert model_config(model)["kwargs"]["hidden"] == [8]
    assert model.neurofuse_config["kwargs"]["hidden"] == [8]


def test_non_json_kwarg_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="JSON"):
        build("mlp", in_features=4, hidden=[object()])


def test_unknown_name_lists_every_valid_name() -> None:
    with pytest.raises(ValueError) as excinfo:
        build("resnet19")
    message = str(excinfo.value)
    assert "resnet19" in message
    for name in available_architectures():
        assert name in message


@pytest.mark.parametrize(
    ("name", "kwargs", "bad", "allowed"),
    [
        ("mlp", dict(in_features=4, widths=[3]), "widths", "hidden"),
        ("resnet18", dict(depth=3), "depth", "width"),
        ("vit_tiny", dict(depht=3), "depht", "depth"),
    ],
)
def test_unexpected_kwarg_is_a_type_error_naming_the_allowed_ones(
    name: str, kwargs: dict, bad: str, allowed: str
) -> None:
    with pytest.raises(TypeError) as excinfo:
        build(name, **kwargs)
    assert bad in str(excinfo.value)
    assert allowed in str(excinfo.value)
    assert "num_classes" in str(excinfo.value)


def test_mlp_without_input_size_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="in_features"):
        build("mlp")


@pytest.mark.parametrize(
    ("name", "kwargs", "hint"),
    [
        ("mlp", dict(in_features=4, activation="swish"), "gelu"),
        ("mlp", dict(in_features=4, input_shape=[2, 3]), "input_shape"),
        ("mlp", dict(in_features=4, num_classes=0), "num_classes"),
        ("mlp", dict(in_features=4, bias="yes"), "bias"),
        ("vgg", dict(config="vgg19"), "vgg16"),
        ("vgg", dict(config=[8, "P"]), "'M'"),
        ("vgg", dict(config="vgg11", input_size=16), "input_size"),
        ("vit", dict(dim=30, heads=4), "heads"),
        ("vit", dict(image_size=30, patch_size=8), "patch_size"),
        ("vit", dict(dropout=1.5), "dropout"),
        ("cnn1d", dict(length=4, channels=[4, 4, 4]), "pool=False"),
    ],
)
def test_bad_values_are_value_errors_that_say_what_to_do(
    name: str, kwargs: dict, hint: str
) -> None:
    with pytest.raises(ValueError, match=hint):
        build(name, **kwargs)


def test_build_from_config_rejects_malformed_configs() -> None:
    with pytest.raises(ValueError, match="name"):
        build_from_config({"kwargs": {}})
    with pytest.raises(ValueError, match="unexpected keys"):
        build_from_config({"name": "mlp", "kwargs": {"in_features": 3}, "weights": None})
    assert isinstance(build_from_config({"name": "vit_tiny"}), models.VisionTransformer)


def test_model_config_of_a_foreign_model_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError, match="build"):
        model_config(nn.Linear(2, 2))


def test_register_custom_architecture(scratch_registry: None) -> None:
    @register_architecture("toy_linear", "one Linear layer")
    def toy_linear(in_features: int = 3, num_classes: int = 2) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    assert available_architectures()["toy_linear"] == "one Linear layer"
    model = build("toy_linear", num_classes=4)
    assert model.out_features == 4
    twin = build_from_config(model_config(model))
    assert twin.out_features == 4 and twin.in_features == 3
    with pytest.raises(TypeError, match="in_features, num_classes"):
        build("toy_linear", out_features=3)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("toy_linear", "again")(toy_linear)
    register_architecture("toy_linear", "replaced", replace=True)(lambda: nn.Identity())
    assert isinstance(build("toy_linear"), nn.Identity)
    register_architecture("not_a_model", "returns a number")(lambda: 3)
    with pytest.raises(TypeError, match="nn.Module"):
        build("not_a_model")


def test_architecture_factory_is_the_registered_one(scratch_registry: None) -> None:
    def toy(in_features: int = 3) -> nn.Module:
        return nn.Linear(in_features, 2)

    register_architecture("toy_factory", "one Linear layer")(toy)
    assert architecture_factory("toy_factory") is toy
    with pytest.raises(ValueError, match="toy_factory"):  # unknown name lists the valid ones
        architecture_factory("toy_factroy")


def test_vit_cifar_preset_has_the_paper_hyperparameters() -> None:
    model = build("vit_cifar")
    assert model_config(model) == {"name": "vit_cifar", "kwargs": {}}
    assert model.embed.proj.kernel_size == (8, 8) and model.embed.proj.stride == (8, 8)
    assert model.embed.proj.out_channels == 384
    assert model.embed.pos_embedding.shape == (1, 1 + (32 // 8) ** 2, 384)
    assert len(model.blocks) == 7
    for block in model.blocks:
        assert isinstance(block, EncoderBlock)
        assert block.attn.heads == 12 and block.attn.head_dim * 12 == 384
        assert (block.attn.qkv.in_features, block.attn.qkv.out_features) == (384, 3 * 384)
        assert (block.mlp.fc1.in_features, block.mlp.fc1.out_features) == (384, 384)
        assert block.mlp.fc2.out_features == 384
    assert model.head.out_features == 100
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert build("vit_cifar", num_classes=10).head.out_features == 10


def test_attention_heads_follow_the_documented_qkv_layout() -> None:
    dim, heads, tokens = 12, 3, 5
    attn = MultiHeadSelfAttention(dim, heads)
    x = torch.randn(2, tokens, dim)
    q, k, v = attn.qkv(x).split(dim, dim=-1)
    size = dim // heads
    outputs = []
    for h in range(heads):
        part = slice(h * size, (h + 1) * size)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(size)
        outputs.append(scores.softmax(-1) @ v[..., part])
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(outputs, -1)))


def test_encoder_block_is_pre_norm_residual() -> None:
    block = EncoderBlock(dim=8, heads=2, mlp_dim=16).eval()
    x = torch.randn(3, 4, 8)
    mid = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), mid + block.mlp(block.norm2(mid)))
    assert [name for name, _ in block.mlp.named_children()] == ["fc1", "act", "fc2"]


@pytest.mark.parametrize(
    ("name", "stages"), [("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])]
)
def test_resnet_stages_blocks_and_widths(name: str, stages: list[int]) -> None:
    model = build(name, width=8)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    for stage, count in enumerate(stages, start=1):
        layer = getattr(model, f"layer{stage}")
        assert len(layer) == count
        for index, block in enumerate(layer):
            children = [child for child, _ in block.named_children()]
            has_downsample = stage > 1 and index == 0
            expected = ["conv1", "bn1", "conv2", "bn2"] + (["downsample"] if has_downsample else [])
            assert children == expected, f"{name}.layer{stage}.{index}"
            assert block.conv2.out_channels == 8 * 2 ** (stage - 1)
        if stage > 1:
            conv, bn = layer[0].downsample
            assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
            assert isinstance(bn, nn.BatchNorm2d)
    # Slicing the Sequential runs the stem and the four stages: 32x32 -> 4x4, 8w channels.
    assert model[:7](torch.randn(2, 3, 32, 32)).shape == (2, 64, 4, 4)
    graph = fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == sum(stages), "one plain residual add per block"


def test_basic_block_computes_relu_of_residual_sum() -> None:
    model = build("resnet18", width=4).eval()
    block = model.layer2[0]
    x = torch.randn(2, 4, 8, 8)
    branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), torch.relu(branch + block.downsample(x)))


@pytest.mark.parametrize(
    ("config", "conv_widths"),
    [
        ("vgg11", [64, 128, 256, 256, 512, 512, 512, 512]),
        ("vgg13", [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]),
        ("vgg16", [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]),
    ],
)
def test_vgg_named_configs_have_the_standard_convolutions(config: str, conv_widths: list) -> None:
    model = build("vgg", config=config)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == conv_widths
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert len(model.classifier) == 0 and model.head.in_features == 512


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_batch_norm_drops_conv_bias(batch_norm: bool) -> None:
    model = build(
        "vgg", config=[4, "M", 6], in_channels=1, input_size=[8, 6], batch_norm=batch_norm
    )
    kinds = [type(m) for m in model.features]
    conv = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] if batch_norm else [nn.Conv2d, nn.ReLU]
    assert kinds == conv + [nn.MaxPool2d] + conv
    assert all((c.bias is None) == batch_norm for c in model.features if isinstance(c, nn.Conv2d))
    assert model.head.in_features == 6 * 4 * 3
    assert model(torch.randn(2, 1, 8, 6)).shape == (2, 10)


def test_mlp_options_shape_the_layers() -> None:
    model = build("mlp", in_features=5, hidden=[7], activation="tanh", bias=False, num_classes=3)
    assert [n for n, _ in model.named_children()] == ["flatten", "fc1", "act1", "head"]
    assert isinstance(model.act1, nn.Tanh)
    assert model.fc1.bias is None and model.head.bias is None
    assert (model.fc1.in_features, model.head.out_features) == (5, 3)
    linear = build("mlp", in_features=5, hidden=[])
    assert [n for n, _ in linear.named_children()] == ["flatten", "head"]


@pytest.mark.parametrize(("pool", "flat"), [(True, 32 * 5), (False, 32 * 40)])
def test_cnn1d_defaults_fit_mnist1d(pool: bool, flat: int) -> None:
    model = build("cnn1d", pool=pool)
    convs = [m for m in model.features if isinstance(m, nn.Conv1d)]
    assert [c.out_channels for c in convs] == [32, 32, 32]
    assert all(c.kernel_size == (3,) and c.padding == (1,) and c.bias is not None for c in convs)
    assert model.head.in_features == flat
    assert model(torch.randn(3, 1, 40)).shape == (3, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_models_run_on_cuda(name: str) -> None:
    model, x, classes = _small(name)
    model = model.cuda()
    out = model(x.cuda())
    assert out.shape[0] == x.shape[0] and out.shape[-1] == classes
