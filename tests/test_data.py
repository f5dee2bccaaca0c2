"""Offline datasets (registry, loaders, normalisation, safe CIFAR reading) and augmentation."""

from __future__ import annotations

import os
import pickle
import random
import struct
import types

import numpy as np
import pytest
import torch

import neurofuse.data as nd
from neurofuse.data import Augment, cutmix, random_crop, random_flip
from neurofuse.data.safe_pickle import UnsafePickleError, safe_load_pickle

# ---------------------------------------------------------------- registry


def test_registry_lists_builtin_datasets():
    names = nd.available_datasets()
    assert {"mnist5k", "mnist1d", "synthetic", "cifar10", "cifar100", "npz"} <= set(names)
    assert all(isinstance(text, str) and text for text in names.values())


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'imagenet'.*mnist1d.*mnist5k.*synthetic"
    ):
        nd.load("imagenet")


def test_unknown_loader_option_is_refused_with_the_accepted_ones():
    with pytest.raises(TypeError, match=r"num_sample\b.*accepts: num_samples, train_split"):
        nd.load("mnist1d", num_sample=100)
    with pytest.raises(TypeError, match="no options"):
        nd.load("mnist5k", num_samples=100)


def test_custom_loader_registers_and_loads():
    name = "test-constant-task"

    @nd.register_dataset(name, "two constant classes")
    def _loader(*, root, seed, scale: float = 1.0):
        x = np.concatenate([np.zeros((4, 3)), np.ones((4, 3)) * scale])
        y = np.array([0] * 4 + [1] * 4)
        return nd.make_splits(name, x, y, x, y)

    try:
        data = nd.load(name, scale=3.0)
        assert data.name == name and data.num_classes == 2
        assert torch.allclose(data.mean, torch.full((3,), 1.5))
        with pytest.raises(ValueError, match="already registered"):
            nd.register_dataset(name, "again")(_loader)
    finally:
        from neurofuse.data import datasets

        datasets._REGISTRY.pop(name, None)


# ---------------------------------------------------------------- normalisation


def _assert_normalised(data: nd.DataSplits) -> None:
    dims = [0, *range(2, data.x_train.ndim)]
    assert torch.allclose(data.x_train.mean(dim=dims), torch.zeros(data.mean.shape), atol=1e-4)
    assert torch.allclose(
        data.x_train.std(dim=dims, unbiased=False), torch.ones(data.std.shape), atol=1e-3
    )


def test_make_splits_normalises_with_train_statistics_only():
    gen = torch.Generator().manual_seed(0)
    x_train = torch.randn(50, 3, 4, 4, generator=gen) * torch.tensor([1.0, 2.0, 5.0]).view(
        1, 3, 1, 1
    ) + torch.tensor([0.0, -1.0, 10.0]).view(1, 3, 1, 1)
    x_test = torch.randn(20, 3, 4, 4, generator=gen) + 100.0  # very different test statistics
    y = torch.arange(50) % 3
    before = x_train.clone()
    data = nd.make_splits("t", x_train, y, x_test, torch.arange(20) % 3)
    assert torch.equal(x_train, before)  # the caller's data is untouched
    _assert_normalised(data)
    assert torch.allclose(data.mean, x_train.mean(dim=(0, 2, 3)), atol=1e-5)
    shape = (1, 3, 1, 1)
    assert torch.allclose(data.x_test * data.std.view(shape) + data.mean.view(shape), x_test)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64


def test_make_splits_refuses_bad_labels():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match=">= 0"):
        nd.make_splits("t", x, [0, 1, -1, 0], x, [0, 1, 0, 0])
    with pytest.raises(ValueError, match="whole-number"):
        nd.make_splits("t", x, [0, 1, 0.5, 0], x, [0, 1, 0, 0])
    with pytest.raises(ValueError, match="differ in length"):
        nd.make_splits("t", x, [0, 1, 0], x, [0, 1, 0, 0])
    with pytest.raises(ValueError, match="num_classes"):
        nd.make_splits("t", x, [0, 1, 2, 0], x, [0, 1, 0, 0], num_classes=2)


# ---------------------------------------------------------------- mnist5k


def test_mnist5k_fixed_stratified_split():
    data = nd.load("mnist5k")
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert torch.equal(torch.bincount(data.y_train, minlength=10), torch.full((10,), 400))
    assert torch.equal(torch.bincount(data.y_test, minlength=10), torch.full((10,), 100))
    _assert_normalised(data)
    raw = data.x_train * data.std + data.mean  # back to pixels in [0, 1]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and raw.max() > 0.99
    assert 0.05 < float(data.mean) < 0.3  # MNIST's mean intensity is about 0.13
    assert len(set(data.y_train[:100].tolist())) > 5  # training order is shuffled
    # the test set never changes with the experiment seed
    other = nd.load("mnist5k", seed=123)
    assert torch.equal(other.x_test, data.x_test) and torch.equal(other.y_test, data.y_test)


def test_mnist5k_cache_is_not_shared_with_callers():
    first = nd.load("mnist5k")
    first.x_train.fill_(7.0)
    first.y_train.fill_(3)
    second = nd.load("mnist5k")
    assert not torch.equal(second.x_train, first.x_train)
    assert len(second.y_train.unique()) == 10


# ---------------------------------------------------------------- mnist1d


def test_mnist1d_generates_in_memory_without_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.random.seed(99)
    random.seed(99)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    data = nd.load("mnist1d", seed=1, num_samples=500)
    assert os.listdir(tmp_path) == []  # nothing downloaded or cached in the working directory
    assert np.array_equal(np.random.get_state()[1], np_state)  # global RNGs left alone
    assert random.getstate() == py_state
    assert data.x_train.shape == (400, 1, 40) and data.x_test.shape == (100, 1, 40)
    assert data.input_shape == (1, 40)
    assert data.y_train.min() >= 0 and data.y_train.max() <= 9
    assert len(data.y_train.unique()) == 10
    _assert_normalised(data)


def test_mnist1d_deterministic_by_seed():
    a = nd.load("mnist1d", seed=4, num_samples=200)
    b = nd.load("mnist1d", seed=4, num_samples=200)
    c = nd.load("mnist1d", seed=5, num_samples=200)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_mnist1d_validates_options():
    with pytest.raises(ValueError, match="train_split"):
        nd.load("mnist1d", train_split=1.5)


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_balance_and_determinism():
    a = nd.load("synthetic", seed=3, num_samples=600, num_test=200, num_features=12, num_classes=6)
    assert a.x_train.shape == (600, 12) and a.x_test.shape == (200, 12)
    assert a.input_shape == (12,) and a.num_classes == 6
    assert torch.equal(torch.bincount(a.y_train), torch.full((6,), 100))
    _assert_normalised(a)
    b = nd.load("synthetic", seed=3, num_samples=600, num_test=200, num_features=12, num_classes=6)
    c = nd.load("synthetic", seed=4, num_samples=600, num_test=200, num_features=12, num_classes=6)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def _fit(data: nd.DataSplits, hidden: int, steps: int = 150) -> float:
    """Full-batch Adam; returns test accuracy."""
    gen = torch.Generator().manual_seed(0)
    features = data.input_shape[0]
    layers = (
        [features, hidden, hidden, data.num_classes] if hidden else [features, data.num_classes]
    )
    weights = [
        torch.randn(i, o, generator=gen) / i**0.5 for i, o in zip(layers, layers[1:], strict=False)
    ]
    params = [w.requires_grad_() for w in weights] + [
        torch.zeros(o, requires_grad=True) for o in layers[1:]
    ]

    def net(x):
        for k, (w, b) in enumerate(
            zip(params[: len(weights)], params[len(weights) :], strict=True)
        ):
            x = x @ w + b
            x = torch.relu(x) if k < len(weights) - 1 else x
        return x

    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data.x_train), data.y_train).backward()
        opt.step()
    with torch.no_grad():
        return (net(data.x_test).argmax(1) == data.y_test).float().mean().item()


def test_synthetic_is_learnable_by_an_mlp_but_not_linear():
    data = nd.load("synthetic", seed=0, num_samples=600, num_test=500)
    mlp, linear = _fit(data, hidden=48), _fit(data, hidden=0)
    assert mlp > 0.9, mlp
    assert linear < mlp - 0.2, (linear, mlp)


def test_synthetic_validates_options():
    with pytest.raises(ValueError, match="num_classes"):
        nd.load("synthetic", num_classes=1)


# ---------------------------------------------------------------- CIFAR (fake folders)


def _images(n: int, gen: np.random.Generator) -> np.ndarray:
    """(n, 3072) uint8 rows whose three channels have different brightness."""
    img = gen.integers(0, 64, size=(n, 3, 32, 32)) + np.array([0, 80, 160]).reshape(1, 3, 1, 1)
    return img.astype(np.uint8).reshape(n, -1)


class _Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 did for the real CIFAR files: every str/bytes as a py2 'str'
    (BINSTRING) and NumPy's globals under their 1.x names (numpy.core.multiarray)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def _save_numpy1_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str
    dispatch[type] = _save_numpy1_global
    dispatch[types.BuiltinFunctionType] = _save_numpy1_global


def _write(path, obj, py2: bool = False) -> None:
    with open(path, "wb") as handle:
        if py2:
            _Py2Pickler(handle, protocol=2).dump(obj)
        else:
            pickle.dump(obj, handle, protocol=2)


def make_fake_cifar10(parent, per_class: int = 2):
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    labels = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = [c for c in range(10) for _ in range(per_class)]
        x = _images(len(y), gen)
        labels[name] = (x, y)
        record = {b"batch_label": name.encode(), b"data": x, b"labels": y}
        _write(folder / name, record, py2=True)
    names = [f"class{c}".encode() for c in range(10)]
    _write(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072}, py2=True)
    return folder, labels


def test_cifar10_fake_folder_loads_from_parent_and_folder(tmp_path):
    folder, written = make_fake_cifar10(tmp_path)
    for root in (tmp_path, folder):
        data = nd.load("cifar10", root=root)
        assert data.x_train.shape == (100, 3, 32, 32) and data.x_test.shape == (20, 3, 32, 32)
        assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
        assert data.meta["classes"][3] == "class3"
        _assert_normalised(data)
    raw = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    raw = torch.from_numpy(raw.reshape(-1, 3, 32, 32)).float() / 255
    shape = (1, 3, 1, 1)
    assert torch.allclose(
        data.x_train * data.std.view(shape) + data.mean.view(shape), raw, atol=1e-5
    )
    assert torch.allclose(data.mean, raw.mean(dim=(0, 2, 3)), atol=1e-5)
    assert data.mean[2] > data.mean[1] > data.mean[0]  # per channel, not one global value
    assert data.y_test.tolist() == written["test_batch"][1]


def test_cifar100_fake_folder_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    gen = np.random.default_rng(1)
    for name, per_class in (("train", 2), ("test", 1)):
        fine = [c for c in range(100) for _ in range(per_class)]
        _write(
            folder / name,
            {b"data": _images(len(fine), gen), b"fine_labels": fine,
             b"coarse_labels": [c // 5 for c in fine]},
        )  # fmt: skip
    data = nd.load("cifar100", root=tmp_path)
    assert data.x_train.shape == (200, 3, 32, 32) and data.num_classes == 100
    assert torch.equal(torch.bincount(data.y_train), torch.full((100,), 2))
    coarse = nd.load("cifar100", root=folder, labels="coarse")
    assert coarse.num_classes == 20 and torch.equal(coarse.y_train, data.y_train // 5)


def test_missing_cifar_folder_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        nd.load("cifar10", root=tmp_path / "nowhere")
    text = str(err.value)
    for name in ["data_batch_1", "data_batch_5", "test_batch", "cifar-10-batches-py"]:
        assert name in text
    folder, _ = make_fake_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing: data_batch_3"):
        nd.load("cifar10", root=tmp_path)


def test_cifar_without_root_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("NEUROFUSE_DATA", raising=False)
    with pytest.raises(ValueError, match="root=.*NEUROFUSE_DATA"):
        nd.load("cifar100")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    folder, _ = make_fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _write(folder / "data_batch_2", {b"data": _Exploit(marker), b"labels": [0]})
    with pytest.raises(UnsafePickleError, match=r"system"):
        nd.load("cifar10", root=tmp_path)
    assert not marker.exists()  # the command never ran


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_reads_arrays_and_refuses_other_globals(tmp_path, protocol):
    path = tmp_path / "ok.pkl"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    with open(path, "wb") as handle:
        pickle.dump({b"data": array, "names": ["a", b"b"], "n": 3}, handle, protocol=protocol)
    back = safe_load_pickle(path)
    assert np.array_equal(back[b"data"], array) and back["n"] == 3
    for evil in (eval, getattr, object, np.load):
        bad = tmp_path / "bad.pkl"
        with open(bad, "wb") as handle:
            pickle.dump({"f": evil}, handle, protocol=protocol)
        with pytest.raises(UnsafePickleError, match="refusing to load global"):
            safe_load_pickle(bad)


def test_unreadable_pickles_are_unpickling_errors_that_name_the_file(tmp_path):
    good = tmp_path / "good.pkl"
    with open(good, "wb") as handle:
        pickle.dump({b"data": np.arange(50, dtype=np.uint8)}, handle, protocol=2)
    raw = good.read_bytes()
    cases = {"truncated": raw[: len(raw) // 2], "empty": b"", "junk": b"\x80\x02junk" * 9}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(pickle.UnpicklingError, match=f"{name}: not a readable pickle"):
            safe_load_pickle(path)
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as handle:
        pickle.dump({"f": eval}, handle, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"bad\.pkl: refusing to load global"):
        safe_load_pickle(bad)


def test_restricted_unpickler_refuses_object_arrays(tmp_path):
    path = tmp_path / "obj.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"data": np.array([1, "a"], dtype=object)}, handle)
    with pytest.raises(UnsafePickleError, match="object arrays"):
        safe_load_pickle(path)


# ---------------------------------------------------------------- npz


def test_npz_round_trip_with_stratified_split(tmp_path):
    gen = np.random.default_rng(0)
    x = gen.normal(size=(200, 2, 5)).astype(np.float32)
    y = np.repeat(np.arange(4), 50)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    data = nd.load("npz", root=path, seed=1, test_fraction=0.25)
    assert data.x_train.shape == (150, 2, 5) and data.x_test.shape == (50, 2, 5)
    test_counts = torch.bincount(data.y_test)
    assert test_counts.sum() == 50 and test_counts.min() >= 12 and test_counts.max() <= 13
    _assert_normalised(data)
    shape = (1, 2, 1)
    back = torch.cat([data.x_train, data.x_test]) * data.std.view(shape) + data.mean.view(shape)
    rows = {tuple(np.round(r, 4).ravel()) for r in x}
    assert all(tuple(np.round(r, 4).ravel()) in rows for r in back.numpy())
    again = nd.load("npz", path=path, seed=1, test_fraction=0.25)
    assert torch.equal(again.x_test, data.x_test)


def test_npz_given_test_split_and_channels_last(tmp_path):
    gen = np.random.default_rng(0)
    x, x_test = gen.random((30, 6, 6, 3)), gen.random((10, 6, 6, 3))
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(30) % 3, x_test=x_test, y_test=np.arange(10) % 3)
    data = nd.load("npz", root=path, channels_last=True)
    assert data.x_train.shape == (30, 3, 6, 6) and data.x_test.shape == (10, 3, 6, 6)
    assert data.mean.shape == (3,) and data.meta["split"] == "given"


def test_npz_missing_keys_are_named(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((4, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"lacks array\(s\) x\b.*found: \['inputs', 'y'\]"):
        nd.load("npz", root=path)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        nd.load("npz", root=tmp_path / "missing.npz")


def test_npz_refuses_pickled_object_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([[1], "a"], dtype=object), y=np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="allow_pickle"):
        nd.load("npz", root=path)


# ---------------------------------------------------------------- DataSplits helpers


def test_subset_and_to():
    data = nd.load("synthetic", num_samples=100, num_test=20)
    x, y = data.subset(torch.tensor([3, 1]))
    assert torch.equal(x, data.x_train[[3, 1]]) and torch.equal(y, data.y_train[[3, 1]])
    x, y = data.subset([0], split="test")
    assert torch.equal(x, data.x_test[:1])
    with pytest.raises(ValueError, match="train"):
        data.subset([0], split="val")
    moved = data.to("cpu")
    assert moved is not data and torch.equal(moved.x_train, data.x_train)


# ---------------------------------------------------------------- augmentation


def _windows(x: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """All crops of x's own size from the zero-padded x (one sample, C x spatial)."""
    padded = torch.nn.functional.pad(x, (padding,) * (2 * (x.ndim - 1)))
    if x.ndim == 2:
        return [padded[:, i : i + x.shape[1]] for i in range(2 * padding + 1)]
    return [
        padded[:, i : i + x.shape[1], j : j + x.shape[2]]
        for i in range(2 * padding + 1)
        for j in range(2 * padding + 1)
    ]


@pytest.mark.parametrize("shape", [(16, 2, 8, 8), (16, 3, 12)])
def test_random_crop_is_a_padded_window_per_sample(shape):
    x = torch.rand(shape) + 1.0  # strictly positive, so padding zeros are recognisable
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    offsets = set()
    for b in range(shape[0]):
        hits = [k for k, w in enumerate(_windows(x[b], 2)) if torch.equal(w, out[b])]
        assert hits, f"sample {b} is not a padded crop"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets differ between samples
    again = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(random_crop(x, 0), x)


def test_random_flip_flips_some_samples_and_only_images():
    x = torch.rand(64, 1, 4, 5)
    out = random_flip(x, torch.Generator().manual_seed(1))
    same = [torch.equal(out[b], x[b]) for b in range(64)]
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(64)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert 10 < sum(flipped) < 54
    assert torch.equal(out, random_flip(x, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="2-D images"):
        random_flip(torch.rand(4, 1, 10))


@pytest.mark.parametrize("shape", [(8, 2, 16, 16), (8, 1, 30)])
@pytest.mark.parametrize("seed", range(4))
def test_cutmix_label_mass_matches_pasted_area(shape, seed):
    batch = shape[0]
    x = torch.arange(batch, dtype=torch.float32).view(-1, *[1] * (len(shape) - 1)).expand(shape)
    y = torch.arange(batch)
    mixed, soft = cutmix(
        x, y, alpha=1.0, num_classes=batch, generator=torch.Generator().manual_seed(seed)
    )
    assert mixed.shape == x.shape and soft.shape == (batch, batch)
    assert torch.allclose(soft.sum(1), torch.ones(batch))
    for i in range(batch):
        values, counts = mixed[i].unique(return_counts=True)
        fractions = dict(
            zip(values.long().tolist(), (counts / mixed[i].numel()).tolist(), strict=True)
        )
        expected = torch.zeros(batch)
        for label, frac in fractions.items():
            expected[label] += frac
        assert torch.allclose(soft[i], expected, atol=1e-6)


def test_cutmix_accepts_soft_labels_and_is_seeded():
    x = torch.rand(6, 3, 8, 8)
    soft = torch.softmax(torch.randn(6, 4), dim=1)
    a = cutmix(x, soft, 0.5, 4, torch.Generator().manual_seed(2))
    b = cutmix(x, soft, 0.5, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[1].sum(1), torch.ones(6))
    with pytest.raises(ValueError, match="alpha"):
        cutmix(x, soft, 0.0, 4)


def test_augment_composition():
    x = torch.rand(4, 3, 8, 8)
    assert Augment()(x) is x and Augment().is_identity
    aug = Augment(crop=2, flip=True)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    signals = torch.rand(4, 1, 20) + 1
    assert Augment(flip=True)(signals) is signals  # signals are never flipped
    assert Augment.from_spec("crop=4,flip") == Augment(crop=4, flip=True)
    assert Augment.from_spec("none").is_identity
    with pytest.raises(ValueError, match="valid: crop"):
        Augment.from_spec("rotate=10")


def test_a_fusion_set_from_an_npz_a_pt_or_a_dataset_folder(tmp_path):
    folder, _ = make_fake_cifar10(tmp_path / "cifar")
    x, y = nd.load_fusion_file(tmp_path / "cifar")
    splits = nd.load("cifar10", root=folder)
    assert torch.equal(x, splits.x_train) and torch.equal(y, splits.y_train)
    np.savez(tmp_path / "f.npz", x=np.ones((4, 3), dtype=np.uint8))
    x, y = nd.load_fusion_file(tmp_path / "f.npz")
    assert x.dtype == torch.float32 and x.shape == (4, 3) and y is None
    torch.save((torch.zeros(5, 2), torch.arange(5)), tmp_path / "f.pt")
    x, y = nd.load_fusion_file(tmp_path / "f.pt")
    assert x.shape == (5, 2) and torch.equal(y, torch.arange(5))
    torch.save({"x": torch.zeros(3, 2), "y": torch.zeros(4, dtype=torch.long)}, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="one per row of x"):
        nd.load_fusion_file(tmp_path / "g.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not in a layout neurofuse reads"):
        nd.load_fusion_file(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        nd.load_fusion_file(tmp_path / "nope.npz")


def test_augmented_copies_keep_the_set_and_add_shifted_versions():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 8, 8, generator=g) + 0.5  # no zero pixels: a shift shows
    y = torch.arange(6)
    xa, ya = nd.augmented_copies(x, y, copies=3, augment="crop=2", seed=7)
    assert xa.shape == (24, 1, 8, 8) and torch.equal(xa[:6], x)
    assert ya is not None and torch.equal(ya, y.repeat(4))
    # each copy is a shift of its own sample: zero-padded borders appear where it moved
    for k in range(1, 4):
        block = xa[6 * k : 6 * (k + 1)]
        moved = [not torch.equal(block[i], x[i]) for i in range(6)]
        assert any(moved)
        for i in range(6):
            nz = block[i] != 0
            assert torch.isin(block[i][nz], x[i]).all()  # only the sample's own pixels
    again, _ = nd.augmented_copies(x, y, copies=3, augment=Augment(crop=2), seed=7)
    other, _ = nd.augmented_copies(x, y, copies=3, augment="crop=2", seed=8)
    assert torch.equal(again, xa) and not torch.equal(other, xa)
    assert nd.augmented_copies(x, None, copies=1)[1] is None
    assert torch.equal(nd.augmented_copies(x, y, copies=0)[0], x)


def test_augmented_copies_refuse_bad_arguments():
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="copies must be an integer"):
        nd.augmented_copies(x, y, copies=-1)
    with pytest.raises(ValueError, match="changes the inputs"):
        nd.augmented_copies(x, y, copies=2, augment="none")
    with pytest.raises(ValueError, match="one label per sample"):
        nd.augmented_copies(x, y[:3], copies=2)
