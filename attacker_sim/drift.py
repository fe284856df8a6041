"""Benign drift: how honest users' data changes over time, which a defense must learn, not undo.

Each kind is a small class configured once with its parameters (validated at construction) and
a `name` and `params` for reports. Three kinds change how the images look (`pixel_shift`,
`rotation`, `brightness_contrast`); `label_prior` changes which classes arrive. A transform cannot
change which samples arrive, so every kind draws its own stream batches from a pool with
`batches`, and gives the drifted test set to measure accuracy on with `test_view`. Images are
float tensors [N, C, H, W] in [0, 1]; every kind keeps dtype, shape and range.

>>> import torch
>>> drift = build_drift("pixel_shift", pixels=2)
>>> drift.name, drift.params
('pixel_shift', {'pixels': 2, 'height': False})
>>> x, y = torch.rand(100, 1, 8, 8), torch.arange(100) % 10
>>> [tuple(xb.shape) for xb, yb in drift.batches(x, y, batch_size=32, count=2, seed=0)]
[(32, 1, 8, 8), (32, 1, 8, 8)]
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

Batch = tuple[torch.Tensor, torch.Tensor]


def _check_images(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{what} images must be a float tensor [N, C, H, W] in [0, 1], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"{what} labels must be a 1-d tensor with one label per image ({len(x)}), "
                         f"got shape {tuple(getattr(y, 'shape', ()))}")


class Drift(ABC):
    """Base of the drift kinds: `apply` to a batch, draw stream `batches` from a pool, a drifted `test_view`.

    The default stream draws uniformly from the pool in reshuffled epochs (every sample once per
    epoch, a fresh order each epoch, batches of exactly `batch_size`) and applies the transform.
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def params(self) -> dict:
        """The constructor's parameters: `build_drift(d.name, **d.params)` rebuilds `d`."""

    @abstractmethod
    def apply(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        """The drifted copy of a batch (x [N, C, H, W] in [0, 1], labels y [N])."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def batches(self, pool_x: torch.Tensor, pool_y: torch.Tensor, batch_size: int, count: int,
                seed: int) -> Iterator[Batch]:
        """`count` drifted stream batches of `batch_size` drawn from the pool, reproducible by `seed`."""
        _check_images(pool_x, pool_y, "pool")
        if len(pool_x) == 0:
            raise ValueError("pool must hold at least one sample, got an empty pool")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not (isinstance(count, int) and count >= 0):
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        generator = torch.Generator().manual_seed(seed)
        return self._draw(pool_x, pool_y, batch_size, count, generator)

    def test_view(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> Batch:
        """The test set as it looks under this drift: what accuracy after the drift is measured on."""
        _check_images(x, y, "test")
        return self.apply(x, y, torch.Generator().manual_seed(seed))

    def _draw(self, pool_x: torch.Tensor, pool_y: torch.Tensor, batch_size: int, count: int,
              generator: torch.Generator) -> Iterator[Batch]:
        pending = torch.empty(0, dtype=torch.long)
        for _ in range(count):
            while len(pending) < batch_size:  # a new epoch: every sample once more, in a fresh order
                pending = torch.cat([pending, torch.randperm(len(pool_x), generator=generator)])
            idx, pending = pending[:batch_size], pending[batch_size:]
            yield self.apply(pool_x[idx], pool_y[idx], generator)


class PixelShift(Drift):
    """Shift the image content by `pixels` along the width (and the height if `height`), wrapping around.

    A camera or scanner that moved: the same digits, a little off-centre.

    >>> import torch
    >>> x = torch.zeros(1, 1, 2, 3); x[0, 0, 0, 0] = 1.0
    >>> PixelShift(pixels=1).apply(x, torch.tensor([0]))[0][0, 0].tolist()
    [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """

    name = "pixel_shift"

    def __init__(self, pixels: int = 1, height: bool = False):
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
            raise ValueError(f"pixels (shift in pixels) must be an integer >= 1, got {pixels!r}")
        self.pixels = pixels
        self.height = bool(height)

    @property
    def params(self) -> dict:
        return {"pixels": self.pixels, "height": self.height}

    def apply(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        _check_images(x, y, "batch")
        if self.height:
            return torch.roll(x, shifts=(self.pixels, self.pixels), dims=(2, 3)), y
        return torch.roll(x, shifts=self.pixels, dims=3), y


class Rotation(Drift):
    """Rotate every image by a fixed `degrees` (counter-clockwise), bilinear, corners filled with 0.

    >>> import torch
    >>> x = torch.zeros(1, 1, 5, 5); x[0, 0, 2, :] = 1.0
    >>> rotated, _ = Rotation(degrees=90).apply(x, torch.tensor([0]))
    >>> rotated[0, 0, :, 2].tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0]
    """

    name = "rotation"

    def __init__(self, degrees: float = 15.0):
        if not (math.isfinite(degrees) and 0 < abs(degrees) <= 180):
            raise ValueError(f"degrees (rotation angle) must be non-zero and within [-180, 180], got {degrees!r}")
        self.degrees = float(degrees)

    @property
    def params(self) -> dict:
        return {"degrees": self.degrees}

    def apply(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        _check_images(x, y, "batch")
        rotated = TF.rotate(x, self.degrees, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        return rotated.clamp(0.0, 1.0), y  # bilinear weights are convex; the clamp only absorbs rounding


class BrightnessContrast(Drift):
    """Scale brightness by `brightness`, then contrast by `contrast` (around the grey mean), clamped to [0, 1].

    A new camera or lighting: factors > 1 brighten or sharpen, < 1 darken or flatten.

    >>> import torch
    >>> x = torch.tensor([[[[0.25, 0.5]]]])
    >>> BrightnessContrast(brightness=2.5, contrast=1.0).apply(x, torch.tensor([0]))[0].flatten().tolist()
    [0.625, 1.0]
    """

    name = "brightness_contrast"

    def __init__(self, brightness: float = 1.3, contrast: float = 0.6):
        for label, value in (("brightness", brightness), ("contrast", contrast)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{label} (factor) must be a finite number > 0, got {value!r}")
        if brightness == 1 and contrast == 1:
            raise ValueError("brightness and contrast are both 1: that is no drift")
        self.brightness = float(brightness)
        self.contrast = float(contrast)

    @property
    def params(self) -> dict:
        return {"brightness": self.brightness, "contrast": self.contrast}

    def apply(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        _check_images(x, y, "batch")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"brightness_contrast needs 1 or 3 channels, got {x.shape[1]}")
        out = TF.adjust_contrast(TF.adjust_brightness(x, self.brightness), self.contrast)
        return out.clamp(0.0, 1.0), y


class LabelPrior(Drift):
    """The class prior shifts: `classes` classes (a fixed subset drawn by `seed`) get `share` of the samples.

    The images are untouched (`apply` is the identity); what changes is which samples arrive:
    `batches` samples the pool (with replacement) so the favoured classes together make up `share`
    of it, split evenly among them, and the rest is split evenly among the other classes present.
    `test_view` resamples the test set, same size, with the same prior.

    >>> import torch
    >>> drift = LabelPrior(classes=2, share=0.9, num_classes=4, seed=0)
    >>> drift.favoured_classes
    [0, 1]
    >>> y = torch.arange(400) % 4
    >>> _, y_test = drift.test_view(torch.rand(400, 1, 2, 2), y, seed=0)
    >>> round(torch.isin(y_test, torch.tensor(drift.favoured_classes)).float().mean().item(), 1)
    0.9
    """

    name = "label_prior"

    def __init__(self, classes: int = 3, share: float = 0.7, num_classes: int = 10, seed: int = 0):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes < num_classes:
            raise ValueError(f"classes (how many are favoured) must be an integer in [1, num_classes - 1] = "
                             f"[1, {num_classes - 1}], got {classes!r}")
        if not (math.isfinite(share) and 0 < share < 1):
            raise ValueError(f"share (of samples from the favoured classes) must be in (0, 1), got {share!r}")
        self.classes, self.share, self.num_classes, self.seed = classes, float(share), num_classes, seed
        order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
        self.favoured_classes: list[int] = sorted(order[:classes].tolist())

    @property
    def params(self) -> dict:
        return {"classes": self.classes, "share": self.share, "num_classes": self.num_classes, "seed": self.seed}

    def apply(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        _check_images(x, y, "batch")
        return x, y

    def class_weights(self) -> torch.Tensor:
        """The shifted prior over the `num_classes` classes [num_classes], summing to 1."""
        weights = torch.full((self.num_classes,), (1 - self.share) / (self.num_classes - self.classes))
        weights[self.favoured_classes] = self.share / self.classes
        return weights

    def test_view(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> Batch:
        _check_images(x, y, "test")
        generator = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(self._sample_weights(y, "test"), len(y), replacement=True, generator=generator)
        return x[idx], y[idx]

    def _draw(self, pool_x: torch.Tensor, pool_y: torch.Tensor, batch_size: int, count: int,
              generator: torch.Generator) -> Iterator[Batch]:
        weights = self._sample_weights(pool_y, "pool")
        for _ in range(count):
            idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
            yield pool_x[idx], pool_y[idx]

    def _sample_weights(self, y: torch.Tensor, what: str) -> torch.Tensor:
        """Per-sample weights giving each class its prior mass, whatever its count in `y`."""
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"{what} labels must be in [0, {self.num_classes - 1}] (num_classes={self.num_classes}), "
                             f"got {int(y.min())}..{int(y.max())}")
        counts = torch.bincount(y, minlength=self.num_classes).double()
        missing = [c for c in self.favoured_classes if counts[c] == 0]
        if missing:
            raise ValueError(f"{what} has no samples of favoured classes {missing}: their share cannot be drawn")
        weights = self.class_weights().double()
        others = [c for c in range(self.num_classes) if c not in self.favoured_classes]
        present_others = [c for c in others if counts[c] > 0]
        # the others' mass goes to the others that are there, so the favoured share stays exact
        weights[others] = 0.0
        if present_others:
            weights[present_others] = (1 - self.share) / len(present_others)
        return (weights / counts.clamp_min(1))[y]


DRIFTS: dict[str, type[Drift]] = {cls.name: cls for cls in (PixelShift, Rotation, BrightnessContrast, LabelPrior)}


def build_drift(kind: str, **params) -> Drift:
    """The drift registered as `kind`, built with its parameters (the class defaults for the rest).

    >>> build_drift("rotation", degrees=10).params
    {'degrees': 10.0}
    """
    if kind not in DRIFTS:
        raise ValueError(f"unknown drift kind {kind!r}; expected one of {', '.join(DRIFTS)}")
    cls = DRIFTS[kind]
    accepted = list(inspect.signature(cls.__init__).parameters)[1:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for drift {kind!r}; "
                         f"expected some of {', '.join(accepted)}")
    return cls(**params)


__all__ = ["DRIFTS", "BrightnessContrast", "Drift", "LabelPrior", "PixelShift", "Rotation", "build_drift"]
