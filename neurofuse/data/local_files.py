"""Datasets users bring as files: CIFAR-10/100 (python-pickle layout) and NumPy ``.npz``.

Nothing is ever downloaded. CIFAR pickles go through :mod:`neurofuse.data.safe_pickle`, which
refuses arbitrary globals; ``.npz`` archives are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofuse.data.datasets import DataSplits, make_splits, register_dataset
from neurofuse.data.partition import stratified_split
from neurofuse.data.safe_pickle import safe_load_pickle

__all__ = ["DATA_ROOT_ENV", "load_cifar", "load_fusion_file", "load_npz"]

DATA_ROOT_ENV = "NEUROFUSE_DATA"
"""Environment variable consulted when ``root`` is not given."""

_CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta_file": "batches.meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta_file": "meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}
_CIFAR100_LABELS = {
    "fine": ("fine_labels", "fine_label_names", 100),
    "coarse": ("coarse_labels", "coarse_label_names", 20),
}


def _resolve_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        env = os.environ.get(DATA_ROOT_ENV)
        if not env:
            raise ValueError(
                f"dataset {name!r} is read from local files: pass root=<folder> or set the "
                f"{DATA_ROOT_ENV} environment variable"
            )
        root = env
    return Path(root).expanduser()


def _find_cifar_folder(name: str, root: Path) -> Path:
    """Accept the batches folder itself or its parent; fail naming every expected file."""
    layout = _CIFAR_LAYOUT[name]
    expected = layout["train"] + layout["test"]
    for folder in (root, root / layout["folder"]):
        if folder.is_dir() and all((folder / f).is_file() for f in expected):
            return folder
    where = root / layout["folder"] if not (root / expected[0]).exists() else root
    missing = [f for f in expected if not (where / f).is_file()]
    raise FileNotFoundError(
        f"{name}: expected the files {', '.join(expected)} in {where} (or directly in {root}); "
        f"missing: {', '.join(missing)}. Download and unpack {layout['url']} there "
        "(neurofuse never downloads data itself)"
    )


def _str_keys(obj: Any, source: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{source} does not hold a dict; is it a CIFAR python-layout file?")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(safe_load_pickle(path), path)
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise ValueError(f"{path} lacks key(s) {', '.join(missing)} (has {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: data must be (N, 3072) with one label per row, got {data.shape} and "
            f"{labels.shape[0]} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _label_names(path: Path, key: str) -> list[str] | None:
    if not path.is_file():
        return None
    names = _str_keys(safe_load_pickle(path), path).get(key)
    if names is None:
        return None
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(
    name: str, root: Path, label_key: str, meta_key: str, num_classes: int
) -> DataSplits:
    """Read CIFAR batches under ``root``; images ``(N, 3, 32, 32)`` scaled to [0, 1] then
    normalised with the training split's per-channel statistics."""
    layout = _CIFAR_LAYOUT[name]
    folder = _find_cifar_folder(name, root)
    splits = {}
    for split in ("train", "test"):
        parts = [_read_batch(folder / f, label_key) for f in layout[split]]
        x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
        splits[split] = (x, np.concatenate([p[1] for p in parts]))
    info: dict[str, Any] = {"source": str(folder), "labels": label_key}
    names = _label_names(folder / layout["meta_file"], meta_key)
    if names is not None:
        info["classes"] = names
    return make_splits(name, *splits["train"], *splits["test"], num_classes=num_classes, meta=info)


@register_dataset(
    "cifar10", "CIFAR-10 from a local cifar-10-batches-py folder (3x32x32, 10 classes)"
)
def _cifar10(*, root: str | Path | None, seed: int) -> DataSplits:
    """``seed`` is unused: CIFAR-10 has a fixed, published train/test split."""
    return load_cifar("cifar10", _resolve_root("cifar10", root), "labels", "label_names", 10)


@register_dataset(
    "cifar100", "CIFAR-100 from a local cifar-100-python folder (3x32x32, 100 fine classes)"
)
def _cifar100(*, root: str | Path | None, seed: int, labels: str = "fine") -> DataSplits:
    """``labels="fine"`` (100 classes) or ``"coarse"`` (20 superclasses); ``seed`` is unused."""
    if labels not in _CIFAR100_LABELS:
        raise ValueError(f"labels must be one of {sorted(_CIFAR100_LABELS)}, got {labels!r}")
    label_key, meta_key, k = _CIFAR100_LABELS[labels]
    return load_cifar("cifar100", _resolve_root("cifar100", root), label_key, meta_key, k)


def load_npz(
    path: Path,
    *,
    seed: int,
    test_fraction: float,
    num_classes: int | None,
    channels_last: bool,
) -> DataSplits:
    """Read ``x``, ``y`` (and optionally ``x_test``, ``y_test``) from an ``.npz`` archive.

    Without ``x_test``/``y_test`` the samples are split stratified by class, ``test_fraction``
    of them going to the test split (seeded by ``seed``). ``channels_last=True`` moves the last
    axis of ``(N, ..., C)`` inputs to axis 1.
    """
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist; pass root=<file.npz>")
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise ValueError(
                f"{path} lacks array(s) {', '.join(missing)}; it must hold 'x' (inputs) and "
                f"'y' (labels), optionally 'x_test' and 'y_test' (found: {sorted(keys)})"
            )
        has_test = {"x_test", "y_test"} & keys
        if has_test and has_test != {"x_test", "y_test"}:
            raise ValueError(
                f"{path} has {has_test.pop()!r} but not its partner; give both or neither"
            )
        arrays = {k: archive[k] for k in ("x", "y", "x_test", "y_test") if k in keys}
    if arrays["x"].ndim < 2:
        raise ValueError(f"'x' must be (N, features) or (N, C, ...), got shape {arrays['x'].shape}")
    if channels_last:
        for k in ("x", "x_test"):
            if k in arrays:
                arrays[k] = np.moveaxis(arrays[k], -1, 1)
    info: dict[str, Any] = {"source": str(path), "channels_last": channels_last}
    if "x_test" in arrays:
        x_tr, y_tr, x_te, y_te = arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]
        info["split"] = "given"
    else:
        x, y = arrays["x"], arrays["y"]
        if y.ndim != 1 or y.dtype.kind not in "iu" or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"'y' must be 1-D integer labels, one per row of 'x' ({x.shape[0]}), got "
                f"shape {y.shape} and dtype {y.dtype}"
            )
        train_idx, test_idx = stratified_split(
            torch.arange(y.shape[0]), torch.from_numpy(y.astype(np.int64)), test_fraction, seed
        )
        x_tr, y_tr = x[train_idx.numpy()], y[train_idx.numpy()]
        x_te, y_te = x[test_idx.numpy()], y[test_idx.numpy()]
        info.update(split="stratified", test_fraction=test_fraction, seed=seed)
    return make_splits("npz", x_tr, y_tr, x_te, y_te, num_classes=num_classes, meta=info)


@register_dataset("npz", "arrays x, y (optionally x_test, y_test) from a local .npz file")
def _npz(
    *,
    root: str | Path | None,
    seed: int,
    path: str | Path | None = None,
    test_fraction: float = 0.2,
    num_classes: int | None = None,
    channels_last: bool = False,
) -> DataSplits:
    """``path`` (or ``root``) names the ``.npz`` file; see :func:`load_npz`."""
    if path is not None and root is not None:
        raise ValueError("give the .npz file as path= or root=, not both")
    target = path if path is not None else _resolve_root("npz", root)
    return load_npz(
        Path(target).expanduser(),
        seed=seed,
        test_fraction=test_fraction,
        num_classes=num_classes,
        channels_last=channels_last,
    )


def load_fusion_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fusion set from a file, as given (no normalisation, no split): ``(x, y)`` with ``y``
    ``None`` when the file has no labels.

    - ``.npz``: array ``x`` (inputs), optionally ``y`` (integer labels); read with
      ``allow_pickle=False``;
    - ``.pt`` / ``.pth``: a tensor of inputs, an ``(x, y)`` pair or a dict with ``x`` (and
      ``y``); read with ``torch.load(weights_only=True)``;
    - a folder in a layout :func:`neurofuse.data.load` reads (CIFAR-10/100 batches): its
      training split, normalised as ``neurofuse.data.load`` does.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("cifar10", "cifar100"):
            try:
                _find_cifar_folder(name, path)
            except FileNotFoundError:
                continue
            from neurofuse.data.datasets import load

            splits = load(name, root=path)
            return splits.x_train, splits.y_train
        raise ValueError(
            f"{path}: folder is not in a layout neurofuse reads (cifar-10-batches-py, "
            "cifar-100-python); give an .npz or .pt file of inputs x (and labels y)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"fusion data {path} does not exist")
    x: Any
    y: Any = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise ValueError(
                    f"{path} lacks array 'x' (the inputs); found {sorted(archive.files)}"
                )
            x = torch.from_numpy(archive["x"])
            y = torch.from_numpy(archive["y"]) if "y" in archive.files else None
    elif path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{path}: not readable as tensors with torch.load(weights_only=True) ({err}); "
                "save a tensor, an (x, y) pair or {'x': ..., 'y': ...}"
            ) from err
        if isinstance(obj, dict):
            x, y = obj.get("x"), obj.get("y")
        elif isinstance(obj, tuple | list) and len(obj) == 2:
            x, y = obj
        else:
            x = obj
        if not isinstance(x, torch.Tensor) or (y is not None and not isinstance(y, torch.Tensor)):
            raise ValueError(
                f"{path} must hold a tensor of inputs, an (x, y) pair of tensors or "
                "{'x': tensor, 'y': tensor}"
            )
    else:
        raise ValueError(f"{path}: fusion data must be .npz, .pt/.pth or a dataset folder")
    if x.dim() < 2:
        raise ValueError(f"{path}: x must be (N, features) or (N, C, ...), got {tuple(x.shape)}")
    if y is not None:
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ValueError(
                f"{path}: y must be integer labels, one per row of x ({x.shape[0]}), got shape "
                f"{tuple(y.shape)} and dtype {y.dtype}"
            )
        y = y.long()
    return (x.float() if not x.is_floating_point() else x), y
