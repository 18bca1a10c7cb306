"""Machine and library facts recorded in every result row.

Everything here is cheap, side-effect free and never raises: a fact that cannot
be found is ``None`` (or missing from :func:`versions`), never an exception.
In particular nothing imports ``numba.cuda`` at module import, :func:`gpu_name`
returns ``None`` quickly on a machine without an NVIDIA driver, and the MPI
library version is read without initialising MPI in the calling process.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import shutil
import socket
import subprocess
import sys
import warnings
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent

# Signs that an NVIDIA driver is present; without any of them we do not even try CUDA.
_NVIDIA_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")


def host() -> str:
    """The machine's hostname (short form as the OS reports it)."""
    try:
        name = socket.gethostname()
    except OSError:
        name = ""
    return name or platform.node() or "unknown"


def cpu_model() -> str:
    """The CPU model string, e.g. ``"Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model name", "Hardware"):
                    value = value.strip()
                    if value:
                        return value
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_count() -> dict[str, int | None]:
    """Core counts: ``physical`` and ``logical`` (via psutil) and ``usable`` (CPU affinity)."""
    physical: int | None = None
    logical: int | None = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        logical = psutil.cpu_count(logical=True)
    except Exception:
        pass
    if logical is None:
        logical = os.cpu_count()
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    return {"physical": physical, "logical": logical, "usable": usable}


def _nvidia_driver_present() -> bool:
    return any(os.path.exists(p) for p in _NVIDIA_MARKERS) or shutil.which("nvidia-smi") is not None


def gpu_name() -> str | None:
    """Name of the current CUDA GPU, or ``None`` without a real one.

    ``None`` under the CUDA simulator (``NUMBA_ENABLE_CUDASIM``), without an NVIDIA
    driver (checked before importing anything), or when ``numba.cuda`` is missing
    or cannot talk to the device.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0"):
        return None
    if not _nvidia_driver_present():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from numba import cuda

            if not cuda.is_available():
                return None
            name = cuda.get_current_device().name
    except Exception:
        return None
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return str(name) or None


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    except Exception:
        return None


def _module_version(module: str, dist: str | None = None) -> str | None:
    """Version of an already-imported module, else of its installed distribution."""
    mod = sys.modules.get(module)
    version = getattr(mod, "__version__", None) if mod is not None else None
    return str(version) if version is not None else _dist_version(dist or module)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


_MPI_PROBE = (
    "import mpi4py; mpi4py.rc.initialize = False; mpi4py.rc.finalize = False\n"
    "from mpi4py import MPI; print(MPI.Get_library_version())"
)


def mpi_library_version() -> str | None:
    """First line of ``MPI.Get_library_version()``, e.g. ``"MPICH Version: 5.0.2"``.

    If this process has already imported ``mpi4py.MPI`` it is asked directly (the call
    is legal before ``MPI_Init``). Otherwise a short child process asks, so that merely
    recording run info never initialises MPI here.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is not None:
            return _first_line(mpi.Get_library_version())
        if _dist_version("mpi4py") is None:
            return None
        out = subprocess.run(
            [sys.executable, "-c", _MPI_PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=True,
        )
        line = _first_line(out.stdout)
        return " ".join(line.split()) or None
    except Exception:
        return None


def blas_info() -> list[dict[str, Any]]:
    """Loaded BLAS/OpenMP libraries per threadpoolctl: internal_api, version, num_threads."""
    try:
        import numpy  # noqa: F401  (loads the BLAS numpy links against)
        from threadpoolctl import threadpool_info

        return [
            {
                "user_api": lib.get("user_api"),
                "internal_api": lib.get("internal_api"),
                "version": lib.get("version"),
                "num_threads": lib.get("num_threads"),
            }
            for lib in threadpool_info()
        ]
    except Exception:
        return []


def versions() -> dict[str, Any]:
    """Versions of Python and the libraries that shape the timings.

    Keys: ``python``, ``numpy``, ``numba``, ``pandas``, ``scipy``, ``torch``,
    ``numba_cuda``, ``mpi4py``, ``mpi`` (the MPI library's own version line) and
    ``blas`` (list of threadpoolctl entries). A library that is not installed is
    left out. Torch is never imported just to read its version.
    """
    out: dict[str, Any] = {"python": platform.python_version()}
    for key, module, dist in (
        ("numpy", "numpy", "numpy"),
        ("numba", "numba", "numba"),
        ("pandas", "pandas", "pandas"),
        ("scipy", "scipy", "scipy"),
        ("torch", "torch", "torch"),
        ("numba_cuda", "numba_cuda", "numba-cuda"),
        ("mpi4py", "mpi4py", "mpi4py"),
    ):
        version = _module_version(module, dist)
        if version is not None:
            out[key] = version
    if "mpi4py" in out:
        mpi = mpi_library_version()
        if mpi is not None:
            out["mpi"] = mpi
    out["blas"] = blas_info()
    return out


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """Short commit hash of the checkout holding ``path`` (default: this package).

    ``"-dirty"`` is appended when tracked files differ from the commit. ``None``
    outside a git checkout or without git; never raises.
    """
    cwd = Path(path) if path is not None else _PACKAGE_DIR
    if not cwd.is_dir():
        cwd = cwd.parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            stdin=subprocess.DEVNULL,
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        commit = head.stdout.strip()
        status = git("status", "--porcelain", "--untracked-files=no")
        if status.returncode == 0 and status.stdout.strip():
            commit += "-dirty"
        return commit
    except Exception:
        return None


def timestamp() -> str:
    """Current time in UTC, ISO 8601 with offset, e.g. ``2025-01-31T12:00:00.123456+00:00``."""
    return datetime.now(UTC).isoformat()


@functools.lru_cache(maxsize=1)
def _static_info() -> dict[str, Any]:
    return {
        "host": host(),
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "gpu": gpu_name(),
        "versions": versions(),
        "commit": git_commit(),
    }


def run_info() -> dict[str, Any]:
    """Host, CPU, GPU, versions and commit (gathered once per process) plus a fresh timestamp.

    Keys: ``host``, ``cpu``, ``cpu_count``, ``gpu``, ``versions``, ``commit``,
    ``timestamp``. The returned dict is a copy: changing it does not touch the cache.
    """
    info = copy.deepcopy(_static_info())
    info["timestamp"] = timestamp()
    return info


def clear_cache() -> None:
    """Forget the cached facts (e.g. after ``git commit`` inside a long-lived kernel)."""
    _static_info.cache_clear()


__all__ = [
    "blas_info",
    "clear_cache",
    "cpu_count",
    "cpu_model",
    "git_commit",
    "gpu_name",
    "host",
    "mpi_library_version",
    "run_info",
    "timestamp",
    "versions",
]
