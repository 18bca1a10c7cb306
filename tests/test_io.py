"""cnn.io.atomic_write: all or nothing, and the file mode a user expects."""

import os
import stat

import pytest

from cnn.io import atomic_write


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_default(tmp_path, umask, mask, want):
    """Before: every file came out 0600 (mkstemp's mode)."""
    umask(mask)
    with atomic_write(tmp_path / "new.txt", "w") as fh:
        fh.write("x")
    assert _mode(tmp_path / "new.txt") == want
    with open(tmp_path / "plain.txt", "w") as fh:  # the reference: what open() gives
        fh.write("x")
    assert _mode(tmp_path / "plain.txt") == want


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o755, 0o600])
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, mode):
    umask(0o077)
    path = tmp_path / "old.txt"
    path.write_text("old")
    os.chmod(path, mode)
    with atomic_write(path, "w") as fh:
        fh.write("new")
    assert path.read_text() == "new" and _mode(path) == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as fh:
        fh.write("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_errors_name_the_requested_file_not_the_temporary_one(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "m.pkl"
    with pytest.raises(OSError, match=f"cannot write {target}") as err, \
            atomic_write(target) as fh:
        fh.write(b"x")
    assert ".tmp" not in str(err.value)
