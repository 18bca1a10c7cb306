"""Exceptions a user of the study can catch by kind; every message says what to do."""


class CnnError(Exception):
    """Base class of every error this package raises on purpose."""


class ShapeError(CnnError, ValueError):
    """An array or a layer stack does not have the shape it needs."""


class DataError(CnnError, OSError):
    """A dataset is missing, truncated, corrupt or not the file we pinned."""


class DivergenceError(CnnError, FloatingPointError):
    """Training produced a NaN or infinite loss.

    ``frame`` holds the rows of the epochs that completed before it (or None), so a CLI
    can still save them with ``--save-metrics``.
    """

    frame = None


class BackendUnavailable(CnnError, RuntimeError):
    """A backend was asked for that does not exist or cannot run here."""


class UsageError(CnnError, ValueError):
    """A flag, an output path or a resumed run that cannot work; the CLIs exit with status 2."""


class CheckpointError(CnnError, ValueError):
    """A checkpoint is missing, unreadable, of another format or of another run."""
