"""The cost model's arithmetic against hand-computed values; the measurements under mpiexec."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn.parallel import costmodel as cm


def test_point_to_point_and_ring_allreduce_by_hand():
    assert cm.p2p_time(1000, 1e-6, 1e9) == pytest.approx(2e-6)
    # 2*3*1us + 2*3/4 * 1 MB / 1 GB/s = 6 us + 1.5 ms
    assert cm.ring_allreduce_time(1e6, 4, 1e-6, 1e9) == pytest.approx(1.506e-3)
    # P = 2: 2 alpha + n / beta = 20 us + 4 ms
    assert cm.ring_allreduce_time(8e6, 2, 1e-5, 2e9) == pytest.approx(4.02e-3)
    # reduction arithmetic: + (P-1)/P n gamma = 0.75 * 1e6 * 1e-10
    assert cm.ring_allreduce_time(1e6, 4, 1e-6, 1e9, gamma=1e-10) == pytest.approx(1.581e-3)
    assert cm.ring_allreduce_time(1e9, 1, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        cm.ring_allreduce_time(1, 0, 1, 1)
    # bandwidth term tends to 2 n / beta, latency term grows linearly
    big = cm.ring_allreduce_time(1e6, 1024, 0.0, 1e9)
    assert big == pytest.approx(2 * 1023 / 1024 * 1e-3)


def test_parameter_server_by_hand():
    # 3 workers: 6 messages of (1 us + 1 ms) through the server's link, + 1 ms update
    assert cm.param_server_time(1e6, 3, 1e-6, 1e9, update_s=1e-3) == pytest.approx(7.006e-3)
    c = cm.Compute(0.0, 1e-3)
    assert cm.step_time(c, 32, 4, 1e6, 1e-6, 1e9, "param-server") == pytest.approx(
        0.032 + 3 * 2 * (1e-6 + 1e-3))
    with pytest.raises(ValueError, match="no model"):
        cm.step_time(c, 32, 4, 1e6, 1e-6, 1e9, "hogwild")


def test_scaling_by_hand():
    c = cm.Compute(0.0, 1e-3)  # 1 ms per sample
    # global batch 128 on 2 ranks: 64 ms compute + (2 us + 1.6 ms) allreduce
    s, e = cm.strong_scaling(c, 128, 2, 1.6e6, 1e-6, 1e9)
    assert s == pytest.approx(0.128 / 0.065602) and e == pytest.approx(0.064 / 0.065602)
    s, e = cm.weak_scaling(c, 64, 2, 1.6e6, 1e-6, 1e9)
    assert e == pytest.approx(0.064 / 0.065602) and s == pytest.approx(2 * e)
    s, e = cm.strong_scaling(c, 128, 1, 1.6e6, 1e-6, 1e9)
    assert s == e == 1.0


def test_fits_recover_known_parameters():
    n = np.array([8, 64, 1024, 65536, 1 << 20, 1 << 24], dtype=float)
    alpha, beta = 5e-6, 2e9
    t = alpha + n / beta
    a, b = cm.fit_hockney(n, t)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    rows = pd.DataFrame({"bytes": n, "time_s": t})
    a, b = cm.calibrate(rows)
    assert a == pytest.approx(alpha, rel=1e-3) and b == pytest.approx(beta, rel=1e-6)
    c = cm.Compute.fit([16, 32, 64], [0.002 + 0.001 * b for b in (16, 32, 64)])
    assert c.c0 == pytest.approx(0.002) and c.c1 == pytest.approx(0.001)
    c = cm.Compute.fit([1, 2], [0.5, 2.0])  # intercept -1: refitted through the origin
    assert c.c0 == 0.0 and c.c1 == pytest.approx((0.5 + 4.0) / 5)
    with pytest.raises(ValueError):
        cm.fit_linear([1, 1], [2, 3])


def test_check_and_extrapolate():
    measured = pd.DataFrame({"bytes": [1e6, 4e6], "processes": [2, 2], "time_s": [1e-3, 5e-3]})
    out = cm.check(measured, 0.0, 1e9)
    np.testing.assert_allclose(out["predicted_s"], [1e-3, 4e-3])
    np.testing.assert_allclose(out["rel_error"], [0.0, -0.2])
    c = cm.Compute(0.001, 1e-3)
    df = cm.extrapolate(c, 1.7e6, batch_per_rank=64, global_batch=4096)
    assert len(df) == len(cm.NETWORKS) * 7 and df["processes"].max() == 1024
    for _, g in df.groupby("network"):
        assert g["weak_efficiency"].is_monotonic_decreasing
        assert (g["weak_efficiency"] <= 1).all() and (g["strong_efficiency"] <= 1).all()
    ib = df[(df.network == "IB-100G") & (df.processes == 16)].iloc[0]
    eth = df[(df.network == "10GbE") & (df.processes == 16)].iloc[0]
    assert ib["weak_efficiency"] > eth["weak_efficiency"]
    assert ib["allreduce_s"] == pytest.approx(cm.ring_allreduce_time(1.7e6, 16, 1.5e-6, 11.5e9))


def test_measure_compute_rows():
    df = cm.measure_compute(model="mlp", input_shape=(4,), batches=(8, 16), repeats=2,
                            num_classes=3)
    assert list(df["batch_size"]) == [8, 16] and (df["time_s"] > 0).all()
    assert df["param_bytes"].iloc[0] == 4 * df["num_params"].iloc[0]


MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
if not Path(MPIEXEC).exists():
    MPIEXEC = shutil.which("mpiexec")


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
def test_measurements_under_mpiexec(tmp_path):
    out = tmp_path / "comm.pkl"
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "cnn.parallel.costmodel",
                           "--sizes", "64,65536", "--repeats", "5", "--save", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_pickle(out)
    assert sorted(df["strategy"]) == ["allreduce", "allreduce", "pingpong", "pingpong"]
    assert (df["time_s"] > 0).all() and (df["processes"] == 2).all()
    assert set(df["bytes"]) == {64, 65536} and df["host"].notna().all()
