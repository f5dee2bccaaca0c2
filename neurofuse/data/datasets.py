"""Dataset container and registry: every loader returns the same normalised ``DataSplits``.

A loader is a function ``fn(*, root, seed, **options) -> DataSplits`` registered under a name
with :func:`register_dataset`; :func:`load` looks it up, checks the options against the loader's
signature and calls it. Loaders build their result with :func:`make_splits`, which standardises
every input channel with the mean and standard deviation of the *training* split only, so no
test statistics leak into the inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofuse.utils import to_jsonable

__all__ = [
    "DataSplits",
    "available_datasets",
    "channel_stats",
    "load",
    "make_splits",
    "register_dataset",
]

Loader = Callable[..., "DataSplits"]

_REGISTRY: dict[str, tuple[Loader, str]] = {}
_SPLITS = ("train", "test")


@dataclasses.dataclass
class DataSplits:
    """A train/test classification dataset, inputs already normalised per channel.

    Attributes:
        name: registry name of the dataset (e.g. ``"mnist5k"``).
        x_train: ``(N_train, *input_shape)`` float32 inputs, standardised with ``mean``/``std``.
        y_train: ``(N_train,)`` int64 labels in ``[0, num_classes)``.
        x_test: ``(N_test, *input_shape)`` float32 inputs, standardised with the *train* stats.
        y_test: ``(N_test,)`` int64 labels.
        num_classes: number of classes.
        mean: ``(C,)`` per-channel mean of the raw training inputs (channel = axis 1).
        std: ``(C,)`` per-channel standard deviation of the raw training inputs.
        meta: JSON-serialisable description (source, split sizes, seeds, options).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)``, ``(1, 40)`` or ``(num_features,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def subset(
        self, idx: torch.Tensor | Sequence[int], split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` of the samples ``idx`` of ``split`` (``"train"`` or ``"test"``).

        Typical use: the inputs of one partition part, or of the fusion set.
        """
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        index = torch.as_tensor(idx, dtype=torch.long).to(x.device)
        return x[index], y[index]

    def to(self, device: str | torch.device) -> DataSplits:
        """Return a copy whose tensors live on ``device`` (the original is left untouched)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            mean=self.mean.to(device),
            std=self.std.to(device),
            meta=dict(self.meta),
        )


def register_dataset(name: str, description: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(*, root, seed, **options) -> DataSplits`` under ``name``.

    Users can register their own loaders the same way; the name must not be taken yet.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def decorate(fn: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"a dataset named {name!r} is already registered; pick another name")
        params = inspect.signature(fn).parameters
        missing = [p for p in ("root", "seed") if p not in params]
        if missing:
            raise TypeError(
                f"dataset loader {fn.__qualname__} must accept keyword arguments root and seed "
                f"(missing: {', '.join(missing)})"
            )
        _REGISTRY[name] = (fn, description)
        return fn

    return decorate


def available_datasets() -> dict[str, str]:
    """Map every registered dataset name to its one-line description."""
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


def load(name: str, *, root: str | Path | None = None, seed: int = 0, **kwargs: Any) -> DataSplits:
    """Load dataset ``name`` as normalised ``DataSplits``.

    Args:
        name: a registered name; see :func:`available_datasets`.
        root: folder (or file) the data lives in, for datasets read from disk.
        seed: seed of any randomness in generation or splitting (datasets with a fixed,
            published split, such as ``mnist5k``, document that they ignore it).
        **kwargs: loader-specific options (e.g. ``num_samples`` for ``mnist1d``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    fn, _ = _REGISTRY[name]
    options = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("root", "seed")
    ]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(
            f"dataset {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(options) if options else '(no options)'}"
        )
    return fn(root=root, seed=seed, **kwargs)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std of ``x`` of shape ``(N, C, ...)`` (channel = axis 1).

    ``mean_c = E[x[:, c, ...]]`` and ``std_c = sqrt(E[(x[:, c, ...] - mean_c)^2])``, computed in
    float64 for accuracy. A constant channel gets ``std = 1`` so normalising it never divides by 0.
    """
    if x.ndim < 2:
        raise ValueError(
            f"inputs must have shape (N, C, ...) or (N, features), got {tuple(x.shape)}"
        )
    dims = [0, *range(2, x.ndim)]
    x64 = x.double()
    mean = x64.mean(dim=dims)
    std = x64.var(dim=dims, unbiased=False).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float(), std.float()


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return ((x - mean.view(shape)) / std.view(shape)).float()


def _as_inputs(x: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """A float32 CPU copy of real-valued inputs (integers such as uint8 pixels are converted)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{what} must hold real numbers, got dtype {x.dtype}")
        return x.detach().to("cpu", torch.float32, copy=True)
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    return torch.from_numpy(arr.astype(np.float32, copy=True))


def _as_labels(y: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must hold whole-number class indices, got non-integers")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{what} must be integer class indices, got dtype {arr.dtype}")
    labels = torch.from_numpy(arr.astype(np.int64, copy=True))
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{what} must be >= 0, found {int(labels.min())}")
    return labels


def make_splits(
    name: str,
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    x_test: np.ndarray | torch.Tensor,
    y_test: np.ndarray | torch.Tensor,
    *,
    num_classes: int | None = None,
    meta: dict[str, Any] | None = None,
) -> DataSplits:
    """Validate raw arrays and build ``DataSplits`` normalised with the training statistics.

    Inputs are ``(N, C, ...)`` (or ``(N, features)``, each feature its own channel); labels are
    1-D class indices. ``num_classes`` defaults to ``max(label) + 1`` over both splits. The
    caller's arrays are copied, never modified.
    """
    xtr, xte = _as_inputs(x_train, "x_train"), _as_inputs(x_test, "x_test")
    ytr, yte = _as_labels(y_train, "y_train"), _as_labels(y_test, "y_test")
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise ValueError(
            f"inputs and labels differ in length: x_train {xtr.shape[0]} vs y_train "
            f"{ytr.shape[0]}, x_test {xte.shape[0]} vs y_test {yte.shape[0]}"
        )
    if xtr.shape[0] == 0:
        raise ValueError("the training split is empty; provide at least one training sample")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(
            f"train and test samples differ in shape: {tuple(xtr.shape[1:])} vs "
            f"{tuple(xte.shape[1:])}"
        )
    if not (torch.isfinite(xtr).all() and torch.isfinite(xte).all()):
        raise ValueError("inputs contain NaN or infinite values; clean the data first")
    top = int(max(ytr.max(), yte.max() if yte.numel() else 0)) + 1
    if num_classes is None:
        num_classes = top
    elif num_classes < top:
        raise ValueError(f"labels go up to {top - 1} but num_classes={num_classes}; raise it")
    mean, std = channel_stats(xtr)
    info = {
        "num_train": int(xtr.shape[0]),
        "num_test": int(xte.shape[0]),
        "input_shape": list(xtr.shape[1:]),
        **(meta or {}),
    }
    return DataSplits(
        name=name,
        x_train=_normalise(xtr, mean, std),
        y_train=ytr,
        x_test=_normalise(xte, mean, std),
        y_test=yte,
        num_classes=int(num_classes),
        mean=mean,
        std=std,
        meta=to_jsonable(info),
    )
