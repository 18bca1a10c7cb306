"""cnn.bench_plots: targets and tables computed from hand-made bench rows; figures draw."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from cnn import bench_plots as BP
from cnn import plots

matplotlib.use("agg")

SPS = {  # (backend, threads) -> samples/s at 3x32x32, batch 128, host "a"
    ("numpy", 1): 1000.0, ("numba", 1): 1900.0, ("numba", 2): 3600.0,
    ("torch", 1): 2000.0, ("torch", 2): 3000.0,
}


def step(backend, threads, sps, batch=128, shape="3x32x32", filters="32,64", host="a",
         pct=float("nan"), iqr=1.0):
    med = batch / sps * 1e3
    return dict(experiment="bench_cpu", strategy={"numpy": "sequential"}.get(backend, backend),
                backend=backend, processes=1, threads=threads, device="cpu", host=host,
                cpu="test cpu", input_shape=shape, filters=filters, batch_size=batch,
                samples_per_s=sps, step_ms_median=med, step_ms_iqr=iqr, gflops=sps * 0.025,
                pct_of_peak=pct, kernel=None, direction=None, first_call_s=0.1, compile_s=0.0,
                timestamp="2026-01-01T00:00:00")


def ladder(host="a", scale=1.0, batch=128):
    rows = [step(b, t, v * scale, batch=batch, host=host,
                 pct=45.0 if (b, t) == ("numba", 2) else float("nan"))
            for (b, t), v in SPS.items()]
    rows.append(dict(step("numpy", 1, float("nan"), host=host), strategy="gemm-ceiling",
                     kernel="sgemm 2048x2048x2048", gflops=200.0, threads=1, batch_size=None))
    rows.append(dict(step("numpy", 2, float("nan"), host=host), strategy="gemm-ceiling",
                     kernel="sgemm 2048x2048x2048", gflops=380.0, threads=2, batch_size=None))
    return pd.DataFrame(rows)


def kernels(series=(("numpy", 1), ("numba", 1), ("numba", 2))):
    rows = []
    for backend, t in series:
        speed = {"numpy": 1.0, "numba": 1.5 * t}[backend]
        for name, flops in (("0.Conv2D", 4e8), ("1.ReLU", 0.0), ("6.Flatten", 0.0),
                            ("7.Dense", 1e8)):
            for direction in ("fwd", "bwd"):
                ms = (2.0 if flops else 0.5) / speed
                rows.append(dict(step(backend, t, float("nan")), strategy="kernel",
                                 kernel=name, direction=direction, step_ms_median=ms,
                                 kernel_flops=flops, mbytes=8.0,
                                 gflops=flops / ms / 1e6 if flops else float("nan"),
                                 gbytes_per_s=8 * 2**20 / ms / 1e6, pct_of_peak=10.0))
    return pd.DataFrame(rows)


def test_step_rows_leave_out_kernels_and_ceiling():
    df = pd.concat([ladder(), kernels()], ignore_index=True)
    steps = BP.step_rows(df)
    assert len(steps) == len(SPS)
    assert set(steps["series"]) == {"numpy 1t", "numba 1t", "numba 2t", "torch 1t", "torch 2t"}
    assert BP.ceilings(df) == {1: 200.0, 2: 380.0}
    assert BP.ceilings(df, host="other") == {}


def test_target_checks_from_the_rows():
    checks = BP.target_checks(ladder()).set_index("target")
    got = checks["measured"].to_dict()
    assert got["numba 2t >= 1.2x torch 2t"] == pytest.approx(3600 / 3000)
    assert got["numba 1t >= 1.0x torch 1t"] == pytest.approx(1900 / 2000)
    assert got["numba 2t >= 1.8x numba 1t"] == pytest.approx(3600 / 1900)
    assert got["numba 2t step >= 40% of the 2-thread GEMM ceiling"] == pytest.approx(45.0)
    assert got["numpy 1t >= 0.5x torch 1t"] == pytest.approx(1000 / 2000)
    met = checks["met"].to_dict()
    assert met == {"numba 2t >= 1.2x torch 2t": True, "numba 1t >= 1.0x torch 1t": False,
                   "numba 2t >= 1.8x numba 1t": True,
                   "numba 2t step >= 40% of the 2-thread GEMM ceiling": True,
                   "numpy 1t >= 0.5x torch 1t": True}


def test_target_checks_never_mix_hosts_and_skip_missing_rows():
    a = ladder("a")
    b = ladder("b", scale=2.0)
    b = b[~((b["backend"] == "torch") & (b["threads"] == 2))]  # host b lacks torch 2t
    checks = BP.target_checks(pd.concat([a, b], ignore_index=True))
    on_b = checks[checks["host"] == "b"].set_index("target")
    assert "numba 2t >= 1.2x torch 2t" not in on_b.index
    assert on_b.loc["numba 1t >= 1.0x torch 1t", "measured"] == pytest.approx(0.95)
    assert len(checks[checks["host"] == "a"]) == len(BP.TARGETS)


def test_target_table_picks_the_config_and_counts():
    df = pd.concat([ladder(batch=128), ladder(batch=32, scale=1.0)], ignore_index=True)
    torch1_b32 = (df["batch_size"] == 32) & (df["backend"] == "torch") & (df["threads"] == 1)
    df.loc[torch1_b32, "samples_per_s"] = 1000.0  # numba 1t beats torch 1t at batch 32 only
    checks = BP.target_checks(df)
    table = BP.target_table(checks, {"input_shape": "3x32x32", "batch_size": 128})
    row = table.loc["numba 1t >= 1.0x torch 1t"]
    assert row["measured"] == pytest.approx(0.95)
    assert row["met"] == "not met"
    assert row["configs met"] == "1 / 2"
    assert table.loc["numba 2t step >= 40% of the 2-thread GEMM ceiling", "target value"] == "40%"
    missing = BP.target_table(checks, {"batch_size": 999})
    assert (missing["met"] == "not measured").all()
    grid = BP.target_grid(checks)
    assert list(grid.columns) == ["3x32x32, b=128", "3x32x32, b=32"]
    assert BP.target_table(pd.DataFrame()).empty


def test_comparison_table_ratios():
    table = BP.comparison_table(ladder())
    row = table.iloc[0]
    assert list(table.columns[:5]) == ["numpy 1t", "numba 1t", "numba 2t", "torch 1t",
                                       "torch 2t"]
    assert row["numba 2t / torch 2t"] == pytest.approx(1.2)
    assert row["numba 2t x numpy 1t"] == pytest.approx(3.6)
    assert row["torch 1t x numpy 1t"] == pytest.approx(2.0)
    assert BP.comparison_table(pd.DataFrame()).empty


def test_grid_frame_speedup_and_restriction():
    rows = []
    for f in (32, 64):
        for b in (32, 128):
            rows.append(step("numba", 2, 1000.0 * f / 32, batch=b, filters=f"{f},64"))
            rows.append(step("numpy", 1, 250.0, batch=b, filters=f"{f},64"))
    rows.append(step("numba", 2, 5.0, batch=256, filters="32,64"))  # outside the grid
    g = BP.grid_frame(pd.DataFrame(rows), 2, "3x32x32", batch_sizes=[32, 128],
                      filters=["32,64", "64,64"])
    assert len(g) == 4 and set(g["f"]) == {32, 64}
    assert g.set_index(["f", "batch_size"]).loc[(64, 128), "speedup"] == pytest.approx(8.0)
    whole = BP.grid_frame(pd.DataFrame(rows), 2, "3x32x32")
    assert math.isnan(whole.set_index(["f", "batch_size"]).loc[(32, 256), "speedup"])


def test_figures_draw_and_save(tmp_path):
    df = pd.concat([ladder(), ladder(batch=32), kernels()], ignore_index=True)
    grid = pd.DataFrame([step(b, t, 1000.0, batch=n, filters=f"{f},64")
                         for f in (32, 64) for n in (32, 128) for b, t in (("numba", 2),
                                                                          ("numpy", 1))])
    figs = {
        "scaling": BP.thread_scaling(df),
        "bars": BP.comparison_bars(df),
        "grid": BP.grid_heatmaps(grid, 2, "3x32x32"),
        "kernels": BP.kernel_breakdown(kernels(), BP.step_rows(df)),
        "roofline": BP.roofline(kernels(), df, {1: 200.0, 2: 380.0}, {1: 12.0, 2: 20.0}),
    }
    for name, fig in figs.items():
        out = plots.save_figure(fig, f"t_{name}", directory=tmp_path, close=True)
        assert out["png"].stat().st_size > 1000 and out["pdf"].stat().st_size > 1000
    empty = pd.DataFrame()
    for fig in (BP.thread_scaling(empty), BP.comparison_bars(empty),
                BP.grid_heatmaps(empty, 2), BP.kernel_breakdown(empty),
                BP.roofline(empty, None, {})):
        assert fig.axes


def test_sps_spread_is_bounded():
    rows = pd.DataFrame([step("numba", 2, 100.0, batch=10, iqr=1000.0),
                         step("numba", 2, 100.0, batch=10, iqr=10.0)])
    spread = BP._sps_spread(rows)
    assert np.all(np.isfinite(spread))
    assert spread[1] == pytest.approx(100.0 * 10.0 / (2 * 100.0))
