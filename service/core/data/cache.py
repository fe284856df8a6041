"""Decode once: keep decoded (train, test) arrays as an .npz keyed by the source's identity.

The key is a hash of the source files' names, sizes and modification times, so replacing a
source file invalidates its cache entry without anyone having to clear the cache by hand.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from service.core.atomic import atomic_writer
from service.core.data.dataset import ArrayDataset

log = logging.getLogger(__name__)

# Bump when the stored layout or the decoding changes, so old entries are ignored, not misread.
CACHE_FORMAT = 1


def source_fingerprint(paths: Iterable[Path], *extra: str) -> str:
    """A short hash of each path's name, size and mtime (plus ``extra`` strings).

    >>> len(source_fingerprint([], "x"))
    12
    """
    digest = hashlib.sha256(f"format={CACHE_FORMAT}".encode())
    for text in extra:
        digest.update(f"|{text}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def cache_file(cache_dir: Path, name: str, kind: str, fingerprint: str) -> Path:
    return cache_dir / "datasets" / f"{name}-{kind}-{fingerprint}.npz"


def save_pair(path: Path, train: ArrayDataset, test: ArrayDataset) -> None:
    """Write atomically (`service/core/atomic.py`): a crash or a concurrent reader never sees half a file.

    A cache that cannot be written is not an error: the caller already holds the arrays.
    """
    try:
        with atomic_writer(path) as handle:  # a file object stops np.savez from appending ".npz"
            np.savez(handle, x_train=train.x, y_train=train.y, x_test=test.x, y_test=test.y,
                     classes=np.array(train.classes, dtype=str), source=np.array(train.source, dtype=str))
    except OSError as err:
        log.warning("cannot write dataset cache %s: %s", path, err)


def load_pair(path: Path, name: str) -> tuple[ArrayDataset, ArrayDataset] | None:
    """The cached (train, test), or None when absent or unreadable (the caller then re-decodes)."""
    if not path.is_file():
        return None
    try:
        # allow_pickle=False: only plain arrays are stored, so a tampered file cannot run code.
        with np.load(path, allow_pickle=False) as npz:
            classes = tuple(str(c) for c in npz["classes"])
            source = str(npz["source"].item())
            train = ArrayDataset(name, npz["x_train"], npz["y_train"], classes, source)
            test = ArrayDataset(name, npz["x_test"], npz["y_test"], classes, source)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable dataset cache %s: %s", path, err)
        return None
    return train, test
