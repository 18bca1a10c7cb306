"""Headlines pooled over sittings, and the re-run check, against answers known in advance."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cnn.metrics import make_row
from study import analysis as A
from study import paths, report, reproduce, schema, sittings


def rates(session, values, experiment="exp", host="h"):
    return pd.DataFrame([dict(experiment=experiment, host=host, session=session, config="c",
                              strategy=s, workers=w, samples_per_s=v)
                         for (s, w), vals in values.items() for v in vals])


def speedup_headline(frames):
    """A family's `headlines` in miniature: the 2-worker speedup of the newest sitting."""
    df = A.latest_session(frames["runs"])
    p = A.speedups(df)
    p = p[p["workers"] == 2].iloc[0]
    return [A.headline_from_point("speedup", "two workers", p, "x", rows=df.assign(
        scale="standard", cpu="cpu"))]


def test_a_sitting_frame_takes_that_sitting_where_it_exists_else_the_newest():
    df = pd.concat([rates("20260101T1", {("seq", 1): [1]}), rates("20260101T2", {("seq", 1): [2]}),
                    rates("20260101T3", {("seq", 1): [3]}, experiment="other")])
    assert sittings.sessions({"f": df}) == ["20260101T3", "20260101T2", "20260101T1"]
    assert sorted(sittings.sitting_frames(df, "20260101T1")["samples_per_s"]) == [1, 3]
    assert sorted(sittings.sitting_frames(df, "20260101T3")["samples_per_s"]) == [2, 3]


def test_a_headline_pairing_two_files_is_pooled_only_from_matching_sittings():
    """A cost-model-like number: file b's sitting paired with file a's rows of the same
    sitting. The build for a's newer sitting pairs it with b's only sitting: not counted."""
    a = pd.concat([rates("20260101T1", {("seq", 1): [100]}),
                   rates("20260101T2", {("seq", 1): [150]})])
    b = rates("20260101T1", {("seq", 1): [1]})

    def build(frames):
        s = str(frames["b"]["session"].iloc[0])
        v = float(frames["a"]["samples_per_s"].iloc[0])
        return [A.Headline("pair", "pair", v, session=s, trials=1)]

    [h] = sittings.pooled_headlines(build, {"a": a, "b": b})
    assert h.value == 100 and h.session == "20260101T1"


def test_one_sitting_is_left_as_it_is():
    frames = {"runs": rates("s1", {("seq", 1): [100] * 5, ("par", 2): [190, 191, 189, 190, 190]})}
    [h] = sittings.pooled_headlines(speedup_headline, frames)
    [direct] = speedup_headline(frames)
    assert (h.value, h.lo, h.hi, h.trials) == (direct.value, direct.lo, direct.hi, 5)
    assert "sittings" not in h.extra


def prediction_by_hand(heads, log=True):
    """The declared rule written out again: max(t(k-1) s, z w) sqrt(1 + 1/k) about the mean."""
    f = np.log if log else (lambda x: np.asarray(x, dtype=float))
    y = f([h.value for h in heads])
    k = len(y)
    ses = [(f(h.hi) - f(h.lo)) / (2 * 1.959964) for h in heads if math.isfinite(h.lo)]
    w = math.sqrt(np.mean(np.square(ses))) if ses else 0.0
    half = max(stats.t.ppf(0.975, k - 1) * np.std(y, ddof=1), 1.959964 * w) * math.sqrt(1 + 1 / k)
    lo, hi = y.mean() - half, y.mean() + half
    return (math.exp(lo), math.exp(hi)) if log else (lo, hi)


def test_two_sittings_pool_to_the_median_and_a_prediction_interval_for_a_rerun():
    a = rates("20260101T1", {("seq", 1): [100] * 5, ("par", 2): [180, 181, 179, 180, 182]})
    b = rates("20260101T2", {("seq", 1): [100] * 5, ("par", 2): [186, 185, 187, 186, 184]})
    [ha] = speedup_headline({"runs": a})
    [hb] = speedup_headline({"runs": b})
    [h] = sittings.pooled_headlines(speedup_headline, {"runs": pd.concat([a, b])})
    assert h.value == pytest.approx((ha.value + hb.value) / 2)
    assert (h.lo, h.hi) == pytest.approx(prediction_by_hand([hb, ha]), rel=1e-6)
    assert h.lo < ha.lo and h.hi > hb.hi  # two sittings: t(1) makes it wide
    assert h.extra["envelope"] == [ha.lo, hb.hi]
    assert "spread of 2 sitting values" in h.extra["interval"]
    assert h.trials == 10 and h.session == "20260101T2+20260101T1"
    assert [s["session"] for s in h.extra["sittings"]] == ["20260101T2", "20260101T1"]
    assert "sittings disagree" in h.anomaly  # [1.79, 1.82] and [1.84, 1.87] do not overlap
    assert "2 sittings pooled" in h.note


def test_sittings_that_agree_better_than_their_trials_get_the_trial_noise_as_width():
    heads = [A.Headline("s", "s", v, v - 0.2, v + 0.2, "x", session=str(i), trials=5)
             for i, v in enumerate((2.0, 2.01, 1.99))]
    h = sittings.pool(heads)
    assert (h.lo, h.hi) == pytest.approx(prediction_by_hand(heads), rel=1e-6)
    assert "trial noise" in h.extra["interval"]
    assert h.lo < 1.8 and h.hi > 2.2  # never narrower than one sitting's own interval
    diffs = [A.Headline("d", "d", v, v - 1, v + 1, "points", session=str(i), trials=5)
             for i, v in enumerate((-2.0, -1.0, 0.5))]
    h = sittings.pool(diffs)
    assert (h.lo, h.hi) == pytest.approx(prediction_by_hand(diffs, log=False), rel=1e-6)
    assert "linear scale" in h.extra["interval"]
    errors = [A.Headline("e", "e", v, session=str(i), unit="error", trials=1)
              for i, v in enumerate((0.029, 0.154, 0.231))]
    h = sittings.pool(errors)  # an error near zero is not a factor away from 15%
    assert (h.lo, h.hi) == pytest.approx(prediction_by_hand(errors, log=False), rel=1e-6)


@pytest.mark.parametrize("drift", [0.0, 1.0, 3.0])
def test_the_rerun_interval_covers_the_next_sitting_95_percent_of_the_time(drift):
    """Simulated sittings: value = truth x exp(drift + trial noise), each with its own 95%
    interval. Three sittings predict a fourth. The envelope of the intervals (the rule
    before) under-covers once drift exceeds the trial noise; the declared rule does not."""
    rng = np.random.default_rng(7)
    sigma, inside, in_envelope, n = 0.05, 0, 0, 3000
    for _ in range(n):
        y = 0.6 + rng.normal(0, drift * sigma, 4) + rng.normal(0, sigma, 4)
        heads = [A.Headline("s", "s", math.exp(v), math.exp(v - 1.96 * sigma),
                            math.exp(v + 1.96 * sigma), "x", session=str(i), trials=5)
                 for i, v in enumerate(y[:3])]
        h = sittings.pool(heads)
        inside += h.lo <= math.exp(y[3]) <= h.hi
        lo, hi = h.extra["envelope"]
        in_envelope += lo <= math.exp(y[3]) <= hi
    assert 0.94 <= inside / n <= 0.995
    if drift >= 3:
        assert in_envelope / n < 0.85
def test_sittings_that_agree_are_not_flagged_but_a_wide_rerun_interval_is():
    a = rates("20260101T1", {("seq", 1): [100] * 5, ("par", 2): [176, 180, 184, 182, 178]})
    b = rates("20260101T2", {("seq", 1): [100] * 5, ("par", 2): [182, 184, 178, 186, 180]})
    c = rates("20260101T3", {("seq", 1): [100] * 5, ("par", 2): [179, 183, 181, 177, 185]})
    [h] = sittings.pooled_headlines(speedup_headline, {"runs": pd.concat([a, b, c])})
    assert h.anomaly == "" and h.lo < 1.8 < h.hi
    d = rates("20260101T4", {("seq", 1): [100] * 5, ("par", 2): [120, 200, 150, 130, 190]})
    [h] = sittings.pooled_headlines(speedup_headline, {"runs": pd.concat([a, b, c, d])})
    assert "re-run interval over 4 sittings" in h.anomaly and "wider than 20%" in h.anomaly


def test_a_sitting_of_another_configuration_is_not_pooled():
    a = rates("20260101T1", {("seq", 1): [100] * 5, ("par", 2): [150] * 5})
    a["config"] = "old preset"
    b = rates("20260101T2", {("seq", 1): [100] * 5, ("par", 2): [180, 181, 179, 180, 182]})
    [h] = sittings.pooled_headlines(speedup_headline, {"runs": pd.concat([a, b])})
    assert h.value == pytest.approx(1.8) and h.trials == 5


def test_deterministic_sittings_that_agree_keep_no_interval():
    same = [A.Headline("acc", "acc", 0.92, session=s, trials=1) for s in ("b", "a")]
    h = sittings.pool(same)
    assert h.value == 0.92 and math.isnan(h.lo) and h.trials == 2
    other = [same[0], A.Headline("acc", "acc", 0.90, session="a", trials=1)]
    h = sittings.pool(other)
    assert (h.lo, h.hi) == pytest.approx(prediction_by_hand(other), rel=1e-6)
    assert h.lo < 0.90 and h.hi > 0.92


def test_check_says_inside_outside_and_equal():
    committed = [A.Headline("x", "x", 1.8, 1.7, 1.9, "x"), A.Headline("y", "y", 0.92),
                 A.Headline("z", "z", 2.0, 1.9, 2.1, "x"), A.not_measured("w", "w", "no GPU")]
    rerun = [A.Headline("x", "x", 1.75, 1.6, 1.8, "x"), A.Headline("y", "y", 0.92),
             A.Headline("z", "z", 2.2, 2.1, 2.3, "x"), A.Headline("w", "w", 3.0)]
    t = sittings.check(committed, rerun).set_index("key")
    assert t.loc["x", "inside"] and t.loc["y", "inside"] and not t.loc["z", "inside"]
    assert t.loc["w", "inside"] is None
    assert "deterministic" in t.loc["y", "how"]
    few = A.Headline("f", "f", 0.06, unit="error", trials=2)
    model = A.Headline("m", "m", 0.83, unit="modelled %")
    t = sittings.check([few, model], [A.Headline("f", "f", 0.23, unit="error", trials=2),
                                      A.Headline("m", "m", 0.85, unit="modelled %")])
    assert t["inside"].isna().all()
    assert list(t["how"].str.slice(0, 11)) == ["not checked"] * 2


def test_a_deterministic_number_pooled_over_sittings_is_still_checked_for_equality():
    """Three sittings of a bit-identical accuracy sum to 3 trials but still have no spread:
    a re-run must give the same number, not be waved through as 'too few trials'."""
    same = sittings.pool([A.Headline("acc", "acc", 0.9203, session=s, trials=1)
                          for s in ("c", "b", "a")])
    assert same.trials == 3 and math.isnan(same.lo)
    t = sittings.check([same], [A.Headline("acc", "acc", 0.9203, trials=1)])
    assert t["inside"].tolist() == [True] and "deterministic" in t["how"].iloc[0]
    t = sittings.check([same], [A.Headline("acc", "acc", 0.9190, trials=1)])
    assert t["inside"].tolist() == [False]


def test_a_pooled_model_output_is_still_not_checked():
    """Two sittings' cost models give a range of outputs, not a 95% interval to re-run."""
    pooled = sittings.pool([A.Headline("m", "m", 0.841, unit="modelled %", session="b"),
                            A.Headline("m", "m", 0.835, unit="modelled %", session="a")])
    assert (pooled.lo, pooled.hi) == (0.835, 0.841)
    t = sittings.check([pooled], [A.Headline("m", "m", 0.859, unit="modelled %")])
    assert t["inside"].iloc[0] is None and "model's output" in t["how"].iloc[0]


def baseline_rows(session, rate):
    raw = [make_row(experiment="baseline_train", strategy="sequential", backend="numpy",
                    processes=1, threads=1, device="cpu", model="seed_cnn",
                    dataset="fashion-mnist", batch_size=64, epoch=e, test_acc=0.9,
                    samples_per_s=rate + e, config="seed_cnn/fashion-mnist") for e in range(5)]
    return schema.rows(raw, scale="standard", session=session)


def test_reproduce_checks_a_rerun_folder_then_pools_it(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    monkeypatch.delenv(paths.RESULTS_ENV, raising=False)
    (tmp_path / "results").mkdir()
    schema.save(baseline_rows("20260101T1", 3000.0), "baseline_fashion_mnist")
    rerun = tmp_path / "rerun"
    with reproduce.results_folder(rerun):
        rerun.mkdir()
        schema.save(baseline_rows("20260101T2", 3500.0), "baseline_fashion_mnist")
    assert paths.RESULTS_ENV not in __import__("os").environ
    rec = reproduce.compare(rerun)
    rows = {r["key"]: r for r in rec["rows"]}
    assert rec["families"] == ["baseline"] and rec["compared"] == 2
    assert rows["baseline_accuracy"]["inside"] is True  # deterministic and equal
    assert rows["baseline_throughput"]["inside"] is False  # 3502 outside [3000, 3004]
    reproduce.append_record(rec)
    assert len(report.reproduction_checks()) == 1
    reproduce.pool_in(rerun)
    assert set(schema.load("baseline_fashion_mnist")["session"]) == {"20260101T1", "20260101T2"}
    pooled = {h.key: h for h in report.all_headlines(report.family_frames())}
    t = pooled["baseline_throughput"]
    assert t.extra["envelope"] == pytest.approx([3000.0, 3504.0], abs=1.5)
    assert t.lo < 3000 and t.hi > 3504  # the re-run interval of two sittings 17% apart
    assert t.trials == 10


def test_reproduce_refuses_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results"):
        reproduce.compare(tmp_path)


def test_make_study_checks_only_the_sitting_its_notebooks_added(tmp_path, monkeypatch):
    """`python -m study all` reads the committed frames before measuring and checks the
    rows of the new sitting alone against them (`reproduce.new_rows`)."""
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    monkeypatch.delenv(paths.RESULTS_ENV, raising=False)
    (tmp_path / "results").mkdir()
    schema.save(baseline_rows("20260101T1", 3000.0), "baseline_fashion_mnist")
    before = report.family_frames()
    schema.save(baseline_rows("20260101T2", 3001.0), "baseline_fashion_mnist")  # "notebooks"
    fresh = reproduce.new_rows(before, report.family_frames())
    assert set(fresh) == {"baseline"}
    assert set(fresh["baseline"]["baseline_fashion_mnist"]["session"]) == {"20260101T2"}
    rec = reproduce.check_record(before, fresh)
    assert rec["rerun_sessions"] == ["20260101T2"] and rec["committed_sessions"] == ["20260101T1"]
    assert rec["inside"] == rec["compared"] == 2  # 3003 inside [3000, 3004]


def test_an_error_bar_a_bound_misses_by_rounding_is_drawn_clipped():
    """A percentile bound can sit 1e-10 past its median (seen in a stragglers sitting);
    matplotlib refuses negative error bars, so `style.with_ci` clips them at zero."""
    import matplotlib.pyplot as plt

    from study.figures import style

    fig, ax = plt.subplots()
    style.with_ci(ax, [1.0, 2.0], [0.66, 0.7], [0.66 + 1e-10, 0.6], [0.73, 0.8], "x")
    segments = ax.collections[0].get_segments()
    assert segments[0][0][1] == pytest.approx(0.66) and segments[1][0][1] == pytest.approx(0.6)
    plt.close(fig)
