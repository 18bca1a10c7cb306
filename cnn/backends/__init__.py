"""Backend registry: one module per backend, all with the same kernel names and signatures."""

from __future__ import annotations

import importlib
from types import ModuleType

from cnn.backends import contract
from cnn.errors import BackendUnavailable

#: name -> module path. The NumPy backend is the reference the others are checked against.
BACKENDS: dict[str, str] = {
    "numpy": "cnn.backends.numpy_seq",
    "numba": "cnn.backends.numba_cpu",
    "cuda": "cnn.backends.numba_cuda",
}


def get_backend(name: str | ModuleType) -> ModuleType:
    """The backend module for ``name``; a clear error if it is unknown or cannot run here."""
    if isinstance(name, ModuleType):
        return name
    if name not in BACKENDS:
        raise BackendUnavailable(
            f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == BACKENDS[name]:
            raise BackendUnavailable(f"backend {name!r} is not part of this build yet") from exc
        raise BackendUnavailable(
            f"backend {name!r} needs the package {exc.name!r}: pip install -e '.[{name}]' "
            f"or see README") from exc
    contract.check(module)  # every kernel of cnn/backends/contract.py, with its signature
    check = getattr(module, "check_available", None)
    if check is not None:
        check()  # raises BackendUnavailable with the reason (no GPU, no compiler cache, ...)
    return module


def available_backends() -> dict[str, str]:
    """``{name: "ok" | reason}`` for every registered backend, without raising."""
    status = {}
    for name in BACKENDS:
        try:
            get_backend(name)
            status[name] = "ok"
        except BackendUnavailable as exc:
            status[name] = str(exc)
    return status
