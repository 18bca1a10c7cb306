"""study/figures/kernels.py: each figure draws the series and values of known frames."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from test_kernels_study import KNOWN, synthetic

from study import schema, steps
from study.experiments import kernels as K
from study.figures import kernels as F

matplotlib.use("agg")

SERIES = ["numpy 1t", "numba 1t", "numba 2t", "torch 1t", "torch 2t"]
KERNELS = [("0.Conv2D", 4e8), ("1.ReLU", 0.0), ("3.Conv2D", 8e8), ("6.Flatten", 0.0),
           ("7.Dense", 1e8), ("loss", 0.0), ("sgd_update", 0.0)]


def kernel_rows(trials: int = 3) -> pd.DataFrame:
    """bench_kernel rows: every kernel takes 1 ms / speed; numba 2t is twice numba 1t."""
    rows = []
    for (b, t) in KNOWN:
        speed = {"numpy": 1.0, "numba": 1.5 * t, "torch": 1.2 * t}[b]
        for trial in range(trials):
            for name, flops in KERNELS:
                for d in (("fwd", "bwd") if "." in name else ("update",)):
                    ms = 1.0 / speed
                    rows.append(dict(
                        experiment="bench_kernel", strategy=steps.STRATEGY[b], backend=b,
                        processes=1, threads=t, device="cpu", model="seed_cnn",
                        dataset="synthetic", batch_size=128, input_shape="3x32x32",
                        filters="32,64", config=K.config_label("3x32x32", 128, "32,64"),
                        trial=trial, kernel=name, direction=d, step_ms_median=ms,
                        kernel_flops=flops, kernel_bytes=1e6,
                        gflops=flops / ms / 1e6 if flops else np.nan,
                        host="h", cpu="test cpu", physical_cores=2, versions={}, commit="c",
                        timestamp="2026-01-01T00:00:00"))
    roofs = [dict(rows[0], experiment="bench_roof", strategy="roof", model=m, threads=t,
                  backend="numpy", kernel=m, gflops=g, gbytes_per_s=c, trial=0)
             for t, g, c in ((1, 100.0, 10.0), (2, 180.0, 15.0)) for m in ("gemm", "copy")]
    return schema.rows(rows + roofs, scale="standard", session="k")


def frame() -> pd.DataFrame:
    return pd.concat([synthetic(), synthetic(where=K.MPI, session="s2"), kernel_rows()],
                     ignore_index=True)


def bars(ax):
    return [p for p in ax.patches if p.get_height() > 0]


def test_throughput_draws_five_series_with_their_medians_at_both_configs():
    fig = F.throughput(frame())
    assert [a.get_title() for a in fig.axes] == ["3x32x32, batch 128 (seed config)",
                                                 "1x28x28, batch 64 (MPI/HOGWILD config)"]
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == SERIES
        heights = [p.get_height() for p in bars(ax)]
        assert heights == pytest.approx([np.median(KNOWN[k]) for k in KNOWN])
        assert len(ax.lines) + len(ax.collections) >= 5  # a CI whisker per bar


def test_kernel_time_stacks_the_groups_and_draws_the_roofs():
    fig = F.kernel_time(frame())
    ax_a, ax_b = fig.axes
    split = F.time_split(K.rows_of(frame(), "kernels"))
    # numpy: 5 kernels with fwd+bwd (10 calls) + loss + update at 1 ms each
    assert split.loc["numpy 1t", "median"] == pytest.approx(12.0)
    assert split.loc["numba 2t", "median"] == pytest.approx(4.0)
    assert split.loc["numpy 1t", "conv1"] == pytest.approx(2.0)
    assert split.loc["numpy 1t", "loss + update"] == pytest.approx(2.0)
    assert [t.get_text() for t in ax_a.get_xticklabels()] == SERIES
    assert len(bars(ax_a)) == len(SERIES) * len(F.GROUPS)
    labels = [t.get_text() for t in ax_b.get_legend().get_texts()]
    assert labels == ["roof 1t", "roof 2t", "numpy 1t", "numba 2t", "torch 2t"]
    roof2 = [ln for ln in ax_b.lines if ln.get_label() == "roof 2t"][0]
    assert roof2.get_ydata().max() == pytest.approx(180.0)
    assert np.allclose(roof2.get_ydata()[:3], np.minimum(180.0, 15.0 * roof2.get_xdata()[:3]))


def test_thread_scaling_is_against_the_best_one_thread_run():
    fig = F.thread_scaling(frame())
    ax = fig.axes[0]
    assert "baseline: numba 1t" in ax.get_title()
    series = {c.get_label(): c.lines[0] for c in ax.containers}
    assert list(series) == ["numpy", "numba", "torch"]
    assert np.allclose(series["numba"].get_ydata(), [1.0, 200 / 150])
    assert np.allclose(series["torch"].get_ydata(), [140 / 150, 160 / 150])
    assert [ln.get_label() for ln in ax.lines if ln.get_label() == "ideal"] == ["ideal"]


def test_grid_marks_the_best_cell():
    cells = pd.concat([synthetic("standard", "bench_grid", ("1x28x28", b), "16,32", "g")
                       for b in (32, 128)], ignore_index=True)
    cells.loc[(cells["batch_size"] == 128) & (cells["backend"] == "numpy"),
              "samples_per_s"] *= 0.5
    fig = F.grid(cells)
    ax = fig.axes[0]
    texts = sorted(t.get_text().split("\n")[0] for t in ax.texts)
    assert texts == ["2.00x", "4.00x"]
    assert "best cell of the grid" in ax.get_title()
    box = [p for p in ax.patches if not p.get_fill()][0]
    assert box.get_xy() == (0.5, -0.5)  # column of batch 128


def test_empty_frames_say_so_and_too_many_series_refused():
    for fn in F.FIGURES.values():
        fig = fn(pd.DataFrame())
        assert any("measured yet" in t.get_text() for ax in fig.axes for t in ax.texts)
    df = frame()
    extra = df[(df["experiment"] == "bench_step") & (df["backend"] == "torch")]
    more = pd.concat([df] + [extra.assign(threads=t, workers=t) for t in (3, 4)],
                     ignore_index=True)
    with pytest.raises(ValueError, match="at most 6"):
        F.throughput(more)


def test_report_figures_are_saved(monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_IMAGES_DIR", str(tmp_path))
    paths = F.save_all(frame(), "quick", names=F.REPORT)
    assert sorted(p.name for v in paths.values() for p in v.values()) == [
        "kernels_throughput.pdf", "kernels_throughput.png", "kernels_time.pdf",
        "kernels_time.png"]
