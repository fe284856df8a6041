"""load_dataset: find a dataset's files, decode them once, and serve later loads from the cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.core.data.cache import cache_file, load_pair, save_pair, source_fingerprint
from service.core.data.catalog import DATASETS, SPECS, DatasetSpec
from service.core.data.dataset import ArrayDataset
from service.core.data.digits import load_sklearn_digits
from service.core.data.errors import DatasetNotFoundError
from service.core.data.image_folder import SPLITS, folder_candidates, read_image_folder
from service.core.data.locations import DATA_ENV, candidate_data_dirs, default_cache_dir, labelled_data_dirs
from service.core.data.torchvision_source import read_torchvision, torchvision_present

log = logging.getLogger(__name__)

Pair = tuple[ArrayDataset, ArrayDataset]


@dataclass(frozen=True)
class _Source:
    """One place a dataset was found: how to name its cache entry and how to decode it."""

    kind: str  # "tar", "dir" or "torchvision"; part of the cache file name
    path: Path
    fingerprint: str
    read: Callable[[], Pair]


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False,
                 cache_dir: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset | None]:
    """(train, test) for ``name``, one of DATASETS; ``digits`` has no test split and returns (all, None).

    Sources tried per data directory: the image-folder tree (``<stem>.tar.gz`` or ``<stem>/``), then
    torchvision's layout. A given ``data_dir`` is the only directory searched; ``data_dir=None``
    searches $DSCGUARD_DATA_DIR, ./data, ../shared/data, <repo>/../shared/data and the download
    cache. The first decode is cached under ``cache_dir`` (default: default_cache_dir()).

    >>> train, test = load_dataset("digits")
    >>> train.x.shape, test is None
    ((1797, 1, 8, 8), True)
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = SPECS[key]
    if key == "digits":
        return load_sklearn_digits(), None

    places = [("data_dir", Path(data_dir))] if data_dir is not None else default_search_places()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for _, directory in places:
        if directory.is_dir():
            for source in _sources(spec, directory):
                return _load_via_cache(spec, source, cache_root)

    if download and spec.torchvision_files:
        # Never download into ../shared/data (read-only): use the given directory or the user's cache.
        root = Path(data_dir) if data_dir is not None else default_cache_dir() / "downloads"
        pair = _checked(spec, read_torchvision(spec, root, download=True), root)
        fingerprint = _torchvision_fingerprint(spec, root)
        save_pair(cache_file(cache_root, spec.name, "torchvision", fingerprint), *pair)
        return pair
    # Without an explicit data_dir, suggest $DSCGUARD_DATA_DIR or ./data: the directory found may
    # be the read-only ../shared/data.
    target = candidate_data_dirs()[0] if data_dir is None else Path(data_dir)
    remedies = _remedies(spec, target)
    raise DatasetNotFoundError(_not_found_message(spec, places, remedies, data_dir is None), dataset=spec.name,
                               searched=places, explicit=data_dir is not None, remedies=remedies)


def default_search_places() -> list[tuple[str, Path]]:
    """(label, directory) of every place searched when no data_dir is given, in order, existing or not.

    Every candidate (not only the first existing one), so an unrelated ./data does not hide
    ../shared/data; plus where download=True puts files when no data_dir is given.
    """
    return [*labelled_data_dirs(), ("the download cache", default_cache_dir() / "downloads")]


def _sources(spec: DatasetSpec, directory: Path) -> list[_Source]:
    found = []
    for path in folder_candidates(spec, directory):
        if path.is_file():
            found.append(_Source("tar", path, source_fingerprint([path]),
                                 lambda p=path: read_image_folder(p, spec)))
        elif all((path / split).is_dir() for split in SPLITS):
            # A directory's own size says nothing; the class folders' mtimes change when files come or go.
            folders = sorted(p for split in SPLITS for p in (path / split).iterdir() if p.is_dir())
            found.append(_Source("dir", path, source_fingerprint(folders, str(path.resolve())),
                                 lambda p=path: read_image_folder(p, spec)))
    if torchvision_present(spec, directory):
        found.append(_Source("torchvision", directory, _torchvision_fingerprint(spec, directory),
                             lambda: read_torchvision(spec, directory, download=False)))
    return found


def _torchvision_fingerprint(spec: DatasetSpec, root: Path) -> str:
    return source_fingerprint([root / f for f in spec.torchvision_files])


def _load_via_cache(spec: DatasetSpec, source: _Source, cache_root: Path) -> Pair:
    path = cache_file(cache_root, spec.name, source.kind, source.fingerprint)
    cached = load_pair(path, spec.name)
    if cached is not None:
        log.debug("loaded %s from cache %s", spec.name, path)
        return _checked(spec, cached, path)
    log.info("decoding %s from %s (first load; cached afterwards at %s)", spec.name, source.path, path)
    pair = _checked(spec, source.read(), source.path)
    save_pair(path, *pair)
    return pair


def _checked(spec: DatasetSpec, pair: Pair, origin: Path) -> Pair:
    """Reject sources that decode to the wrong dataset rather than fail deep inside a model."""
    for part in pair:
        if part.input_shape != spec.input_shape:
            raise ValueError(f"{origin}: {spec.name} images have shape {part.input_shape}, "
                             f"expected {spec.input_shape}")
        if spec.classes is not None and part.classes != spec.classes:
            raise ValueError(f"{origin}: {spec.name} classes {part.classes} differ from {spec.classes}")
    return pair


def _describe_torchvision_files(spec: DatasetSpec) -> str:
    folders = {PurePosixPath(f).parent for f in spec.torchvision_files}
    if len(folders) == 1 and folders != {PurePosixPath(".")}:
        names = ", ".join(PurePosixPath(f).name for f in spec.torchvision_files)
        return f"{folders.pop()}/ (with {names})"
    return " and ".join(spec.torchvision_files)


def _remedies(spec: DatasetSpec, target: Path) -> list[str]:
    """Which files to put where (``target``) for ``spec`` to be found."""
    remedies = []
    if spec.archive:
        ext = spec.image_ext
        remedies.append(f"put {spec.archive} in {target} (or its extracted tree {target / spec.folder_stem}/"
                        f" with train/<class>/*{ext} and test/<class>/*{ext})")
    remedies.append(f"put torchvision's {_describe_torchvision_files(spec)} under {target}")
    return remedies


def _not_found_message(spec: DatasetSpec, places: list[tuple[str, Path]], remedies: list[str],
                       defaulted: bool) -> str:
    listed = ", ".join(f"{d}{'' if d.is_dir() else ' (missing)'}" for _, d in places)
    options = [*remedies, "pass download=True where the network allows"]
    if defaulted:
        options.append(f"point ${DATA_ENV} at a directory holding these files")
    return f"dataset {spec.name!r} not found; searched: {listed}. To fix: " + "; or ".join(options) + "."
