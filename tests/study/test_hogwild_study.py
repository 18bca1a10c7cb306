"""The HOGWILD family of the study: plans, the analysis of frames with known answers, the
figures' series, the pinning watcher, and one real quick run through `run`."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest

from cnn.metrics import make_row
from study import config, schema
from study.affinity import can_pin, pin_children, usable_cores
from study.experiments import hogwild as hw
from study.figures import hogwild as figs

matplotlib.use("agg")

STD = config.preset("hogwild", "standard")
SESSION = "20260101T000000-abcdef"
MACHINE = dict(host="testhost", cpu="Test CPU (2 cores, 2 threads)", physical_cores=2, gpu=None,
               versions={"numpy": "x"}, commit="abc1234", timestamp="2026-01-01T00:00:00")


def frame(points: list[dict], scale: str = "standard", experiment: str = "hogwild",
          session: str = SESSION) -> pd.DataFrame:
    """Study rows of runs with given per-trial throughput, step and final accuracy: two
    epoch rows (accuracy 1 point lower at epoch 1) and one run row per trial."""
    recs = []
    for pt in points:
        w, b = pt["workers"], pt["batch"]
        common = dict(experiment=experiment, strategy=pt["strategy"], backend="numba",
                      processes=w, threads=1, workers=w, device="cpu", model="seed_cnn",
                      dataset="fashion-mnist", batch_size=b, pinned=pt.get("pinned", False),
                      config=hw.config_label(STD, b), **MACHINE)
        for t, (thr, step, acc) in enumerate(zip(pt["thr"], pt["step"], pt["acc"],
                                                 strict=True)):
            for e in (1, 2):
                recs.append(make_row(**common, kind="epoch", epoch=float(e), trial=t,
                                     test_acc=acc - 0.01 * (2 - e), samples_per_s=thr))
            recs.append(make_row(**common, kind="run", trial=t, samples_per_s=thr,
                                 step_ms_median=step, test_acc=acc, startup_s=3.0 + t,
                                 staleness_mean=float(w - 1)))
    return schema.rows(recs, scale=scale, session=session)


def seeded(b: int = 64, hw2=(200.0, 210, 190, 205, 195), step2=(33.0,) * 5) -> list[dict]:
    """Sequential 100 samples/s, one worker 110, two 200 (median), locked 150."""
    five = [0, 1, 2, 3, 4]
    return [
        dict(strategy="sequential", workers=1, batch=b, thr=[100.0 + i for i in five],
             step=[36.0] * 5, acc=[0.90] * 5),
        dict(strategy="hogwild", workers=1, batch=b, thr=[110.0 + i for i in five],
             step=[33.0] * 5, acc=[0.90] * 5),
        dict(strategy="hogwild", workers=2, batch=b, thr=list(hw2), step=list(step2),
             acc=[0.89, 0.885, 0.88, 0.895, 0.89]),
        dict(strategy=hw.LOCKED, workers=2, batch=b, thr=[150.0 + i for i in five],
             step=[40.0] * 5, acc=[0.9] * 5),
    ]


# --- plans ---------------------------------------------------------------------------------

def test_throughput_plan_compares_every_strategy_at_every_batch():
    plan = hw.throughput_plan(STD, cores=2)
    got = [(c["strategy"], c["workers"], c["batch_size"]) for c in plan.configs]
    assert got == [("sequential", 1, 32), ("hogwild", 1, 32), ("hogwild", 2, 32),
                   (hw.LOCKED, 2, 32), ("sequential", 1, 64), ("hogwild", 1, 64),
                   ("hogwild", 2, 64), (hw.LOCKED, 2, 64)]
    assert len(set(plan.labels)) == len(plan.labels)
    one_core = hw.throughput_plan(STD, cores=1)
    assert {c["workers"] for c in one_core.configs} == {1}
    full = hw.throughput_plan(config.preset("hogwild", "full"), cores=16)
    assert [c["workers"] for c in full.configs[:8]] == [1, 1, 2, 2, 4, 4, 8, 8]


def test_pinning_plan_pairs_pinned_and_unpinned_at_the_seed_batch():
    plan = hw.pinning_plan(STD, cores=2)
    assert [(c["workers"], c["pinned"], c["batch_size"]) for c in plan.configs] == [
        (1, False, 64), (1, True, 64), (2, False, 64), (2, True, 64)]


def test_commands_call_the_library_clis():
    cfg = dict(strategy=hw.LOCKED, workers=2, batch_size=32, pinned=False)
    cmd = hw.command(STD, cfg, "hogwild")
    assert cmd[:3] == [sys.executable, "-m", "cnn.parallel.hogwild"]
    assert cmd[cmd.index("--workers") + 1] == "2" and "--lock" in cmd
    assert cmd[cmd.index("--subset") + 1] == "12000"
    assert cmd[cmd.index("--batch-size") + 1] == "32"
    seq = hw.command(config.preset("hogwild", "quick"), dict(cfg, strategy="sequential",
                                                             workers=1), "hogwild")
    assert seq[:3] == [sys.executable, "-m", "cnn.train"]
    assert "--workers" not in seq and "--lock" not in seq and "--subset" not in seq


# --- one run's rows ----------------------------------------------------------------------

def raw_epochs(strategy: str, compile_s: list[float]) -> pd.DataFrame:
    rows = [make_row(experiment="x", strategy=strategy, backend="numba", processes=1,
                     threads=1, device="cpu", model="seed_cnn", dataset="digits",
                     batch_size=32, epoch=float(e), epochs=float(e), samples=100.0 * e,
                     wall_s=1.0 * e, compile_s=c, step_ms_median=10.0 + e, step_ms_iqr=1.0,
                     test_acc=0.5 + 0.1 * e, final_loss=1.0 / e, staleness_mean=0.5 * e,
                     staleness_max=float(e), overlap_frac=0.0, lock_wait_s=0.1,
                     process_wall_s=5.0, startup_s=9.9, lock=False, updates=4, **MACHINE)
            for e, c in zip((1, 2), compile_s, strict=True)]
    return pd.DataFrame(rows)


def test_sequential_run_row_takes_the_jit_step_out_of_the_wall():
    cfg = dict(strategy="sequential", workers=1, pinned=False)
    # cnn.train repeats the cumulative first-step excess on every epoch row
    df = hw.tidy(raw_epochs("sequential", [0.5, 0.5]), cfg, "c", "hogwild")
    run = df[df["kind"] == "run"].iloc[0]
    assert run["wall_s"] == pytest.approx(1.5) and run["compile_s"] == pytest.approx(0.5)
    assert run["samples_per_s"] == pytest.approx(200 / 1.5)
    assert run["test_acc"] == pytest.approx(0.7) and run["step_ms_median"] == 11.5
    assert df["startup_s"].tolist() == pytest.approx([3.5] * 3)  # 5 s process - 1.5 s train
    assert set(df.columns) <= set(schema.COLUMNS)  # library extras (lock, updates) dropped
    assert list(df["kind"]) == ["epoch", "epoch", "run"]


def test_hogwild_run_row_keeps_its_untimed_warm_up_apart():
    cfg = dict(strategy="hogwild", workers=2, pinned=True)
    df = hw.tidy(raw_epochs("hogwild", [0.3, 0.0]), cfg, "c", "hogwild", pinned_workers=1)
    run = df[df["kind"] == "run"].iloc[0]
    assert run["wall_s"] == 2.0 and run["compile_s"] == pytest.approx(0.3)
    assert run["staleness_mean"] == pytest.approx(0.75) and run["staleness_max"] == 2.0
    assert run["lock_wait_s"] == pytest.approx(0.2) and run["workers"] == 2
    assert df["anomaly"].str.contains("only 1 of 2 worker").all()


# --- analysis of frames with known answers ----------------------------------------------------

def test_speedup_is_against_the_best_one_worker_run():
    tp = hw.throughput(frame(seeded()))
    two = tp[(tp["strategy"] == "hogwild") & (tp["workers"] == 2)].iloc[0]
    assert two["speedup"] == pytest.approx(200 / 112)  # medians: 2 workers 200, 1 worker 112
    assert two["baseline"] == "hogwild" and two["batch_size"] == 64
    seq = tp[tp["strategy"] == "sequential"].iloc[0]
    assert seq["speedup"] == pytest.approx(102 / 112)
    assert two["speedup_lo"] < two["speedup"] < two["speedup_hi"]


def test_superlinear_points_are_flagged_on_the_run_rows_only():
    df = hw.flag(frame(seeded(hw2=(250.0, 251, 252, 253, 254))))
    runs = df[df["kind"] == "run"]
    two = runs[(runs["strategy"] == "hogwild") & (runs["workers"] == 2)]
    assert two["anomaly"].str.contains("superlinear").all()
    assert not runs[runs["workers"] == 1]["anomaly"].str.contains("superlinear").any()
    assert (df[df["kind"] == "epoch"]["anomaly"] == "").all()


def test_a_two_worker_step_faster_than_a_lone_one_is_flagged_with_its_reason():
    df = hw.flag(frame(seeded(step2=(31.2,) * 5)))
    st = hw.step_points(df)
    two = st[(st["strategy"] == "hogwild") & (st["workers"] == 2)].iloc[0]
    assert two["step_ratio"] == pytest.approx(33.0 / 31.2)
    assert "per-step superlinear" in two["anomaly"] and "pinned" in two["anomaly"]
    run2 = df[(df["kind"] == "run") & (df["strategy"] == "hogwild") & (df["workers"] == 2)]
    assert run2["anomaly"].str.contains("per-step superlinear").all()
    locked = st[st["strategy"] == hw.LOCKED].iloc[0]
    assert locked["anomaly"] == ""  # no locked one-worker run: nothing to compare with


def test_accuracy_gap_is_paired_by_trial_in_points():
    gap = hw.accuracy_gap(frame(seeded()))
    two = gap[(gap["strategy"] == "hogwild") & (gap["workers"] == 2)].iloc[0]
    assert two["median"] == pytest.approx(-1.0)  # -1, -1.5, -2, -0.5, -1 points
    assert two["n"] == 5 and two["lo"] <= -1.0 <= two["hi"]
    assert two["sequential_acc"] == pytest.approx(0.90)


def test_accuracy_points_per_epoch():
    pts = hw.accuracy_points(frame(seeded()))
    seq = pts[(pts["strategy"] == "sequential")].sort_values("epoch")
    assert seq["median"].tolist() == pytest.approx([0.89, 0.90])


def test_summary_table_reads_one_line_per_point():
    t = hw.summary_table(frame(seeded(32) + seeded(64)))
    assert len(t) == 8 and set(t["batch"]) == {32, 64}
    two = t[(t["strategy"] == "hogwild") & (t["workers"] == 2)].iloc[0]
    assert two["speedup"].startswith("1.79 [") and two["acc - seq (pts)"].startswith("-1.00")


def test_headlines_name_the_seed_configuration_at_both_batches():
    df = frame(seeded(32) + seeded(64))
    heads = {h.key: h for h in hw.headlines({"hogwild_runs": df})}
    assert set(heads) == {"hogwild_speedup_b32", "hogwild_acc_gap_b32", "hogwild_speedup_b64",
                          "hogwild_acc_gap_b64"}
    h = heads["hogwild_speedup_b64"]
    assert h.value == pytest.approx(200 / 112) and h.unit == "x" and h.trials == 5
    assert "seed configuration" in h.label and "batch 64" in h.config
    assert "seed configuration" not in heads["hogwild_speedup_b32"].label
    assert heads["hogwild_acc_gap_b64"].value == pytest.approx(-1.0)
    assert h.anomaly == "" and h.scale == "standard"
    missing = hw.headlines({})
    assert len(missing) == 4 and not any(m.measured for m in missing)
    assert "not found" in missing[0].note


def pinning_frame(step1_free: float, step1_pinned: float, step2: float) -> pd.DataFrame:
    five = [0, 1, 2, 3, 4]
    pts = [dict(strategy="hogwild", workers=w, batch=64, pinned=pin, thr=[100.0 * w + i for i in
                                                                         five],
                step=[s + 0.01 * i for i in five], acc=[0.9] * 5)
           for w, pin, s in ((1, False, step1_free), (1, True, step1_pinned),
                             (2, False, step2), (2, True, step2))]
    return frame(pts, experiment="hogwild_pinning")


def test_pinning_verdict_when_migration_explains_it():
    text = hw.pinning_verdict(pinning_frame(33.3, 31.0, 31.2))
    assert "1.07" in text and "migration of the lone worker explains" in text
    eff = hw.pinning_effect(pinning_frame(33.3, 31.0, 31.2))
    one = eff[eff["workers"] == 1].iloc[0]
    assert one["pinned_over_unpinned"] == pytest.approx(31.02 / 33.32)


def test_pinning_verdict_when_it_does_not():
    assert "does not explain" in hw.pinning_verdict(pinning_frame(33.3, 33.3, 31.2))
    assert "not faster" in hw.pinning_verdict(pinning_frame(31.0, 31.0, 31.2))
    assert hw.pinning_verdict(pd.DataFrame()).startswith("Not measured")


# --- figures -------------------------------------------------------------------------------

def series(fig) -> list[int]:
    return [len(ax.get_legend_handles_labels()[0]) for ax in fig.axes]


def test_figures_draw_the_expected_series():
    frames = {"hogwild_runs": frame(seeded(32) + seeded(64)),
              "hogwild_pinning": pinning_frame(33.3, 31.0, 31.2)}
    figs_ = figs.draw(frames, save=False)
    # lock-free, locked, sequential, ideal per batch panel
    assert series(figs_["hogwild_speedup"]) == [4, 4]
    # sequential, 1 and 2 lock-free workers, locked at 2
    assert series(figs_["hogwild_accuracy"]) == [4, 4]
    assert series(figs_["hogwild_pinning"]) == [2, 3]
    assert [ax.get_title() for ax in figs_["hogwild_speedup"].axes] == [
        "batch 32", "batch 64 (seed configuration)"]


def test_figures_without_results_say_so():
    for draw in (figs.speedup, figs.accuracy, figs.pinning):
        assert "not measured" in draw({}, save=False).axes[0].texts[0].get_text()


def test_too_many_series_are_refused():
    pts = []
    for w in (1, 2, 4, 8, 16, 32):
        pts.append(dict(strategy="hogwild", workers=w, batch=64, thr=[100.0 * w] * 3,
                        step=[30.0] * 3, acc=[0.9] * 3))
        if w > 1:
            pts.append(dict(strategy=hw.LOCKED, workers=w, batch=64, thr=[90.0 * w] * 3,
                            step=[30.0] * 3, acc=[0.9] * 3))
    pts.append(dict(strategy="sequential", workers=1, batch=64, thr=[90.0] * 3, step=[30.0] * 3,
                    acc=[0.9] * 3))
    # 6 lock-free worker counts + sequential + locked = 8 accuracy series
    with pytest.raises(ValueError, match="at most 6"):
        figs.accuracy({"hogwild_runs": frame(pts)}, save=False)


# --- pinning watcher -------------------------------------------------------------------------

def _report_affinity(q) -> None:
    import time

    time.sleep(1.0)  # long enough for the watcher to see this process
    q.put(sorted(os.sched_getaffinity(0)))


@pytest.mark.skipif(not can_pin(), reason="os.sched_setaffinity is Linux-only")
def test_pin_children_moves_each_spawned_worker_to_its_own_core():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    core = usable_cores()[-1]
    with pin_children([core]) as pins:
        p = ctx.Process(target=_report_affinity, args=(q,))
        p.start()
        got = q.get(timeout=60)
        p.join(timeout=10)
    assert got == [core] and pins == {p.pid: core}


# --- one real quick run ------------------------------------------------------------------------

def test_quick_run_writes_valid_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_RESULTS_DIR", str(tmp_path))
    tiny = dict(config.PRESETS["hogwild"]["quick"], subset=300, test_subset=100, epochs=1,
                batches=(32,), seed_batch=32, workers=(1, 2))
    monkeypatch.setitem(config.PRESETS["hogwild"], "quick", tiny)
    frames = hw.run("quick", log=None)
    assert set(frames) == ({"hogwild_runs", "hogwild_pinning"} if can_pin()
                           else {"hogwild_runs"})
    runs = schema.load("hogwild_runs", "quick", strict=True)
    assert len(runs) == len(frames["hogwild_runs"])
    r = runs[runs["kind"] == "run"]
    assert sorted(zip(r["strategy"], r["workers"], strict=True)) == [
        ("hogwild", 1), ("hogwild", 2), (hw.LOCKED, 2), ("sequential", 1)]
    assert r["session"].nunique() == 1 and set(r["trial"]) == {0}
    assert set(r["config"]) == {hw.config_label(tiny, 32)}
    assert (r["samples"] == 300).all() and (r["startup_s"] > 0).all()
    assert (r["samples_per_s"] > 0).all() and r["test_acc"].between(0, 1).all()
    assert r["anomaly"].str.contains("only 1 trial").all()
    if can_pin():
        pin = schema.load("hogwild_pinning", "quick", strict=True)
        pr = pin[pin["kind"] == "run"]
        assert sorted(zip(pr["workers"], pr["pinned"], pr["pinned_workers"], strict=True)) == [
            (1, False, 0.0), (1, True, 1.0), (2, False, 0.0), (2, True, 2.0)]
    assert np.isfinite(hw.throughput(runs)["speedup"]).all()


def test_pinning_table_reads_medians_with_cis():
    t = hw.pinning_table(pinning_frame(33.3, 31.0, 31.2))
    assert t["workers"].tolist() == [1, 2]
    assert t["step ms, unpinned"].iloc[0].startswith("33.32 [")
    assert t["1-worker / W-worker step, unpinned"].iloc[1].startswith("1.07 [")
    assert hw.pinning_table(None).empty
