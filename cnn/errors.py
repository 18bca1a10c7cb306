"""Exceptions a user of the study can catch by kind; every message says what to do."""


class CnnError(Exception):
    """Base class of every error this package raises on purpose."""


class ShapeError(CnnError, ValueError):
    """An array or a layer stack does not have the shape it needs."""


class DataError(CnnError, OSError):
    """A dataset is missing, truncated, corrupt or not the file we pinned."""


class DivergenceError(CnnError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


class BackendUnavailable(CnnError, RuntimeError):
    """A backend was asked for that does not exist or cannot run here."""
