"""The error raised when a dataset's files are nowhere to be found."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says which files to put where.

    Subclassing FileNotFoundError lets callers that only care about "missing file" catch it
    without importing this module.

    The parts of the message are kept too, so a front end (the CLI) can say the same in its own
    terms: ``searched`` holds (label, directory) pairs in search order, ``explicit`` is True when a
    data directory was given (then the only one searched), ``remedies`` the files to put where.

    >>> issubclass(DatasetNotFoundError, FileNotFoundError)
    True
    >>> DatasetNotFoundError("not here", dataset="mnist").dataset
    'mnist'
    """

    def __init__(self, message: str, *, dataset: str = "", searched: Sequence[tuple[str, Path]] = (),
                 explicit: bool = False, remedies: Sequence[str] = ()):
        super().__init__(message)
        self.dataset = dataset
        self.searched = list(searched)
        self.explicit = explicit
        self.remedies = list(remedies)
