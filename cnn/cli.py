"""What every command line of the library shares: flag validation, output checks, exit policy.

A user's mistake should cost one line and no time: every flag is checked by its
argparse ``type`` while parsing, before any data is loaded or a process started, and
the error names the flag (``--lr: must be a finite number > 0, got inf``); output
paths (``--save-metrics``, ``--save-weights``, ``--checkpoint-dir``) are checked
before training, with the path as the user typed it. A :class:`~cnn.errors.CnnError`
that still reaches a CLI (a dataset missing, a checkpoint of another run, divergence)
prints its message and exits with status 2, without a traceback (:func:`run`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from cnn.errors import CnnError, UsageError

__all__ = ["ArgumentParser", "check_outputs", "flag", "int_at_least", "is_weights_file",
           "number", "parse", "run", "values_equal"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ... (see --help)``), exit status 2.

    ``quiet=True`` prints neither errors nor help but exits the same way: for the MPI
    ranks other than 0, so a user reads one copy, not one per rank.
    """

    def __init__(self, *args: Any, quiet: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def error(self, message: str) -> NoReturn:
        self.exit(2, None if self.quiet else f"{self.prog}: error: {message} (see --help)\n")

    def print_help(self, file: Any = None) -> None:
        if not self.quiet:
            super().print_help(file)


def flag(dest: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + dest.replace("_", "-")


def values_equal(a: Any, b: Any) -> bool:
    """``a == b``, except that NaN equals NaN (a flag given as nan on two ranks is the same)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# --- argparse types --------------------------------------------------------------------

def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval (``lo_open``/``hi_open``: excluded)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    want = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if lo is not None and hi is not None:
        want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = want
    return parse


# --- output paths ----------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_dir(directory: Path, what: str) -> None:
    """Raise UsageError unless files can be created in ``directory`` (or in the nearest
    existing ancestor, where the missing folders would be made)."""
    base = _nearest_existing(directory)
    if not base.is_dir():
        raise UsageError(f"{what}: {base} is not a directory")
    try:  # the only reliable test (read-only mounts, /proc, ACLs, root): try it
        fd, probe = tempfile.mkstemp(prefix=".cnn-write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{what}: cannot create files in {base} ({exc.strerror})") from None


def is_weights_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is an ``.npz`` of weights as :meth:`cnn.network.Network.save` writes
    them (every entry a ``<layer>.weight`` / ``<layer>.bias`` array): safe to replace."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    for name in names:
        stem, dot, ext = name.rpartition(".")
        layer, _, kind = stem.partition(".")
        if ext != "npy" or not layer.isdigit() or kind not in ("weight", "bias"):
            return False
    return bool(names)


def check_output_file(path: str | os.PathLike, flag_name: str) -> Path:
    """Refuse an output file that cannot be written: a directory, a parent that is a file,
    a folder where files cannot be created. Returns the path."""
    p = Path(path)
    what = f"{flag_name} {path}"
    if str(path) == "" or p.name in ("", ".", ".."):
        raise UsageError(f"{what}: give a file name")
    if p.is_dir():
        raise UsageError(f"{what} is a directory; give a file name")
    if p.exists() and not p.is_file():
        raise UsageError(f"{what} exists and is not a regular file")
    _writable_dir(p.parent, what)
    return p


def check_outputs(args: argparse.Namespace) -> None:
    """Check ``--save-metrics``, ``--save-weights``, ``--checkpoint-dir`` and ``--resume``
    (those the namespace has) before any work; raise :class:`UsageError` naming the flag."""
    metrics = getattr(args, "save_metrics", None)
    weights = getattr(args, "save_weights", None)
    ckpt = getattr(args, "checkpoint_dir", None)
    if metrics:
        check_output_file(metrics, "--save-metrics")
    if weights:
        check_output_file(weights, "--save-weights")
        if metrics and Path(metrics).resolve() == Path(weights).resolve():
            raise UsageError(f"--save-weights {weights} is the --save-metrics file too; give "
                             f"them different paths")
        if Path(weights).exists() and not is_weights_file(weights):
            raise UsageError(f"--save-weights {weights} exists and is not a weights .npz "
                             f"written by cnn; refusing to overwrite it (move it or give "
                             f"another path)")
    if ckpt:
        d = Path(ckpt)
        if d.exists() and not d.is_dir():
            raise UsageError(f"--checkpoint-dir {ckpt} is a file, not a directory")
        _writable_dir(d, f"--checkpoint-dir {ckpt}")
    if getattr(args, "resume", False) and not ckpt:
        raise UsageError("--resume needs --checkpoint-dir (where the checkpoint is)")


def parse(parser: argparse.ArgumentParser, argv: Iterable[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` plus :func:`check_outputs`; a problem is a parser error
    (one line, exit status 2)."""
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        check_outputs(args)
    except UsageError as exc:
        parser.error(str(exc))
    return args


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Call a CLI's ``main``; a :class:`CnnError` prints ``error: <message>`` on stderr and
    gives exit status 2 (no traceback: the message says what is wrong and what to do);
    Ctrl-C, once ``main`` has cleaned up, prints ``interrupted`` and gives 130."""
    try:
        main(argv)
    except CnnError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
