"""Checkpoints: exact round trips, honest sidecars, clear errors, atomic writes, no pickle."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import neurofuse
from neurofuse.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    load_metadata,
    load_tensors,
    load_weights,
    save_checkpoint,
    save_tensors,
)
from neurofuse.evaluate import Metrics
from neurofuse.utils import atomic_write_text, to_jsonable


def bn_model() -> nn.Module:
    """A template model with BatchNorm buffers that training has moved off their defaults."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 5))
    return model


def built_mlp() -> nn.Module:
    from neurofuse.models import build

    torch.manual_seed(0)
    return build("mlp", in_features=5, num_classes=3, hidden=[8, 4])


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def rewrite_weights(path: Path, edit) -> None:
    """Edit the stored state dict and re-sign it, so only the edit itself is wrong."""
    weights, sidecar = checkpoint_paths(path)
    tensors = edit(load_file(weights))
    save_file(tensors, weights)
    meta = json.loads(sidecar.read_text())
    meta["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))


def test_round_trip_is_bit_exact_including_batchnorm_buffers(tmp_path):
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    written = save_checkpoint(model, tmp_path / "bn")
    assert written == tmp_path / "bn.safetensors"
    loaded, _ = load_checkpoint(
        tmp_path / "bn",
        model=nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)),
    )
    assert_same_state(model, loaded)
    assert int(loaded[1].num_batches_tracked) == 3
    assert not loaded.training
    x = torch.randn(4, 5)
    assert torch.equal(model.eval()(x), loaded(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_round_trip_rebuilds_the_architecture(tmp_path):
    model = built_mlp()
    save_checkpoint(model, tmp_path / "mlp.safetensors", metadata={"seed": 3})
    for spelling in ("mlp", "mlp.safetensors", "mlp.json"):
        loaded, meta = load_checkpoint(tmp_path / spelling)
        assert type(loaded) is type(model)
        assert loaded.neurofuse_config == model.neurofuse_config
        assert_same_state(model, loaded)
        assert meta["seed"] == 3


def test_sidecar_records_config_hash_and_metadata(tmp_path):
    model = built_mlp()
    metadata = {
        "dataset": "mnist1d",
        "partition": {"scheme": "dirichlet", "alpha_min": 1.0},
        "seed": 11,
        "class_counts": torch.tensor([5, 0, 7]),
        "metrics": Metrics(accuracy=0.9, nll=0.3, ece=0.02, n=100),
    }
    weights = save_checkpoint(model, tmp_path / "run" / "client0", metadata=metadata)
    sidecar = json.loads((tmp_path / "run" / "client0.json").read_text())
    assert sidecar["format"] == "neurofuse-checkpoint" and sidecar["format_version"] == 1
    assert sidecar["neurofuse_version"] == neurofuse.__version__
    assert sidecar["model"] == {"name": "mlp", "kwargs": model.neurofuse_config["kwargs"]}
    assert sidecar["weights"] == {
        "file": "client0.safetensors",
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "bytes": weights.stat().st_size,
        "num_tensors": len(model.state_dict()),
    }
    assert sidecar["class_counts"] == [5, 0, 7]
    assert sidecar["metrics"] == {"accuracy": 0.9, "nll": 0.3, "ece": 0.02, "n": 100}
    assert sidecar["partition"] == metadata["partition"] and sidecar["dataset"] == "mnist1d"
    assert load_metadata(weights) == sidecar


def test_corrupt_json_names_the_sidecar(tmp_path):
    save_checkpoint(built_mlp(), tmp_path / "m")
    (tmp_path / "m.json").write_text('{"format": "neurofuse-checkpoint", ')
    with pytest.raises(CheckpointError, match=r"m\.json.*corrupt JSON"):
        load_checkpoint(tmp_path / "m")


def test_truncated_weights_fail_the_hash_check(tmp_path):
    weights = save_checkpoint(built_mlp(), tmp_path / "m")
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*SHA-256 mismatch"):
        load_checkpoint(tmp_path / "m")


def test_a_flipped_byte_fails_the_hash_check(tmp_path):
    weights = save_checkpoint(built_mlp(), tmp_path / "m")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_weights(tmp_path / "m")


def test_garbage_weights_with_a_matching_hash_fail_to_parse(tmp_path):
    weights = save_checkpoint(built_mlp(), tmp_path / "m")
    weights.write_bytes(b"\xff" * 64)
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*not a readable safetensors"):
        load_checkpoint(tmp_path / "m")


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    save_checkpoint(built_mlp(), tmp_path / "m")

    def edit(tensors):
        del tensors["fc1.bias"]
        tensors["extra.weight"] = torch.zeros(2)
        tensors["head.bias"] = torch.zeros(7)
        return tensors

    rewrite_weights(tmp_path / "m", edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "m")
    message = str(info.value)
    assert "m.safetensors" in message
    assert "missing keys (1): fc1.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "head.bias: file (7,) vs model (3,)" in message


def test_unknown_architecture_names_the_file(tmp_path):
    save_checkpoint(built_mlp(), tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["model"]["name"] = "no_such_net"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m\.json.*'no_such_net'"):
        load_checkpoint(tmp_path / "m")


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(built_mlp(), tmp_path / "m")
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match=r"m\.json: sidecar missing"):
        load_checkpoint(tmp_path / "m")
    save_checkpoint(built_mlp(), tmp_path / "w")
    (tmp_path / "w.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"w\.safetensors: weights file missing"):
        load_checkpoint(tmp_path / "w")


def test_model_without_config_needs_a_template(tmp_path):
    save_checkpoint(bn_model(), tmp_path / "plain")
    assert load_metadata(tmp_path / "plain")["model"] is None
    with pytest.raises(CheckpointError, match="pass model="):
        load_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(bn_model(), tmp_path / "x", metadata={"weights": 1})


def test_tied_and_non_contiguous_tensors_save(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight  # tied
    save_checkpoint(model, tmp_path / "tied")
    template = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    template[1].weight = template[0].weight
    loaded, _ = load_checkpoint(tmp_path / "tied", model=template)
    assert loaded[0].weight is loaded[1].weight
    assert torch.equal(loaded[0].weight, model[0].weight)

    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "row": base[1], "counts": torch.tensor([3, 0, 9])}
    save_tensors(tmp_path / "scores", tensors, {"level": "fc1"})
    back, meta = load_tensors(tmp_path / "scores.safetensors")
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    assert meta["level"] == "fc1" and meta["format"] == "neurofuse-tensors"
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "scores")


def test_failed_write_leaves_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    old = built_mlp()
    save_checkpoint(old, tmp_path / "m", metadata={"version": "old"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    new = built_mlp()
    with torch.no_grad():
        new.head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(new, tmp_path / "m", metadata={"version": "new"})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(new, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing else either
    monkeypatch.undo()
    loaded, meta = load_checkpoint(tmp_path / "m")
    assert meta["version"] == "old"
    assert_same_state(old, loaded)


def test_interrupted_save_between_the_two_files_is_detected(tmp_path, monkeypatch):
    save_checkpoint(built_mlp(), tmp_path / "m")
    real_replace = os.replace
    calls = []

    def replace_weights_only(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise OSError("crash before the sidecar")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_weights_only)
    other = built_mlp()
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(other, tmp_path / "m")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(tmp_path / "m")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = built_mlp()
    save_checkpoint(model, tmp_path / "m")
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert_same_state(model, loaded)
    save_tensors(tmp_path / "s", {"a": torch.ones(2)})
    assert torch.equal(load_tensors(tmp_path / "s")[0]["a"], torch.ones(2))


def test_atomic_write_text_replaces_whole_files(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "notes.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        atomic_write_text(target, "third")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["notes.txt"]


def test_to_jsonable_gives_strict_json():
    value = {
        1: torch.tensor([1.5, 2.0]),
        "nan": float("nan"),
        "path": Path("a/b"),
        "dtype": torch.float16,
        "set": {3, 1},
        "fn": torch.sigmoid,
    }
    converted = to_jsonable(value)
    json.dumps(converted, allow_nan=False)
    assert converted["1"] == [1.5, 2.0] and converted["nan"] == "nan"
    assert converted["path"] == os.fspath(Path("a/b")) and converted["set"] == [1, 3]
    assert converted["dtype"] == "torch.float16" and converted["fn"].endswith("sigmoid")
    with pytest.raises(TypeError, match="to_dict"):
        to_jsonable(object())


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_keep_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write_text(tmp_path / "f.txt", "x")
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "m")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert stat.S_IMODE(path.stat().st_mode) == want
    for name in ("m.safetensors", "m.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want
