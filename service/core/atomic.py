"""Write files atomically and durably: to a temporary sibling, fsync, rename, fsync the directory.

Readers never see half a file, a failed write leaves the old file as it was, and once the call
returns the new content survives a power cut (the rename is on disk, not only in the page cache).

Permissions follow the umask, as for a file opened with `open(path, "w")`: the result is
`0o666 & ~umask` (0644 under the usual umask 022, 0600 under 077), whether `path` is new or
replaced; a replaced file's own mode is not carried over. Write secrets under a umask of 077.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: str | Path) -> None:
    """Flush a file's, or a directory's entries', data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_sibling(path: Path) -> tuple[int, Path]:
    """A new, empty, hidden file next to `path`, opened for writing.

    Not tempfile.mkstemp: it creates files 0600 whatever the umask. Created with mode 0666 here,
    the kernel applies the umask itself (no process-wide umask read-and-restore, which races
    with other threads).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` in one rename when the block ends without error (the parent
    directory is created if needed); on an error the temporary file is removed and `path` is untouched.

    The file gets `0o666 & ~umask`, like any newly created file (see the module docstring).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d, atomic_writer(Path(d) / "a.bin") as fh:
    ...     fh.write(b"abc")
    3
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_sibling(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` in one rename."""
    with atomic_writer(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
