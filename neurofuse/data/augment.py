"""Batch augmentations in plain torch (no torchvision): random crop, horizontal flip, CutMix.

Every function works on whole batches on any device, never modifies its input, and draws its
randomness from an optional ``torch.Generator`` (CPU or on the batch's device), so a seeded
generator makes the result reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neurofuse.checks import integer

__all__ = [
    "Augment",
    "augmented_copies",
    "changing_augmentation",
    "cutmix",
    "random_crop",
    "random_flip",
]


def _device_of(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _randint(
    high: int, size: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` drawn on the generator's device, moved to ``device``."""
    out = torch.randint(high, size, generator=generator, device=_device_of(generator, device))
    return out.to(device)


def _rand(
    size: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    return torch.rand(size, generator=generator, device=_device_of(generator, device)).to(device)


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad every spatial side by ``padding``, then cut a window of the original size at a
    random offset per sample (the standard CIFAR "crop 32, padding 4").

    Args:
        x: ``(B, C, H, W)`` images or ``(B, C, L)`` signals.
        padding: pixels added on each side; 0 returns a copy of ``x``.
    """
    if x.ndim not in (3, 4):
        raise ValueError(
            f"random_crop expects (B, C, L) or (B, C, H, W) inputs, got {tuple(x.shape)}: "
            "shifted copies need signals or images; for feature vectors drop the crop (augment=)"
        )
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    if padding == 0:
        return x.clone()
    spatial = x.shape[2:]
    batch = x.shape[0]
    padded = F.pad(x, (padding,) * (2 * len(spatial)))
    offsets = _randint(2 * padding + 1, (batch, len(spatial)), generator, x.device)
    b = torch.arange(batch, device=x.device)
    c = torch.arange(x.shape[1], device=x.device)
    if len(spatial) == 1:
        pos = offsets[:, 0:1] + torch.arange(spatial[0], device=x.device)  # (B, L)
        return padded[b[:, None, None], c[None, :, None], pos[:, None, :]]
    rows = offsets[:, 0:1] + torch.arange(spatial[0], device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(spatial[1], device=x.device)  # (B, W)
    return padded[
        b[:, None, None, None],
        c[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def random_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Mirror each image left-right (last axis) with probability ``p``; ``x`` is
    ``(B, C, H, W)``. Signals are not flipped: reversing time changes what a 1-D pattern means."""
    if x.ndim != 4:
        raise ValueError(
            f"random_flip expects images (B, C, H, W), got {tuple(x.shape)}; horizontal flips "
            "are defined for 2-D images only"
        )
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    flip = _rand((x.shape[0],), generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _soft_labels(y: torch.Tensor, num_classes: int, batch: int) -> torch.Tensor:
    if y.ndim == 1:
        if y.is_floating_point():
            raise ValueError("1-D labels must be integer class indices")
        return F.one_hot(y.long(), num_classes).float()
    if y.ndim == 2 and y.shape == (batch, num_classes):
        return y.float()
    raise ValueError(
        f"labels must be (B,) class indices or (B, num_classes) probabilities, got "
        f"{tuple(y.shape)} for B={batch}, num_classes={num_classes}"
    )


def cutmix(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""CutMix (Yun et al., 2019): paste a random box from a shuffled partner into each sample.

    ``\lambda \sim \mathrm{Beta}(\alpha, \alpha)`` (one per batch) sets the box size: each
    spatial side is ``\mathrm{side} \cdot (1 - \lambda)^{1/D}`` (D = 2 for images, 1 for
    signals) around a uniform random centre, clipped to the input. Labels mix by the area
    actually kept: ``y = r\, y_i + (1 - r)\, y_{\pi(i)}`` with ``r = 1 - \text{box area} /
    \text{total area}``.

    Args:
        x: ``(B, C, H, W)`` or ``(B, C, L)``.
        y: ``(B,)`` class indices or ``(B, num_classes)`` soft labels.
        alpha: Beta concentration, > 0.

    Returns:
        ``(x_mixed, y_soft)`` with ``y_soft`` of shape ``(B, num_classes)``, rows summing to 1.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"cutmix expects (B, C, L) or (B, C, H, W), got {tuple(x.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    batch = x.shape[0]
    soft = _soft_labels(y.to(x.device), num_classes, batch)
    spatial = x.shape[2:]
    seed = int(_randint(2**62, (1,), generator, torch.device("cpu")).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(batch, generator=generator, device=_device_of(generator, x.device))
    perm = perm.to(x.device)
    centre = _rand((len(spatial),), generator, torch.device("cpu")).tolist()
    ratio = (1.0 - lam) ** (1.0 / len(spatial))
    box = []
    for size, u in zip(spatial, centre, strict=True):
        half = int(size * ratio) // 2
        mid = int(u * size)
        box.append(slice(max(mid - half, 0), min(mid + half, size)))
    mixed = x.clone()
    region = (slice(None), slice(None), *box)
    mixed[region] = x[perm][region]
    cut = math.prod(s.stop - s.start for s in box)
    kept = 1.0 - cut / math.prod(spatial)
    return mixed, kept * soft + (1.0 - kept) * soft[perm]


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time input augmentation composed from named steps, applied in this order:
    ``crop`` (padding in pixels, 0 = off) then ``flip`` (random horizontal flip; applied to
    4-D image batches only, 1-D signals pass through unflipped).

    ``Augment()`` is the identity and returns ``x`` itself. CutMix changes the labels too, so it
    is a separate function (:func:`cutmix`) that training applies to ``(x, y)``.
    """

    crop: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.crop, int) or self.crop < 0:
            raise ValueError(f"crop must be an integer padding >= 0, got {self.crop!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be True or False, got {self.flip!r}")

    @classmethod
    def from_spec(cls, spec: str | None) -> Augment:
        """Parse a comma-separated spec such as ``"crop=4,flip"`` (``""``/``None``/``"none"`` =
        identity), e.g. from a command line."""
        if spec is None or spec.strip().lower() in ("", "none"):
            return cls()
        kwargs: dict[str, Any] = {}
        for item in spec.split(","):
            key, _, value = item.strip().partition("=")
            if key == "flip":
                kwargs["flip"] = value.strip().lower() not in ("0", "false", "no", "off")
            elif key == "crop":
                try:
                    kwargs["crop"] = int(value) if value else 4
                except ValueError:
                    raise ValueError(f"crop needs an integer padding, got {value!r}") from None
            else:
                raise ValueError(f"unknown augmentation {key!r} in {spec!r}; valid: crop[=N], flip")
        return cls(**kwargs)

    @property
    def is_identity(self) -> bool:
        return self.crop == 0 and not self.flip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.crop:
            x = random_crop(x, self.crop, generator)
        if self.flip and x.ndim == 4:
            x = random_flip(x, generator)
        return x


def changing_augmentation(augment: Augment | str) -> Augment:
    """``augment`` (an :class:`Augment` or its spec), refused when it leaves the inputs
    unchanged: copies made with it would only repeat the data."""
    aug = augment if isinstance(augment, Augment) else Augment.from_spec(augment)
    if aug.is_identity:
        raise ValueError(
            f"augment={augment!r} leaves the inputs unchanged; give an augmentation that "
            "changes the inputs, one the models were trained with (e.g. 'crop=2')"
        )
    return aug


def augmented_copies(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    copies: int = 4,
    augment: Augment | str = "crop=2",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fusion set enlarged with augmented copies of itself: ``x`` followed by ``copies``
    augmented versions of it (each drawn afresh, seeded by ``seed``), and ``y`` repeated to
    match (``None`` stays ``None``). No sample is added that the set does not already hold, so
    a fusion on the result stays one-shot; the paper augments its fusion sets the same way
    (Table 6). The augmentation should be one the models were trained with (the random shifts of
    ``"crop=2"`` for the bundled digits), so that the copies lie where the models are reliable.
    """
    integer("copies", copies, 0)
    aug = augment if isinstance(augment, Augment) else Augment.from_spec(augment)
    if copies:
        changing_augmentation(aug)
    if y is not None and len(y) != len(x):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}; give one label per sample")
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.cat([x] + [aug(x, gen) for _ in range(copies)])
    return out, (y.repeat(copies + 1) if y is not None else None)
