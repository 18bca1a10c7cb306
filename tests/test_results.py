"""The results schema: column order, atomic pickles, merging across machines, timing stats."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest

from cnn.results import (
    COLUMNS,
    load_results,
    make_row,
    save_results,
    speedup_table,
    step_stats,
    to_frame,
)

EXPECTED_COLUMNS = [
    "experiment", "strategy", "backend", "processes", "threads", "device", "model",
    "dataset", "batch_size", "epochs", "samples", "wall_s", "compile_s",
    "step_ms_median", "step_ms_iqr", "samples_per_s", "comm_s", "test_acc",
    "final_loss", "host", "cpu", "gpu", "versions", "commit", "timestamp",
]  # fmt: skip


def row(host="hostA", device="cpu", strategy="sequential", **kw):
    base = dict(
        experiment="scaling",
        strategy=strategy,
        backend="numpy",
        processes=1,
        threads=1,
        device=device,
        model="seed_cnn",
        dataset="digits",
        batch_size=32,
        wall_s=10.0,
        host=host,
        cpu="test cpu",
        gpu=None,
        versions={"numpy": np.__version__},
        commit="abc1234",
        timestamp="2025-01-01T00:00:00+00:00",
    )
    base.update(kw)
    return make_row(**base)


def no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------- schema


def test_columns_are_the_design_schema_in_order():
    assert COLUMNS == EXPECTED_COLUMNS
    assert len(set(COLUMNS)) == len(COLUMNS)


def test_make_row_fills_every_column_and_machine_facts():
    r = make_row(experiment="e", strategy="sequential", wall_s=1.5)
    assert list(r)[: len(COLUMNS)] == COLUMNS
    assert r["experiment"] == "e" and r["wall_s"] == 1.5
    # numeric columns not given are NaN, others None
    assert math.isnan(r["test_acc"]) and math.isnan(r["processes"])
    assert r["model"] is None and r["device"] is None
    # machine and library facts come from runinfo
    assert isinstance(r["host"], str) and r["host"]
    assert isinstance(r["cpu"], str) and r["cpu"]
    assert isinstance(r["versions"], dict) and r["versions"]["numpy"] == np.__version__
    assert isinstance(r["timestamp"], str) and r["timestamp"].endswith("+00:00")
    assert "gpu" in r


def test_make_row_keeps_given_machine_fields_and_extras():
    r = make_row(strategy="allreduce", host="node7", gpu="Tesla", commit="deadbee", seed=3, lr=0.1)
    assert r["host"] == "node7" and r["gpu"] == "Tesla" and r["commit"] == "deadbee"
    assert list(r)[len(COLUMNS) :] == ["seed", "lr"]
    assert r["seed"] == 3 and r["lr"] == 0.1


def test_to_frame_orders_schema_first_then_extras():
    rows = [
        {"wall_s": 1.0, "zeta": 1, "strategy": "a"},
        {"alpha": 2, "strategy": "b"},
    ]
    df = to_frame(rows)
    assert list(df.columns) == COLUMNS + ["zeta", "alpha"]
    assert df["strategy"].tolist() == ["a", "b"]
    assert df["test_acc"].isna().all()
    empty = to_frame([])
    assert list(empty.columns) == COLUMNS and len(empty) == 0


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    df = to_frame([row(strategy="sequential"), row(strategy="numba", threads=2, extra=7)])
    path = tmp_path / "results" / "scaling.pkl"  # parent is created
    written = save_results(df, path)
    back = load_results(path)
    pd.testing.assert_frame_equal(back, written)
    pd.testing.assert_frame_equal(back, df)
    assert list(back.columns) == COLUMNS + ["extra"]
    assert back.loc[1, "versions"] == {"numpy": np.__version__}
    assert no_temp_files(path.parent)


def test_save_accepts_rows(tmp_path):
    save_results([row(), row(strategy="numba")], tmp_path / "r.pkl")
    assert load_results(tmp_path / "r.pkl")["strategy"].tolist() == ["sequential", "numba"]


def test_crash_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.pkl"
    save_results([row(wall_s=1.0)], path)
    before = path.read_bytes()

    bad = to_frame([row(wall_s=2.0)])
    bad["payload"] = [lambda: None]  # pickling fails part-way through the write
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_results(bad, path)

    assert path.read_bytes() == before
    assert load_results(path)["wall_s"].tolist() == [1.0]
    assert no_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pkl"]


def test_merge_keeps_rows_from_other_hosts(tmp_path):
    path = tmp_path / "r.pkl"
    on = ["experiment", "strategy", "processes", "threads", "host", "device"]
    save_results(
        [
            row(host="hostA", strategy="sequential", wall_s=10.0),
            row(host="hostA", strategy="allreduce", processes=2, wall_s=6.0),
            row(host="gpubox", device="cuda:0", strategy="cuda", wall_s=1.0),
            row(host="gpubox", device="cpu", strategy="sequential", wall_s=12.0),
        ],
        path,
    )
    # re-run on hostA: its rows are replaced, gpubox's are kept
    merged = save_results(
        [
            row(host="hostA", strategy="sequential", wall_s=9.0),
            row(host="hostA", strategy="allreduce", processes=4, wall_s=3.0),
        ],
        path,
        merge_on=on,
    )
    back = load_results(path)
    pd.testing.assert_frame_equal(back, merged)
    cols = ["host", "strategy", "processes", "wall_s"]
    got = sorted(map(tuple, back[cols].itertuples(index=False)))
    assert got == [
        ("gpubox", "cuda", 1, 1.0),
        ("gpubox", "sequential", 1, 12.0),
        ("hostA", "allreduce", 4, 3.0),
        ("hostA", "sequential", 1, 9.0),
    ]
    assert no_temp_files(tmp_path)


def test_merge_same_host_other_device_is_kept(tmp_path):
    path = tmp_path / "r.pkl"
    save_results([row(host="gpubox", device="cuda:0", strategy="cuda", wall_s=1.0)], path)
    save_results([row(host="gpubox", device="cpu", wall_s=12.0)], path, merge_on="strategy")
    back = load_results(path)
    assert sorted(back["device"]) == ["cpu", "cuda:0"]


def test_merge_drops_colliding_rows(tmp_path):
    path = tmp_path / "r.pkl"
    save_results([row(host="hostB", strategy="sequential", wall_s=5.0)], path)
    # merge key without host: hostB's sequential row collides with the new one
    save_results([row(host="hostA", strategy="sequential", wall_s=9.0)], path, merge_on="strategy")
    back = load_results(path)
    assert back["host"].tolist() == ["hostA"]


def test_without_merge_the_file_is_replaced(tmp_path):
    path = tmp_path / "r.pkl"
    save_results([row(host="hostB")], path)
    save_results([row(host="hostA")], path)
    assert load_results(path)["host"].tolist() == ["hostA"]


def test_load_glob_concatenates(tmp_path):
    save_results([row(experiment="a", extra_a=1)], tmp_path / "a.pkl")
    save_results([row(experiment="b"), row(experiment="b")], tmp_path / "b.pkl")
    df = load_results(str(tmp_path / "*.pkl"))
    assert df["experiment"].tolist() == ["a", "b", "b"]
    assert list(df.columns) == COLUMNS + ["extra_a"]
    assert load_results([tmp_path / "b.pkl"])["experiment"].tolist() == ["b", "b"]


def test_load_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nope.pkl")
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_results(str(tmp_path / "nothing*.pkl"))


# ---------------------------------------------------------------- step_stats


def test_step_stats_known_values():
    # warm-up: 1.0 + 0.5; rest: 0.1 0.1 0.2 0.3 -> median 0.15, q25 0.1, q75 0.225
    s = step_stats([1.0, 0.5, 0.1, 0.1, 0.2, 0.3], warmup=2)
    assert s["compile_s"] == pytest.approx(1.5 - 2 * 0.15)
    assert s["step_ms_median"] == pytest.approx(150.0)
    assert s["step_ms_iqr"] == pytest.approx(125.0)
    assert set(s) == {"compile_s", "step_ms_median", "step_ms_iqr"}


def test_step_stats_constant_steps_and_no_warmup():
    s = step_stats([0.02] * 10, warmup=0)
    assert s == pytest.approx({"compile_s": 0.0, "step_ms_median": 20.0, "step_ms_iqr": 0.0})
    s = step_stats(np.array([3.0, 0.02, 0.02, 0.02]), warmup=1)
    assert s["compile_s"] == pytest.approx(2.98)
    assert s["step_ms_median"] == pytest.approx(20.0)


def test_step_stats_clamps_compile_at_zero():
    s = step_stats([0.01, 0.5, 0.5, 0.5], warmup=1)
    assert s["compile_s"] == 0.0
    assert s["step_ms_median"] == pytest.approx(500.0)


@pytest.mark.parametrize(
    "times, warmup",
    [([0.1, 0.2], 2), ([], 0), ([0.1, 0.2], -1), ([0.1, float("nan")], 0), ([0.1, -0.2], 0)],
)
def test_step_stats_rejects_bad_input(times, warmup):
    with pytest.raises(ValueError):
        step_stats(times, warmup)


# ---------------------------------------------------------------- speedup_table


def test_speedup_against_same_host_baseline_only():
    df = to_frame(
        [
            row(host="hostA", strategy="sequential", wall_s=10.0),
            row(host="hostA", strategy="allreduce", processes=2, wall_s=5.0),
            row(host="hostA", strategy="hybrid", processes=2, threads=2, wall_s=4.0),
            # hostB has no sequential baseline of its own: hostA's must not be used
            row(host="hostB", strategy="allreduce", processes=2, wall_s=2.5),
            # another batch size on hostA: its own baseline only
            row(host="hostA", strategy="sequential", batch_size=64, wall_s=8.0),
            row(host="hostA", strategy="allreduce", batch_size=64, processes=4, wall_s=4.0),
        ]
    )
    t = speedup_table(df)
    assert len(t) == len(df)
    assert t["speedup"].tolist()[:3] == pytest.approx([1.0, 2.0, 2.5])
    assert t["efficiency"].tolist()[:3] == pytest.approx([1.0, 1.0, 0.625])
    assert math.isnan(t.loc[3, "speedup"]) and math.isnan(t.loc[3, "efficiency"])
    assert math.isnan(t.loc[3, "baseline_wall_s"])
    assert t.loc[5, "speedup"] == pytest.approx(2.0)
    assert t.loc[5, "efficiency"] == pytest.approx(0.5)
    # the input frame is not modified
    assert "speedup" not in df.columns


def test_speedup_median_of_repeated_baselines_and_throughput():
    df = to_frame(
        [
            row(strategy="sequential", wall_s=9.0, samples_per_s=100.0),
            row(strategy="sequential", wall_s=10.0, samples_per_s=90.0),
            row(strategy="sequential", wall_s=30.0, samples_per_s=80.0),
            row(strategy="numba", threads=2, wall_s=5.0, samples_per_s=180.0),
        ]
    )
    t = speedup_table(df)
    assert t.loc[3, "baseline_wall_s"] == pytest.approx(10.0)
    assert t.loc[3, "speedup"] == pytest.approx(2.0)
    tp = speedup_table(df, metric="samples_per_s")
    assert tp.loc[3, "speedup"] == pytest.approx(2.0)  # 180 / median(100, 90, 80)
    assert tp.loc[3, "efficiency"] == pytest.approx(1.0)


def test_speedup_custom_baseline_strategy():
    df = to_frame(
        [
            row(strategy="numba", threads=1, wall_s=8.0),
            row(strategy="numba", threads=4, wall_s=2.0),
        ]
    )
    t = speedup_table(df, baseline_strategy="numba")
    # both rows are baselines of the same group: median 5.0
    assert t["speedup"].tolist() == pytest.approx([5.0 / 8.0, 2.5])
