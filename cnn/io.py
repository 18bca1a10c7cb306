"""Atomic file writes: a crash or a full disk never leaves half a result behind."""

from __future__ import annotations

import os
import pickle
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np


def current_umask() -> int:
    """The process umask (read without a window in which it is changed, where Linux allows)."""
    with suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The mode the written file gets: the replaced file's, else what ``open`` would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place on success.

    The data is fsynced before the rename, so a kill or a power cut leaves either the
    old file or the new one. The new file keeps the mode of the file it replaces, or
    gets the umask's default (0644 under umask 022) rather than mkstemp's 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the caller asked for, not the temporary one
        raise _naming(exc, path) from exc
    try:
        with os.fdopen(fd, mode) as fh:
            os.fchmod(fh.fileno(), _final_mode(path))
            yield fh
            try:
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as exc:  # a full disk shows here
                raise _naming(exc, path) from exc
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _naming(exc, path) from exc
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _naming(exc: OSError, path: Path) -> OSError:
    """The same kind of OSError, about ``path``."""
    return type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}", str(path))


def save_pickle(obj: Any, path: str | os.PathLike) -> Path:
    """Pickle ``obj`` (a results DataFrame) atomically."""
    with atomic_write(path) as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return Path(path)


def save_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Save named arrays as an uncompressed ``.npz`` atomically."""
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)
    return Path(path)
