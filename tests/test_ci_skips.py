"""The CI rule of tests/conftest.py, on a real pytest run: under ``CI=true`` a skip whose
reason is not on the allow-list fails the build; an allowed one (no GPU) stays a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

TESTS = '''
import pytest

def test_missing_dependency():
    pytest.skip("could not import 'torch'")

def test_no_gpu():
    pytest.skip("no usable CUDA GPU: backend 'cuda' needs an NVIDIA GPU")

def test_fashion():
    pytest.skip("Fashion-MNIST is not installed")

@pytest.mark.xfail(reason="known")
def test_known():
    assert False
'''


def run_suite(tmp_path: Path, **env: str) -> str:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(TESTS)
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CI", "CNN_CI_NO_FASHION_MNIST", "PYTEST_ADDOPTS")}
    environ.update(env)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("fashion_missing", [False, True])
def test_in_ci_only_allowed_skips_stay_skips(tmp_path, fashion_missing):
    env = {"CI": "true", **({"CNN_CI_NO_FASHION_MNIST": "1"} if fashion_missing else {})}
    out = run_suite(tmp_path, **env)
    assert "FAILED test_skips.py::test_missing_dependency" in out
    assert "not on the allow-list" in out
    assert "SKIPPED" in out and "no usable CUDA GPU" in out
    assert ("FAILED test_skips.py::test_fashion" in out) is not fashion_missing
    assert "XFAIL test_skips.py::test_known" in out


def test_outside_ci_a_skip_is_a_skip(tmp_path):
    out = run_suite(tmp_path)
    assert "FAILED" not in out and "3 skipped" in out
