"""The analysis layer against answers known in advance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from study import analysis as A


def test_median_ci_brackets_the_median_and_needs_three_values():
    med, lo, hi = A.median_ci([10, 11, 12, 13, 14])
    assert med == 12 and lo <= 12 <= hi and lo >= 10 and hi <= 14
    assert np.isnan(A.median_ci([1.0, 2.0])[1])
    assert A.median_ci([5, 5, 5]) == (5, 5, 5)


def test_ratio_ci_of_exact_multiples_is_exact():
    r = A.ratio_ci([2.0, 2.02, 1.98, 2.01, 1.99], [1.0, 1.01, 0.99, 1.005, 0.995])
    assert r[0] == pytest.approx(2.0)
    assert 1.9 <= r[1] <= 2.0 <= r[2] <= 2.1
    spread = A.ratio_ci([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert spread[0] == pytest.approx(2.0) and spread[2] - spread[1] > r[2] - r[1]


def frame(rates):
    rows = []
    for (strategy, w), vals in rates.items():
        rows += [dict(host="h", session="s", config="c", strategy=strategy, workers=w,
                      samples_per_s=v, wall_s=1000.0 / v) for v in vals]
    return pd.DataFrame(rows)


def test_speedup_is_against_the_best_one_worker_series():
    df = frame({("sequential", 1): [100, 101, 99, 100, 100],
                ("hogwild", 1): [110, 111, 109, 110, 110],  # the better one-worker run
                ("hogwild", 2): [198, 200, 202, 199, 201]})
    sp = A.speedups(df)
    two = sp[(sp["strategy"] == "hogwild") & (sp["workers"] == 2)].iloc[0]
    assert two["baseline"] == "hogwild"
    assert two["speedup"] == pytest.approx(200 / 110)
    assert two["efficiency"] == pytest.approx(100 / 110)
    assert two["anomaly"] == ""


def test_time_metric_speedup_and_superlinear_flag():
    df = frame({("serial", 1): [100, 100, 100, 100, 100],
                ("engines", 2): [230, 231, 229, 230, 230]})
    sp = A.speedups(df, "wall_s", higher_is_better=False)
    two = sp[sp["workers"] == 2].iloc[0]
    assert two["speedup"] == pytest.approx(2.3)
    assert "superlinear" in two["anomaly"]


def test_wide_interval_and_too_few_trials_are_flagged():
    df = frame({("sequential", 1): [100, 150, 60, 120, 80], ("x", 2): [150, 160]})
    sp = A.speedups(df)
    assert "wider than 20%" in sp[sp["workers"] == 1].iloc[0]["anomaly"]
    assert "only 2 trial(s)" in sp[sp["workers"] == 2].iloc[0]["anomaly"]


def test_sessions_are_never_mixed():
    a = frame({("sequential", 1): [100] * 5})
    b = frame({("hogwild", 2): [300] * 5})
    b["session"] = "other"
    sp = A.speedups(pd.concat([a, b]))
    assert np.isnan(sp[sp["workers"] == 2].iloc[0]["speedup"])


def test_flag_rows_copies_point_anomalies_to_rows():
    df = frame({("serial", 1): [100] * 5, ("engines", 2): [230] * 5})
    df["anomaly"] = ""
    sp = A.speedups(df, "wall_s", higher_is_better=False)
    out = A.flag_rows(df, sp, ["strategy", "workers"])
    assert (out.loc[df["workers"] == 2, "anomaly"].str.contains("superlinear")).all()
    assert (out.loc[df["workers"] == 1, "anomaly"] == "").all()


def test_headline_text_and_quick_scale_flag():
    p = {"speedup": 1.8, "speedup_lo": 1.7, "speedup_hi": 1.9, "n": 5, "config": "c"}
    rows = pd.DataFrame({"scale": ["quick"], "cpu": ["cpu"]})
    h = A.headline_from_point("k", "label", p, "x", rows=rows)
    assert h.text() == "1.80x [1.70, 1.90]"
    assert "quick-scale" in h.anomaly
