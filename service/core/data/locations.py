"""Where datasets are looked for and where decoded arrays are cached."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DSCGUARD_CACHE_DIR"
DATA_ENV = "DSCGUARD_DATA_DIR"

# service/core/data/locations.py -> parents[3] is the repository root.
_REPO_ROOT = Path(__file__).resolve().parents[3]


def cache_dir_path() -> Path:
    """$DSCGUARD_CACHE_DIR, else ~/.cache/dscguard, without creating it."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dscguard"


def default_cache_dir() -> Path:
    """$DSCGUARD_CACHE_DIR, else ~/.cache/dscguard; created on demand.

    >>> default_cache_dir().is_dir()
    True
    """
    path = cache_dir_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def labelled_data_dirs() -> list[tuple[str, Path]]:
    """Every place a data directory may be, in the order they are tried (existing or not), each with
    the name it is known by: $DSCGUARD_DATA_DIR (when set), ./data and ../shared/data (relative to
    the working directory), then the checkout's own ../shared/data."""
    candidates = []
    env = os.environ.get(DATA_ENV)
    if env:
        candidates.append((f"${DATA_ENV}", Path(env).expanduser()))
    candidates += [("./data", Path("data")), ("../shared/data", Path("..") / "shared" / "data"),
                   ("the checkout's ../shared/data", _REPO_ROOT.parent / "shared" / "data")]
    # The same directory may be reached twice (CWD is the repo root); keep the first mention.
    unique: dict[Path, str] = {}
    for label, path in candidates:
        unique.setdefault(path.resolve(), label)
    return [(label, path) for path, label in unique.items()]


def candidate_data_dirs() -> list[Path]:
    """Every place a data directory may be, in the order they are tried (existing or not)."""
    return [path for _, path in labelled_data_dirs()]


def find_data_dir() -> Path | None:
    """The first existing of $DSCGUARD_DATA_DIR, ./data, ../shared/data and <repo>/../shared/data.

    Relative candidates are resolved against the current working directory. None if none exists.
    """
    return next((path for path in candidate_data_dirs() if path.is_dir()), None)
