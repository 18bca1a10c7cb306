"""Machine and library facts: present, well-formed, cheap, and never failing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn import runinfo

REPO = Path(__file__).resolve().parents[1]


def _nvidia_driver_present() -> bool:
    return any(os.path.exists(p) for p in runinfo._NVIDIA_MARKERS) or bool(
        shutil.which("nvidia-smi")
    )


def test_host_and_cpu_are_this_machines():
    import socket

    assert runinfo.host() == socket.gethostname()
    with open("/proc/cpuinfo") as fh:
        names = [line.split(":", 1)[1].strip() for line in fh
                 if line.split(":")[0].strip() in ("model name", "Model name")]
    if names:
        assert runinfo.cpu_model() == names[0]


def test_cpu_count():
    counts = runinfo.cpu_count()
    assert set(counts) == {"physical", "logical", "usable"}
    assert counts["logical"] == os.cpu_count()
    assert 1 <= counts["usable"] <= counts["logical"]
    if counts["physical"] is not None:
        assert 1 <= counts["physical"] <= counts["logical"]


@pytest.mark.skipif(_nvidia_driver_present(), reason="machine has an NVIDIA driver")
def test_gpu_name_is_none_without_a_gpu():
    assert runinfo.gpu_name() is None


def test_gpu_name_is_none_under_the_simulator(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert runinfo.gpu_name() is None


def test_gpu_name_type():
    name = runinfo.gpu_name()
    assert name is None or (isinstance(name, str) and name)


def test_versions():
    v = runinfo.versions()
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert v["numpy"] == np.__version__
    assert v["pandas"] == pd.__version__
    import numba

    assert v["numba"] == numba.__version__
    for key in ("python", "numpy", "numba", "pandas"):
        assert isinstance(v[key], str) and v[key]
    assert isinstance(v["blas"], list)
    for lib in v["blas"]:
        assert set(lib) == {"user_api", "internal_api", "version", "num_threads"}
    if any(lib["user_api"] == "blas" for lib in v["blas"]):
        assert all(isinstance(lib["num_threads"], int) for lib in v["blas"])
    if "mpi4py" in v:
        assert isinstance(v.get("mpi"), str) and v["mpi"]
        assert "\n" not in v["mpi"]


def test_mpi_version_without_initialising_mpi_here():
    pytest.importorskip("mpi4py")
    already = "mpi4py.MPI" in sys.modules
    line = runinfo.mpi_library_version()
    assert isinstance(line, str) and line and "\n" not in line
    if not already:
        assert "mpi4py.MPI" not in sys.modules


def test_git_commit_is_head_and_says_dirty(tmp_path):
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    (tmp_path / "f.txt").write_text("a\n")
    git("init", "-q")
    git("add", "f.txt")
    git("-c", "user.email=a@b", "-c", "user.name=t", "commit", "-qm", "x")
    head = git("rev-parse", "--short", "HEAD")
    assert runinfo.git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("b\n")
    assert runinfo.git_commit(tmp_path) == head + "-dirty"


def test_git_commit_looks_like_hex():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    commit = runinfo.git_commit()
    assert commit is not None
    assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", commit), commit


def test_git_commit_outside_git_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert runinfo.git_commit(tmp_path) is None
    assert runinfo.git_commit(tmp_path / "missing" / "dir") is None


def test_git_commit_without_git_is_none(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert runinfo.git_commit() is None


def test_timestamp_is_utc_iso8601():
    ts = runinfo.timestamp()
    parsed = datetime.fromisoformat(ts)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60


def test_run_info_fields_and_cache():
    runinfo.clear_cache()
    a = runinfo.run_info()
    assert set(a) == {"host", "cpu", "cpu_count", "gpu", "versions", "commit", "timestamp"}
    assert a["host"] == runinfo.host()
    assert a["cpu"] == runinfo.cpu_model()
    assert isinstance(a["versions"], dict)
    a["versions"]["numpy"] = "tampered"  # a copy: the cache is unaffected
    b = runinfo.run_info()
    assert b["versions"]["numpy"] == np.__version__
    info = runinfo._static_info.cache_info()
    assert info.misses == 1 and info.hits >= 1
    assert datetime.fromisoformat(b["timestamp"]) >= datetime.fromisoformat(a["timestamp"])


def test_import_and_run_info_stay_light():
    """Neither importing runinfo nor run_info() loads numba.cuda, torch or initialises MPI."""
    code = (
        "import sys\n"
        "import cnn.runinfo as r\n"
        "assert 'numba.cuda' not in sys.modules\n"
        "info = r.run_info()\n"
        "heavy = [m for m in ('torch', 'mpi4py.MPI') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "if info['gpu'] is None:\n"
        "    assert 'numba.cuda' not in sys.modules or r._nvidia_driver_present()\n"
        "print(info['host'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == runinfo.host()
