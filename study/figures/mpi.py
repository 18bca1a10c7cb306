"""The MPI family's figures (notebook 04 and the report).

The report's two: `scaling` (saved as ``mpi_speedup``: speedup against workers, weak and
strong as panels, ideal line and 95% CIs) and `comm_split` (a steady step split into
compute and communication). The notebook's others: `amortisation` (speedup of whole runs
by work per worker), `hybrid`, `accuracy` (against epochs, and the final gap to
sequential) and the cost model's `costmodel_check` and `extrapolation`. Each takes the
family's frames (as `study.experiments.mpi.load` returns them), draws the latest session,
returns the figure and saves it under the scale's images folder unless ``save=False``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from study import analysis
from study.experiments import mpi_analysis as A
from study.figures import style


def _close(fig: Any, axes: Sequence[Any], rows: pd.DataFrame | None, note: str, name: str,
           scale: str, save: bool) -> Any:
    """`style.finish` with the note wrapped to the figure's width."""
    note = "\n".join(textwrap.wrap(note, 140)) if note else note
    return style.finish(fig, axes, rows if rows is not None else pd.DataFrame(), note, name,
                        scale, save)


def _rows(frames: Mapping[str, pd.DataFrame], name: str) -> pd.DataFrame:
    return analysis.latest_session(frames.get(name))


def series_order(names: Sequence[str]) -> list[str]:
    """Strategies in the study's order (sequential first), others after."""
    known = ["sequential", *A.STRATEGIES]
    return [s for s in known if s in names] + sorted(set(names) - set(known))


def scaling(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
            save: bool = True) -> Any:
    """Speedup against workers per strategy, weak and strong panels, ideal line, CIs;
    hollow markers: oversubscribed points (more processes than physical cores)."""
    df = _rows(frames, A.SCALING)
    pts = A.scaling_points(df)
    fig, axes = style.new_figure(2, height=3.0, sharey=True)
    for ax, mode in zip(axes, ("weak", "strong"), strict=True):
        p = pts[pts["mode"] == mode] if len(pts) else pts
        if not len(p):
            style.empty(ax, f"no {mode}-scaling rows yet")
            continue
        names = [n for n in series_order(list(dict.fromkeys(p["strategy"])))
                 if n != "sequential"]  # the baseline (or slower than it): speedup <= 1
        style.ideal_line(ax, p["workers"])
        for name in names:
            s = p[p["strategy"] == name].sort_values("workers")
            style.with_ci(ax, s["workers"], s["speedup"], s["speedup_lo"], s["speedup_hi"],
                          label=name, strategy=name)
            over = s[s["oversubscribed"]]
            if len(over):
                ax.plot(over["workers"], over["speedup"], "o", markerfacecolor="white",
                        color=style.color(name), zorder=3)
        ax.set_xticks(sorted(set(p["workers"])))
        ax.set_xlabel("workers (training ranks)")
        b = p["global_batch"].max() if mode == "strong" else p["batch_size"].max()
        ax.set_title(f"{mode} scaling ({'global batch' if mode == 'strong' else 'per worker'} "
                     f"{b:g})\nbaseline: {p['baseline'].iloc[0]}", fontsize=9)
    axes[0].set_ylabel("speedup vs best one-process run")
    return _close(fig, axes, df, f"hollow: oversubscribed; {A.EFFICIENCY_NOTE}",
                  "mpi_speedup", scale, save)


def comm_split(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
               save: bool = True) -> Any:
    """A steady step of each strategy at the largest P that fits the cores (and the
    one-process runs): compute (solid) and communication (hatched), CI of the whole."""
    df = _rows(frames, A.SCALING)
    split = A.comm_split(df)
    fig, axes = style.new_figure(2, height=3.0, sharey=True)
    for ax, mode in zip(axes, ("weak", "strong"), strict=True):
        s = split[split["mode"] == mode] if len(split) else split
        if not len(s):
            style.empty(ax, f"no {mode}-scaling rows yet")
            continue
        rank = {n: i for i, n in enumerate(series_order(list(s["strategy"])))}
        s = s.assign(order=s["strategy"].map(rank)).sort_values(["order", "processes"])
        s = s.reset_index(drop=True)
        style.check_series(len(s), f"mpi comm split ({mode})")
        x = np.arange(len(s))
        colors = [style.color(n) for n in s["strategy"]]
        ax.bar(x, s["compute_ms"], color=colors)
        ax.bar(x, s["comm_ms"], bottom=s["compute_ms"], color="white", edgecolor=colors,
               hatch="///")
        ax.bar([], [], color="#777777", label="compute")  # legend proxies: one per part
        ax.bar([], [], color="white", edgecolor="#777777", hatch="///", label="communication")
        known = np.isfinite(s["lo"]) & np.isfinite(s["hi"])
        ax.errorbar(x[known], s["step_ms"][known], yerr=[(s["step_ms"] - s["lo"])[known],
                                                         (s["hi"] - s["step_ms"])[known]],
                    fmt="none", color="#333333", capsize=3, elinewidth=1)
        ax.set_xticks(x, [f"{n} P={p}" for n, p in zip(s["strategy"], s["processes"],
                                                       strict=True)], fontsize=6.5,
                      rotation=30, ha="right")
        ax.set_title(f"{mode} scaling: one steady step")
    axes[0].set_ylabel("ms per step")
    return _close(fig, axes, df, "communication: time inside MPI calls, waiting for the "
                  "slowest rank included; bars: medians, whiskers: 95% CI of the whole step",
                  "mpi_comm_split", scale, save)


def amortisation(frames: Mapping[str, pd.DataFrame], steps: Sequence[int],
                 scale: str = "standard", save: bool = True) -> Any:
    """Speedup of whole runs (start-up and first step included) against steps per
    worker, at the largest P that fits the cores; dotted: the steady-state speedup."""
    df = _rows(frames, A.SCALING)
    am = A.amortisation(df, steps) if len(df) else pd.DataFrame()
    top = A.largest_fitting(A.scaling_points(df)) if len(df) else pd.DataFrame()
    fig, axes = style.new_figure(2, height=3.0, sharey=True)
    for ax, mode in zip(axes, ("weak", "strong"), strict=True):
        t = top[top["mode"] == mode] if len(top) else top
        if not len(t) or not len(am):
            style.empty(ax, f"no {mode}-scaling rows yet")
            continue
        for name in series_order(list(t["strategy"])):
            p = t[t["strategy"] == name].iloc[0]
            s = am[(am["mode"] == mode) & (am["strategy"] == name)
                   & (am["workers"] == p["workers"])].sort_values("steps_per_worker")
            style.with_ci(ax, s["steps_per_worker"], s["speedup"], s["speedup_lo"],
                          s["speedup_hi"], label=f"{name} (P={int(p['processes'])})",
                          strategy=name)
            ax.axhline(p["speedup"], color=style.color(name), linestyle=":", linewidth=0.8)
        measured = df["step"].max()
        ax.axvline(measured, color="#999999", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("steps per worker in a run")
        ax.set_title(f"{mode} scaling: whole runs")
    axes[0].set_ylabel("speedup of the whole run")
    return _close(fig, axes, df, "run time = start-up + first step + (steps - 1) x steady "
                  "step, each measured per trial; dotted: steady-state speedup; dashed: the "
                  "measured run length", "mpi_amortisation", scale, save)


def hybrid(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
           ) -> Any:
    """Speedup (CI) of each ranks x threads layout against the best one-worker run."""
    df = _rows(frames, A.HYBRID)
    pts = A.scaling_points(df, ("strategy", "processes", "threads"))
    fig, axes = style.new_figure(1, height=2.8, width=style.WIDTH * 0.7)
    ax = axes[0]
    if not len(pts):
        style.empty(ax, "no hybrid rows yet (needs the numba backend)")
        return _close(fig, axes, df, "", "mpi_hybrid", scale, save)
    pts = pts.sort_values(["workers", "processes"]).reset_index(drop=True)
    style.check_series(len(pts), "mpi hybrid")
    x = np.arange(len(pts))
    labels = [("sequential" if s == "sequential" else f"{p}x{t}") for s, p, t in pts[
        ["strategy", "processes", "threads"]].itertuples(index=False)]
    known = np.isfinite(pts["speedup_lo"]) & np.isfinite(pts["speedup_hi"])
    yerr = np.vstack([np.where(known, pts["speedup"] - pts["speedup_lo"], 0),
                      np.where(known, pts["speedup_hi"] - pts["speedup"], 0)])
    ax.bar(x, pts["speedup"], yerr=yerr, capsize=3,
           color=[style.color("sequential" if s == "sequential" else "hybrid")
                  for s in pts["strategy"]])
    ax.plot(x, pts["workers"], "_", color="#888888", markersize=18, label="ideal (= workers)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("ranks x threads")
    ax.set_ylabel("speedup vs best one-worker run")
    return _close(fig, axes, df, "each worker (thread) with the same samples per step",
                  "mpi_hybrid", scale, save)


def accuracy(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
             ) -> Any:
    """Test accuracy against epochs per strategy (median, CI over seeds), and the final
    difference from sequential in points (paired by seed)."""
    df = _rows(frames, A.ACCURACY)
    curves = A.accuracy_curves(df)
    final = A.accuracy_points(df)
    fig, axes = style.new_figure(2, height=3.0)
    if not len(curves):
        for ax in axes:
            style.empty(ax, "no accuracy rows yet")
        return _close(fig, axes, df, "", "mpi_accuracy", scale, save)
    names = series_order(list(dict.fromkeys(curves["strategy"])))
    style.check_series(len(names), "mpi accuracy")
    for name in names:
        c = curves[curves["strategy"] == name].sort_values("epoch")
        style.with_ci(axes[0], c["epoch"], c["median"], c["lo"], c["hi"], label=name,
                      strategy=name)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_xticks(sorted(set(curves["epoch"])))
    f = final[final["strategy"] != "sequential"]
    f = f.set_index("strategy").loc[[n for n in names if n in set(f["strategy"])]]
    x = np.arange(len(f))
    known = np.isfinite(f["lo"]) & np.isfinite(f["hi"])
    yerr = np.vstack([np.where(known, f["median"] - f["lo"], 0),
                      np.where(known, f["hi"] - f["median"], 0)])
    axes[1].bar(x, f["median"], yerr=yerr, capsize=3, color=[style.color(n) for n in f.index])
    axes[1].axhline(0, color="#888888", linewidth=0.8)
    axes[1].set_xticks(x, list(f.index), fontsize=6.5, rotation=30, ha="right")
    axes[1].set_ylabel("points vs sequential (final)")
    return _close(fig, axes, df, "same global batch, seed, lr schedule and epochs as "
                  "sequential; CIs over seeds", "mpi_accuracy", scale, save)


def costmodel_check(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
                    save: bool = True) -> Any:
    """Measured against modelled: Allreduce time by message size (markers: measured with
    CI; lines: the ring model), and steady step times (modelled vs measured)."""
    cm_rows = _rows(frames, A.COSTMODEL)
    check = A.costmodel_check(cm_rows, frames.get(A.SCALING)) if len(cm_rows) else (
        pd.DataFrame())
    fig, axes = style.new_figure(2, height=3.0)
    if not len(check) or "why" in check:
        why = check["why"].iloc[0] if "why" in check else "no cost-model rows yet"
        for ax in axes:
            style.empty(ax, "\n".join(textwrap.wrap(why, 50)))
        return _close(fig, axes, cm_rows, "", "mpi_costmodel_check", scale, save)
    ar = check[check["kind"] == "allreduce"]
    ps = sorted(set(ar["processes"]))
    style.check_series(len(ps), "allreduce check")
    for i, p in enumerate(ps):
        s = ar[ar["processes"] == p].sort_values("bytes")
        c = style.PALETTE[i % len(style.PALETTE)]
        known = np.isfinite(s["lo"]) & np.isfinite(s["hi"])
        axes[0].errorbar(s["bytes"], s["time_s"] * 1e6, fmt="o", color=c, capsize=2,
                         yerr=[np.where(known, (s["time_s"] - s["lo"]) * 1e6, 0),
                               np.where(known, (s["hi"] - s["time_s"]) * 1e6, 0)],
                         label=f"P={p}")
        axes[0].plot(s["bytes"], s["predicted_s"] * 1e6, "-", color=c, linewidth=1)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("message bytes")
    axes[0].set_ylabel("Allreduce time (us)")
    st = check[check["kind"] == "step"]
    if len(st):
        names = series_order(list(dict.fromkeys(st["strategy"])))
        style.check_series(len(names), "step check")
        for name in names:
            s = st[st["strategy"] == name]
            axes[1].errorbar(s["predicted_s"] * 1e3, s["time_s"] * 1e3, fmt="o",
                             color=style.color(name), label=name, capsize=2,
                             yerr=[np.nan_to_num((s["time_s"] - s["lo"]) * 1e3),
                                   np.nan_to_num((s["hi"] - s["time_s"]) * 1e3)])
        lim = [0, float(max(st["predicted_s"].max(), st["time_s"].max()) * 1.1e3)]
        axes[1].plot(lim, lim, ":", color="#888888", linewidth=1, label="model = measured")
        axes[1].set_xlabel("modelled step (ms)")
        axes[1].set_ylabel("measured steady step (ms)")
    else:
        style.empty(axes[1], "no scaling rows to check the step model against")
    return _close(fig, axes, cm_rows, "ring allreduce 2(P-1)a + 2(P-1)/P n/b; step = C(b) + "
                  "communication", "mpi_costmodel_check", scale, save)


def extrapolation(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
                  save: bool = True, batch_per_rank: int = 64, global_batch: int = 4096) -> Any:
    """Modelled allreduce efficiency up to 1024 ranks per interconnect: weak scaling at
    ``batch_per_rank`` (solid) and strong scaling at ``global_batch`` (dashed)."""
    cm_rows = _rows(frames, A.COSTMODEL)
    ext = A.extrapolation(cm_rows, batch_per_rank, global_batch) if len(cm_rows) else (
        pd.DataFrame())
    fig, axes = style.new_figure(1, height=3.0, width=style.WIDTH * 0.75)
    ax = axes[0]
    if not len(ext) or "why" in ext:
        why = ext["why"].iloc[0] if "why" in ext else "no cost-model rows yet"
        style.empty(ax, "\n".join(textwrap.wrap(why, 60)))
        return _close(fig, axes, cm_rows, "", "mpi_costmodel_extrapolation", scale, save)
    nets = list(dict.fromkeys(ext["network"]))
    style.check_series(2 * len(nets), "extrapolation")
    for i, net in enumerate(nets):
        s = ext[ext["network"] == net].sort_values("processes")
        c = style.PALETTE[i % len(style.PALETTE)]
        name = s["network_name"].iloc[0]
        ax.plot(s["processes"], s["weak_efficiency"], "-o", color=c, markersize=3,
                label=f"{name}, weak")
        ax.plot(s["processes"], s["strong_efficiency"], "--", color=c, label=f"{name}, strong")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("ranks")
    ax.set_ylabel("modelled efficiency")
    return _close(fig, axes, cm_rows, f"model only: weak {batch_per_rank} per rank, strong "
                  f"global batch {global_batch}; compute as this host's core",
                  "mpi_costmodel_extrapolation", scale, save)
