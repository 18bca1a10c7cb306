"""Figures of the single-process kernels family (notebook 02, the report's kernels section).

Two designed figures for the report: `throughput` (samples/s of NumPy, Numba and PyTorch
at 1 and 2 threads, medians with 95% CIs, at the seed and the MPI configurations) and
`kernel_time` (where a step's time goes, and the roofline of its kernels against the
measured GEMM and copy roofs). Two more for the notebook: `thread_scaling` and `grid`.
Every function takes the ``kernels`` frame (`study.experiments.kernels`) and returns a
matplotlib figure; what was not measured is an empty panel that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from study import analysis
from study.experiments import kernels as K
from study.figures import style

#: Series order of bars and legends.
ORDER = ("numpy", "numba", "torch")
#: What the stacked bar of a step groups its kernels into.
GROUPS = ("conv1", "conv2", "dense", "ReLU / pool / flatten", "loss + update")
#: Their colours: light tints no strategy uses (Set3), so bars never read as a backend.
GROUP_COLORS = ("#80B1D3", "#FDB462", "#B3DE69", "#D9D9D9", "#FB8072")
REPORT = ("kernels_throughput", "kernels_time")


def series_key(s: str) -> tuple[int, int]:
    b, t = s.rsplit(" ", 1)
    return (ORDER.index(b) if b in ORDER else len(ORDER), int(t[:-1]))


def ordered(series: Sequence[str]) -> list[str]:
    return sorted(set(series), key=series_key)


def configs_shown(rows: pd.DataFrame, limit: int = 2) -> list[tuple[str, int]]:
    """The headline configurations (seed, MPI) where measured, else the first measured."""
    have = list(dict.fromkeys(zip(rows["input_shape"], pd.to_numeric(rows["batch_size"])
                                  .astype(int), strict=True))) if len(rows) else []
    wanted = [c for c in (K.SEED, K.MPI) if c in have]
    return (wanted or have)[:limit]


def latest(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the latest session (a figure compares runs measured side by side)."""
    return rows[rows["session"] == K.latest_session(rows)] if len(rows) else rows


def at(rows: pd.DataFrame, shape: str, batch: int, filters: str = "32,64") -> pd.DataFrame:
    r = rows[(rows["input_shape"] == shape) & (pd.to_numeric(rows["batch_size"]) == batch)
             & (rows["filters"] == filters)]
    return latest(r)


def _hatch(series: str) -> str | None:
    return None if series.endswith(" 1t") else "//"


def _bars(ax: Any, r: pd.DataFrame, value: str, unit_fmt: str = "{:,.0f}") -> list[str]:
    """One bar per series: median of ``value`` with its 95% CI; returns the series drawn."""
    pts = analysis.points(r, ["series"], value)
    names = ordered(pts["series"])
    style.check_series(len(names), "kernels bars")
    pts = pts.set_index("series").loc[names]
    x = np.arange(len(names))
    lo = np.where(np.isfinite(pts["lo"]), pts["median"] - pts["lo"], 0.0)
    hi = np.where(np.isfinite(pts["hi"]), pts["hi"] - pts["median"], 0.0)
    for i, s in enumerate(names):
        ax.bar(x[i], pts["median"].iloc[i], 0.7, color=style.color(s.split(" ")[0]),
               hatch=_hatch(s), edgecolor="white", label=s,
               yerr=[[lo[i]], [hi[i]]], capsize=3, error_kw={"elinewidth": 1.0})
        ax.text(x[i], pts["median"].iloc[i] + hi[i], unit_fmt.format(pts["median"].iloc[i]),
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    ax.grid(axis="x", visible=False)
    return names


# --- designed figure 1 ----------------------------------------------------------------

def throughput(df: pd.DataFrame | None) -> Any:
    """Training samples/s per series (median, 95% CI over interleaved trials), one panel
    per configuration: the seed CNN at 3x32x32 batch 128 and the MPI one, 1x28x28 batch 64."""
    steps = K.rows_of(df, "steps")
    shown = configs_shown(steps)
    fig, axes = style.new_figure(max(1, len(shown)), height=3.0)
    if not shown:
        style.empty(axes[0], "no step rows measured yet")
        return fig
    for ax, (shape, batch) in zip(axes, shown, strict=True):
        r = at(steps, shape, batch)
        _bars(ax, r, "samples_per_s")
        what = {K.SEED: "seed config", K.MPI: "MPI/HOGWILD config"}.get((shape, batch), "")
        ax.set_title(f"{shape}, batch {batch}" + (f" ({what})" if what else ""))
        ax.set_ylabel("training samples / s")
    style.footer(fig, steps, "bars: median over interleaved trials, whiskers: 95% bootstrap "
                 "CI; hatched: 2+ threads")
    return fig


# --- designed figure 2 ----------------------------------------------------------------

def group_of(kernel: str, convs: Sequence[str]) -> str:
    """Which part of the stacked bar a kernel belongs to (``convs``: conv kernels in order;
    every conv after the first counts as conv2)."""
    if kernel in ("loss", "sgd_update"):
        return "loss + update"
    if kernel in convs:
        return "conv1" if convs.index(kernel) == 0 else "conv2"
    return "dense" if kernel.endswith("Dense") else "ReLU / pool / flatten"


def time_split(kern: pd.DataFrame) -> pd.DataFrame:
    """Median ms per (series, group) and the per-trial sum of every kernel (median, CI)."""
    convs = sorted({k for k in kern["kernel"] if k.endswith("Conv2D")},
                   key=lambda k: int(k.split(".")[0]))
    k = kern.assign(group=[group_of(x, convs) for x in kern["kernel"]])
    per = k.groupby(["series", "group", "kernel", "direction"])["step_ms_median"].median()
    split = per.groupby(["series", "group"]).sum().unstack("group").reindex(columns=GROUPS)
    total = k.groupby(["series", "trial"])["step_ms_median"].sum().reset_index()
    ci = analysis.points(total, ["series"], "step_ms_median").set_index("series")
    return split.join(ci[["median", "lo", "hi", "n"]])


def kernel_time(df: pd.DataFrame | None) -> Any:
    """(a) Where a step's time goes: the kernels timed alone, stacked per series (sum:
    median and CI over trials), the whole step timed as one (black). (b) The roofline:
    achieved GFLOP/s of each arithmetic kernel against its FLOPs per byte, under the
    measured GEMM and copy roofs at each thread count."""
    kern = latest(K.rows_of(df, "kernels"))
    fig, (ax_a, ax_b) = style.new_figure(2, height=3.4)
    if not len(kern):
        style.empty(ax_a, "no kernel rows measured yet")
        style.empty(ax_b, "no kernel rows measured yet")
        return fig
    shape, batch = kern["input_shape"].iloc[0], int(kern["batch_size"].iloc[0])
    split = time_split(kern)
    names = ordered(split.index)
    style.check_series(len(names), "kernel time")
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for i, g in enumerate(GROUPS):
        v = split.loc[names, g].fillna(0.0).to_numpy()
        ax_a.bar(x, v, 0.65, bottom=bottom, color=GROUP_COLORS[i], label=g,
                 edgecolor="white", linewidth=0.4)
        bottom += v
    tot = split.loc[names]
    ax_a.errorbar(x, tot["median"], yerr=[np.nan_to_num(tot["median"] - tot["lo"]),
                                          np.nan_to_num(tot["hi"] - tot["median"])],
                  fmt="none", color="#444444", capsize=3)
    step_rows = at(K.rows_of(df, "steps"), shape, batch)
    whole = analysis.points(step_rows, ["series"], "step_ms_median").set_index("series") \
        if len(step_rows) else pd.DataFrame()
    if len(whole):
        w = whole.reindex(names)
        ax_a.scatter(x, w["median"], marker="_", s=400, color="black", zorder=4,
                     label="whole step, timed as one")
    ax_a.set_xticks(x, names, rotation=20)
    ax_a.set_ylabel("ms per training step")
    ax_a.set_title(f"(a) kernels alone, {shape} batch {batch}")
    top = np.nanmax([np.nanmax(tot["hi"].fillna(tot["median"])),
                     np.nanmax(whole["median"]) if len(whole) else 0.0])
    ax_a.set_ylim(0, 1.45 * top)
    ax_a.legend(fontsize=6.5, loc="upper center", ncol=2)
    _roofline(ax_b, kern, K.roofs_of(df, str(kern["host"].iloc[0])))
    style.footer(fig, kern, "kernels timed alone with the tensors of a real step; FLOPs per "
                 "byte from the bytes each kernel reads and writes (estimate)")
    return fig


def _roofline(ax: Any, kern: pd.DataFrame, roofs: dict[tuple[str, int], float]) -> None:
    flop = kern[pd.to_numeric(kern["kernel_flops"]) > 0].copy()
    top = {b: int(flop.loc[flop["backend"] == b, "threads"].max())
           for b in set(flop["backend"])}
    flop = flop[[int(t) == top[b] for b, t in zip(flop["backend"], flop["threads"],
                                                    strict=True)]]
    flop["ai"] = pd.to_numeric(flop["kernel_flops"]) / pd.to_numeric(flop["kernel_bytes"])
    names = ordered(flop["series"])
    style.check_series(len(names), "roofline")
    ais = flop["ai"].to_numpy(float)
    grid = np.logspace(np.log10(max(ais.min() / 3, 1e-2)), np.log10(ais.max() * 3), 100) \
        if len(ais) else np.array([0.1, 100.0])
    threads = sorted({t for m, t in roofs if m == "gemm"})
    for t in threads:
        roof = np.full_like(grid, roofs[("gemm", t)])
        if ("copy", t) in roofs:
            roof = np.minimum(roof, roofs[("copy", t)] * grid)
        ax.plot(grid, roof, color="#555555", linewidth=1.0,
                linestyle="-" if t == max(threads) else "--", label=f"roof {t}t")
    for s in names:
        pts = analysis.points(flop[flop["series"] == s], ["kernel", "direction"], "gflops")
        ai = flop[flop["series"] == s].groupby(["kernel", "direction"], sort=False)["ai"] \
            .first().reindex(pd.MultiIndex.from_frame(pts[["kernel", "direction"]]))
        yerr = [np.nan_to_num(pts["median"] - pts["lo"]), np.nan_to_num(pts["hi"] - pts["median"])]
        ax.errorbar(ai.to_numpy(float), pts["median"], yerr=yerr, fmt="o", markersize=4,
                    color=style.color(s.split(" ")[0]), label=s, capsize=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per byte moved")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("(b) roofline of the conv and dense kernels")
    ax.legend(fontsize=6.5, loc="lower right")


# --- notebook views ---------------------------------------------------------------------

def thread_scaling(df: pd.DataFrame | None) -> Any:
    """Speedup against the best one-thread run of the same configuration and session
    (`analysis.speedups`), with CIs and the ideal line, per headline configuration."""
    steps = K.rows_of(df, "steps")
    shown = configs_shown(steps)
    fig, axes = style.new_figure(max(1, len(shown)), height=3.0, sharey=True)
    if not shown:
        style.empty(axes[0], "no step rows measured yet")
        return fig
    for ax, (shape, batch) in zip(axes, shown, strict=True):
        r = at(steps, shape, batch)
        sp = analysis.speedups(r, "samples_per_s", series=("backend",))
        backends = [b for b in ORDER if b in set(sp["backend"])]
        style.check_series(len(backends), "thread scaling")
        for b in backends:
            p = sp[sp["backend"] == b].sort_values("workers")
            style.with_ci(ax, p["workers"], p["speedup"], p["speedup_lo"], p["speedup_hi"],
                          label=b, strategy=b)
        style.ideal_line(ax, sp["workers"])
        ax.set_xticks(sorted(set(sp["workers"])))
        ax.set_xlabel("threads")
        ax.set_title(f"{shape}, batch {batch} (baseline: {sp['baseline'].iloc[0]} 1t)")
    axes[0].set_ylabel("speedup vs best 1-thread run")
    axes[0].legend(fontsize=7)
    style.footer(fig, steps, "95% bootstrap CIs over interleaved trials")
    return fig


def grid(df: pd.DataFrame | None) -> Any:
    """The filters x batch grid: Numba at the most threads over sequential NumPy per cell
    (median ratio and 95% CI); the best cell is boxed and labelled as such."""
    from matplotlib.patches import Rectangle

    cells = K.grid_ratios(df)
    fig, axes = style.new_figure(1, height=3.2, width=style.WIDTH * 0.8)
    ax = axes[0]
    if not len(cells):
        style.empty(ax, "no grid rows measured yet")
        return fig
    fs = sorted(set(cells["filters"]), key=lambda f: [int(v) for v in f.split(",")])
    bs = sorted(set(cells["batch_size"]))
    m = cells.pivot_table(index="filters", columns="batch_size", values="ratio").reindex(
        index=fs, columns=bs)
    im = ax.imshow(m.to_numpy(float), cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(im, ax=ax, shrink=0.85, label="speedup over numpy 1t")
    best = cells.loc[cells["ratio"].idxmax()]
    mid = (cells["ratio"].min() + cells["ratio"].max()) / 2
    for c in cells.itertuples():
        i, j = fs.index(c.filters), bs.index(c.batch_size)
        ci = f"\n[{c.ratio_lo:.2f}, {c.ratio_hi:.2f}]" if np.isfinite(c.ratio_lo) else ""
        ax.text(j, i, f"{c.ratio:.2f}x{ci}", ha="center", va="center", fontsize=7,
                color="white" if c.ratio <= mid else "black")
    bi, bj = fs.index(best["filters"]), bs.index(best["batch_size"])
    ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="#D55E00",
                           linewidth=2))
    ax.set_xticks(range(len(bs)), [str(b) for b in bs])
    ax.set_yticks(range(len(fs)), fs)
    ax.set_xlabel("batch size")
    ax.set_ylabel("conv filters (conv1,conv2)")
    ax.grid(False)
    ax.set_title(f"numba {int(best['threads'])}t over numpy 1t, {best['input_shape']} "
                 "(boxed: best cell of the grid)")
    style.footer(fig, K.rows_of(df, "grid"), "median ratio [95% bootstrap CI] over "
                 "interleaved trials")
    return fig


FIGURES = {"kernels_throughput": throughput, "kernels_time": kernel_time,
           "kernels_thread_scaling": thread_scaling, "kernels_grid": grid}


def save_all(df: pd.DataFrame | None, scale: str, names: Sequence[str] = tuple(FIGURES)
             ) -> dict[str, Any]:
    """Draw and save the named figures (PNG + PDF); returns their paths by name."""
    return {n: style.save_figure(FIGURES[n](df), n, scale, close=True) for n in names}
