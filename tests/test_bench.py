"""The timing harness: rows in the results schema, honest stats, kernels, ceiling, CLI, pinning."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cnn import bench
from cnn.results import COLUMNS

HAS_TORCH = importlib.util.find_spec("torch") is not None
TINY = dict(threads=1, batch_size=4, input_shape="1x12x12", filters=(4, 8), repeats=3, warmup=1)
LAYERS = ["Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten", "Dense",
          "ReLU", "Dense"]  # seed_cnn


def _check_step_row(row: dict, backend: str) -> None:
    assert list(row)[:len(COLUMNS)] == COLUMNS
    assert all(c in row for c in bench.EXTRA_COLUMNS)
    assert row["backend"] == backend
    assert row["strategy"] == bench.STRATEGY[backend]
    assert (row["processes"], row["threads"], row["epochs"], row["comm_s"]) == (1, 1, 0, 0.0)
    assert (row["dataset"], row["model"], row["batch_size"]) == ("synthetic", "seed_cnn", 4)
    assert (row["input_shape"], row["filters"], row["samples"]) == ("1x12x12", "4,8", 12)
    assert math.isnan(row["test_acc"])
    for col in ("wall_s", "step_ms_median", "samples_per_s", "gflops", "first_call_s"):
        assert math.isfinite(row[col]) and row[col] > 0, col
    assert row["step_ms_iqr"] >= 0 and row["compile_s"] >= 0
    assert row["samples_per_s"] == pytest.approx(4 / (row["step_ms_median"] / 1e3), rel=1e-9)
    assert math.isfinite(row["final_loss"])
    if not math.isnan(row["peak_mem_mb"]):
        assert row["peak_mem_mb"] >= max(row["traced_mem_mb"], row["rss_mem_mb"]) >= 0
    for col in ("host", "cpu", "versions", "timestamp"):
        assert row[col], col


def test_bench_step_numpy_row():
    row = bench.bench_step("numpy", **TINY, ceiling=100.0)
    _check_step_row(row, "numpy")
    assert row["device"] == "cpu"
    assert row["pct_of_peak"] == pytest.approx(row["gflops"])  # ceiling 100 GFLOP/s
    assert row["traced_mem_mb"] > 0  # numpy's arrays are seen by tracemalloc


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_bench_step_torch_row_same_network():
    ref = bench.bench_step("numpy", **TINY, memory=False)
    row = bench.bench_step("torch", **TINY, memory=False)
    _check_step_row(row, "torch")
    assert row["optimizer"] == "torch.optim.SGD"
    # same weights, same batch, same optimizer: the loss after the same number of steps
    assert row["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-4)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("torch", marks=pytest.mark.skipif(
    not HAS_TORCH, reason="torch not installed"))])
def test_bench_kernels_cover_every_layer(backend):
    rows = bench.bench_kernels(backend, **TINY, ceiling=50.0)
    got = [(r["kernel"], r["direction"]) for r in rows]
    want = [(f"{i}.{name}", d) for i, name in enumerate(LAYERS) for d in ("fwd", "bwd")]
    assert got == want + [("loss", "fwd+bwd"), ("sgd_update", "update")]
    assert all(r["strategy"] == "kernel" and r["backend"] == backend for r in rows)
    assert all(r["step_ms_median"] > 0 and r["compile_s"] >= 0 for r in rows)
    conv = {(r["kernel"], r["direction"]): r for r in rows}
    # the first conv computes dW only (1x forward); later param layers dW and dx (2x)
    assert conv["0.Conv2D", "bwd"]["kernel_flops"] == conv["0.Conv2D", "fwd"]["kernel_flops"]
    assert conv["3.Conv2D", "bwd"]["kernel_flops"] == 2 * conv["3.Conv2D", "fwd"]["kernel_flops"]
    assert conv["3.Conv2D", "fwd"]["pct_of_peak"] == pytest.approx(
        2 * conv["3.Conv2D", "fwd"]["gflops"])
    assert math.isnan(conv["1.ReLU", "fwd"]["gflops"])  # no FLOPs counted: bandwidth only
    assert conv["1.ReLU", "fwd"]["gbytes_per_s"] > 0


def test_kernel_flops_add_up_to_the_step():
    from cnn.models import seed_cnn

    net = seed_cnn((1, 12, 12), filters=(4, 8))
    rows = bench.bench_kernels("numpy", **TINY)
    total = sum(r["kernel_flops"] for r in rows)
    assert total == net.flops(train=True) * 4


def test_gemm_ceiling_positive():
    gflops = bench.gemm_ceiling(1, n=128, repeats=2)
    assert math.isfinite(gflops) and gflops > 0
    row = bench.gemm_row(1, n=128, repeats=2)
    assert row["strategy"] == "gemm-ceiling" and row["pct_of_peak"] == 100.0
    assert row["kernel_flops"] == 2 * 128**3


def test_time_calls_excludes_first_call_and_warmup():
    calls = []

    def fn():
        calls.append(1)
        return len(calls)

    t = bench.time_calls(fn, repeats=4, warmup=2)
    assert len(calls) == 7 and t["result"] == 7 and len(t["times_s"]) == 4
    assert t["wall_s"] == pytest.approx(sum(t["times_s"]))
    assert t["compile_s"] >= 0 and t["step_ms_median"] > 0


def _thread_state():
    import numba
    from threadpoolctl import threadpool_info

    state = {"numba": numba.get_num_threads(),
             "pools": sorted((p["filepath"], p["num_threads"]) for p in threadpool_info())}
    if "torch" in sys.modules:
        state["torch"] = sys.modules["torch"].get_num_threads()
    return state


def test_pinned_threads_sets_and_restores():
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    if HAS_TORCH:
        import torch
    n = min(2, bench.max_threads())
    with threadpool_limits(limits=n):
        numba.set_num_threads(n)
        if HAS_TORCH:
            torch.set_num_threads(n)
        before = _thread_state()
        with bench.pinned_threads(1) as got:
            assert got == 1
            assert numba.get_num_threads() == 1
            assert all(p["num_threads"] == 1 for p in threadpool_info())
            if HAS_TORCH:
                assert torch.get_num_threads() == 1
        assert _thread_state() == before
        with pytest.raises(RuntimeError), bench.pinned_threads(1):
            raise RuntimeError("boom")
        assert _thread_state() == before
        if n == 2:  # BLAS on its own count: numpy and numba call it single-threaded
            with bench.pinned_threads(2, blas=1):
                apis = [(p["user_api"], p["num_threads"]) for p in threadpool_info()]
                assert {t for api, t in apis if api == "blas"} == {1}
                assert {t for api, t in apis if api == "openmp"} <= {2}
                assert numba.get_num_threads() == 2
            assert _thread_state() == before
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"), \
            bench.pinned_threads(bench.max_threads() + 1):
        pass


def test_numpy_is_single_threaded():
    assert bench.thread_problem("numpy", 2)
    with pytest.raises(ValueError, match="1 thread"):
        bench.bench_step("numpy", **{**TINY, "threads": 2})


def test_unknown_and_unavailable_backends_are_reasons():
    status = bench.backend_status(["numpy", "nope"])
    assert status["numpy"] == "ok" and "unknown backend" in status["nope"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "x.pkl"
    backends = "numpy,torch" if HAS_TORCH else "numpy"
    df = bench.main(["--backends", backends, "--threads", "1", "--batch-sizes", "4,8",
                     "--input-shape", "1x12x12", "--filters", "4,8", "--repeats", "2",
                     "--warmup", "1", "--gemm-size", "128", "--kernels", "--out", str(out)])
    saved = pd.read_pickle(out)
    assert list(saved.columns[:len(COLUMNS)]) == COLUMNS
    assert len(saved) == len(df)
    steps = saved[~saved["strategy"].isin(bench.NON_STEP_STRATEGIES)]
    assert sorted(steps["batch_size"].astype(int)) == sorted([4, 8] * len(backends.split(",")))
    assert (saved["strategy"] == "gemm-ceiling").sum() == 1
    assert (saved["strategy"] == "kernel").sum() > 0
    assert np.allclose(steps["pct_of_peak"], 100 * steps["gflops"] / steps["gemm_gflops"])
    text = capsys.readouterr().out
    assert "samples/s" in text and "median ms per kernel" in text
    if HAS_TORCH:
        assert "numpy/1t x torch" in text
        table = bench.summary_table(saved)
        assert np.allclose(table["numpy/1t x torch"], table["numpy/1t"] / table["torch/1t"])

    # a re-run keeps rows from another host and replaces this host's rows
    other = saved.iloc[:1].assign(host="elsewhere")
    pd.to_pickle(pd.concat([saved, other], ignore_index=True), out)
    bench.main(["--backends", "numpy", "--threads", "1", "--batch-sizes", "4",
                "--input-shape", "1x12x12", "--filters", "4,8", "--repeats", "2",
                "--warmup", "0", "--no-gemm", "--no-memory", "--out", str(out)])
    again = pd.read_pickle(out)
    assert (again["host"] == "elsewhere").sum() == 1
    assert len(again) == 2


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "cnn.bench", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    assert "--backends" in res.stdout and "python -m cnn.bench" in res.stdout


def test_run_api_skips_with_reasons():
    lines = []
    df = bench.run(backends=["numpy", "nope"], threads=[1], batch_sizes=[4],
                   input_shapes="1x12x12", filters=(4, 8), repeats=2, warmup=0, gemm=False,
                   memory=False, save=False, log=lines.append)
    assert any(line.startswith("skip nope: unknown backend") for line in lines)
    assert "sequential" in set(df["strategy"])
    with pytest.raises(TypeError, match="unknown bench option"):
        bench.run(nonsense=1, save=False)
