"""The kernels family (study/steps.py, study/experiments/kernels.py) against references:
every backend's step equals the NumPy step before anything is timed, the torch twin's loss
equals ours, FLOP counts and GFLOP/s match a hand count, trials are interleaved, and the
headlines are the ratios of medians of known synthetic trials."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial

import numpy as np
import pandas as pd
import pytest

from study import checks, measure, schema, steps
from study.experiments import kernels as K

TINY = dict(shape=(1, 12, 12), filters=(4, 8))
SEED_LAYERS = ["Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten",
               "Dense", "ReLU", "Dense"]
#: Hand count of the seed CNN's forward FLOPs per sample at 3x32x32 (a multiply-add = 2):
#: conv1 32x30x30 outputs of 3x3x3, conv2 64x13x13 of 3x3x32, dense 2304->256, 256->10.
SEED_FWD = [2 * 32 * 30 * 30 * 27, 2 * 64 * 13 * 13 * 288, 2 * 2304 * 256, 2 * 256 * 10]
#: Training: forward + dW of every parameter layer + dx of all but the first.
SEED_TRAIN = 3 * sum(SEED_FWD) - SEED_FWD[0]


# --- the step each backend times ----------------------------------------------------

def test_numba_and_torch_steps_equal_the_numpy_step():
    got = steps.agreement(["numba", "torch"], TINY["shape"], 4, TINY["filters"], steps=3)
    names = {c.name.split(" ")[0] for c in got}
    assert names == {"numba", "torch"}
    assert len(got) == 2 * (1 + 8)  # the losses and the 8 tensors of each backend
    assert all(c.ok for c in got), [c.line() for c in got if not c.ok]


def test_torch_twin_loss_equals_ours_step_by_step():
    with steps.pinned("numpy", 1):
        ours = steps.make_setup("numpy", 1, 8, (3, 16, 16), (4, 8))
        want = np.array([ours.step() for _ in range(3)], np.float32)
    with steps.pinned("torch", 1):
        twin = steps.make_setup("torch", 1, 8, (3, 16, 16), (4, 8))
        got = np.array([twin.step() for _ in range(3)], np.float32)
    assert checks.compare(got, want).ok
    assert not checks.compare(got[1:], want[:-1]).ok  # the steps do move the loss
    for k, w in ours.state().items():
        assert checks.compare(twin.state()[k], w, k).ok


def test_a_backend_computing_another_step_is_refused_before_timing(monkeypatch):
    real = steps.make_setup

    def off_by_a_seed(backend, *args):
        args = list(args)
        if backend == "numba":
            args[-1] += 1  # another initialisation: another step
        return real(backend, *args)

    monkeypatch.setattr(steps, "make_setup", off_by_a_seed)
    with pytest.raises(RuntimeError, match="differs from the NumPy reference"):
        K.check_agreement([("numpy", 1), ("numba", 1)], ["1x12x12"], log=None)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_kernels_cover_every_layer_and_add_up_to_the_step(backend):
    with steps.pinned(backend, 1):
        s = steps.make_setup(backend, 1, 2, (3, 32, 32), (32, 64))
        ks = s.kernels()
    got = [(k.name, k.direction) for k in ks]
    want = [(f"{i}.{n}", d) for i, n in enumerate(SEED_LAYERS) for d in ("fwd", "bwd")]
    assert got == want + [("loss", "fwd+bwd"), ("sgd_update", "update")]
    flops = {(k.name, k.direction): k.flops for k in ks}
    assert flops["0.Conv2D", "fwd"] == 2 * SEED_FWD[0]  # batch 2
    assert flops["0.Conv2D", "bwd"] == flops["0.Conv2D", "fwd"]  # dW only
    assert flops["3.Conv2D", "bwd"] == 2 * flops["3.Conv2D", "fwd"]  # dW and dx
    assert sum(flops.values()) == 2 * SEED_TRAIN == 2 * s.flops_per_sample
    assert all(k.nbytes > 0 for k in ks)


def test_gflops_of_a_known_step(monkeypatch):
    """10 ms per step of the seed CNN at batch 2: GFLOP/s from the hand count."""
    def fixed(fn, repeats, warmup=0, sync=None, collect=True):
        return {"compile_s": 0.5, "step_ms_median": 10.0, "step_ms_iqr": 1.0,
                "first_call_s": 0.51, "wall_s": 0.01 * repeats, "times_s": [0.01] * repeats,
                "result": fn()}

    monkeypatch.setattr(measure, "time_calls", fixed)
    cfg = dict(backend="numpy", threads=1, shape="3x32x32", batch=2, filters=(32, 64), steps=4)
    row = K.time_step(cfg).iloc[0]
    assert row["gflops"] == pytest.approx(SEED_TRAIN * 2 / 0.010 / 1e9)
    assert row["samples_per_s"] == pytest.approx(200.0)
    assert (row["samples"], row["first_step_s"], row["compile_s"]) == (8, 0.51, 0.5)
    assert row["config"] == "seed_cnn 3x32x32 f32,64 b2" and row["strategy"] == "sequential"
    pct = K.with_roofs(pd.DataFrame([row]), {("gemm", 1): 50.0})["pct_gemm_roof"].iloc[0]
    assert pct == pytest.approx(100 * SEED_TRAIN * 2 / 0.010 / 1e9 / 50.0)


def test_peak_memory_sees_at_least_the_batch():
    shape, batch = (3, 32, 32), 64
    with steps.pinned("numpy", 1):
        mem = steps.peak_memory(partial(steps.make_setup, "numpy", 1, batch, shape, (32, 64)))
    assert mem["peak_mem_mb"] >= batch * np.prod(shape) * 4 / measure.MB


def test_numpy_is_single_threaded_and_unknown_backends_say_why():
    assert steps.thread_problem("numpy", 2)
    with pytest.raises(ValueError, match="1 thread"):
        steps.prepare("numpy", 2)
    status = steps.backend_status(["numpy", "nope"])
    assert status["numpy"] == "ok" and "unknown backend" in status["nope"]
    lines = []
    assert K.series_plan([1], backends=("numpy", "nope"), log=lines.append) == [("numpy", 1)]
    assert any("skip nope" in line for line in lines)


# --- interleaving, rows, headlines -------------------------------------------------

#: Known samples/s per trial at the seed configuration: numba 2t is 2x numpy, 1.25x torch.
KNOWN = {("numpy", 1): [100, 98, 102, 101, 99], ("numba", 1): [150, 149, 151, 152, 148],
         ("numba", 2): [200, 196, 204, 202, 198], ("torch", 1): [140, 141, 139, 142, 138],
         ("torch", 2): [160, 158, 162, 161, 159]}


def synthetic(scale: str = "standard", experiment: str = "bench_step",
              where: tuple[str, int] = K.SEED, filters: str = "32,64",
              session: str = "s1", factor: float = 1.0) -> pd.DataFrame:
    """bench_step rows with the KNOWN throughputs, as the study saves them."""
    rows = []
    for (b, t), values in KNOWN.items():
        for trial, v in enumerate(values):
            sps = v * factor
            rows.append(dict(
                experiment=experiment, strategy=steps.STRATEGY[b], backend=b, processes=1,
                threads=t, device="cpu", model="seed_cnn", dataset="synthetic",
                batch_size=where[1], input_shape=where[0], filters=filters,
                config=K.config_label(where[0], where[1], filters), trial=trial,
                samples_per_s=sps, step_ms_median=1e3 * where[1] / sps, gflops=sps * 0.025,
                host="h", cpu="test cpu", physical_cores=2, versions={}, commit="c",
                timestamp=f"2026-01-01T00:00:{trial:02d}"))
    return schema.rows(rows, scale=scale, session=session)


def test_ratio_headlines_are_ratios_of_medians_with_cis():
    df = pd.concat([synthetic(), synthetic(where=K.MPI, session="s2", factor=0.5)],
                   ignore_index=True)
    hs = {h.key: h for h in K.headlines({K.NAME: df})}
    h = hs["numba2t_vs_numpy_seed"]
    assert h.value == pytest.approx(200 / 100)
    assert h.lo <= h.value <= h.hi and h.hi - h.lo < 0.2
    assert "3x32x32, batch 128" in h.label and h.trials == 5 and h.session == "s1"
    assert hs["numba1t_vs_torch1t_seed"].value == pytest.approx(150 / 140)
    assert hs["numba2t_vs_torch2t_mpi"].value == pytest.approx(200 / 160)  # factor cancels
    assert "1x28x28, batch 64" in hs["numba2t_vs_torch2t_mpi"].label
    assert not h.anomaly
    assert not hs["numba_vs_numpy_grid_best"].measured
    assert not hs["numba_cold_compile"].measured


def test_best_grid_cell_is_labelled_and_quick_rows_are_flagged():
    cells = pd.concat([synthetic("quick", "bench_grid", ("1x28x28", 32), "16,32", "g"),
                       synthetic("quick", "bench_grid", ("1x28x28", 128), "16,32", "g",
                                 factor=1.0)], ignore_index=True)
    big = cells["batch_size"] == 128
    cells.loc[big & (cells["backend"] == "numpy"), "samples_per_s"] *= 0.5  # 4x there
    table = K.grid_ratios(cells)
    assert sorted(table["ratio"].round(6)) == [2.0, 4.0]
    best = {h.key: h for h in K.headlines({K.NAME: cells})}["numba_vs_numpy_grid_best"]
    assert best.value == pytest.approx(4.0)
    assert "best cell of the grid" in best.label and "batch 128" in best.label
    assert "quick-scale rows" in best.anomaly


def test_superlinear_thread_speedup_is_flagged_on_its_rows():
    df = synthetic()
    df.loc[(df["backend"] == "numba") & (df["threads"] == 2), "samples_per_s"] *= 1.7
    flagged = K.flag_speedups(df)
    numba2 = flagged[(flagged["backend"] == "numba") & (flagged["threads"] == 2)]
    assert numba2["anomaly"].str.contains("superlinear").all()
    others = flagged[~flagged.index.isin(numba2.index)]
    assert not others["anomaly"].str.contains("superlinear").any()


def test_trials_are_interleaved_and_rows_saved(monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_RESULTS_DIR", str(tmp_path))
    tiny = dict(shapes=("1x12x12",), batches=(4,), threads=(1, 2), steps=2, trials=3,
                kernel_config=("1x12x12", 4), grid_shape="1x12x12")
    monkeypatch.setattr(K, "preset", lambda family, scale: tiny)
    order = []

    def fake(cfg, experiment="bench_step"):
        order.append((cfg["backend"], cfg["threads"]))
        v = KNOWN[cfg["backend"], cfg["threads"]][sum(o == order[-1] for o in order) - 1]
        return pd.DataFrame([K.step_row(cfg, "cpu", experiment, samples_per_s=float(v),
                                    step_ms_median=4e3 / v)])

    monkeypatch.setattr(K, "time_step", fake)
    frames = K.run("quick", parts=["steps"], log=None)
    pairs = K.series_plan(tiny["threads"], log=None)
    assert pairs == [p for p in KNOWN if p[1] <= measure.max_threads()]
    rounds = [order[i:i + len(pairs)] for i in range(0, len(order), len(pairs))]
    assert len(rounds) == 3 and all(sorted(r) == sorted(pairs) for r in rounds)
    assert rounds[0] != rounds[1]  # rotated: no series always first
    df = frames[K.NAME]
    n = 3 * len(pairs)
    assert len(df) == n and set(df["trial"]) == {0, 1, 2} and df["session"].nunique() == 1
    assert (df["peak_mem_mb"] > 0).all()  # the untimed memory pass, once per configuration
    saved = schema.load(K.NAME, "quick")
    assert len(saved) == n
    q = K.ratio(saved, "steps", ("numba", 1), ("numpy", 1), "1x12x12", 4)
    assert q["ratio"] == pytest.approx(np.median(KNOWN["numba", 1][:3])
                                       / np.median(KNOWN["numpy", 1][:3]))


def test_a_quick_run_of_roofs_kernels_and_grid_measures_every_part(monkeypatch, tmp_path):
    """The real thing at tiny sizes: rows validate and join up (no timing is read)."""
    monkeypatch.setenv("CNN_RESULTS_DIR", str(tmp_path))
    df = K.run("quick", parts=["roofs", "kernels", "grid"], log=None)[K.NAME]
    assert set(df["experiment"]) == {"bench_roof", "bench_kernel", "bench_grid"}
    roofs = K.roofs_of(df)
    assert {m for m, _ in roofs} == {"gemm", "copy"} and all(v > 0 for v in roofs.values())
    kern = K.rows_of(df, "kernels")
    conv = kern[(kern["kernel"] == "3.Conv2D") & (kern["direction"] == "fwd")]
    t = conv["threads"].astype(int)
    want = 100 * conv["gflops"] / t.map(lambda n: roofs["gemm", n])
    assert np.allclose(conv["pct_gemm_roof"], want)
    grid = K.rows_of(df, "grid")
    assert set(grid["series"]) >= {"numpy 1t", "numba 1t"}
    assert (df["anomaly"].str.contains("trial")).all()  # 2 quick trials: no CI, flagged


def test_fresh_process_row_has_start_up_and_first_step_apart():
    cfg = dict(backend="numpy", cache="", steps=3, batch=4)
    row = K.time_fresh_process(cfg).iloc[0]
    assert row["startup_s"] > 0 and row["jit_cache"] == ""
    assert row["first_step_s"] == pytest.approx(row["compile_s"] + row["step_ms_median"] / 1e3)
    assert row["process_wall_s"] >= row["startup_s"] + row["wall_s"] - 1e-6


def test_cli_help_and_bad_part():
    res = subprocess.run([sys.executable, "-m", "study.experiments.kernels", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "--parts" in res.stdout and "bench_compile" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "study.experiments.kernels", "--parts", "nope",
                          "--scale", "quick"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown nope" in bad.stderr
    with pytest.raises(ValueError, match="unknown part"):
        K.run("quick", parts=["nope"])


# --- the harness this family leans on (moved from tests/test_bench.py) ----------------

def test_time_calls_excludes_first_call_and_warmup():
    calls = []

    def fn():
        calls.append(1)
        return len(calls)

    t = measure.time_calls(fn, repeats=4, warmup=2)
    assert len(calls) == 7 and t["result"] == 7 and len(t["times_s"]) == 4
    assert t["wall_s"] == pytest.approx(sum(t["times_s"]))
    assert t["compile_s"] >= 0 and t["step_ms_median"] > 0


def test_copy_roof_at_two_threads():
    gbps = measure.copy_gbps(4 * measure.MB, 2, threads=2)
    assert math.isfinite(gbps) and gbps > 0


def test_pinned_threads_sets_and_restores():
    import numba
    import torch
    from threadpoolctl import threadpool_info

    def state():
        return (numba.get_num_threads(), torch.get_num_threads(),
                sorted((p["filepath"], p["num_threads"]) for p in threadpool_info()))

    before = state()
    with measure.pinned_threads(1) as got:
        assert got == 1 and numba.get_num_threads() == 1 and torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert state() == before
    with pytest.raises(RuntimeError), measure.pinned_threads(1):
        raise RuntimeError("boom")
    assert state() == before
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"), \
            measure.pinned_threads(measure.max_threads() + 1):
        pass
