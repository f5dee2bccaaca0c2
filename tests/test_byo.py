"""Bring-your-own models and data: plain state dicts and safetensors of a user's class, folders,
fusion sets from files, recipes that replay bit-identically, and model folders with a card."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_cli import DATA, assert_user_error, invoke, ok

import neurofuse as nf
from neurofuse.checkpoint import CheckpointError
from neurofuse.pretrained import is_pretrained_folder
from neurofuse.recipe import load_recipe, parse_recipe, recipe_schema
from neurofuse.sources import ModelSpec, expand, load_model, read_state_dict

NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, hidden: int = 16, classes: int = 10):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(20, hidden), nn.ReLU())
            self.head = nn.Linear(hidden, classes)

        def forward(self, x):
            return self.head(self.body(x))
    """
)


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the user's module ``usernet`` (class ``Net``) and two plain state dicts
    of it, the current directory for the test (as a user would run the command)."""
    module = f"usernet_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    Net = __import__(module).Net
    for k in range(2):
        torch.manual_seed(k)
        torch.save(Net(hidden=24).state_dict(), tmp_path / f"net_{k}.pt")
    (tmp_path / "module_name").write_text(module)
    yield tmp_path
    sys.modules.pop(module, None)


def _module(user_dir: Path) -> str:
    return (user_dir / "module_name").read_text()


def _model_args(user_dir: Path) -> list[str]:
    return ["--model", f"{_module(user_dir)}:Net", "--model-kw", "hidden=24"]


def _user_args(user_dir: Path) -> list[str]:
    return [*_model_args(user_dir), *SMALL]


SMALL = ["--fusion-samples", "100"]


def test_plain_state_dicts_of_a_users_class_fuse_and_replay_bit_identically(user_dir: Path):
    out = user_dir / "out" / "fused.safetensors"
    ok("fuse", "net_0.pt", "net_1.pt", *_user_args(user_dir), *DATA, "--out", out)
    recipe_path = user_dir / "out" / "fused.recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["models"][0]["path"] == "../net_0.pt" and len(recipe["models"][0]["sha256"]) == 64
    assert recipe["model"] == f"{_module(user_dir)}:Net" and recipe["model_kwargs"] == {
        "hidden": 24
    }
    assert recipe["fusion_samples"] == 100 and recipe["method"] == "kf_linear"
    again = user_dir / "again.safetensors"
    ok("fuse", "--config", recipe_path, "--out", again)
    first, second = load_file(str(out)), load_file(str(again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # the fused model loads back into the user's class
    result = ok("eval", out, *_model_args(user_dir), *DATA, "--json")
    metrics = json.loads(result.stdout)["models"]
    assert 0.0 <= metrics[str(out)]["accuracy"] <= 1.0


def test_a_recipe_refuses_a_base_model_that_changed(user_dir: Path):
    out = user_dir / "fused.safetensors"
    ok("fuse", "net_0.pt", "net_1.pt", *_user_args(user_dir), *DATA, "--out", out)
    state = torch.load(user_dir / "net_1.pt", weights_only=True)
    state["head.bias"] += 1
    torch.save(state, user_dir / "net_1.pt")
    result = invoke("fuse", "--config", user_dir / "fused.recipe.yaml")
    assert_user_error(result, "net_1.pt changed since the recipe was written")


def test_plain_safetensors_folders_and_a_fusion_file(user_dir: Path):
    folder = user_dir / "weights"
    folder.mkdir()
    for k in (0, 1):
        save_file(
            torch.load(user_dir / f"net_{k}.pt", weights_only=True), folder / f"m{k}.safetensors"
        )
    (folder / "notes.txt").write_text("ignored")
    rng = np.random.default_rng(0)
    np.savez(user_dir / "fusion.npz", x=rng.normal(size=(120, 20)).astype(np.float32))
    args = _user_args(user_dir)[:-2]  # every row of the file
    result = ok("fuse", folder, *args, "--data", "fusion.npz", "-m", "git_rebasin", "--json")
    payload = json.loads(result.stdout)
    assert payload["models"] == [str(folder / "m0.safetensors"), str(folder / "m1.safetensors")]
    assert payload["fusion_set"]["size"] == 120 and payload["fusion_set"]["labelled"] is False
    assert payload["metrics"] == {}  # no dataset named: nothing to test on


def test_a_model_folder_round_trips_with_its_card(user_dir: Path):
    folder = user_dir / "fused_model"
    ok("fuse", "net_0.pt", "net_1.pt", *_user_args(user_dir), *DATA, "--save-pretrained", folder)
    assert is_pretrained_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_class"]["target"] == f"{_module(user_dir)}:Net"
    card = (folder / "README.md").read_text()
    for needle in ("kf_linear", "net_0.pt", "## Fusion set", "## Measured metrics", "## Recipe"):
        assert needle in card
    with pytest.raises(CheckpointError, match="import_model=True"):
        nf.load_pretrained(folder)
    model = nf.load_pretrained(folder, import_model=True)
    weights = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    exported = torch.export.export(model, (torch.randn(3, 20),))
    x = torch.randn(3, 20)
    torch.testing.assert_close(exported.module()(x), model(x))
    # the folder is a model the CLI reads like any other, and its recipe replays
    ok("eval", folder, *_model_args(user_dir), *DATA)
    ok("fuse", "--config", folder / "recipe.yaml", "--out", user_dir / "replay")
    replay = load_file(str(user_dir / "replay.safetensors"))
    assert all(torch.equal(replay[k], weights[k]) for k in weights)


def test_a_zoo_model_folder_loads_without_arguments(tmp_path: Path):
    from neurofuse.models import build

    model = build("mlp", in_features=20, num_classes=10, hidden=(8,))
    nf.save_pretrained(model, tmp_path / "m")
    back = nf.load_pretrained(tmp_path / "m")
    x = torch.randn(4, 20)
    torch.testing.assert_close(back(x), model.eval()(x))


def test_folder_order_is_natural(tmp_path: Path):
    for name in ("m10.pt", "m2.pt", "m1.pt"):
        torch.save({"w": torch.zeros(1)}, tmp_path / name)
    assert [p.name for p in expand([tmp_path])] == ["m1.pt", "m2.pt", "m10.pt"]


def test_weights_only_refuses_a_pickle_of_objects(tmp_path: Path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": Payload()}, handle)
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_state_dict(path)


def test_nested_and_data_parallel_state_dicts_are_read(tmp_path: Path):
    layer = torch.nn.Linear(3, 2)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in layer.state_dict().items()}, "epoch": 3},
        tmp_path / "a.pt",
    )
    state = read_state_dict(tmp_path / "a.pt")
    assert set(state) == {"weight", "bias"}


def test_mismatched_weights_name_the_file_and_the_keys(user_dir: Path):
    result = invoke(
        "fuse", "net_0.pt", "net_1.pt", "--model", f"{_module(user_dir)}:Net", *DATA, *SMALL
    )  # hidden=16 by default: the files hold hidden=24
    assert_user_error(result, "net_0.pt", "shape mismatches", "body.0.weight", "--model-kw")
    result = invoke("fuse", "net_0.pt", "net_1.pt", *DATA)
    assert_user_error(result, "net_0.pt", "records no architecture", "--model", "--arch")
    result = invoke("fuse", "net_0.pt", "net_1.pt", "--model", "nomodule_xyz:Net", *DATA)
    assert_user_error(result, "cannot import module 'nomodule_xyz'")
    result = invoke("fuse", "net_0.pt", "net_1.pt", "--model", "Net", *DATA)
    assert_user_error(result, "package.module:ClassName")


def test_model_spec_for_a_zoo_architecture(tmp_path: Path):
    from neurofuse.models import build

    model = build("mlp", in_features=20, num_classes=10, hidden=(8,))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    spec = ModelSpec(arch="mlp", kwargs={"in_features": 20, "num_classes": 10, "hidden": [8]})
    loaded = load_model(tmp_path / "m.pt", spec)
    assert loaded.kind == "state_dict" and len(loaded.sha256) == 64
    x = torch.randn(3, 20)
    torch.testing.assert_close(loaded.model(x), model.eval()(x))


def test_ensemble_with_out_is_refused_before_any_work(user_dir: Path):
    result = invoke(
        "fuse", "net_0.pt", "net_1.pt", *_user_args(user_dir), *DATA, "-m", "ensemble", "--out", "e"
    )
    assert_user_error(result, "cannot be saved")
    assert "Fusing" not in result.stdout


def test_recipe_errors_name_the_field(tmp_path: Path):
    with pytest.raises(ValueError, match="field 'seed'"):
        parse_recipe({"models": ["a.pt"], "seed": "x"})
    with pytest.raises(ValueError, match="field 'methd'"):
        parse_recipe({"models": ["a.pt"], "methd": "kf_linear"})
    with pytest.raises(ValueError, match="field 'models'"):
        parse_recipe({"models": []})
    with pytest.raises(ValueError, match="not both"):
        parse_recipe({"models": ["a.pt"], "model": "m:Net", "arch": "mlp"})
    bad = tmp_path / "r.yaml"
    bad.write_text("models: [a.pt]\nfusion_samples: 0\n")
    with pytest.raises(ValueError, match="field 'fusion_samples'"):
        load_recipe(bad)
    assert "models" in recipe_schema()["properties"]


def test_config_refuses_command_line_inputs_that_would_change_it(user_dir: Path):
    out = user_dir / "f.safetensors"
    ok("fuse", "net_0.pt", "net_1.pt", *_user_args(user_dir), *DATA, "--out", out)
    result = invoke("fuse", "--config", user_dir / "f.recipe.yaml", "-m", "hf_linear")
    assert_user_error(result, "--method", "Edit the recipe")
