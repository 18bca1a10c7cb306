"""HOGWILD's figures (notebook 05, the report's asynchronous-methods section).

Designed for the report: `speedup` (speedup vs workers, ideal line, 95% CIs, one panel
per batch size) and `accuracy` (test accuracy vs epochs against sequential training).
Notebook extra: `pinning` (step time and speedup, workers pinned vs unpinned). Every
function takes the family's frames (`study.experiments.hogwild.run` or ``load``), draws the
latest session, returns the figure and saves it unless ``save=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from study import analysis
from study.config import preset
from study.experiments import hogwild as hw
from study.figures import style
from study.figures.style import empty_figure

NAMES = {"sequential": "sequential (cnn.train)", "hogwild": "HOGWILD lock-free",
         hw.LOCKED: "HOGWILD locked"}
MARKERS = {"sequential": "s", "hogwild": "o", hw.LOCKED: "^"}
CI_NOTE = "median of trials with 95% bootstrap CI"


def _seed_batch(df: pd.DataFrame) -> int:
    return int(preset("hogwild", str(df["scale"].iloc[0]))["seed_batch"])


def speedup(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
            ) -> Any:
    """Speedup (samples/s) against the best one-worker run vs workers, per batch size."""
    df = analysis.latest_session(frames.get(hw.RESULTS[0]))
    tp = hw.throughput(df)
    if not len(tp):
        return empty_figure("hogwild_speedup", "HOGWILD not measured yet (notebook 05)", scale,
                            save)
    batches = sorted(int(b) for b in tp["batch_size"].unique())
    seed = _seed_batch(df)
    fig, axes = style.new_figure(len(batches), sharey=True)
    for ax, b in zip(axes, batches, strict=True):
        t = tp[tp["batch_size"] == b]
        for strategy in ("hogwild", hw.LOCKED, "sequential"):
            s = t[t["strategy"] == strategy].sort_values("workers")
            if len(s):
                style.with_ci(ax, s["workers"], s["speedup"], s["speedup_lo"], s["speedup_hi"],
                              NAMES[strategy], strategy, marker=MARKERS[strategy],
                              linestyle="-" if len(s) > 1 else "none")
        style.ideal_line(ax, t["workers"])
        ax.set_title(f"batch {b}" + (" (seed configuration)" if b == seed else ""))
        ax.set_xlabel("worker processes")
        ax.set_xticks(sorted(set(t["workers"].astype(int))))
    axes[0].set_ylabel("speedup vs best 1-worker run")
    note = (f"HOGWILD, {hw.config_label(preset('hogwild', str(df['scale'].iloc[0])), seed)}"
            f" (batch per panel); {CI_NOTE}")
    return style.finish(fig, axes, hw.runs(df), note, "hogwild_speedup", scale, save)


def accuracy(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
             ) -> Any:
    """Test accuracy vs epochs, HOGWILD against sequential training, per batch size."""
    df = analysis.latest_session(frames.get(hw.RESULTS[0]))
    pts = hw.accuracy_points(df)
    if not len(pts):
        return empty_figure("hogwild_accuracy", "HOGWILD not measured yet (notebook 05)", scale,
                            save)
    batches = sorted(int(b) for b in pts["batch_size"].unique())
    fig, axes = style.new_figure(len(batches), sharey=True)
    most = int(pts["workers"].max())
    for ax, b in zip(axes, batches, strict=True):
        p = pts[pts["batch_size"] == b]
        for (strategy, w), s in p.groupby(["strategy", "workers"], sort=True):
            if strategy == hw.LOCKED and int(w) != most:
                continue  # locked only at the most workers: at most 6 series per panel
            s = s.sort_values("epoch")
            lab = NAMES[strategy] + ("" if strategy == "sequential" else f", {int(w)} worker(s)")
            ls = {1: ":", 2: "-"}.get(int(w), "--") if strategy != "sequential" else "-"
            style.with_ci(ax, s["epoch"], s["median"], s["lo"], s["hi"], lab, strategy,
                          marker=MARKERS[strategy], linestyle=ls)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("epoch")
        ax.set_xticks(sorted(set(p["epoch"].astype(int))))
    axes[0].set_ylabel("test accuracy")
    note = f"equal epochs for every run; {CI_NOTE} (HOGWILD is nondeterministic)"
    return style.finish(fig, axes, df[df["kind"] == "epoch"], note,
                   "hogwild_accuracy", scale, save)


def pinning(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
            ) -> Any:
    """Notebook extra: the step of one worker and the speedup, pinned vs unpinned."""
    df = analysis.latest_session(frames.get(hw.RESULTS[1]))
    series = hw.SERIES["pinning"]
    st, tp = hw.step_points(df, series), hw.throughput(df, series)
    if not len(st):
        return empty_figure("hogwild_pinning", "pinning variant not measured yet", scale, save)
    fig, axes = style.new_figure(2)
    for pin, marker, ls in ((False, "o", "-"), (True, "D", "--")):
        lab = "pinned, one core per worker" if pin else "unpinned"
        s = st[st["pinned"].astype(bool) == pin].sort_values("workers")
        t = tp[tp["pinned"].astype(bool) == pin].sort_values("workers")
        style.with_ci(axes[0], s["workers"], s["median"], s["lo"], s["hi"], lab, "hogwild",
                      marker=marker, linestyle=ls)
        style.with_ci(axes[1], t["workers"], t["speedup"], t["speedup_lo"], t["speedup_hi"],
                      lab, "hogwild", marker=marker, linestyle=ls)
    style.ideal_line(axes[1], tp["workers"])
    axes[0].set_title("one worker's step")
    axes[0].set_ylabel("ms per step (median)")
    axes[1].set_title("throughput")
    axes[1].set_ylabel("speedup vs best 1-worker run")
    for ax in axes:
        ax.set_xlabel("worker processes")
        ax.set_xticks(sorted(set(np.asarray(st["workers"], int))))
    note = f"HOGWILD lock-free, batch {int(df['batch_size'].iloc[0])}; {CI_NOTE}"
    return style.finish(fig, axes, hw.runs(df), note, "hogwild_pinning", scale, save)


def draw(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
         ) -> dict[str, Any]:
    """Every HOGWILD figure, by name."""
    return {"hogwild_speedup": speedup(frames, scale, save),
            "hogwild_accuracy": accuracy(frames, scale, save),
            "hogwild_pinning": pinning(frames, scale, save)}
