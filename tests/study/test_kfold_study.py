"""The k-fold family of the study: plans, the fold check and speedups on frames with known
answers, the figures' series, the serial launcher, and one real quick run through `run`."""

from __future__ import annotations

import sys

import matplotlib
import pandas as pd
import pytest

from cnn.metrics import make_row
from study import config, kfold_serial, schema
from study.experiments import kfold as kf
from study.figures import kfold as figs

matplotlib.use("agg")

STD = config.preset("kfold", "standard")
SESSION = "20260101T000000-abcdef"
MACHINE = dict(host="testhost", cpu="Test CPU (2 cores, 2 threads)", physical_cores=2, gpu=None,
               versions={"numpy": "x"}, commit="abc1234", timestamp="2026-01-01T00:00:00")
ACCS = [0.81, 0.83, 0.80, 0.82]


def frame(runs: list[dict], subset: int = 12000, epochs: int = 2,
          experiment: str = "kfold") -> pd.DataFrame:
    """Fold rows (accuracies ``ACCS`` unless given) and a run row per trial of each run."""
    recs = []
    for r in runs:
        e = r["engines"]
        serial = e == 0
        common = dict(experiment=experiment, strategy="sequential" if serial else "kfold",
                      backend="numba", processes=max(1, e), threads=1, workers=max(1, e),
                      engines=float(e), device="cpu", model="seed_cnn",
                      dataset="fashion-mnist", batch_size=64, folds=4.0,
                      mode="serial" if serial else "parallel",
                      config=kf.config_label(STD, subset, epochs), **MACHINE)
        for t, (wall, proc) in enumerate(zip(r["wall"], r["proc"], strict=True)):
            accs = r.get("accs", ACCS)
            per = 0.25 * wall
            for k, acc in enumerate(accs):
                lane = k % max(1, e)
                recs.append(make_row(**common, kind="fold", fold=float(k), trial=t,
                                     test_acc=acc, samples=9000.0 * epochs * subset / 12000,
                                     pid=1000.0 + lane, start_s=per * (k // max(1, e)),
                                     end_s=per * (k // max(1, e) + 1)))
            recs.append(make_row(**common, kind="run", trial=t, wall_s=wall,
                                 process_wall_s=proc, startup_s=proc - wall,
                                 samples=4 * 9000.0 * epochs * subset / 12000,
                                 test_acc=sum(accs) / 4, cpu_busy_min=90.0 + t,
                                 cpu_busy=[95.0, 90.0 + t], cpu_own_mean=100.0 * max(1, e),
                                 cpu_times=[0.5, 1.0], cpu_samples=[[90.0, 80.0], [100.0, 99.0]]))
    return schema.rows(recs, scale="standard", session=SESSION)


def seeded(subset: int = 12000, epochs: int = 2, **kw) -> pd.DataFrame:
    """Serial 40 s (45 end to end), one engine 42 s (55), two 21 s (33): medians."""
    return frame([dict(engines=0, wall=[40.0, 41, 39, 40.5, 39.5], proc=[45.0, 46, 44, 45, 45]),
                  dict(engines=1, wall=[42.0, 43, 41, 42, 42], proc=[55.0, 56, 54, 55, 55]),
                  dict(engines=2, wall=[21.0, 22, 20, 21, 21], proc=[33.0, 34, 32, 33, 33],
                       **kw)], subset, epochs)


# --- plans ---------------------------------------------------------------------------------

def test_plan_has_serial_and_every_engine_count_that_fits():
    plan = kf.plan(STD, [(12000, 2)], cores=2)
    assert [(c["strategy"], c["engines"]) for c in plan.configs] == [
        ("sequential", 0), ("kfold", 1), ("kfold", 2)]
    full = config.preset("kfold", "full")
    assert [c["engines"] for c in kf.plan(full, [(None, 3)], cores=4).configs] == [0, 1, 2, 4]
    assert len(set(plan.labels)) == 3


def test_work_sweep_leaves_the_seed_point_to_the_engines_part():
    assert kf.seed_point(STD) == (12000, 2)
    assert kf.work_points(STD) == [(3000, 1), (6000, 1)]
    assert kf.work_points(config.preset("kfold", "quick")) == [(600, 1)]


def test_commands_call_the_library_cli_and_the_serial_launcher():
    cfg = dict(strategy="kfold", engines=2, subset=3000, epochs=1)
    cmd = kf.command(STD, cfg, "kfold_work")
    assert cmd[:3] == [sys.executable, "-m", "cnn.parallel.kfold"]
    assert cmd[cmd.index("--engines") + 1] == "2" and cmd[cmd.index("--subset") + 1] == "3000"
    assert cmd[cmd.index("--epochs") + 1] == "1" and cmd[cmd.index("--folds") + 1] == "4"
    assert "--timeout" in cmd
    ser = kf.command(STD, dict(cfg, strategy="sequential", engines=0, subset=None), "kfold")
    assert ser[:3] == [sys.executable, "-m", "study.kfold_serial"]
    assert "--engines" not in ser and "--subset" not in ser


# --- analysis of frames with known answers ----------------------------------------------------

def test_identical_folds_are_recorded_as_matching():
    df = kf.flag(seeded())
    runs = df[df["kind"] == "run"]
    assert runs["fold_acc_match"].astype(bool).all()
    assert (runs["fold_acc_rel_err"] == 0).all()


def test_a_fold_that_differs_from_serial_is_flagged():
    df = kf.flag(seeded(accs=[0.81, 0.83, 0.79, 0.82]))
    two = df[(df["kind"] == "run") & (df["workers"] == 2)]
    assert not two["fold_acc_match"].astype(bool).any()
    assert two["fold_acc_rel_err"].iloc[0] == pytest.approx(0.01 / 0.83)
    assert two["anomaly"].str.contains("per-fold accuracies differ").all()


def test_speedup_against_the_best_one_worker_run_both_measures():
    pts = kf.speedups(seeded())
    tr = pts[(pts["measure"] == "training") & (pts["workers"] == 2)].iloc[0]
    e2e = pts[(pts["measure"] == "end to end") & (pts["workers"] == 2)].iloc[0]
    assert tr["speedup"] == pytest.approx(40 / 21) and tr["baseline"] == "sequential"
    assert e2e["speedup"] == pytest.approx(45 / 33)
    assert tr["work_per_worker"] == pytest.approx(4 * 9000 * 2 / 2)  # folds x data x ep / E
    one = pts[(pts["measure"] == "training") & (pts["strategy"] == "kfold")
              & (pts["workers"] == 1)].iloc[0]
    assert one["speedup"] == pytest.approx(40 / 42)


def test_superlinear_engines_are_flagged():
    df = frame([dict(engines=0, wall=[40.0] * 3, proc=[45.0] * 3),
                dict(engines=2, wall=[15.0, 15.1, 14.9], proc=[25.0] * 3)])
    run2 = kf.flag(df).query("kind == 'run' and workers == 2")
    assert run2["anomaly"].str.contains("superlinear").all()


def test_work_curve_joins_the_seed_point_and_the_sweep():
    frames = {"kfold_runs": seeded(),
              "kfold_work": pd.concat([seeded(3000, 1), seeded(6000, 1)])}
    curve = kf.work_curve(frames)
    two = curve[(curve["measure"] == "training") & (curve["workers"] == 2)]
    assert two["work_per_worker"].tolist() == pytest.approx([4500, 9000, 36000])


def test_tables_read_the_latest_session():
    old = seeded().assign(session="20250101T000000-000000")
    df = pd.concat([old, seeded(accs=[0.5, 0.6, 0.7, 0.8])], ignore_index=True)
    table = kf.fold_table(df)
    assert list(table.columns) == ["serial", "1 engine(s)", "2 engine(s)"]
    assert table["serial"].tolist() == ACCS and table["2 engine(s)"].tolist() == [0.5, 0.6,
                                                                                  0.7, 0.8]
    sp = kf.speedup_table(kf.flag(seeded()))
    assert sp["run"].tolist() == ["serial", "1 engine(s)", "2 engine(s)"]
    assert sp["speedup"].iloc[2].startswith("1.90 [") and sp["folds = serial"].all()
    assert sp["least busy core %"].iloc[0].startswith("92 [")


def test_headlines_at_two_engines():
    heads = {h.key: h for h in kf.headlines({"kfold_runs": seeded()})}
    assert heads["kfold_speedup"].value == pytest.approx(40 / 21)
    assert heads["kfold_speedup_e2e"].value == pytest.approx(45 / 33)
    assert heads["kfold_speedup"].config == kf.config_label(STD, 12000, 2)
    assert heads["kfold_speedup"].trials == 5 and heads["kfold_speedup"].scale == "standard"
    assert not any(h.measured for h in kf.headlines({}))


# --- figures -------------------------------------------------------------------------------

def series(fig) -> list[int]:
    return [len(ax.get_legend_handles_labels()[0]) for ax in fig.axes]


def test_figures_draw_the_expected_series():
    frames = {"kfold_runs": seeded(), "kfold_work": seeded(3000, 1)}
    made = figs.draw(frames, save=False)
    # engines: training, end to end, serial, ideal | work: training, end to end, ideal
    assert series(made["kfold_speedup"]) == [4, 3]
    assert series(made["kfold_cpu"]) == [3, 3, 3]  # core 0, core 1, mean per run
    lanes = made["kfold_timeline"].axes[0].get_yticklabels()
    assert [t.get_text() for t in lanes] == ["1 engine(s) #0", "2 engine(s) #0",
                                             "2 engine(s) #1", "serial #0"]


def test_figures_without_results_say_so():
    made = figs.draw({}, save=False)
    assert all("not measured" in f.axes[0].texts[0].get_text() for f in made.values())


# --- the serial launcher and one real quick run ----------------------------------------------

def test_serial_launcher_writes_the_serial_rows(tmp_path):
    out = tmp_path / "m.pkl"
    kfold_serial.main(["--dataset", "digits", "--subset", "200", "--folds", "2", "--epochs",
                       "1", "--no-progress", "--cpu-interval", "0.1", "--save-metrics",
                       str(out)])
    df = pd.read_pickle(out)
    assert sorted(df["kind"]) == ["fold", "fold", "run"]
    assert set(df["strategy"]) == {"sequential"} and set(df["engines"]) == {0}


def test_quick_run_writes_valid_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_RESULTS_DIR", str(tmp_path))
    tiny = dict(config.PRESETS["kfold"]["quick"], subset=300, epochs=1, folds=2,
                engines=(1, 2), work=((200, 1), (300, 1)), cpu_interval=0.1)
    monkeypatch.setitem(config.PRESETS["kfold"], "quick", tiny)
    frames = kf.run("quick", log=None)
    assert set(frames) == {"kfold_runs", "kfold_work"}
    for name, subset in (("kfold_runs", 300), ("kfold_work", 200)):
        df = schema.load(name, "quick", strict=True)
        runs = df[df["kind"] == "run"]
        assert sorted(zip(runs["strategy"], runs["workers"], strict=True)) == [
            ("kfold", 1), ("kfold", 2), ("sequential", 1)]
        assert set(runs["config"]) == {kf.config_label(tiny, subset, 1)}
        assert df["session"].nunique() == 1 and set(df["trial"]) == {0}
        assert runs["fold_acc_match"].astype(bool).all(), runs["fold_acc_rel_err"]
        assert (runs["startup_s"] > 0).all() and (runs["wall_s"] > 0).all()
        assert len(df[df["kind"] == "fold"]) == 6
    assert len(kf.work_curve(frames)) == 12  # 2 points x 3 runs x 2 measures
