"""Atomic file writes: a crash or a full disk never leaves half a result behind."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_pickle(obj: Any, path: str | os.PathLike) -> Path:
    """Pickle ``obj`` (a DataFrame, a checkpoint dict) atomically."""
    with atomic_write(path) as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return Path(path)


def save_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Save named arrays as an uncompressed ``.npz`` atomically."""
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)
    return Path(path)
