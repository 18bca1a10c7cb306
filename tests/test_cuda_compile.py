"""Every kernel of the cuda backend compiles for sm_90 (H100/H200) with numba-cuda and
NVVM from pip, no GPU needed; registers, shared memory and spills are reported and a
compile failure, a spill or stray float64 arithmetic fails (never skips)."""

from __future__ import annotations

import json

from test_numba_cuda import python

from cnn.backends import cuda_compile


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "kernels.json"
    proc = python(f"""
        import sys
        from cnn.backends import cuda_compile
        sys.exit(cuda_compile.main(["--cc", "9.0", "--json", {str(out)!r}]))
    """, sim=False, timeout=540)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    names = {(r["kernel"], r["dtype"]) for r in rows}
    for dtype in ("float32", "float64"):
        for base in ("gemm", "conv_fwd", "conv_dw", "conv_dx"):
            for tile in ("64x64", "32x128"):
                assert (f"{base}/{tile}", dtype) in names
        for name in ("relu_fwd", "relu_bwd", "sigmoid_fwd", "sigmoid_bwd",
                     "maxpool_fwd", "maxpool_bwd", "softmax_xent", "sgd", "adam"):
            assert (name, dtype) in names
    assert ("probe", "float32") in names
    for r in rows:
        assert r["registers"] > 0 and r["spill_stores"] == r["spill_loads"] == 0, r
        if r["launch_bounds"]:  # the register cap the launch bounds ask for holds
            threads, blocks = r["launch_bounds"]
            assert r["registers"] * threads * blocks <= 65536, r
    assert "0 problems" in proc.stdout


def test_problems_are_named():
    """The checker flags spills, local memory and float64 arithmetic in float32 kernels
    (except the loss, which sums in float64 on purpose)."""
    ok = dict(kernel="gemm/64x64", dtype="float32", registers=64, shared_bytes=9476,
              stack_bytes=0, spill_stores=0, spill_loads=0, f64_ops=0, local_ops=0,
              launch_bounds=(256, 4), source="test")
    assert cuda_compile.problems([ok]) == []
    found = cuda_compile.problems([
        {**ok, "spill_stores": 96, "spill_loads": 140},
        {**ok, "kernel": "conv_dx/64x64", "local_ops": 3},
        {**ok, "kernel": "relu_fwd", "f64_ops": 2},
        {**ok, "kernel": "softmax_xent", "f64_ops": 46},
    ])
    assert len(found) == 3, found
    assert "spills registers (96 B stored, 140 B loaded)" in found[0]
    assert "local memory" in found[1] and "float64" in found[2]
    assert "softmax_xent" not in " ".join(found)


def test_report_table_lists_every_row():
    row = dict(kernel="sgd", dtype="float32", registers=36, shared_bytes=0, stack_bytes=0,
               spill_stores=0, spill_loads=0, f64_ops=0, local_ops=0, launch_bounds=None,
               source="test")
    table = cuda_compile.format_table([row, {**row, "kernel": "adam", "registers": 40}])
    lines = table.splitlines()
    assert len(lines) == 4 and "regs" in lines[0]
    assert lines[2].split()[:3] == ["sgd", "float32", "36"]
    assert lines[3].split()[:3] == ["adam", "float32", "40"]
