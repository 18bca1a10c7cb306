"""The stragglers family: plans and commands, one run's rows, the analysis of frames with
known answers (time to the target, how much sooner, accuracy gaps, the targets), the
figures' series, the run-time estimate of the standard preset, and real quick runs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from cnn.metrics import make_row
from study import config, paths, schema
from study.experiments import stragglers as st
from study.experiments import stragglers_analysis as sa
from study.figures import stragglers as figs

matplotlib.use("agg")

STD = config.preset("stragglers", "standard")
SESSION = "20260101T000000-abcdef"
MACHINE = dict(host="testhost", cpu="Test CPU (2 cores, 2 threads)", physical_cores=2, gpu=None,
               versions={"numpy": "x"}, commit="abc1234", timestamp="2026-01-01T00:00:00")


def arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# --- plans and commands ----------------------------------------------------------------

def test_scenario_plan_runs_every_strategy_with_no_straggler_and_the_preset_ones_after():
    plan, seq = st.scenario_plan(STD)
    by = {}
    for c in plan.configs:
        by.setdefault(c["scenario"], []).append(c["key"])
    assert list(by) == ["none", "slow2x", "slow4x", "random"]
    assert by["none"] == list(config.STRAGGLER_STRATEGIES)
    for sc in ("slow2x", "slow4x", "random"):
        assert "param-server" not in by[sc] and "async-param-server-stale1" not in by[sc]
        assert {"allreduce", "param-server-backup", "async-param-server",
                "async-param-server-stale", "model-average", *st.HOGWILD_OPTIONS} == set(by[sc])
    assert [(c["key"], c["batch_size"]) for c in seq.configs] == [("sequential", 32)]
    assert len(set(plan.labels)) == len(plan.labels)
    mom, mseq = st.momentum_plan(STD)
    assert [(c["key"], c["batch_size"], c["evals"]) for c in mom.configs] == [
        (k, 64, False) for k in st.HOGWILD_OPTIONS]
    assert [c["batch_size"] for c in mseq.configs] == [64]


@pytest.mark.parametrize("key,scenario,runner,slow", [
    ("allreduce", "slow4x", "mpi", "1:4"),
    ("param-server-backup", "slow2x", "mpi", "2:2"),
    ("async-param-server-stale1", "slow4x", "mpi", "2:4"),
    ("hogwild (shared)", "slow4x", "hogwild", "1:4"),
])
def test_commands_slow_the_last_worker(key, scenario, runner, slow):
    cmd = st.command(STD, dict(key=key, scenario=scenario, batch_size=32), "stragglers")
    assert arg(cmd, "--straggler") == slow and "--straggler-dist" not in cmd
    if runner == "mpi":
        assert Path(cmd[0]).name == "mpiexec" and cmd[cmd.index("-m") + 1] == "cnn.parallel.mpi"
        assert arg(cmd, "-n") == ("2" if key == "allreduce" else "3")
        assert arg(cmd, "--eval-every") == "47"  # 3000 samples of a 2 x 32 global batch
    else:
        assert cmd[1:3] == ["-m", "cnn.parallel.hogwild"]
        assert arg(cmd, "--hogwild-momentum") == "shared" and arg(cmd, "--assign") == "dynamic"
        assert arg(cmd, "--eval-every") == "94"  # one batch of 32 per HOGWILD step
    assert arg(cmd, "--subset") == "6000" and arg(cmd, "--batch-size") == "32"


def test_commands_of_the_other_scenarios_and_strategies():
    c = dict(key="model-average", scenario="random", batch_size=32)
    cmd = st.command(STD, c, "stragglers")
    assert arg(cmd, "--straggler-dist") == "exp:4" and arg(cmd, "--sync-every") == "4"
    cmd = st.command(STD, dict(key="param-server-backup", scenario="none", batch_size=32),
                     "stragglers")
    assert arg(cmd, "--backup-workers") == "1" and "--straggler" not in cmd
    cmd = st.command(STD, dict(key="async-param-server-stale1", scenario="none", batch_size=32),
                     "x")
    assert "--staleness-aware" in cmd and arg(cmd, "--staleness-rule") == "plus1"
    cmd = st.command(STD, dict(key="sequential", scenario="none", batch_size=64, evals=False),
                     "x")
    assert cmd[:3] == [sys.executable, "-m", "cnn.parallel.hogwild"]
    assert arg(cmd, "--workers") == "1" and "--eval-every" not in cmd
    with pytest.raises(ValueError, match="unknown scenario"):
        st.scenario_flags(STD, "slow8", st.STRATEGIES["allreduce"])


def test_the_standard_preset_fits_the_budget():
    est = st.estimate(STD)
    assert 20 * 60 <= est["total"] <= 26 * 60, est
    assert est["total"] == pytest.approx(est["scenarios"] + est["momentum"])
    assert st.estimate(config.preset("stragglers", "quick"))["total"] < 180


def test_slowdown_model():
    assert sa.slowdown("sync", "slow4x", 16, 4) == 4.0
    assert sa.slowdown("backup", "slow4x", 16, 4) == 1.0
    assert sa.slowdown("async", "slow4x", 16, 4) == pytest.approx(1.6)
    assert sa.slowdown("sync", "random", 16, 4) == pytest.approx(1.375)
    assert sa.slowdown("one", "slow4x", 16, 4) == 1.0


# --- one run -------------------------------------------------------------------------------

def test_time_to_target_interpolates_the_first_crossing():
    assert sa.time_to_target([1, 2, 3], [0.5, 0.7, 0.9], 0.8) == pytest.approx(2.5)
    assert sa.time_to_target([1, 2, 3], [0.85, 0.7, 0.9], 0.8) == 1.0
    assert sa.time_to_target([1, 2, 3], [0.5, 0.8, 0.7], 0.8) == 2.0
    assert math.isnan(sa.time_to_target([1, 2], [0.5, 0.7], 0.8))
    assert sa.time_to_target([1, 2, 3], [0.5, float("nan"), 0.9], 0.7) == pytest.approx(2.0)
    assert sa.add_histograms([[3, 1], [1, 1, 2], None]) == [4, 2, 2]


def raw_run(runner: str, compile_s: float = 0.5) -> pd.DataFrame:
    """Two epoch rows as a library CLI reports them, with their evaluated copies."""
    rows = []
    for e in (1, 2):
        evals = [dict(step=10 * e - 5, samples=160.0 * e - 80, wall_s=2.0 * e - 1.0,
                      test_loss=1.0, test_acc=0.3 + 0.3 * e),
                 dict(step=10 * e, samples=160.0 * e, wall_s=2.0 * e, test_loss=1.0,
                      test_acc=0.4 + 0.3 * e)]
        rows.append(make_row(experiment="stragglers", strategy="x", backend="numba",
                             processes=3, threads=1, device="cpu", model="seed_cnn",
                             dataset="digits", batch_size=32, epoch=float(e), epochs=float(e),
                             step=10 * e, samples=160.0 * e, wall_s=2.0 * e,
                             compile_s=compile_s if e == 1 or runner == "mpi" else 0.0,
                             test_acc=0.4 + 0.3 * e, staleness_hist=[2, 3] if e == 1 else
                             [1, 1, 1], dropped=2.0, straggler="2:4", rank_steps=[0, 14, 6],
                             evals=evals, process_wall_s=9.0, **MACHINE))
    return pd.DataFrame(rows)


def test_tidy_makes_epoch_eval_and_run_rows():
    cfg = dict(key="param-server-backup", scenario="slow4x", batch_size=32)
    p = dict(STD, target_acc=0.8)
    df = st.tidy(raw_run("mpi"), cfg, p, "stragglers")
    assert df["kind"].tolist() == ["epoch"] * 2 + ["eval"] * 4 + ["run"]
    run = df[df["kind"] == "run"].iloc[0]
    # the first step's JIT excess (0.5 s) comes out of every MPI wall clock
    assert run["wall_s"] == pytest.approx(3.5) and run["compile_s"] == pytest.approx(0.5)
    ev = df[df["kind"] == "eval"]
    assert ev["wall_s"].tolist() == pytest.approx([0.5, 1.5, 2.5, 3.5])
    assert ev["epoch"].tolist() == [1, 1, 2, 2]
    # 0.8 is crossed between the copies at 1.5 s (0.7) and 2.5 s (0.9)
    assert run["time_to_target_s"] == pytest.approx(2.0)
    assert run["staleness_hist"] == [3, 4, 1] and run["dropped"] == 4.0
    assert run["staleness_mean"] == pytest.approx((4 + 2) / 8)
    assert (df["strategy"] == "param-server-backup").all() and (df["mode"] == "slow4x").all()
    assert (df["workers"] == 2).all() and run["startup_s"] == pytest.approx(5.5)
    rows = schema.rows(df, scale="standard", session=SESSION)
    assert len(rows) == 7
    hog = st.tidy(raw_run("hogwild"), dict(key="hogwild (scaled)", scenario="none",
                                           batch_size=32), p, "stragglers")
    r = hog[hog["kind"] == "run"].iloc[0]
    assert r["wall_s"] == pytest.approx(4.0) and r["momentum_mode"] == "scaled"
    assert r["strategy"] == "hogwild"


# --- analysis of frames with known answers -------------------------------------------------

def frame(points: list[dict], experiment: str = "stragglers") -> pd.DataFrame:
    """Run rows (and a rising curve per run) with given times to the target and accuracy."""
    recs = []
    for pt in points:
        s = st.STRATEGIES[pt["key"]]
        common = dict(experiment=experiment, strategy=s.name, momentum_mode=s.momentum_mode,
                      backend="numba", processes=s.processes, threads=1, workers=s.trainers,
                      device="cpu", model="seed_cnn", dataset="fashion-mnist",
                      batch_size=pt.get("batch", 32), mode=pt.get("scenario", "none"),
                      config=st.config_label(STD, pt.get("batch", 32)), target_acc=0.8,
                      **MACHINE)
        for t, (tt, acc) in enumerate(zip(pt["tta"], pt["acc"], strict=True)):
            for k, frac in enumerate((0.5, 1.0, 1.5)):
                recs.append(make_row(**common, kind="eval", trial=t, step=10 * (k + 1),
                                     wall_s=tt * frac, test_acc=0.8 + 0.05 * (frac - 1)))
            recs.append(make_row(**common, kind="run", trial=t, time_to_target_s=tt,
                                 test_acc=acc, staleness_hist=pt.get("hist", [5, 5])))
    return schema.rows(recs, scale="standard", session=SESSION)


FIVE = (0.80, 0.81, 0.82, 0.83, 0.84)


def seeded() -> pd.DataFrame:
    """allreduce 10 s (20 s with a 4x straggler), the async server 8 s (5 s), the backup
    worker 9 s (8 s); async 1 point below the synchronous server, staleness-aware 0.3."""
    acc = [0.85] * 5
    return frame([
        dict(key="allreduce", tta=[10.0, 10.5, 9.5, 10.2, 9.8], acc=acc),
        dict(key="param-server", tta=[11.0] * 5, acc=acc),
        dict(key="async-param-server", tta=[8.0] * 5, acc=[0.84] * 5, hist=[1, 9]),
        dict(key="async-param-server-stale", tta=[8.5] * 5, acc=[0.847] * 5),
        dict(key="hogwild (local)", tta=[7.0] * 5, acc=list(FIVE)),
        dict(key="hogwild (shared)", tta=[7.0] * 5, acc=[0.85] * 5),
        dict(key="sequential", tta=[14.0], acc=[0.853]),
        dict(key="allreduce", scenario="slow4x", tta=[20.0, 21.0, 19.0, 20.5, 19.5], acc=acc),
        dict(key="async-param-server", scenario="slow4x", tta=[5.0, 5.2, 4.8, 5.1, 4.9],
             acc=acc, hist=[6, 2, 1, 1]),
        dict(key="param-server-backup", scenario="slow4x", tta=[8.0, math.nan, 8.2, 7.8, 8.1],
             acc=[0.8] * 5),
    ])


def test_time_to_target_points_and_how_much_sooner():
    df = seeded()
    pts = sa.tta_points(df).set_index(["mode", "series"])
    assert pts.loc[("none", "allreduce"), "median"] == 10.0
    assert pts.loc[("slow4x", "param-server-backup"), "reached"] == 4
    assert "not reached in 1 of 5 trials" in pts.loc[("slow4x", "param-server-backup"),
                                                     "anomaly"]
    q = sa.tta_ratio(df, "slow4x", "async-param-server")
    assert q["speedup"] == pytest.approx(4.0) and q["speedup_lo"] <= 4.0 <= q["speedup_hi"]
    assert sa.tta_ratio(df, "slow4x", "param-server-backup")["anomaly"].startswith(
        "1 run(s) never reached")
    flagged = sa.flag(df)
    bad = flagged[(flagged["kind"] == "run") & (flagged["strategy"] == "param-server-backup")]
    assert bad["anomaly"].str.contains("not reached").all()


def test_accuracy_gaps_pair_trials_and_use_a_deterministic_reference_as_is():
    df = seeded()
    g = sa.acc_gap(df, "async-param-server", "param-server")
    assert g["median"] == pytest.approx(-1.0) and g["n"] == 5
    g = sa.acc_gap(df, "hogwild (local)", "sequential")  # one sequential trial: its value
    assert g["median"] == pytest.approx(100 * (0.82 - 0.853))
    assert sa.staleness_distribution(df, "slow4x", "async-param-server").tolist() == \
        pytest.approx([0.6, 0.2, 0.1, 0.1])


def test_targets_say_met_or_by_how_much_missed():
    df = seeded()
    mom = frame([dict(key=k, batch=64, tta=[1.0] * 5, acc=[0.86] * 5)
                 for k in ("hogwild (local)", "hogwild (scaled)")] +
                [dict(key="sequential", batch=64, tta=[1.0], acc=[0.87])],
                experiment="stragglers_momentum")
    t = {x["key"]: x for x in sa.targets({"stragglers_runs": df, "stragglers_momentum": mom})}
    a = t["stragglers_async_gap"]
    assert a["value"] == pytest.approx(-0.3) and a["met"]
    assert "async-param-server-stale" in a["verdict"]
    b32 = t["stragglers_hogwild_gap_b32"]
    assert b32["value"] == pytest.approx(-0.3) and b32["met"]  # shared: 0.85 vs 0.853
    assert "hogwild (shared)" in b32["verdict"]
    b64 = t["stragglers_hogwild_gap_b64"]
    assert b64["value"] == pytest.approx(-1.0) and not b64["met"]
    assert "missed by 0.50 points" in b64["verdict"]
    s = t["stragglers_slow4x_sooner"]
    assert s["value"] == pytest.approx(4.0) and s["met"] and "async-param-server" in s["verdict"]
    table = sa.targets_table({"stragglers_runs": df, "stragglers_momentum": mom})
    assert len(table) == 4 and table["measured"].iloc[-1].startswith("4.00 [")
    heads = st.headlines({"stragglers_runs": df, "stragglers_momentum": mom})
    assert [h.key for h in heads] == list(t) and all(h.measured for h in heads)
    assert heads[-1].unit == "x" and "met" in heads[-1].note
    missing = st.headlines({})
    assert [h.measured for h in missing] == [False] * 4
    assert "notebook 05" in missing[0].note


def test_scenario_table_reads_one_line_per_strategy():
    tab = sa.scenario_table(seeded()).set_index("strategy")
    assert tab.loc["allreduce", "none"].startswith("10.0 [")
    assert tab.loc["async-param-server", "slow4x"].endswith(", 4.00x")
    assert "(4/5 reached)" in tab.loc["param-server-backup", "slow4x"]
    assert tab.loc["hogwild (shared)", "slow4x"] == "not run"
    assert tab.loc["sequential", "test acc, no straggler"] == "0.8530"


# --- figures -------------------------------------------------------------------------------

def test_figures_draw_the_expected_series(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.IMAGES_ENV, str(tmp_path))
    frames = {"stragglers_runs": seeded()}
    fig = figs.time_to_accuracy(frames, save=False)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["no straggler", "one worker 4x slower"]
    labels = panels[0].get_legend_handles_labels()[1]
    assert labels == ["allreduce", "async-param-server", "async-param-server-stale",
                      "hogwild (shared), best option"]
    assert len(panels[1].get_legend_handles_labels()[1]) == 3
    fig = figs.scenarios(frames, save=False)
    left, right = fig.axes[:2]
    assert left.get_legend_handles_labels()[1] == ["allreduce", "param-server",
                                                   "param-server-backup"]
    assert len(right.get_legend_handles_labels()[1]) == 4
    assert figs.staleness(frames, save=True) is not None
    assert (tmp_path / "stragglers_staleness.png").exists()
    assert figs.curve_series(seeded(), "slow4x") == ["allreduce", "param-server-backup",
                                                     "async-param-server"]


def test_figures_without_results_say_so():
    for name, fig in figs.draw({}, save=False).items():
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any("not measured" in t or "no staleness" in t for t in texts), name


# --- real quick runs -------------------------------------------------------------------------

@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "results"))
    monkeypatch.setenv(paths.IMAGES_ENV, str(tmp_path / "images"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    return tmp_path


def test_quick_momentum_part_writes_valid_rows(scratch):
    frames = st.run("quick", parts=["momentum"], log=None)
    df = schema.load_file(scratch / "results" / "stragglers_momentum.pkl", strict=True)
    assert set(frames) == {"stragglers_momentum"} and len(df) == len(frames[
        "stragglers_momentum"])
    runs = df[df["kind"] == "run"]
    assert sorted(runs["momentum_mode"]) == ["", "local", "scaled", "shared"]
    assert set(runs["strategy"]) == {"hogwild", "sequential"}
    assert (runs["test_acc"] > 0.1).all() and (runs["batch_size"] == 32).all()
    assert not (df["kind"] == "eval").any()  # no copies: accuracy at equal epochs only


@pytest.mark.slow
def test_quick_scenarios_and_figures(scratch):
    from study.figures import stragglers as figures

    frames = st.run("quick", log=None)
    for draw in (figures.time_to_accuracy, figures.scenarios, figures.staleness,
                 figures.momentum):
        draw(frames, "quick")
    for stem in st.RESULTS:
        df = schema.load_file(scratch / "results" / f"{stem}.pkl", strict=True)
        assert set(df["scale"]) == {"quick"}
    made = {p.stem for p in (scratch / "images").glob("*.png")}
    assert {"stragglers_time_to_accuracy", "stragglers_scenarios", "stragglers_staleness",
            "stragglers_momentum"} <= made
    rows = schema.load_file(scratch / "results" / "stragglers_runs.pkl")
    r = rows[rows["kind"] == "run"]
    assert set(r["mode"]) == {"none", "slow4x"}
    assert (r[r["mode"] == "slow4x"]["straggler"].str.endswith(":4")).all()
    assert np.isfinite(r["time_to_target_s"]).sum() >= len(r) // 2


def test_a_diverged_run_is_a_row_that_never_reaches_the_target():
    p = config.preset("stragglers", "quick")
    plan, _ = st.scenario_plan(p)
    cfg = next(c for c in plan.configs if "async" in c["key"])
    row = st.diverged_row(p, cfg, st.EXPERIMENT["scenarios"], "diverged: loss became nan")
    df = schema.rows(row, scale="quick", session="s")
    schema.validate(df, strict=True)
    assert df["kind"].tolist() == ["run"] and np.isnan(df["time_to_target_s"].iloc[0])
    assert df["anomaly"].iloc[0] == "diverged: loss became nan"
    assert df["strategy"].iloc[0].startswith("async")
