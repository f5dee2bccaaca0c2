"""Split a training set among models (IID, Dirichlet non-IID, sharded) and draw fusion sets.

The schemes follow Appendix D of the neuron-interpolation fusion paper. All randomness comes
from a generator seeded locally from ``seed``; global random state is never read or changed.
Indices always refer to positions in the *training* split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "PARTITION_SCHEMES",
    "Partition",
    "fusion_indices",
    "partition",
    "stratified_split",
]


@dataclasses.dataclass
class Partition:
    """The training-set indices each model (part) gets.

    Attributes:
        scheme: name of the scheme that produced it (``"iid"``, ``"dirichlet"``, ``"sharded"``).
        indices: one sorted int64 tensor of training indices per part; disjoint, and together
            they cover every training sample exactly once.
        class_counts: ``(n_parts, num_classes)`` int64, samples of each class in each part
            (what a federated client reports; FedAvg weights by its row sums).
        params: the arguments that produced it (seed, num_classes, scheme options, ...).
    """

    scheme: str
    indices: list[torch.Tensor]
    class_counts: torch.Tensor
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_parts(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> list[int]:
        """Number of samples in each part."""
        return [int(idx.numel()) for idx in self.indices]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (indices and counts as nested lists)."""
        return {
            "scheme": self.scheme,
            "indices": [idx.tolist() for idx in self.indices],
            "class_counts": self.class_counts.tolist(),
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        """Rebuild a partition saved with :meth:`to_dict`."""
        missing = [k for k in ("scheme", "indices", "class_counts") if k not in data]
        if missing:
            raise ValueError(f"partition dict lacks key(s) {', '.join(missing)}")
        indices = [torch.tensor(list(idx), dtype=torch.long) for idx in data["indices"]]
        counts = torch.tensor(data["class_counts"], dtype=torch.long)
        if counts.ndim != 2 or counts.shape[0] != len(indices):
            raise ValueError(
                f"class_counts must have one row per part ({len(indices)}), got shape "
                f"{tuple(counts.shape)}"
            )
        return cls(str(data["scheme"]), indices, counts, dict(data.get("params", {})))


SchemeFn = Callable[..., list[np.ndarray]]


def _iid(labels: np.ndarray, n_parts: int, rng: np.random.Generator, **_: Any) -> list[np.ndarray]:
    """Random permutation cut into ``n_parts`` near-equal pieces."""
    return list(np.array_split(rng.permutation(labels.shape[0]), n_parts))


def _dirichlet(
    labels: np.ndarray,
    n_parts: int,
    rng: np.random.Generator,
    *,
    num_classes: int,
    alpha_min: float,
    min_max_ratio: float,
    **_: Any,
) -> list[np.ndarray]:
    r"""Non-IID split: per class ``c``, ``p \sim \mathrm{Dir}(\pi_c(\alpha))`` decides the shares.

    ``alpha = linspace(alpha_min, alpha_min / min_max_ratio, n_parts)`` and ``\pi_c`` is a fresh
    random permutation for every class, so no part is systematically favoured. Class ``c``'s
    samples (shuffled) are cut at ``floor(cumsum(p) * N_c)``.

    ``min_max_ratio = 1`` gives equal concentrations, ``Dir(alpha_min, ..., alpha_min)``, which
    is itself far from IID for ``alpha_min = 1``. Lowering the ratio adds a systematic spread of
    the shares but also raises the total concentration (less random spread). For 2 parts, the
    paper's main setting, the label skew grows as the ratio falls (1.0 -> 0.2 -> 0.05); for 5 or
    more parts it does not: measured as the mean KL divergence of a part's class distribution
    from the global one, 10 parts give 0.31 / 0.22 / 0.23 for ratios 1.0 / 0.2 / 0.05. For more
    skew with many parts, lower ``alpha_min`` as well.
    """
    alphas = np.linspace(alpha_min, alpha_min / min_max_ratio, n_parts)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(rng.permutation(alphas))
        cuts = np.floor(np.cumsum(shares)[:-1] * members.size).astype(np.int64)
        for k, piece in enumerate(np.split(members, cuts)):
            parts[k].append(piece)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _sharded(
    labels: np.ndarray, n_parts: int, rng: np.random.Generator, *, num_classes: int, **_: Any
) -> list[np.ndarray]:
    """Classes permuted and cut into ``n_parts`` disjoint near-equal groups; a part gets all of
    its classes' samples, none of any other class."""
    if n_parts > num_classes:
        raise ValueError(
            f"sharded partition needs at least one class per part, but n_parts={n_parts} > "
            f"num_classes={num_classes}; use at most {num_classes} parts or the 'dirichlet' "
            "scheme"
        )
    groups = np.array_split(rng.permutation(num_classes), n_parts)
    return [np.flatnonzero(np.isin(labels, group)) for group in groups]


PARTITION_SCHEMES: dict[str, SchemeFn] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "sharded": _sharded,
}


def _labels_numpy(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a 1-D integer tensor of class indices, got shape {arr.shape} "
            f"and dtype {arr.dtype}"
        )
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _resolve_num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    top = int(labels.max()) + 1 if labels.size else 0
    if num_classes is None:
        return top
    if num_classes < top:
        raise ValueError(f"labels go up to {top - 1} but num_classes={num_classes}; raise it")
    return int(num_classes)


def partition(
    labels: torch.Tensor,
    n_parts: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    num_classes: int | None = None,
    alpha_min: float = 1.0,
    min_max_ratio: float = 0.2,
) -> Partition:
    """Split the training samples with ``labels`` among ``n_parts`` models.

    Args:
        labels: ``(N,)`` integer class labels of the training split.
        n_parts: number of models / clients (>= 1).
        scheme: one of :data:`PARTITION_SCHEMES` (``"iid"``, ``"dirichlet"``, ``"sharded"``).
        seed: seeds a local generator; equal seeds give equal partitions.
        num_classes: defaults to ``max(labels) + 1``.
        alpha_min: smallest Dirichlet concentration (``dirichlet`` only), > 0.
        min_max_ratio: ``alpha_min / alpha_max`` in ``(0, 1]`` (``dirichlet`` only); smaller
            means more skewed parts.

    Returns:
        A :class:`Partition` whose parts are disjoint and cover all ``N`` samples.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; valid schemes: "
            f"{', '.join(sorted(PARTITION_SCHEMES))}"
        )
    if not isinstance(n_parts, int) or isinstance(n_parts, bool) or n_parts < 1:
        raise ValueError(f"n_parts must be an integer >= 1, got {n_parts!r}")
    if not alpha_min > 0:
        raise ValueError(f"alpha_min must be > 0, got {alpha_min}")
    if not 0 < min_max_ratio <= 1:
        raise ValueError(
            f"min_max_ratio must lie in (0, 1], got {min_max_ratio}; 1 means equal "
            "concentrations, smaller values more skew"
        )
    y = _labels_numpy(labels)
    if y.size == 0:
        raise ValueError("labels is empty; there is nothing to partition")
    k = _resolve_num_classes(y, num_classes)
    rng = np.random.default_rng(seed)
    pieces = PARTITION_SCHEMES[scheme](
        y,
        n_parts,
        rng,
        num_classes=k,
        alpha_min=float(alpha_min),
        min_max_ratio=float(min_max_ratio),
    )
    indices = [torch.from_numpy(np.sort(p).astype(np.int64)) for p in pieces]
    counts = torch.stack(
        [torch.bincount(torch.from_numpy(y[idx.numpy()]), minlength=k) for idx in indices]
    )
    params: dict[str, Any] = {"seed": seed, "num_classes": k, "num_samples": int(y.size)}
    if scheme == "dirichlet":
        params.update(alpha_min=float(alpha_min), min_max_ratio=float(min_max_ratio))
    return Partition(scheme, indices, counts.long(), params)


def _balanced_counts(available: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Water-filling: give every class ``n / #classes`` samples, capped by what it has; what a
    small class cannot take goes to the classes that still have samples. The last few samples
    (fewer than the classes still open) go to randomly chosen open classes, so the counts of
    classes that are not exhausted differ by at most one."""
    take = np.zeros_like(available)
    remaining = n
    while remaining > 0:
        open_classes = np.flatnonzero(available > take)
        share = remaining // open_classes.size
        if share == 0:
            lucky = rng.choice(open_classes, size=remaining, replace=False)
            take[lucky] += 1
            break
        grant = np.minimum(share, available[open_classes] - take[open_classes])
        take[open_classes] += grant
        remaining -= int(grant.sum())
    return take


def fusion_indices(
    labels: torch.Tensor,
    partition: Partition | None,
    n: int,
    *,
    seed: int = 0,
    from_part: int = 0,
) -> torch.Tensor:
    """Draw the ``n`` training indices of the fusion set, as class-balanced as possible.

    For the ``iid`` scheme, or ``partition=None``, the pool is the whole training split; for
    every other scheme it is only part ``from_part``'s data (the paper's setting: the fusing
    party holds model 1's data, never the others'). Each class present in the pool gets
    ``n / #classes`` samples; classes with fewer give all they have and the rest is spread
    over the classes that still have samples.

    Returns:
        ``(n,)`` int64 indices into the training split, in random order (any prefix is itself
        a near-balanced sample), on ``labels.device``.
    """
    y = _labels_numpy(labels)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (fusion set size) must be an integer >= 1, got {n!r}")
    if partition is None or partition.scheme == "iid":
        pool = np.arange(y.size)
        where = "the training split"
    else:
        if not 0 <= from_part < partition.n_parts:
            raise ValueError(f"from_part must lie in [0, {partition.n_parts - 1}], got {from_part}")
        pool = partition.indices[from_part].cpu().numpy().astype(np.int64)
        if pool.size and pool.max() >= y.size:
            raise ValueError(
                f"partition indices reach {int(pool.max())} but only {y.size} labels were "
                "given; pass the labels of the training split the partition was made from"
            )
        where = f"part {from_part} of the {partition.scheme!r} partition"
    if n > pool.size:
        raise ValueError(
            f"asked for a fusion set of {n} samples but only {pool.size} are available in "
            f"{where}; use n <= {pool.size}"
        )
    rng = np.random.default_rng(seed)
    pool_labels = y[pool]
    classes = np.unique(pool_labels)
    members = [rng.permutation(pool[pool_labels == c]) for c in classes]
    take = _balanced_counts(np.array([m.size for m in members]), n, rng)
    chosen = np.concatenate([m[:t] for m, t in zip(members, take, strict=True)])
    return torch.from_numpy(rng.permutation(chosen).astype(np.int64)).to(labels.device)


def stratified_split(
    indices: torch.Tensor | Sequence[int],
    labels: torch.Tensor,
    val_fraction: float,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``indices`` into train/validation indices with the same class proportions.

    ``round(val_fraction * len(indices))`` samples go to validation. Each class ``c`` with
    ``N_c`` of them contributes ``floor(val_fraction * N_c)`` plus possibly one more: the left
    over seats go to the classes with the largest fractional remainders (ties broken at
    random), which keeps every class within one sample of its exact share.

    Args:
        indices: positions into ``labels`` to split (e.g. one partition part).
        labels: full label vector that ``indices`` point into.
        val_fraction: in ``(0, 1)``.
        seed: seeds a local generator.

    Returns:
        ``(train_idx, val_idx)``: disjoint int64 tensors, each in random order, on
        ``labels.device``.
    """
    y = _labels_numpy(labels)
    idx = np.asarray(
        indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else indices,
        dtype=np.int64,
    ).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        raise ValueError(f"indices must lie in [0, {y.size - 1}] (positions into labels)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * idx.size))
    if not 0 < n_val < idx.size:
        raise ValueError(
            f"val_fraction={val_fraction} of {idx.size} samples leaves an empty train or "
            "validation split; use more samples or a different fraction"
        )
    rng = np.random.default_rng(seed)
    sub = y[idx]
    classes = np.unique(sub)
    sizes = np.array([(sub == c).sum() for c in classes])
    exact = val_fraction * sizes
    quota = np.floor(exact).astype(np.int64)
    leftover = n_val - int(quota.sum())
    if leftover > 0:
        order = np.lexsort((rng.random(classes.size), -(exact - quota)))
        quota[order[:leftover]] += 1
    train, val = [], []
    for c, q in zip(classes, quota, strict=True):
        members = rng.permutation(idx[sub == c])
        val.append(members[:q])
        train.append(members[q:])
    device = labels.device if isinstance(labels, torch.Tensor) else torch.device("cpu")

    def pack(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(rng.permutation(np.concatenate(parts)).astype(np.int64)).to(device)

    return pack(train), pack(val)
