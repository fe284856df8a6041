"""Atomic writes: the content is replaced in one rename and the mode follows the umask."""

import os
import stat

import pytest

from service.core.atomic import atomic_write_bytes, atomic_write_text, atomic_writer


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one is restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_0666_minus_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = atomic_write_text(tmp_path / "reports" / "report.md", "# report\n")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_text() == "# report\n"


def test_a_replaced_file_takes_the_umask_not_its_old_mode(tmp_path, umask):
    path = tmp_path / "results.json"
    path.write_text("old")
    path.chmod(0o600)
    umask(0o022)
    atomic_write_bytes(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == b"new"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write(b"half")
        raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
