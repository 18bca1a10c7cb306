"""Every backend passes the kernel contract of cnn/backends/contract.py, and the checker
really catches a backend that breaks it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

from cnn.backends import BACKENDS, contract, numpy_seq
from cnn.errors import BackendUnavailable


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_cpu_backends_pass_the_contract(name):
    assert contract.problems(importlib.import_module(BACKENDS[name])) == []


def test_cuda_backend_passes_the_contract_in_the_simulator():
    code = ("import os; os.environ['NUMBA_ENABLE_CUDASIM'] = '1'\n"
            "import cnn.backends.numba_cuda as m\n"
            "from cnn.backends import contract\n"
            "print(contract.problems(m))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _copy_of_reference(**changes) -> types.ModuleType:
    fake = types.ModuleType("fake_backend")
    for name in (*contract.ATTRIBUTES, *contract.REQUIRED):
        setattr(fake, name, getattr(numpy_seq, name))
    for name, value in changes.items():
        if value is None:
            delattr(fake, name)
        else:
            setattr(fake, name, value)
    return fake


def test_checker_names_a_missing_kernel_and_a_wrong_signature():
    fake = _copy_of_reference(relu_backward=None, dense_forward=lambda x, b, w: None)
    found = contract.problems(fake)
    assert any(p.startswith("missing kernel relu_backward") for p in found), found
    assert any(p.startswith("dense_forward takes ('x', 'b', 'w')") for p in found), found
    with pytest.raises(BackendUnavailable, match="relu_backward"):
        contract.check(fake)


def test_a_compliant_copy_passes_and_fusion_is_detected_by_name():
    fake = _copy_of_reference()
    assert contract.problems(fake) == []
    assert not contract.supports(fake, "conv2d_relu_forward")
    fake.conv2d_relu_forward = lambda x, w, b, stride, padding: None
    assert contract.supports(fake, "conv2d_relu_forward")
    with pytest.raises(KeyError):
        contract.supports(fake, "conv2d_forward")  # required, not optional
