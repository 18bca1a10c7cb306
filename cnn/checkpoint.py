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
checkpoint in place and loadable (and a temporary file, which the next save removes).

>>> save("ckpt.npz", {"w": np.zeros(3)}, {"step": 10})          # doctest: +SKIP
>>> arrays, meta = load("ckpt.npz")                             # doctest: +SKIP

Stopping on a signal (a batch system's warning before a time limit or a preemption):
:class:`StopFlag` turns SIGTERM, SIGINT and SIGUSR1 into a flag the training loops read
between steps; they write one checkpoint, raise :class:`Stopped`, and the CLIs exit
with :data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``: "checkpointed, run me again with
--resume"). A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import threading
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import numpy as np

from cnn.cli import flag, values_equal
from cnn.errors import CheckpointError
from cnn.io import atomic_write

FORMAT = "cnn-checkpoint"
#: Bumped when the layout changes; a newer file is refused with a message, never misread.
FORMAT_VERSION = 1
META_KEY = "__meta__"

#: Exit status of a run that stopped on a signal after writing its checkpoint: run the same
#: command again with ``--resume`` (``scripts/slurm_mpi.sbatch`` requeues the job on it).
EXIT_REQUEUE = 75
#: The signals that ask a run to checkpoint and stop.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

__all__ = ["EXIT_REQUEUE", "FORMAT", "FORMAT_VERSION", "META_KEY", "STOP_SIGNALS", "Hooks",
           "StopFlag", "Stopped", "changed_flags", "exit_stopped", "jsonable", "load",
           "refuse_changes", "require_resumable", "save", "versions"]


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
    # a writer killed mid-write (SIGKILL, power cut) left its temporary file; the checkpoint
    # has one writer, so any other is stale
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        stale.unlink(missing_ok=True)
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



# --- comparing a checkpoint's run with the one resuming it -----------------------------

def changed_flags(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between a checkpoint's ``saved`` flags and ``now``
    (present in one only counts as different); NaN equals NaN."""
    now = jsonable(dict(now))
    return [k for k in sorted(set(saved) | set(now))
            if k not in saved or k not in now or not values_equal(saved[k], now[k])]


def refuse_changes(path: str | os.PathLike, saved: Mapping[str, Any],
                   now: Mapping[str, Any], first: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointError` naming every flag (``--model was 'seed_cnn', now
    'lenet5'``) that differs between the run that wrote ``path`` and this one; the flags in
    ``first`` are named first (the ones that matter most: model, dataset, strategy)."""
    diff = changed_flags(saved, now)
    if not diff:
        return
    now = jsonable(dict(now))
    diff.sort(key=lambda k: (k not in first, first.index(k) if k in first else 0, k))
    parts = [f"{flag(k)} was {saved.get(k, 'not set')!r}, now {now.get(k, 'not set')!r}"
             for k in diff]
    raise CheckpointError(f"--resume: the checkpoint {path} was written by a different run: "
                          f"{'; '.join(parts)}. Resume with the same flags, or start a new run "
                          f"in another --checkpoint-dir")


# --- stopping on a signal --------------------------------------------------------------

class Stopped(Exception):  # noqa: N818 - a request carried out, not an error
    """A run stopped on request (a signal) after writing its checkpoint at ``step``
    (``done``: how far it got, when steps are not the unit, e.g. ``"3 of 5 folds"``).

    Not a :class:`~cnn.errors.CnnError`: nothing went wrong. CLIs exit with
    :data:`EXIT_REQUEUE`.
    """

    def __init__(self, step: int, path: str | os.PathLike | None, signum: int | None = None,
                 done: str | None = None):
        self.step, self.path, self.signum = int(step), path, signum
        name = signal.Signals(signum).name if signum else "a stop request"
        where = f"checkpoint {path}" if path else "no checkpoint yet"
        super().__init__(f"stopped on {name} after {done or f'step {step}'}; {where}; run the "
                         f"same command with --resume to continue (exit status "
                         f"{EXIT_REQUEUE})")


def require_resumable(directory: str | os.PathLike, pattern: str) -> None:
    """``--resume`` needs something to resume: raise :class:`CheckpointError` unless a file
    matching ``pattern`` is in ``directory`` (a mistyped --checkpoint-dir must not start
    over silently)."""
    if not any(Path(directory).glob(pattern)):
        raise CheckpointError(f"--resume: no checkpoint in {directory} (looked for "
                              f"{Path(directory) / pattern}); drop --resume to start a new "
                              f"run there")


def exit_stopped(exc: Stopped) -> NoReturn:
    """What a CLI does with :class:`Stopped`: say where the run is, exit with
    :data:`EXIT_REQUEUE` (a ``SystemExit``, which :func:`cnn.cli.run` lets through)."""
    sys.stdout.flush()
    print(exc, file=sys.stderr, flush=True)
    raise SystemExit(EXIT_REQUEUE) from None


class StopFlag:
    """SIGTERM, SIGINT and SIGUSR1 set a flag instead of killing the process.

    ``with StopFlag() as stop: ...`` installs the handlers (main thread only; elsewhere it
    is an inert flag) and restores the previous ones on exit. ``stop.signum`` is the first
    signal received (0: none). A second SIGINT raises ``KeyboardInterrupt`` at once, so
    Ctrl-C twice still interrupts a run that is stuck.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def request(self, signum: int) -> None:
        """What the handler does (also for tests and for a stop decided by the program)."""
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = int(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


# --- what cnn.train.fit plugs in beyond one process ------------------------------------

@dataclass
class Hooks:
    """How :func:`cnn.train.fit` checkpoints when it is one of several processes.

    ``write``: this process writes the file (MPI: rank 0 only; every rank still calls
    ``state``, which may be collective). ``read``: loads ``(arrays, meta)`` of a path (MPI:
    rank 0 reads and broadcasts). ``state``: more arrays and metadata to save (every rank's
    optimiser state, a strategy's counters); ``restore`` puts them back after the weights
    and rank 0's optimiser state were loaded. ``stop(global_step)``, after every step:
    True writes a checkpoint there and raises :class:`Stopped` (collective on MPI: every
    rank must agree on the step). ``signum``: the signal behind a stop, for the message.
    """

    write: bool = True
    read: Callable[[Path], tuple[dict[str, np.ndarray], dict[str, Any]]] = load
    state: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]] | None = None
    restore: Callable[[dict[str, np.ndarray], dict[str, Any]], None] | None = None
    stop: Callable[[int], bool] | None = None
    signum: Callable[[], int] | None = None
