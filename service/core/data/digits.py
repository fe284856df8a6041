"""scikit-learn's bundled 8x8 digits: the dataset that works offline on any machine."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from service.core.data.catalog import DIGIT_CLASSES
from service.core.data.dataset import ArrayDataset


def load_sklearn_digits() -> ArrayDataset:
    """All 1,797 images as uint8 [N, 1, 8, 8]; there is no official test split.

    >>> ds = load_sklearn_digits()
    >>> ds.x.shape, int(ds.x.max())
    ((1797, 1, 8, 8), 255)
    """
    bunch = load_digits()
    # Values are counts 0..16 (4x4 pixel blocks); rescale so 16 maps to 255, like any 8-bit image.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return ArrayDataset("digits", x, y, DIGIT_CLASSES, source="sklearn load_digits")
