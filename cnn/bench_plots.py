"""Notebook 02's figures and the tables behind them: the CPU benchmark (``cnn.bench`` rows).

Every function takes rows written by :mod:`cnn.bench` (``results/bench_cpu.pkl``: whole
training steps, ``strategy="kernel"`` rows and ``strategy="gemm-ceiling"`` rows) and
returns a table or a ``matplotlib`` figure in the study's style (:mod:`cnn.plots`): every
series names the host and device it was measured on, and a footer names each host's CPU.
Nothing is invented: a configuration that was not measured stays empty.

    from cnn import bench, bench_plots as BP, plots
    df = bench.run(backends=["numpy", "numba", "torch"], threads=[1, 2], save=False)
    checks = BP.target_checks(df)                 # issue 3's targets, from the rows
    fig = BP.comparison_bars(df)                  # samples/s, one panel per input shape
    plots.save_figure(fig, "numba_vs_torch")

Series are called ``"<backend> <threads>t"`` (``numpy 1t``, ``numba 2t``, ``torch 1t``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cnn import plots
from cnn.results import numeric_column as _num
from cnn.results import text_column as _str

#: Strategies that are not whole training steps (as ``cnn.bench.NON_STEP_STRATEGIES``).
NON_STEP = ("kernel", "gemm-ceiling")
#: Series order in tables and bars.
BACKEND_ORDER = ("numpy", "numba", "torch")


class Target(NamedTuple):
    """One of issue 3's targets: ``value(num) / value(den) >= threshold`` (``den`` None:
    the numerator row's ``column`` itself, e.g. ``pct_of_peak``)."""

    name: str
    num: tuple[str, int]
    den: tuple[str, int] | None
    threshold: float
    column: str = "samples_per_s"
    unit: str = "x"


#: Issue 3's targets, in the issue's order.
TARGETS: tuple[Target, ...] = (
    Target("numba 2t >= 1.2x torch 2t", ("numba", 2), ("torch", 2), 1.2),
    Target("numba 1t >= 1.0x torch 1t", ("numba", 1), ("torch", 1), 1.0),
    Target("numba 2t >= 1.8x numba 1t", ("numba", 2), ("numba", 1), 1.8),
    Target("numba 2t step >= 40% of the 2-thread GEMM ceiling", ("numba", 2), None, 40.0,
           "pct_of_peak", "%"),
    Target("numpy 1t >= 0.5x torch 1t", ("numpy", 1), ("torch", 1), 0.5),
)

CONFIG = ["host", "input_shape", "filters", "batch_size"]


# --------------------------------------------------------------------------- rows


def series_name(backend: Any, threads: Any) -> str:
    """``"numba 2t"``."""
    return f"{backend} {int(threads)}t"


def with_series(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus a ``series`` column (``"<backend> <threads>t"``)."""
    t = _num(df, "threads").fillna(1).astype(int)
    return df.assign(series=[series_name(b, n) for b, n in zip(_str(df, "backend"), t,
                                                                   strict=True)])


def step_rows(df: pd.DataFrame | None) -> pd.DataFrame:
    """Whole training-step rows (not kernels, not the GEMM ceiling), with ``series``."""
    if df is None or not len(df):
        return pd.DataFrame(columns=[*CONFIG, "series", "samples_per_s"])
    keep = ~_str(df, "strategy").isin(NON_STEP) & _num(df, "samples_per_s").notna()
    if "kernel" in df.columns:
        keep &= _str(df, "kernel") == ""
    return with_series(df.loc[keep])


def kernel_rows(df: pd.DataFrame | None) -> pd.DataFrame:
    """``strategy="kernel"`` rows with ``series`` and ``layer`` (``"0 Conv2D"``)."""
    if df is None or not len(df):
        return pd.DataFrame(columns=[*CONFIG, "series", "kernel", "direction"])
    k = df.loc[_str(df, "strategy") == "kernel"]
    return with_series(k).assign(layer=_str(k, "kernel").str.replace(".", " ", n=1,
                                                                      regex=False))


def ceilings(df: pd.DataFrame | None, host: str | None = None) -> dict[int, float]:
    """``{threads: GFLOP/s}`` of the GEMM-ceiling rows (median per thread count)."""
    if df is None or not len(df):
        return {}
    g = df.loc[_str(df, "strategy") == "gemm-ceiling"]
    if host is not None:
        g = g.loc[_str(g, "host") == host]
    if not len(g):
        return {}
    med = g.assign(t=_num(g, "threads")).groupby("t")["gflops"].median()
    return {int(t): float(v) for t, v in med.items()}


def series_order(series: Iterable[str]) -> list[str]:
    """Distinct series names in table order: numpy, numba, torch, then by thread count."""
    def key(s: str) -> tuple[int, int, str]:
        b, t = s.rsplit(" ", 1)
        rank = BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER)
        return rank, int(t[:-1]), b
    return sorted(set(series), key=key)


def _filters_first(value: Any) -> float:
    """``"128,64"`` -> 128 (the first conv's filter count)."""
    try:
        return float(str(value).split(",")[0])
    except ValueError:
        return float("nan")


def _sps_spread(rows: pd.DataFrame) -> np.ndarray:
    """Half-width of a samples/s whisker from the step-time IQR, to first order:
    ``samples_per_s x IQR / (2 x median)`` (bounded even when the IQR is as large as the
    median, which the exact conversion is not)."""
    thr, med, iqr = (_num(rows, c).to_numpy(float) for c in
                     ("samples_per_s", "step_ms_median", "step_ms_iqr"))
    ok = np.isfinite(thr) & np.isfinite(med) & np.isfinite(iqr) & (med > 0)
    return np.where(ok, thr * iqr / (2 * np.where(ok, med, 1.0)), 0.0)


# --------------------------------------------------------------------------- tables


def comparison_table(df: pd.DataFrame, value: str = "samples_per_s") -> pd.DataFrame:
    """Median ``value`` per configuration (host, input shape, filters, batch) and series,
    plus ``numba Tt / torch Tt`` and ``x numpy 1t`` ratios where both sides were measured."""
    steps = step_rows(df)
    if not len(steps):
        return pd.DataFrame()
    steps = steps.assign(batch_size=_num(steps, "batch_size").astype(int))
    table = steps.pivot_table(index=CONFIG, columns="series", values=value,
                              aggfunc="median", sort=False)
    table = table[series_order(table.columns)]
    if value != "samples_per_s":
        return table
    for col in list(table.columns):
        backend, t = col.rsplit(" ", 1)
        if backend == "numba" and f"torch {t}" in table.columns:
            table[f"{col} / torch {t}"] = table[col] / table[f"torch {t}"]
    for col in [c for c in table.columns if " / " not in c and not c.startswith("numpy")]:
        if "numpy 1t" in table.columns:
            table[f"{col} x numpy 1t"] = table[col] / table["numpy 1t"]
    table.columns.name = None
    return table


def target_checks(df: pd.DataFrame, targets: Sequence[Target] = TARGETS) -> pd.DataFrame:
    """Every target at every configuration (host, input shape, filters, batch) where its
    rows were measured: ``measured``, ``threshold``, ``met`` (bool), the values it came from.
    Values are medians over duplicate rows; a ratio is only taken within one host."""
    steps = step_rows(df)
    cols = ["target", *CONFIG, "measured", "threshold", "unit", "met", "numerator",
            "denominator"]
    if not len(steps):
        return pd.DataFrame(columns=cols)
    steps = steps.assign(batch_size=_num(steps, "batch_size").astype(int))
    out = []
    for key, grp in steps.groupby(CONFIG, sort=False):
        def value(series: tuple[str, int], column: str, grp: pd.DataFrame = grp) -> float:
            rows = grp.loc[grp["series"] == series_name(*series)]
            return float(_num(rows, column).median()) if len(rows) else float("nan")

        for t in targets:
            num = value(t.num, t.column)
            den = value(t.den, t.column) if t.den is not None else float("nan")
            measured = num / den if t.den is not None else num
            if not np.isfinite(measured):
                continue
            out.append(dict(zip(CONFIG, key, strict=True)) | {
                "target": t.name, "measured": measured, "threshold": t.threshold,
                "unit": t.unit, "met": bool(measured >= t.threshold), "numerator": num,
                "denominator": den})
    return pd.DataFrame(out, columns=cols)


def target_table(checks: pd.DataFrame, config: Mapping[str, Any] | None = None
                 ) -> pd.DataFrame:
    """One row per target: the value at ``config`` (e.g. ``{"input_shape": "3x32x32",
    "batch_size": 128}``; default the first configuration measured), the threshold, met or
    not, and over every measured configuration the range and how many met it."""
    if checks is None or not len(checks):
        return pd.DataFrame()
    rows = []
    for name, grp in checks.groupby("target", sort=False):
        pick = grp
        for k, v in (config or {}).items():
            pick = pick.loc[pick[k].astype(str) == str(v)]
        one = pick.iloc[0] if len(pick) else None
        unit = grp["unit"].iloc[0]
        fmt = "{:.0f}%" if unit == "%" else "{:.2f}x"
        rows.append({
            "target": name,
            "measured": one["measured"] if one is not None else float("nan"),
            "target value": fmt.format(grp["threshold"].iloc[0]),
            "met": ("not measured" if one is None else "met" if one["met"] else "not met"),
            "range over configs": f"{fmt.format(grp['measured'].min())} .. "
                                  f"{fmt.format(grp['measured'].max())}",
            "configs met": f"{int(grp['met'].sum())} / {len(grp)}",
        })
    return pd.DataFrame(rows).set_index("target")


def target_grid(checks: pd.DataFrame) -> pd.DataFrame:
    """Measured value per target (rows) and configuration ``shape, batch`` (columns)."""
    if checks is None or not len(checks):
        return pd.DataFrame()
    c = checks.assign(config=checks["input_shape"].astype(str) + ", b=" +
                      checks["batch_size"].astype(int).astype(str))
    return c.pivot_table(index="target", columns="config", values="measured",
                         aggfunc="median", sort=False)


# --------------------------------------------------------------------------- figures


def _shade(color: str, i: int, n: int) -> tuple[float, float, float]:
    """``color`` lightened for the ``i``-th of ``n`` (the last one: full colour)."""
    from matplotlib.colors import to_rgb

    mix = 1.0 if n <= 1 else 0.4 + 0.6 * i / (n - 1)
    return tuple(mix * c + (1 - mix) for c in to_rgb(color))


def _series_colors(series: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per series: the backend's strategy colour, lighter for fewer threads."""
    from cnn.bench import STRATEGY

    out = {}
    by_backend: dict[str, list[str]] = {}
    for s in series_order(series):
        by_backend.setdefault(s.rsplit(" ", 1)[0], []).append(s)
    for b, ss in by_backend.items():
        color = plots.strategy_color(STRATEGY.get(b, b))
        for i, s in enumerate(ss):
            out[s] = _shade(color, i, len(ss))
    return out


def _host_device(rows: pd.DataFrame) -> tuple[str, str]:
    hosts = list(dict.fromkeys(_str(rows, "host")))
    devices = list(dict.fromkeys(_str(rows, "device")))
    return ", ".join(hosts) or "?", ", ".join(devices) or "?"


def comparison_bars(df: pd.DataFrame, shapes: Sequence[str] | None = None,
                    title: str | None = None) -> Any:
    """Samples/s per batch size (grouped bars, IQR whiskers), one panel per input shape,
    one bar per series (numpy 1t, numba 1t/2t, torch 1t/2t) and host."""
    steps = step_rows(df)
    shapes = list(shapes or dict.fromkeys(_str(steps, "input_shape")))
    fig, axes = plots._new_figure(max(1, len(shapes)), (5.0 * max(1, len(shapes)), 3.9))
    if not len(steps) or not shapes:
        plots._empty(axes[0], "no step rows")
        return fig
    hosts = list(dict.fromkeys(_str(steps, "host")))
    colors = _series_colors(list(steps["series"]))
    for ax, shape in zip(axes, shapes, strict=True):
        sub = steps.loc[_str(steps, "input_shape") == shape]
        batches = sorted(set(_num(sub, "batch_size").astype(int)))
        bars = [(s, h) for h in hosts for s in series_order(sub["series"])
                if ((sub["series"] == s) & (_str(sub, "host") == h)).any()]
        width = 0.8 / max(1, len(bars))
        for j, (s, h) in enumerate(bars):
            rows = sub.loc[(sub["series"] == s) & (_str(sub, "host") == h)]
            rows = rows.groupby(_num(rows, "batch_size").astype(int)).first()
            x = np.array([batches.index(b) for b in rows.index]) + (j - len(bars) / 2 + .5) * width
            hatch = None if hosts.index(h) == 0 else "//"
            ax.bar(x, _num(rows, "samples_per_s"), width, color=colors[s], hatch=hatch,
                   yerr=_sps_spread(rows), error_kw={"elinewidth": 0.8, "capsize": 1.5},
                   label=plots.series_label(s, h, _str(rows, "device").iloc[0]))
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("training samples / s")
        ax.set_title(f"input {shape}")
        ax.grid(axis="x", visible=False)
    axes[0].legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title)
    plots._footer(fig, steps, note="whiskers: +-IQR/2 of the step time, as samples/s")
    return fig


def thread_scaling(df: pd.DataFrame, backends: Sequence[str] = ("numba", "torch"),
                   title: str | None = None) -> Any:
    """Per input shape: samples/s against threads, and speedup over the same backend's
    1-thread rows (same host, shape, filters, batch) with the ideal line. One line per
    (backend, batch size, host): darker = larger batch; numba solid, others dashed."""
    steps = step_rows(df)
    steps = steps.loc[_str(steps, "backend").isin(list(backends))]
    shapes = list(dict.fromkeys(_str(steps, "input_shape")))
    import matplotlib.pyplot as plt

    plots.apply_style()
    n = max(1, len(shapes))
    fig, axes = plt.subplots(n, 2, figsize=(8.6, 3.2 * n + 0.6), squeeze=False)
    if not len(steps):
        plots._empty(axes[0][0], "no numba/torch step rows")
        return fig
    from cnn.bench import STRATEGY

    hosts = list(dict.fromkeys(_str(steps, "host")))
    all_threads = sorted(set(_num(steps, "threads").astype(int)))
    for (ax_t, ax_s), shape in zip(axes, shapes, strict=True):
        sub = steps.loc[_str(steps, "input_shape") == shape]
        batches = sorted(set(_num(sub, "batch_size").astype(int)))
        for (backend, host, batch), grp in sub.groupby(
                [_str(sub, "backend"), _str(sub, "host"), _num(sub, "batch_size").astype(int)],
                sort=False):
            agg = grp.groupby(_num(grp, "threads").astype(int))["samples_per_s"].median()
            agg = agg.sort_index()
            color = _shade(plots.strategy_color(STRATEGY.get(backend, backend)),
                           batches.index(batch), len(batches))
            style = dict(color=color, linestyle="-" if backend == "numba" else "--",
                         marker=plots.HOST_MARKERS[hosts.index(host) % len(plots.HOST_MARKERS)])
            label = plots.series_label(backend, host, _str(grp, "device").iloc[0],
                                       f"b={batch}")
            ax_t.plot(agg.index, agg.values, label=label, **style)
            if 1 in agg.index:
                ax_s.plot(agg.index, agg.values / agg.loc[1], label=label, **style)
        ax_s.plot(all_threads, all_threads, color="#888888", linestyle=":", linewidth=1,
                  label="ideal")
        for ax in (ax_t, ax_s):
            ax.set_xticks(all_threads)
            ax.set_xlabel("threads (pinned: Numba, BLAS, torch)")
            if max(all_threads) >= 8:
                ax.set_xscale("log", base=2)
        ax_t.set_ylabel("training samples / s")
        ax_s.set_ylabel("speedup vs 1 thread")
        ax_t.set_title(f"{shape}: throughput")
        ax_s.set_title(f"{shape}: speedup over the same backend at 1 thread")
        ax_s.set_ylim(bottom=0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=7)
    fig.set_size_inches(8.6, 3.2 * n + 0.6 + 0.17 * math.ceil(len(labels) / 3))
    if title:
        fig.suptitle(title)
    plots._footer(fig, steps, top=True)
    return fig


def grid_frame(df: pd.DataFrame, threads: int, input_shape: str | None = None,
               backend: str = "numba", batch_sizes: Iterable[int] | None = None,
               filters: Iterable[str] | None = None) -> pd.DataFrame:
    """The filter x batch grid: per (first-conv filters ``f``, batch) the median samples/s of
    ``backend`` at ``threads``, of ``numpy 1t`` (same host) and the speedup. ``batch_sizes``
    and ``filters`` (``"f,64"`` labels) restrict it to the grid's own cells."""
    steps = step_rows(df)
    if input_shape is not None:
        steps = steps.loc[_str(steps, "input_shape") == input_shape]
    if batch_sizes is not None:
        steps = steps.loc[_num(steps, "batch_size").isin([int(b) for b in batch_sizes])]
    if filters is not None:
        steps = steps.loc[_str(steps, "filters").isin([str(f) for f in filters])]
    steps = steps.assign(f=steps["filters"].map(_filters_first),
                         batch_size=_num(steps, "batch_size").astype(int))
    out = []
    for (host, f, b), grp in steps.groupby(["host", "f", "batch_size"], sort=True):
        def med(series: str, grp: pd.DataFrame = grp) -> float:
            rows = grp.loc[grp["series"] == series]
            return float(_num(rows, "samples_per_s").median()) if len(rows) else float("nan")

        cand, ref = med(series_name(backend, threads)), med("numpy 1t")
        if np.isfinite(cand) or np.isfinite(ref):
            out.append({"host": host, "f": int(f), "batch_size": b, "samples_per_s": cand,
                        "numpy_samples_per_s": ref, "speedup": cand / ref,
                        "filters": _str(grp, "filters").iloc[0]})
    return pd.DataFrame(out)


def grid_heatmaps(df: pd.DataFrame, threads: int, input_shape: str | None = None,
                  backend: str = "numba", batch_sizes: Iterable[int] | None = None,
                  filters: Iterable[str] | None = None, title: str | None = None) -> Any:
    """Two heatmaps over (first-conv filters, batch size): samples/s of ``backend`` at
    ``threads``, and its speedup over the same host's sequential NumPy (1 thread)."""
    g = grid_frame(df, threads, input_shape, backend, batch_sizes, filters)
    fig, (ax_a, ax_b) = plots._new_figure(2, (10.0, 4.0))
    if not len(g):
        plots._empty(ax_a, "no grid rows")
        plots._empty(ax_b, "no grid rows")
        return fig
    host = g["host"].iloc[0]
    g = g.loc[g["host"] == host]
    fs, bs = sorted(set(g["f"])), sorted(set(g["batch_size"]))
    second = sorted({str(v).split(",")[1] for v in g["filters"] if "," in str(v)})
    for ax, col, fmt, cmap, name in (
            (ax_a, "samples_per_s", "{:,.0f}", "viridis",
             f"{series_name(backend, threads)}: training samples / s"),
            (ax_b, "speedup", "{:.1f}x", "magma", f"speedup of {series_name(backend, threads)} "
                                                     "over numpy 1t")):
        m = g.pivot_table(index="f", columns="batch_size", values=col).reindex(
            index=fs, columns=bs)
        im = ax.imshow(m.to_numpy(float), cmap=cmap, aspect="auto", origin="lower")
        fig.colorbar(im, ax=ax, shrink=0.85)
        vals = m.to_numpy(float)
        finite = vals[np.isfinite(vals)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(len(fs)):
            for j in range(len(bs)):
                v = vals[i, j]
                ax.text(j, i, "-" if not np.isfinite(v) else fmt.format(v), ha="center",
                        va="center", fontsize=8, color="white" if v < mid else "black")
        ax.set_xticks(range(len(bs)), [str(b) for b in bs])
        ax.set_yticks(range(len(fs)), [str(f) for f in fs])
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"first conv filters f (second conv {'/'.join(second) or '?'})")
        ax.set_title(name, fontsize=10)
        ax.grid(False)
    device = _str(step_rows(df).loc[lambda d: _str(d, "host") == host], "device").iloc[0]
    fig.suptitle(title or f"{input_shape or ''} filter x batch grid "
                 f"@ {host} ({device})".strip(), fontsize=11)
    plots._footer(fig, step_rows(df).loc[lambda d: _str(d, "host") == host])
    return fig


def _layer_colors(layers: Sequence[str]) -> dict[str, Any]:
    import matplotlib as mpl

    cmap = mpl.colormaps["tab20"]
    return {name: cmap((2 * i) % 20 + (i // 10) % 2) for i, name in enumerate(layers)}


def kernel_breakdown(kdf: pd.DataFrame, steps: pd.DataFrame | None = None,
                     title: str | None = None) -> Any:
    """Where a training step's time goes. Left: one stacked bar per series (e.g. numpy 1t
    = before, numba 1t/2t = after), one segment per layer and direction (backward
    hatched), with the measured whole step (``steps``, same configuration) as a marker.
    Right: ms per layer, forward and backward stacked, one bar per series."""
    k = kernel_rows(kdf)
    fig, (ax_a, ax_b) = plots._new_figure(2, (11.0, 5.2))
    if not len(k):
        plots._empty(ax_a, "no kernel rows")
        plots._empty(ax_b, "no kernel rows")
        return fig
    series = series_order(k["series"])
    layers = list(dict.fromkeys(k["layer"]))
    lcol = _layer_colors(layers)
    scol = _series_colors(series)
    ms = k.pivot_table(index=["layer", "direction"], columns="series",
                       values="step_ms_median", aggfunc="median", sort=False)
    for j, s in enumerate(series):
        bottom = 0.0
        for (layer, direction), v in ms[s].items():
            if not np.isfinite(v):
                continue
            hatch = "///" if direction == "bwd" else None
            ax_a.bar(j, v, 0.6, bottom=bottom, color=lcol[layer], hatch=hatch,
                     edgecolor="white", linewidth=0.4,
                     label=layer if j == 0 and direction != "bwd" else None)
            if v > 0.06 * ms[s].sum():
                ax_a.text(j, bottom + v / 2, f"{layer} {direction}",
                          ha="center", va="center", fontsize=6)
            bottom += v
        ax_a.text(j, bottom, f"{bottom:.1f} ms", ha="center", va="bottom", fontsize=7)
    if steps is not None and len(steps):
        st = step_rows(steps)
        for j, s in enumerate(series):
            rows = st.loc[st["series"] == s]
            if len(rows):
                ax_a.plot(j, float(_num(rows, "step_ms_median").median()), marker="_",
                          markersize=28, color="black", markeredgewidth=2,
                          label="whole step (timed as one)" if j == 0 else None)
    ax_a.set_xticks(range(len(series)), series)
    ax_a.set_ylabel("median ms per training step")
    ax_a.set_title("sum of the kernels (hatched: backward)")
    ax_a.grid(axis="x", visible=False)
    handles, labels = ax_a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=7, fontsize=7)
    # right: per layer
    width = 0.8 / len(series)
    y = np.arange(len(layers))
    for j, s in enumerate(series):
        fwd = np.array([ms[s].get((la, d), np.nan) for la in layers
                        for d in ("fwd",)], dtype=float)
        other = np.array([np.nansum([ms[s].get((la, d), np.nan) for d in ("bwd", "fwd+bwd",
                                                                            "update")])
                          for la in layers], dtype=float)
        is_fwd = np.isfinite(fwd)
        yy = y + (j - len(series) / 2 + 0.5) * width
        ax_b.barh(yy, np.where(is_fwd, fwd, 0), width, color=scol[s], label=s)
        ax_b.barh(yy, other, width, left=np.where(is_fwd, fwd, 0), color=scol[s],
                  hatch="///", edgecolor="white", linewidth=0.4)
    ax_b.set_yticks(y, layers, fontsize=8)
    ax_b.invert_yaxis()
    ax_b.set_xlabel("median ms (solid: forward, hatched: backward / loss / update)")
    ax_b.set_title("per layer")
    ax_b.grid(axis="y", visible=False)
    ax_b.legend(loc="lower right", fontsize=7)
    r = k.iloc[0]
    fig.suptitle(title or f"Kernel breakdown: {r['input_shape']}, batch "
                 f"{int(r['batch_size'])}, filters {r['filters']} @ {_host_device(k)[0]}",
                 fontsize=11)
    plots._footer(fig, k, top=True)
    return fig


def roofline(kdf: pd.DataFrame, steps: pd.DataFrame | None, gemm: Mapping[int, float],
             bandwidth: Mapping[int, float] | None = None, target_pct: float = 40.0,
             title: str | None = None) -> Any:
    """The roofline view of one configuration.

    (a) achieved GFLOP/s against arithmetic intensity (FLOPs per byte, ``kernel_flops /
    mbytes``) for every kernel that does FLOPs and for the whole step (sum of the kernels'
    FLOPs and bytes, timed as a step), under the roofs ``min(gemm[t], bandwidth[t] x AI)``
    for each measured thread count ``t``; (b) GFLOP/s per kernel and for the whole step
    against the GEMM ceilings (and ``target_pct`` % of the highest); (c) GB/s of the kernels
    that only move data against the measured copy bandwidth.
    """
    k = kernel_rows(kdf)
    k = k.assign(ai=_num(k, "kernel_flops") / (_num(k, "mbytes") * 2**20))
    fig, axes = plots._new_figure(3, (15.0, 5.4))
    ax_a, ax_b, ax_c = axes
    if not len(k):
        for ax in axes:
            plots._empty(ax, "no kernel rows")
        return fig
    series = series_order(k["series"])
    scol = _series_colors(series)
    markers = dict(zip(series, ["o", "s", "^", "D", "v", "P"], strict=False))
    flop = k.loc[_num(k, "kernel_flops") > 0]
    st = step_rows(steps) if steps is not None else pd.DataFrame()
    whole = {}
    for s in series:
        ks = k.loc[k["series"] == s]
        rows = st.loc[st["series"] == s] if len(st) else st
        if len(rows):
            nbytes = float(_num(ks, "mbytes").sum()) * 2**20
            whole[s] = (float(_num(ks, "kernel_flops").sum()) / nbytes,
                        float(_num(rows, "gflops").median()))
    # (a) roofline
    lo = min(float(flop["ai"].min()), *(w[0] for w in whole.values())) / 3 if len(flop) else 0.1
    hi = max(float(flop["ai"].max()) if len(flop) else 10, 10) * 3
    ai = np.logspace(np.log10(max(lo, 1e-3)), np.log10(hi), 200)
    for t in sorted(gemm):
        roof = np.full_like(ai, gemm[t])
        if bandwidth and t in bandwidth:
            roof = np.minimum(roof, bandwidth[t] * ai)
        ax_a.plot(ai, roof, color="#555555", linestyle="-" if t == max(gemm) else "--",
                  linewidth=1.2, label=f"roof {t}t: GEMM {gemm[t]:.0f} GFLOP/s"
                  + (f", copy {bandwidth[t]:.1f} GB/s" if bandwidth and t in bandwidth else ""))
    for s in series:
        fs = flop.loc[flop["series"] == s]
        ax_a.scatter(fs["ai"], _num(fs, "gflops"), color=scol[s], marker=markers[s], s=28,
                     label=plots.series_label(f"{s} kernels", *_host_device(fs)), zorder=3)
        if s in whole:
            ax_a.scatter(*whole[s], color=scol[s], marker="*", s=160, edgecolor="black",
                         linewidth=0.6, zorder=4, label=f"{s} whole step")
    for _, r in flop.loc[flop["series"] == series[-1]].iterrows():
        ax_a.annotate(f"{r['layer']} {r['direction']}", (r["ai"], r["gflops"]),
                      fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax_a.set_xscale("log")
    ax_a.set_yscale("log")
    ax_a.set_xlabel("arithmetic intensity (FLOP / byte moved, bench's estimate)")
    ax_a.set_ylabel("achieved GFLOP/s")
    ax_a.set_title("(a) roofline")
    handles, labels = ax_a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower left", ncol=3, fontsize=7)
    # (b) GFLOP/s per kernel and whole step
    names = [f"{r.layer} {r.direction}" for r in
             flop.drop_duplicates(["layer", "direction"]).itertuples()]
    keys = list(flop.drop_duplicates(["layer", "direction"])[["layer", "direction"]]
                .itertuples(index=False, name=None))
    width = 0.8 / len(series)
    x = np.arange(len(keys) + 1)
    for j, s in enumerate(series):
        fs = flop.loc[flop["series"] == s].set_index(["layer", "direction"])
        vals = [float(fs["gflops"].get(key, np.nan)) if key in fs.index else np.nan
                for key in keys]
        vals.append(whole.get(s, (np.nan, np.nan))[1])
        ax_b.bar(x + (j - len(series) / 2 + 0.5) * width, vals, width, color=scol[s],
                 label=s)
    for t in sorted(gemm):
        ax_b.axhline(gemm[t], color="#555555", linestyle="-" if t == max(gemm) else "--",
                     linewidth=1, label=f"GEMM ceiling {t}t ({gemm[t]:.0f})")
    if gemm:
        top = max(gemm)
        ax_b.axhline(gemm[top] * target_pct / 100, color="#D55E00", linestyle=":",
                     linewidth=1.2, label=f"target: {target_pct:.0f}% of {top}t ceiling")
    ax_b.set_xticks(x, [*names, "whole step"], rotation=35, ha="right", fontsize=7)
    ax_b.set_ylabel("GFLOP/s")
    ax_b.set_title("(b) GFLOP/s vs the measured GEMM ceiling")
    ax_b.grid(axis="x", visible=False)
    ax_b.legend(loc="upper left", fontsize=6, ncol=2)
    # (c) data-movement kernels
    mem = k.loc[~(_num(k, "kernel_flops") > 0) & ~k["layer"].str.contains("Flatten")]
    mkeys = list(mem.drop_duplicates(["layer", "direction"])[["layer", "direction"]]
                 .itertuples(index=False, name=None))
    if mkeys:
        y = np.arange(len(mkeys))
        for j, s in enumerate(series):
            ms = mem.loc[mem["series"] == s].set_index(["layer", "direction"])
            vals = [float(ms["gbytes_per_s"].get(key, np.nan)) if key in ms.index else np.nan
                    for key in mkeys]
            ax_c.barh(y + (j - len(series) / 2 + 0.5) * width, vals, width, color=scol[s],
                      label=s)
        for t, bw in sorted((bandwidth or {}).items()):
            ax_c.axvline(bw, color="#555555", linestyle="-" if t == max(bandwidth) else "--",
                         linewidth=1, label=f"copy bandwidth {t}t ({bw:.1f} GB/s)")
        ax_c.set_yticks(y, [f"{la} {d}" for la, d in mkeys], fontsize=7)
        ax_c.invert_yaxis()
        ax_c.legend(loc="lower right", fontsize=6)
    else:
        plots._empty(ax_c, "no data-movement kernels")
    ax_c.set_xlabel("GB/s (bench's byte estimate / median time)")
    ax_c.set_title("(c) kernels without FLOPs: bandwidth")
    ax_c.grid(axis="y", visible=False)
    r = k.iloc[0]
    fig.suptitle(title or f"Roofline: {r['input_shape']}, batch {int(r['batch_size'])}, "
                 f"filters {r['filters']} @ {_host_device(k)[0]}", fontsize=11)
    plots._footer(fig, k, top=True)
    return fig


__all__ = [
    "TARGETS",
    "Target",
    "ceilings",
    "comparison_bars",
    "comparison_table",
    "grid_frame",
    "grid_heatmaps",
    "kernel_breakdown",
    "kernel_rows",
    "roofline",
    "series_name",
    "series_order",
    "step_rows",
    "target_checks",
    "target_grid",
    "target_table",
    "thread_scaling",
    "with_series",
]
