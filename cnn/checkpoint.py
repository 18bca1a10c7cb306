"""Checkpoints that cannot run code: named arrays plus JSON metadata in one ``.npz`` file.

A checkpoint is an uncompressed ``.npz`` (NumPy's zip of ``.npy`` files) holding the
caller's arrays (weights, optimiser state, step times, ...) and one extra ``uint8``
array, ``__meta__``, with the UTF-8 JSON metadata (the run's arguments, versions,
global step, samples seen, data-order position, history rows, format version).

Why this format: a pickle runs code on load, so a checkpoint found on a shared disk or
received from someone else could do anything; ``np.load(..., allow_pickle=False)`` and
``json.loads`` only ever build arrays, numbers, strings, lists and dicts. A file that
holds pickled data (an old ``checkpoint.pkl``, a crafted one) is refused, never opened
with pickle.

Writes go through :func:`cnn.io.atomic_write` (temporary file, fsync, rename, fsync of
the directory): a process killed in the middle of a write leaves the previous
checkpoint in place and loadable.

>>> save("ckpt.npz", {"w": np.zeros(3)}, {"step": 10})          # doctest: +SKIP
>>> arrays, meta = load("ckpt.npz")                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnn.errors import CheckpointError
from cnn.io import atomic_write

FORMAT = "cnn-checkpoint"
#: Bumped when the layout changes; a newer file is refused with a message, never misread.
FORMAT_VERSION = 1
META_KEY = "__meta__"

__all__ = ["FORMAT", "FORMAT_VERSION", "META_KEY", "jsonable", "load", "save", "versions"]


def versions() -> dict[str, str]:
    """The library versions a checkpoint records (for the reader, not checked on load)."""
    import cnn

    return {"cnn": cnn.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def jsonable(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays, tuples and paths turned into JSON types.

    Floats stay floats (NaN and inf included: Python's json writes and reads them), so a
    results row survives the round trip with its column types.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"checkpoint metadata cannot hold {type(value).__name__} ({value!r})")


def save(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
         meta: Mapping[str, Any]) -> Path:
    """Write ``arrays`` and ``meta`` to ``path`` atomically; returns the path.

    Array names are free-form strings except ``__meta__``; object arrays are refused
    (they would need pickle to load).
    """
    if META_KEY in arrays:
        raise ValueError(f"{META_KEY!r} is reserved for the metadata")
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise TypeError(f"checkpoint array {name!r} has dtype object; it would need pickle")
        out[name] = a
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
           **jsonable(dict(meta))}
    blob = json.dumps(doc, allow_nan=True, separators=(",", ":")).encode("utf-8")
    out[META_KEY] = np.frombuffer(blob, dtype=np.uint8)
    with atomic_write(path) as fh:
        np.savez(fh, **out)
    return Path(path)


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of the checkpoint at ``path``; never unpickles anything.

    Raises :class:`CheckpointError`, naming the file and what is wrong with it, for a
    missing, truncated, corrupt, pickled, foreign or newer-format file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc}") from None
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path} holds pickled data, which is never loaded (unpickling can run code); "
            f"it is not a checkpoint written by this version of cnn")
    if head != b"PK\x03\x04":
        what = "empty" if not head else "not an .npz archive"
        raise CheckpointError(f"{path} is {what}: not a cnn checkpoint (truncated, or "
                              f"another kind of file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CheckpointError(f"{path} holds an object array, which is never loaded "
                                  f"(unpickling can run code)") from None
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read "
                              f"({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read "
                              f"({type(exc).__name__}: {exc})") from None
    blob = arrays.pop(META_KEY, None)
    if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
        raise CheckpointError(f"{path} is an .npz without cnn checkpoint metadata "
                              f"({META_KEY!r}); it was not written by cnn.checkpoint")
    try:
        meta = json.loads(blob.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the checkpoint metadata is corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this version of cnn reads format "
            f"{FORMAT_VERSION} and older: upgrade cnn to resume it")
    return arrays, meta

