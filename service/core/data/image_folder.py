"""Read image-folder trees (``<split>/<class>/<file>``) from a .tar.gz or an extracted directory.

Tarballs are read member by member with tarfile, never extracted, so member names cannot
write anywhere on disk. Decoding is single-threaded on purpose: for 32x32 images Pillow's
per-image Python overhead dominates, and a thread pool measured slower than a plain loop.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from service.core.data.catalog import DatasetSpec
from service.core.data.dataset import ArrayDataset

SPLITS = ("train", "test")
_PIL_FORMATS = {".png": ["PNG"], ".jpg": ["JPEG"], ".jpeg": ["JPEG"]}


def folder_candidates(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    """Where this dataset's image-folder tree may be under ``data_dir``: tarball first, then directory."""
    if spec.folder_stem is None:
        return []
    return [data_dir / f"{spec.folder_stem}.tar.gz", data_dir / spec.folder_stem]


def read_image_folder(path: Path, spec: DatasetSpec) -> tuple[ArrayDataset, ArrayDataset]:
    """Decode the whole tree at ``path`` (a .tar.gz or a directory) into (train, test).

    Files inside a class folder are not in the original order, so they are sorted by name:
    the result is deterministic, and the splits shuffle with a seed later anyway.
    """
    assert spec.classes is not None and spec.image_ext is not None, f"{spec.name} has no image-folder layout"
    members = _tar_members(path) if path.is_file() else _dir_members(path)
    found: dict[str, list[tuple[int, str, bytes]]] = {split: [] for split in SPLITS}
    for name, data in members:
        key = _classify(name, spec)
        if key is not None:
            split, label = key
            found[split].append((label, name, data))
    train, test = (_decode(path, spec, sorted(found[split])) for split in SPLITS)
    return train, test


def _classify(name: str, spec: DatasetSpec) -> tuple[str, int] | None:
    """(split, label) for an image member, None for anything else (CSV indexes, folders, dotfiles)."""
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if len(parts) == 4 and parts[1] in SPLITS:  # tolerate one top-level folder, e.g. mnist-png/train/...
        parts = parts[1:]
    if len(parts) != 3 or parts[0] not in SPLITS:
        return None
    split, class_name, file_name = parts
    if file_name.startswith(".") or not file_name.lower().endswith(spec.image_ext):
        return None
    if class_name not in spec.classes:
        raise ValueError(f"{name}: unknown class folder {class_name!r} for {spec.name}; "
                         f"expected one of {', '.join(spec.classes)}")
    return split, spec.classes.index(class_name)


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    # "r:*" auto-detects compression; iteration streams the archive once, front to back.
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isfile():
                handle = archive.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()


def _dir_members(root: Path) -> Iterator[tuple[str, bytes]]:
    for split in SPLITS:
        for file in sorted((root / split).glob("*/*")):
            if file.is_file():
                yield file.relative_to(root).as_posix(), file.read_bytes()


def _decode(path: Path, spec: DatasetSpec, items: list[tuple[int, str, bytes]]) -> ArrayDataset:
    if not items:
        raise ValueError(f"{path}: no {spec.image_ext} images found for a split of {spec.name} "
                         f"(expected train/<class>/*{spec.image_ext} and test/<class>/*{spec.image_ext})")
    channels, height, width = spec.input_shape
    x = np.empty((len(items), height, width, channels), dtype=np.uint8)
    formats = _PIL_FORMATS[spec.image_ext]
    for i, (_, name, data) in enumerate(items):
        try:
            with Image.open(io.BytesIO(data), formats=formats) as image:
                # Check the header before decoding: rejects wrong datasets and oversized images early.
                if image.size != (width, height):
                    raise ValueError(f"size {image.size}, expected {(width, height)}")
                pixels = np.asarray(image.convert(spec.image_mode))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot decode {name}: {err}") from err
        x[i] = pixels.reshape(height, width, channels)
    y = np.array([label for label, _, _ in items], dtype=np.int64)
    return ArrayDataset(spec.name, x.transpose(0, 3, 1, 2).copy(), y, spec.classes, source=path.name)
