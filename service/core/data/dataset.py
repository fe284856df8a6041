"""ArrayDataset: a whole dataset held in memory as uint8 images and int64 labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no single truth value
class ArrayDataset:
    """Images as uint8 [N, C, H, W] and int64 labels [N].

    Images stay uint8 (4x smaller than float32) until a model needs them: ``tensors()`` scales
    to float32 in [0, 1], the pixel unit every epsilon in the project is expressed in.

    >>> import numpy as np
    >>> ds = ArrayDataset("toy", np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 0, 1]), ("a", "b"))
    >>> len(ds), ds.num_classes, ds.input_shape
    (4, 2, (1, 2, 2))
    >>> ds.subset([1, 3]).y.tolist()
    [1, 1]
    >>> x, y = ds.tensors()
    >>> x.dtype, y.dtype
    (torch.float32, torch.int64)
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    source: str = ""  # where the pixels came from, for reports (e.g. "cifar10-jpeg.tar.gz")

    def __post_init__(self) -> None:
        # Validate once here so every consumer can trust dtype and shape without re-checking.
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{self.name}: x must be a uint8 array [N, C, H, W], got "
                             f"{getattr(x, 'dtype', type(x))} with shape {getattr(x, 'shape', None)}")
        y = np.asarray(y)
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
            raise ValueError(f"{self.name}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise ValueError(f"{self.name}: {len(x)} images but {len(y)} labels")
        classes = tuple(str(c) for c in self.classes)
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"{self.name}: labels must lie in [0, {len(classes)}), "
                             f"got [{y.min()}, {y.max()}]")
        # Frozen dataclass: normalise fields through object.__setattr__.
        object.__setattr__(self, "y", y.astype(np.int64, copy=False))
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (f"ArrayDataset(name={self.name!r}, n={len(self)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, source={self.source!r})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, idx: np.ndarray | Sequence[int]) -> ArrayDataset:
        """The images at ``idx`` (integer indices, in that order; or a boolean mask), as a copy."""
        idx = np.asarray(idx)
        if idx.dtype != np.bool_:
            # An empty list becomes float64 in numpy; indices must be integers.
            idx = idx.astype(np.int64, copy=False) if idx.size == 0 else idx
            if not np.issubdtype(idx.dtype, np.integer):
                raise TypeError(f"subset indices must be integers or a boolean mask, got {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"subset indices must be 1-D, got shape {idx.shape}")
        return ArrayDataset(self.name, self.x[idx], self.y[idx], self.classes, self.source)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float32 [N, C, H, W] in [0, 1] and labels as int64 [N]; both fresh copies."""
        # torch.tensor copies (unlike from_numpy), so in-place edits never reach the dataset, and
        # it accepts read-only arrays without a warning.
        x = torch.tensor(self.x, dtype=torch.float32).div_(255.0)
        y = torch.tensor(self.y, dtype=torch.int64)
        return x, y
