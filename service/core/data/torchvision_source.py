"""Read (or download) datasets in torchvision's own on-disk layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.core.data.catalog import DatasetSpec
from service.core.data.dataset import ArrayDataset


def torchvision_present(spec: DatasetSpec, root: Path) -> bool:
    """Whether every file torchvision needs for this dataset is under ``root``."""
    return bool(spec.torchvision_files) and all((root / f).is_file() for f in spec.torchvision_files)


def read_torchvision(spec: DatasetSpec, root: Path, *, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) via torchvision.datasets, downloading into ``root`` when asked.

    CIFAR files are Python pickles; torchvision md5-checks them against the official archive's
    checksums before unpickling, which is why we let it read them rather than unpickle ourselves.
    """
    import torchvision.datasets as tvd  # deferred: importing torchvision costs ~1 s, unused on cache hits

    source = f"torchvision {spec.name} under {root}"
    if spec.name == "mnist":
        parts = [tvd.MNIST(root, train=train, download=download) for train in (True, False)]
        arrays = [(ds.data.numpy()[:, None], ds.targets.numpy()) for ds in parts]  # [N,28,28] -> NCHW
        classes = spec.classes
    elif spec.name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if spec.name == "cifar10" else tvd.CIFAR100
        parts = [cls(root, train=train, download=download) for train in (True, False)]
        arrays = [(ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)) for ds in parts]  # NHWC -> NCHW
        classes = spec.classes or tuple(parts[0].classes)
    elif spec.name == "svhn":
        # SVHN's "extra" split (531k images) is left out: train/test match the other datasets' roles.
        parts = [tvd.SVHN(root, split=split, download=download) for split in ("train", "test")]
        arrays = [(ds.data, ds.labels) for ds in parts]  # already NCHW; label 10 is remapped to 0
        classes = spec.classes
    else:
        raise ValueError(f"torchvision has no loader wired for {spec.name!r}")
    train, test = (
        ArrayDataset(spec.name, np.ascontiguousarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64),
                     classes, source=source)
        for x, y in arrays
    )
    return train, test
