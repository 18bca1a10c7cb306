"""Async k-fold's figures (notebook 05, the report's k-fold section).

Designed for the report: `speedup` (left: speedup vs engines at the seed configuration,
ideal line, 95% CIs, on the folds' wall time and end to end; right: speedup vs work per
engine, where start-up is amortised). Notebook extras: `cpu` (per-core utilisation
during one trial of each run) and `timeline` (which process ran which fold, and when).
Every function takes the family's frames (`study.experiments.kfold.run` or ``load``) and
draws the latest session; it returns the figure and saves it unless ``save=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from study import analysis
from study.experiments import kfold as kf
from study.figures import style

LINES = {"training": "-", "end to end": "--"}
MARKERS = {"training": "o", "end to end": "s"}
CI_NOTE = "median of trials with 95% bootstrap CI"


def speedup(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
            ) -> Any:
    """Speedup vs engines (seed configuration) and vs work per engine (the sweep)."""
    df = analysis.latest_session(frames.get(kf.RESULTS[0]))
    pts = kf.speedups(df)
    work = kf.work_curve(frames)
    fig, axes = style.new_figure(2)
    if len(pts):
        for measure in kf.MEASURES:
            s = pts[(pts["measure"] == measure) & (pts["strategy"] == "kfold")]
            s = s.sort_values("workers")
            style.with_ci(axes[0], s["workers"], s["speedup"], s["speedup_lo"],
                          s["speedup_hi"], f"engines, {measure}", "kfold",
                          marker=MARKERS[measure], linestyle=LINES[measure])
        ser = pts[(pts["measure"] == "training") & (pts["strategy"] == "sequential")]
        style.with_ci(axes[0], ser["workers"], ser["speedup"], ser["speedup_lo"],
                      ser["speedup_hi"], "serial folds", "sequential", marker="D",
                      linestyle="none")
        style.ideal_line(axes[0], pts["workers"])
        axes[0].set_xticks(sorted(set(pts["workers"].astype(int))))
        axes[0].set_title(f"{str(pts['config'].iloc[0]).split(',')[0]}: speedup vs engines")
    else:
        style.empty(axes[0], "k-fold not measured yet (notebook 05)")
    axes[0].set_xlabel("engines")
    axes[0].set_ylabel("speedup vs best 1-worker run")
    most = work[work["strategy"] == "kfold"]["workers"].max() if len(work) else np.nan
    if np.isfinite(most) and most > 1:
        for measure in kf.MEASURES:
            s = work[(work["measure"] == measure) & (work["strategy"] == "kfold")
                     & (work["workers"] == most)].sort_values("work_per_worker")
            style.with_ci(axes[1], s["work_per_worker"], s["speedup"], s["speedup_lo"],
                          s["speedup_hi"], f"{int(most)} engines, {measure}", "kfold",
                          marker=MARKERS[measure], linestyle=LINES[measure])
        axes[1].axhline(most, linestyle=":", color="#888888", linewidth=1.0, label="ideal")
        axes[1].set_xscale("log")
        axes[1].set_title("where start-up is amortised")
    else:
        style.empty(axes[1], "work sweep not measured yet (notebook 05)")
    axes[1].set_xlabel("training samples per engine (folds x epochs x data / engines)")
    rows = pd.concat([kf.runs(analysis.latest_session(frames.get(n))) for n in kf.RESULTS],
                     ignore_index=True)
    note = ("training: first fold submitted to last result; end to end: the whole process, "
            f"engine start-up included; {CI_NOTE}")
    return style.finish(fig, axes, rows, note, "kfold_speedup", scale, save)


def cpu(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
        ) -> Any:
    """Notebook extra: per-core CPU utilisation over one trial of each run type."""
    df = analysis.latest_session(frames.get(kf.RESULTS[0]))
    trace = kf.cpu_trace(df)
    if not len(trace):
        fig, axes = style.new_figure(1)
        style.empty(axes[0], "k-fold not measured yet (notebook 05)")
        return style.finish(fig, axes, pd.DataFrame(), "", "kfold_cpu", scale, save)
    fig, axes = style.new_figure(len(trace), sharey=True)
    for ax, (_, r) in zip(axes, trace.iterrows(), strict=True):
        t = np.asarray(r["cpu_times"], float)
        s = np.asarray(r["cpu_samples"], float).reshape(len(t), -1)
        if s.shape[1] <= 4:
            for c in range(s.shape[1]):
                ax.plot(t, s[:, c], linewidth=1.2, label=f"core {c}")
        else:  # many cores: their spread, not one line each (at most 6 series)
            ax.plot(t, s.min(axis=1), linewidth=1.2, label="least busy core")
            ax.plot(t, s.max(axis=1), linewidth=1.2, label="busiest core")
        ax.plot(t, s.mean(axis=1), color="black", linewidth=2, label="mean")
        ax.set_title(f"{r['run']}: {r['wall_s']:.1f} s")
        ax.set_xlabel("seconds")
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("CPU busy (%)")
    note = "psutil per-core utilisation of the whole machine, first trial of the session"
    return style.finish(fig, axes, kf.runs(df), note, "kfold_cpu", scale, save)


def timeline(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
             ) -> Any:
    """Notebook extra: which process ran which fold, and when (first trial)."""
    df = analysis.latest_session(frames.get(kf.RESULTS[0]))
    folds = df[df["kind"] == "fold"] if len(df) else df
    fig, axes = style.new_figure(1, height=1.2 + 0.5 * max(1, len(folds)))
    ax = axes[0]
    if not len(folds):
        style.empty(ax, "k-fold not measured yet (notebook 05)")
        return style.finish(fig, axes, pd.DataFrame(), "", "kfold_timeline", scale, save)
    folds = folds[(folds["config"] == folds["config"].iloc[0])
                  & (folds["trial"] == folds["trial"].min())]
    lanes, ticks = 0, []
    for (strategy, w), g in folds.groupby(["strategy", "workers"], sort=True):
        run = "serial" if strategy == "sequential" else f"{int(w)} engine(s)"
        for i, (_, proc) in enumerate(g.groupby("pid", sort=True)):
            for _, f in proc.iterrows():
                ax.barh(lanes, f["end_s"] - f["start_s"], left=f["start_s"], height=0.6,
                        color=style.PALETTE[int(f["fold"]) % len(style.PALETTE)])
                ax.text((f["start_s"] + f["end_s"]) / 2, lanes, f"fold {int(f['fold'])}",
                        ha="center", va="center", fontsize=7, color="white")
            ticks.append((lanes, f"{run} #{i}"))
            lanes += 1
    ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks])
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("seconds since the first fold was submitted")
    ax.set_title("folds per process")
    return style.finish(fig, axes, kf.runs(df), "first trial of the session", "kfold_timeline",
                   scale, save)


def draw(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
         ) -> dict[str, Any]:
    """Every k-fold figure, by name."""
    return {"kfold_speedup": speedup(frames, scale, save), "kfold_cpu": cpu(frames, scale, save),
            "kfold_timeline": timeline(frames, scale, save)}
