"""The MPI family of the study: plans (P, batches, configs), rows from the CLIs, the
analysis on synthetic frames with known answers, the figures, and a real quick run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cnn.parallel import costmodel as cm
from study import measure, paths, schema
from study.experiments import mpi
from study.experiments import mpi_analysis as A
from study.figures import mpi as figs

NOISE = np.array([-0.01, 0.0, 0.01, 0.005, -0.005])  # symmetric: the median is exact


def row(**kw):
    base = dict(experiment="mpi_weak", backend="numpy", threads=1, device="cpu",
                model="seed_cnn", dataset="digits", mode="weak", config="weak: test",
                host="h", cpu="test cpu (2 cores)", physical_cores=2, versions={},
                commit="abc", timestamp="2026-01-01T00:00:00", step=11.0, startup_s=1.0,
                first_step_s=0.5, comm_s=0.0, batch_size=64)
    base.update(kw)
    return base


def timing_rows(strategy, processes, rate, *, trials=5, mode="weak", batch=64,
                startup=1.0, comm_per_step=0.0, cores=2):
    """Rows of ``rate`` samples/s (x (1 + NOISE)) in steady steps, 11 steps per run."""
    t = A.trainers(strategy, processes)
    gb = t * batch
    out = []
    for i in range(trials):
        r = rate * (1 + NOISE[i % len(NOISE)])
        out.append(row(strategy=strategy, processes=processes, workers=t, trial=i,
                       global_batch=gb, batch_size=batch, wall_s=10 * gb / r,
                       samples_per_s=r, startup_s=startup, mode=mode,
                       experiment=f"mpi_{mode}", config=f"{mode}: test",
                       comm_s=11 * comm_per_step, physical_cores=cores))
    return out


SESSION = "20260101T000000-abcdef"


def frame(rows, session=SESSION, scale="standard"):
    return schema.rows(pd.DataFrame(rows), scale=scale, session=session)


@pytest.fixture
def scaling_df():
    return scaling_frame()


def scaling_frame():
    """Sequential 640/s beats 1-rank allreduce (640/1.1); allreduce on 2 ranks is 1.8x,
    the server with 1 worker (2 processes) 1.2x, with 2 workers (3 processes) 1.5x."""
    return frame([*timing_rows("sequential", 1, 640), *timing_rows("allreduce", 1, 640 / 1.1),
                  *timing_rows("allreduce", 2, 1.8 * 640, comm_per_step=0.02),
                  *timing_rows("param-server", 2, 1.2 * 640),
                  *timing_rows("param-server", 3, 1.5 * 640),
                  *timing_rows("allreduce", 3, 2.0 * 640)])


# --- plans -----------------------------------------------------------------------------------

def flag_value(job, flag):
    return job.args[job.args.index(flag) + 1]


def test_scaling_plan_ranks_batches_and_configs():
    jobs = mpi.scaling_plan("standard", cores=4)
    by = {(j.mode, j.strategy, j.processes): j for j in jobs}
    seq = {m: by[(m, "sequential", 1)] for m in ("weak", "strong")}
    assert [flag_value(seq[m], "--batch-size") for m in ("weak", "strong")] == ["64", "128"]
    assert not seq["weak"].mpi and "cnn.train" in seq["weak"].command()
    ranks = {(m, s): sorted(p for (mm, ss, p) in by if (mm, ss) == (m, s))
             for (m, s, _) in by}
    assert ranks[("weak", "allreduce")] == [1, 2, 3, 4]  # 1 .. physical cores, no more
    assert ranks[("strong", "allreduce")] == [1, 2, 4]  # 3 does not divide 128
    assert ranks[("weak", "param-server")] == [2, 3, 4]  # rank 0 serves
    assert ranks[("strong", "async-param-server")] == [2, 3]  # 3 workers do not divide 128
    ar4 = by[("strong", "allreduce", 4)]
    assert (flag_value(ar4, "--batch-size"), ar4.workers, ar4.global_batch) == ("32", 4, 128)
    ps3 = by[("weak", "param-server", 3)]
    assert (ps3.workers, ps3.global_batch, ps3.batch_size) == (2, 128, 64)
    assert ps3.command()[1:3] == ["-n", "3"] and "cnn.parallel.mpi" in ps3.command()
    ov = by[("weak", "allreduce-overlap", 2)]
    assert "--overlap" in ov.args
    for mode in ("weak", "strong"):  # one config per mode: equal but the worker count
        assert len({j.config for j in jobs if j.mode == mode}) == 1
        assert {flag_value(j, "--max-steps") for j in jobs if j.mode == mode} == {"60"}
    assert jobs[0].config != jobs[-1].config
    assert {flag_value(j, "--threads") for j in jobs} == {"1"}


def test_oversubscription_only_when_asked_or_at_full():
    std = mpi.scaling_plan("standard", cores=2, strategies=["allreduce"])
    assert max(j.processes for j in std) == 2
    asked = mpi.scaling_plan("standard", cores=2, strategies=["allreduce"], oversubscribe=True)
    assert max(j.processes for j in asked) == 3
    full = mpi.scaling_plan("full", cores=2, strategies=["param-server"])
    assert sorted({j.processes for j in full if j.mode == "weak"}) == [1, 2, 3]
    # enough epochs for 200 steps of 3 x 64 on the whole of Fashion-MNIST (60000)
    big = next(j for j in full if j.processes == 3 and j.mode == "weak")
    assert flag_value(big, "--epochs") == "1" and flag_value(big, "--max-steps") == "200"
    ranked = mpi.scaling_plan("full", cores=16, strategies=["allreduce"], ranks=[8])
    eight = next(j for j in ranked if j.processes == 8 and j.mode == "weak")
    assert flag_value(eight, "--epochs") == str(int(np.ceil(200 * 8 * 64 / 60000)))


def test_hybrid_plan_layouts_fill_the_cores_with_equal_work_per_worker():
    jobs = mpi.hybrid_plan("standard", cores=4)
    got = [(j.strategy, j.processes, j.threads, int(flag_value(j, "--batch-size")), j.workers,
            j.global_batch) for j in jobs]
    assert got == [("sequential", 1, 1, 64, 1, 64), ("allreduce", 1, 1, 64, 1, 64),
                   ("allreduce", 1, 4, 256, 4, 256), ("allreduce", 2, 2, 128, 4, 256),
                   ("allreduce", 4, 1, 64, 4, 256)]
    assert len({j.config for j in jobs}) == 1
    env = jobs[3].env()
    assert (env["NUMBA_NUM_THREADS"], env["OMP_NUM_THREADS"]) == ("2", "1")
    assert flag_value(jobs[3], "--backend") == "numba"


def test_accuracy_plan_equal_global_batch_seed_major():
    jobs = mpi.accuracy_plan("quick", seeds=2)
    assert [(j.strategy, j.processes, j.seed) for j in jobs[:5]] == [
        ("sequential", 1, 0), ("allreduce", 2, 0), ("param-server", 3, 0),
        ("async-param-server", 3, 0), ("model-average", 2, 0)]
    assert [j.seed for j in jobs] == [0] * 5 + [1] * 5
    assert {j.global_batch for j in jobs} == {64}
    assert {flag_value(j, "--seed") for j in jobs[5:]} == {"1"}
    assert {flag_value(j, "--schedule") for j in jobs} == {"cosine"}
    assert len({j.config for j in jobs}) == 1


def test_costmodel_plan():
    assert mpi.costmodel_plan("standard", cores=4) == [
        {"kind": "comm", "processes": 2}, {"kind": "comm", "processes": 4}, {"kind": "compute"}]
    assert [c.get("processes") for c in mpi.costmodel_plan("standard", cores=12)] == [
        2, 4, 8, 12, None]
    assert [c.get("processes") for c in mpi.costmodel_plan("standard", cores=1)] == [2, None]
    assert mpi.costmodel_plan("quick", cores=8)[0] == {"kind": "comm", "processes": 2}


# --- rows from a CLI frame --------------------------------------------------------------------

def test_job_rows_split_off_the_first_step():
    job = next(j for j in mpi.scaling_plan("quick", cores=2) if j.mode == "strong"
               and j.strategy == "allreduce" and j.processes == 2)
    raw = pd.DataFrame([row(strategy="allreduce", processes=2, batch_size=128, step=11.0,
                            wall_s=1.2, compile_s=0.1, step_ms_median=100.0, startup_s=3.0,
                            batch_per_rank=64, train_ranks=2, mpi="MPICH")])
    got = mpi.job_rows(job, raw).iloc[0]
    assert got["first_step_s"] == pytest.approx(0.2)
    assert got["wall_s"] == pytest.approx(1.0)
    assert got["samples_per_s"] == pytest.approx(128 * 10 / 1.0)
    assert (got["batch_size"], got["global_batch"], got["workers"]) == (64, 128, 2)
    assert got["config"] == job.config and got["experiment"] == "mpi_strong"
    assert "train_ranks" not in got and "mpi" not in got  # outside the schema
    with pytest.raises(ValueError, match="expected allreduce"):
        mpi.job_rows(job, raw.assign(strategy="model-average"))


# --- analysis: known answers ------------------------------------------------------------------

def test_speedup_against_best_one_process_run(scaling_df):
    pts = A.scaling_points(scaling_df).set_index(["strategy", "workers", "processes"])
    ar2 = pts.loc[("allreduce", 2, 2)]
    assert ar2["baseline"] == "sequential"  # 640/s beats 1-rank allreduce's 582/s
    assert ar2["speedup"] == pytest.approx(1.8) and ar2["efficiency"] == pytest.approx(0.9)
    assert ar2["speedup_lo"] < 1.8 < ar2["speedup_hi"]
    assert ar2["anomaly"] == ""
    # the one-worker server run uses 2 processes: not a baseline, and superlinear vs 640/s
    ps1 = pts.loc[("param-server", 1, 2)]
    assert ps1["speedup"] == pytest.approx(1.2) and "rank 0 serves" in ps1["anomaly"]
    ps2 = pts.loc[("param-server", 2, 3)]
    assert ps2["efficiency"] == pytest.approx(1.5 / 2)  # workers = training ranks only
    assert "oversubscribed: 3 processes" in ps2["anomaly"]
    assert "oversubscribed" in pts.loc[("allreduce", 3, 3)]["anomaly"]
    top = A.largest_fitting(A.scaling_points(scaling_df)).set_index("strategy")
    assert top.loc["allreduce", "processes"] == 2 and top.loc["param-server", "workers"] == 1
    flagged = A.flag(scaling_df, A.scaling_points(scaling_df))
    over = flagged[flagged["processes"] == 3]["anomaly"]
    assert over.str.contains("oversubscribed").all()
    assert (flagged[(flagged["strategy"] == "allreduce") & (flagged["processes"] == 2)]
            ["anomaly"] == "").all()


def test_headlines_name_p_workers_and_how_the_server_counts(scaling_df):
    hs = {h.key: h for h in A.headlines({A.SCALING: scaling_df})}
    h = hs["mpi_weak_allreduce"]
    assert h.value == pytest.approx(0.9) and h.lo < 0.9 < h.hi and h.unit == "%"
    assert "P = 2 processes" in h.note and h.scale == "standard"
    assert h.config == "weak: test" and h.trials == 5
    ps = hs["mpi_weak_param-server"]  # 2 processes = 1 training worker: no efficiency
    assert not ps.measured and "rank 0 serves" in ps.note and "3 or more cores" in ps.note
    assert not hs["mpi_strong_allreduce"].measured
    assert not hs["mpi_accuracy_allreduce"].measured
    quick = {h.key: h for h in A.headlines({A.SCALING: frame(
        scaling_df.to_dict("records"), scale="quick")})}
    assert "quick-scale rows" in quick["mpi_weak_allreduce"].anomaly


def test_only_the_latest_session_is_read(scaling_df):
    old = scaling_df.assign(session="20250101T000000-000000", timestamp="2025-01-01T00:00:00",
                            samples_per_s=scaling_df["samples_per_s"] * 2)
    both = pd.concat([old, scaling_df], ignore_index=True)
    assert set(A.current(both)["session"]) == {SESSION}
    pts = A.scaling_points(both)
    assert set(pts["session"]) == {"20250101T000000-000000", SESSION}  # never mixed


def test_amortisation_known_answer():
    rows = []
    for strategy, procs, startup, step in (("sequential", 1, 1.0, 0.1),
                                           ("allreduce", 1, 2.0, 0.11),
                                           ("allreduce", 2, 2.0, 0.1)):
        gb = 64 * procs
        rows += timing_rows(strategy, procs, gb / step, startup=startup, trials=3)
    df = frame(rows)
    am = A.amortisation(df, [1, 10, 100, 1000]).set_index(["strategy", "workers",
                                                           "steps_per_worker"])
    t1 = lambda s: 1.5 + 0.1 * (s - 1)  # noqa: E731 - sequential: start-up 1 + first step
    t2 = lambda s: 2.5 + 0.1 * (s - 1)  # noqa: E731 - 2 ranks: start-up 2 + first step
    for s in (1, 10, 100, 1000):
        assert am.loc[("allreduce", 2, s), "speedup"] == pytest.approx(2 * t1(s) / t2(s))
    table = A.amortisation_table(df, [1, 10, 100, 1000]).set_index("strategy")
    assert table.loc["allreduce", "steady"] == pytest.approx(2.0)
    # 2 t1 / t2 >= 0.9 x 2 from S = 76 on: the first listed length is 100
    assert table.loc["allreduce", "steps to 90% of steady"] == 100
    assert table.loc["allreduce", "startup_s"] == pytest.approx(2.0)


def test_comm_split_known_answer(scaling_df):
    split = A.comm_split(scaling_df).set_index(["strategy", "processes"])
    ar = split.loc[("allreduce", 2)]
    step_ms = 128 / (1.8 * 640) * 1e3
    assert ar["step_ms"] == pytest.approx(step_ms)
    assert ar["comm_ms"] == pytest.approx(20.0) and ar["compute_ms"] == pytest.approx(
        step_ms - 20.0)
    assert ("sequential", 1) in split.index and ("allreduce", 3) not in split.index
    assert ("allreduce", 1) not in split.index  # a one-process run, not the baseline


def accuracy_frame():
    """Allreduce 0.5 points above sequential for every seed, the async server -2 (median)."""
    rows = []
    accs = {"sequential": [0.90, 0.91, 0.92], "allreduce": [0.905, 0.915, 0.925],
            "async-param-server": [0.88, 0.90, 0.90]}
    for strategy, values in accs.items():
        for seed, acc in enumerate(values):
            for epoch, a in ((1, acc - 0.1), (2, acc)):
                rows.append(row(strategy=strategy, processes=3 if "param" in strategy else 2,
                                workers=2, trial=seed, epoch=float(epoch), test_acc=a,
                                experiment="mpi_accuracy", mode="accuracy",
                                config="accuracy: test", staleness_mean=0.5))
    return frame(rows)


def test_accuracy_paired_by_seed_known_answer():
    df = accuracy_frame()
    pts = A.accuracy_points(df).set_index("strategy")
    assert pts.loc["allreduce", "median"] == pytest.approx(0.5)
    assert pts.loc["allreduce", "test_acc"] == pytest.approx(0.915)
    assert pts.loc["async-param-server", "median"] == pytest.approx(-2.0)
    assert pts.loc["sequential", "median"] == pytest.approx(0.0)
    curves = A.accuracy_curves(df)
    assert len(curves) == 6 and set(curves["epoch"]) == {1.0, 2.0}
    hs = {h.key: h for h in A.accuracy_headlines(df)}
    assert hs["mpi_accuracy_allreduce"].value == pytest.approx(0.5)
    assert hs["mpi_accuracy_allreduce"].text().startswith("+0.50 pts")
    assert not hs["mpi_accuracy_model-average"].measured


ALPHA, BETA, C0, C1 = 2e-6, 5e9, 1e-3, 2e-4


def test_diverged_seeds_are_counted_not_dropped():
    """A seed whose run diverged is a result: counted, flagged, left out of the median."""
    text = ("accuracy async-param-server  P=3x1T b=32 failed with status 2\n"
            "rank 1 failed: DivergenceError: loss became nan on worker 1 at global step 56: "
            "lower --lr\n")
    why = measure.divergence(text)
    assert why == "diverged: loss became nan on worker 1 at global step 56: lower --lr"
    assert measure.divergence("rank 1 failed: ValueError: boom") is None
    job = next(j for j in mpi.accuracy_plan("quick", seeds=1)
               if j.strategy == "async-param-server")
    lost = mpi.diverged_row(job, why).assign(trial=3, config="accuracy: test", host="h")
    lost = schema.rows(lost, scale="standard", session=SESSION)
    df = pd.concat([accuracy_frame(), lost], ignore_index=True)
    pts = A.accuracy_points(df).set_index("strategy")
    assert pts.loc["async-param-server", "median"] == pytest.approx(-2.0)
    assert pts.loc["async-param-server", "diverged"] == 1
    assert "diverged (NaN loss) in 1 of 4 seed(s)" in pts.loc["async-param-server", "anomaly"]
    assert pts.loc["allreduce", "diverged"] == 0
    hs = {h.key: h for h in A.accuracy_headlines(df)}
    assert "diverged in 1 seed(s)" in hs["mpi_accuracy_async-param-server"].note


def costmodel_frame(session=SESSION):
    rows = []
    for trial in range(3):
        for n in (4, 256, 1024, 65536, 262144, 1048576):
            rows.append(row(experiment="mpi_comm", strategy="pingpong", processes=2, workers=2,
                            model="message", dataset="none", batch_size=0, bytes=float(n),
                            time_s=cm.p2p_time(n, ALPHA, BETA), trial=trial, kind="pingpong",
                            mode="costmodel", config="costmodel: test"))
            for p in (2, 3):
                rows.append(row(experiment="mpi_comm", strategy="allreduce", processes=p,
                                workers=p, model="message", dataset="none", batch_size=0,
                                bytes=float(n), time_s=cm.ring_allreduce_time(n, p, ALPHA, BETA)
                                * (1 + 0.01 * (trial - 1)), trial=trial, kind="allreduce",
                                mode="costmodel", config="costmodel: test"))
        for b in (4, 16, 64):
            rows.append(row(experiment="mpi_compute", strategy="sequential", processes=1,
                            workers=1, batch_size=b, time_s=C0 + C1 * b * 1.1,
                            time_min_s=C0 + C1 * b, bytes=4e5, trial=trial, kind="compute",
                            mode="costmodel", config="costmodel: test"))
    return frame(rows, session=session)


def test_costmodel_fit_check_and_extrapolation_known_answer():
    df = costmodel_frame()
    model = A.fit_costmodel(df)
    assert model.alpha == pytest.approx(ALPHA, rel=1e-3) and model.beta == pytest.approx(
        BETA, rel=1e-6)
    assert (model.compute.c0, model.compute.c1) == pytest.approx((C0, C1))
    steps = frame([*timing_rows("sequential", 1, 64 / (C0 + C1 * 64)),
                   *timing_rows("allreduce", 2, 128 / (C0 + C1 * 64 + cm.ring_allreduce_time(
                       4e5, 2, ALPHA, BETA)))])
    check = A.costmodel_check(df, steps)
    ar = check[check["kind"] == "allreduce"]
    assert len(ar) == 12 and np.abs(ar["rel_error"]).max() < 1e-3
    st = check[check["kind"] == "step"].set_index(["strategy", "processes"])
    assert np.abs(st["rel_error"]).max() < 1e-6
    hs = {h.key: h for h in A.costmodel_headlines(df, steps)}
    assert hs["costmodel_step_error"].value < 1e-6 and hs["costmodel_step_error"].trials == 1
    ib = hs["costmodel_weak_1024_ib"]
    net = cm.NETWORKS["IB-100G"]
    assert ib.value == pytest.approx((C0 + C1 * 64) / (C0 + C1 * 64 + cm.ring_allreduce_time(
        4e5, 1024, net.alpha, net.beta))) and "modelled, not measured" in ib.note
    assert ib.text().endswith("% (model)") and ib.unit != "%"  # not among measured efficiencies
    assert hs["costmodel_step_error"].text().startswith("0.0%")
    assert not any(h.measured for h in A.costmodel_headlines(None))
    ext = A.extrapolation(df)
    assert set(ext["network"]) == {"shm", *cm.NETWORKS}
    e = ext[(ext["network"] == "shm") & (ext["processes"] == 16)].iloc[0]
    want = (C0 + C1 * 64) / (C0 + C1 * 64 + cm.ring_allreduce_time(4e5, 16, ALPHA, BETA))
    assert e["weak_efficiency"] == pytest.approx(want, rel=1e-6)


def test_the_cost_model_is_checked_only_against_its_own_sittings_steps():
    """A sitting whose scaling rows were dropped must not borrow another sitting's steps:
    compute speed drifts between sittings by as much as the model's error."""
    df = costmodel_frame(session="20260101T1")
    steps = frame([*timing_rows("sequential", 1, 64 / (C0 + C1 * 64)),
                   *timing_rows("allreduce", 2, 100.0)], session="20260101T2")
    check = A.costmodel_check(df, steps)
    assert set(check["kind"]) == {"allreduce"}
    hs = {h.key: h for h in A.costmodel_headlines(df, steps)}
    assert not hs["costmodel_step_error"].measured
    assert "20260101T1" in hs["costmodel_step_error"].note
    assert hs["costmodel_weak_1024_ib"].measured


# --- figures ----------------------------------------------------------------------------------

def series_in(ax) -> int:
    return len(ax.containers)


def test_figures_draw_one_series_per_strategy_and_save(scaling_df, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("agg")
    monkeypatch.setenv(paths.IMAGES_ENV, str(tmp_path))
    frames = {A.SCALING: scaling_df, A.COSTMODEL: costmodel_frame()}
    fig = figs.scaling(frames, "quick")
    weak, strong = fig.axes[:2]
    assert series_in(weak) == 2  # allreduce, param-server with CIs; sequential is the baseline
    assert [t.get_text() for t in weak.get_legend().get_texts()] == [
        "ideal", "allreduce", "param-server"]
    assert "baseline: sequential" in weak.get_title()
    assert "no strong-scaling rows" in strong.texts[0].get_text()
    assert (tmp_path / "mpi_speedup.png").exists() and (tmp_path / "mpi_speedup.pdf").exists()
    fig = figs.comm_split(frames)
    # compute + comm bars: the baseline (sequential), then the largest P within the cores
    # of each strategy (allreduce P=2, param-server P=2)
    assert len(fig.axes[0].patches) == 2 * 3
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        "sequential P=1", "allreduce P=2", "param-server P=2"]
    fig = figs.amortisation(frames, [1, 10, 100])
    assert series_in(fig.axes[0]) == 2  # allreduce and param-server at the largest P
    fig = figs.costmodel_check(frames)
    # Allreduce by P (2, 3); steps of sequential, allreduce and the parameter server
    assert series_in(fig.axes[0]) == 2 and series_in(fig.axes[1]) == 3
    fig = figs.extrapolation(frames)
    assert len(fig.axes[0].lines) == 2 * (1 + len(cm.NETWORKS))
    empty = {}
    for draw in (figs.scaling, figs.comm_split, figs.hybrid, figs.accuracy,
                 figs.costmodel_check, figs.extrapolation):
        assert draw(empty) is not None  # nothing measured: panels say so, no error
    import matplotlib.pyplot as plt

    plt.close("all")


def test_more_than_six_series_in_a_panel_is_refused(scaling_df):
    import matplotlib

    matplotlib.use("agg")
    extra = [r for s in ("a", "b", "c", "d") for r in timing_rows(f"peer-{s}", 2, 0.1)]
    df = frame([*scaling_df.to_dict("records"), *extra])
    with pytest.raises(ValueError, match="7 series in one panel"):
        figs.scaling({A.SCALING: df}, save=False)


# --- real runs (quick scale) ------------------------------------------------------------------

@pytest.mark.mpi
def test_quick_jobs_give_valid_rows_with_fixed_costs_apart():
    jobs = [j for j in mpi.scaling_plan("quick", cores=2) if j.mode == "weak"
            and (j.strategy, j.processes) in (("sequential", 1), ("param-server", 2))]
    df = mpi.measure_jobs(jobs, 1, scale="quick", session="t", log=None)
    schema.validate(df, strict=True)
    assert list(df["strategy"]) == ["sequential", "param-server"]
    assert list(df["workers"]) == [1, 1] and list(df["processes"]) == [1, 2]
    assert (df["startup_s"] > 0).all() and (df["first_step_s"] > 0).all()
    assert np.allclose(df["samples_per_s"], df["global_batch"] * (df["step"] - 1)
                       / df["wall_s"])


@pytest.mark.mpi
def test_quick_costmodel_part_saves_and_fits(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path))
    out = mpi.run("quick", parts=["costmodel"], log=None)
    df = schema.load(A.COSTMODEL, "quick", strict=True)
    assert len(df) == len(out[A.COSTMODEL])
    assert set(df["experiment"]) == {"mpi_comm", "mpi_compute"}
    comp = df[df["experiment"] == "mpi_compute"]
    assert sorted(comp["batch_size"]) == [4, 16, 64] and (comp["time_min_s"] > 0).all()
    assert set(comp["bytes"]) == {float(cm.measure_compute("seed_cnn", (1, 8, 8), (2,), 1)[
        "param_bytes"].iloc[0])}
    comm = df[df["experiment"] == "mpi_comm"]
    assert set(comm["strategy"]) == {"pingpong", "allreduce"} and (comm["time_s"] > 0).all()
    try:  # ten repeats on a shared 2-core host: the fit may honestly refuse
        model = A.fit_costmodel(df)
    except ValueError as exc:
        assert "fit no latency/bandwidth model" in str(exc)
    else:
        assert model.alpha >= 0 and model.beta > 0 and model.compute.c1 > 0


@pytest.mark.mpi
def test_equivalence_on_ipyparallel_engines():
    checks = mpi.equivalence()
    assert len(checks) == 8 and checks["ok"].all(), checks
    assert checks["rel_err"].max() < 1e-4


@pytest.mark.parametrize("cmd, flag", [
    (["-m", "study.experiments.mpi", "--help"], "--parts"),
    (["scripts/mpi_scaling.py", "--help"], "--oversubscribe"),
    (["scripts/ipp_slurm.py", "--help"], "--nodes")])
def test_clis_have_help(cmd, flag):
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=60,
                          cwd=paths.project_root())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and flag in proc.stdout


def test_noisy_ping_pong_falls_back_or_says_why():
    import matplotlib

    matplotlib.use("agg")
    df = costmodel_frame()
    big = (df["strategy"] == "pingpong") & (df["bytes"] >= 65536)
    # large messages that do not grow with size (a busy host): calibrate finds no bandwidth
    noisy = df.copy()
    noisy.loc[big, "time_s"] = noisy.loc[big, "time_s"].to_numpy()[::-1]
    model = A.fit_costmodel(noisy)
    assert model.method.startswith("fit_hockney") and model.beta > 0
    hopeless = df.copy()
    pp = hopeless["strategy"] == "pingpong"
    hopeless.loc[pp, "time_s"] = 1e-3 / hopeless.loc[pp, "bytes"]  # falls with size
    with pytest.raises(ValueError, match="fit no latency/bandwidth model"):
        A.fit_costmodel(hopeless)
    check = A.costmodel_check(hopeless)
    assert list(check.columns) == ["why"] and "quieter machine" in check["why"].iloc[0]
    assert list(A.extrapolation(hopeless).columns) == ["why"]
    fig = figs.costmodel_check({A.COSTMODEL: hopeless}, save=False)
    assert "quieter" in fig.axes[0].texts[0].get_text().replace("\n", " ")
    assert figs.extrapolation({A.COSTMODEL: hopeless}, save=False) is not None


@pytest.mark.parametrize("df", [None, pd.DataFrame()])
def test_analysis_of_nothing_measured_is_empty(df):
    steps = [1, 10]
    for table in (A.scaling_table(df), A.amortisation(df, steps), A.amortisation_table(df, steps),
                  A.comm_split(df), A.accuracy_points(df), A.accuracy_curves(df),
                  A.costmodel_check(df, df), A.extrapolation(df), A.scaling_points(df)):
        assert isinstance(table, pd.DataFrame) and not len(table)
    assert A.fit_costmodel(df) is None
    assert not any(h.measured for h in A.headlines({}))
