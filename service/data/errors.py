"""The error raised when a dataset's files are nowhere to be found."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says which files to put where.

    Subclassing FileNotFoundError lets callers that only care about "missing file" catch it
    without importing this module.

    >>> issubclass(DatasetNotFoundError, FileNotFoundError)
    True
    """
