"""benchmarks/bench_gpu.py without a GPU: its grids, its table's ratios (against torch with
TF32 off, NumPy at batch 128), and that it stands on the library alone. Its timed rows
are exercised by ``scripts/gpu_check.sh --simulate`` (and on a GPU by the real run)."""

from __future__ import annotations

import importlib.util

import pytest
from test_numba_cuda import ROOT, python

PATH = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_quick_grid(bench):
    grid = bench.GRIDS["gpu-quick"]
    assert grid["batch_sizes"] == (32, 64, 128, 256, 512, 1024)
    assert grid["numpy_batches"] == (128,)  # the slow baseline once, not per batch
    assert tuple(grid["input_shape"]) == (3, 32, 32) and tuple(grid["filters"]) == (32, 64)


def test_cli_overrides(bench, tmp_path):
    args = bench.build_parser().parse_args(
        ["--grid", "gpu-quick", "--batch-sizes", "64,256", "--input-shape", "1x28x28",
         "--out", str(tmp_path / "b.pkl")])
    cfg = bench.config(args)
    assert cfg["batch_sizes"] == (64, 256) and cfg["input_shape"] == (1, 28, 28)
    assert cfg["numpy_batches"] == (64,)  # 128 is not in the grid: the first batch
    assert args.out == str(tmp_path / "b.pkl")
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--batch-sizes", "0,32"])


def _rows(rates):
    out = []
    for (strategy, batch), rate in rates.items():
        out.append({"strategy": strategy, "batch_size": batch, "samples_per_s": rate,
                    "device": "NVIDIA H200"})
    return out


def test_ratio_table_compares_with_tf32_off_and_numpy_at_128(bench):
    rows = _rows({("sequential", 128): 50.0, ("cuda", 256): 5000.0,
                  ("torch-cudnn", 256): 8000.0, ("torch-cudnn-tf32", 256): 20000.0})
    line = next(s for s in bench.ratio_table(rows).splitlines() if s.split()[0] == "256")
    cells = line.split()
    assert cells[2:5] == ["5000.0", "8000.0", "20000.0"]
    assert cells[5:7] == ["100.00x", "ok"]  # 5000 / 50 against the 50x target
    assert cells[7:9] == ["0.62x", "ok"]  # against TF32 OFF (not 0.25x against TF32 on)
    rows[1]["samples_per_s"] = 3000.0
    line = next(s for s in bench.ratio_table(rows).splitlines() if s.split()[0] == "256")
    assert line.split()[7:9] == ["0.38x", "MISS"]


def test_simulator_rows_get_no_verdict(bench):
    rows = _rows({("sequential", 4): 900.0, ("cuda", 4): 0.5})
    for r in rows:
        r["device"] = "cuda-simulator" if r["strategy"] == "cuda" else "cpu"
    table = bench.ratio_table(rows)
    assert "MISS" not in table and "not a timing" in table


def test_stands_on_the_library_alone():
    """Only cnn's library modules (never the study side) are imported by the script."""
    proc = python(f"""
        import runpy, sys
        sys.argv = ["bench_gpu.py", "--help"]
        try:
            runpy.run_path({str(PATH)!r}, run_name="__main__")
        except SystemExit:
            pass
        mods = sorted(m for m in sys.modules if m.startswith(("cnn.", "study")))
        print("MODULES", mods)
    """, sim=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mods = proc.stdout.split("MODULES", 1)[1]
    assert "study" not in mods and "cnn.metrics" in mods and "--grid" in proc.stdout
