"""The study's figures: one look, reusable figure functions, atomic PNG + PDF output.

Every function takes a results frame (the DESIGN.md columns; extra columns are
used when present) and returns a ``matplotlib`` figure; :func:`save_figure`
writes it as ``images/<name>.png`` (200 dpi) and ``images/<name>.pdf`` (vector),
each atomically. Every series is labelled with the host and device it was
measured on (the ``host``/``device`` columns), and a footer names the CPU/GPU of
each host, so a figure never mixes machines silently.

    from cnn import plots
    plots.apply_style()
    fig = plots.speedup_efficiency(df)          # df: results rows, e.g. load_results(...)
    plots.save_figure(fig, "summary_speedup")   # images/summary_speedup.{png,pdf}

The images folder is ``$CNN_IMAGES_DIR`` when set, else ``<project root>/images``.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.io import atomic_write

#: Okabe-Ito, a colour-blind safe palette; strategies keep their colour in every figure.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000", "#999999", "#882255"]
STRATEGY_COLORS: dict[str, str] = {
    "sequential": "#000000",
    "numba": "#0072B2",
    "torch": "#999999",
    "cuda": "#009E73",
    "allreduce": "#D55E00",
    "param-server": "#E69F00",
    "param-server-async": "#F0E442",
    "model-average": "#CC79A7",
    "hybrid": "#882255",
    "hogwild": "#56B4E9",
    "hogwild-locked": "#332288",
    "allreduce-overlap": "#AA4499",
    "async-param-server": "#44AA99",
    "kfold": "#117733",
}
#: Marker per host (in order of appearance), so the same strategy on two machines differs.
HOST_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
HOST_LINESTYLES = ["-", "--", ":", "-."]
PNG_DPI = 200
IMAGES_ENV = "CNN_IMAGES_DIR"

STYLE: dict[str, Any] = {
    "figure.figsize": (7.0, 4.2),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": None,  # filled in apply_style (needs cycler)
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "legend.fontsize": 8,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
    "image.cmap": "viridis",
}


# --------------------------------------------------------------------------- style, output


def apply_style() -> None:
    """Set the study's matplotlib style (idempotent)."""
    import matplotlib as mpl
    from cycler import cycler

    style = dict(STYLE)
    style["axes.prop_cycle"] = cycler(color=PALETTE)
    mpl.rcParams.update(style)


def images_dir() -> Path:
    """``$CNN_IMAGES_DIR``, else ``<project root>/images``."""
    env = os.environ.get(IMAGES_ENV)
    if env:
        return Path(env)
    from cnn.summary import project_root

    return project_root() / "images"


def save_figure(fig: Any, name: str, directory: str | os.PathLike | None = None,
                close: bool = False) -> dict[str, Path]:
    """Write ``<directory>/<name>.png`` (200 dpi) and ``<name>.pdf`` (vector), atomically.

    ``directory`` defaults to :func:`images_dir`. Returns ``{"png": path, "pdf": path}``.
    PDF metadata carries no creation date, so unchanged figures give identical files.
    """
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"figure name must be a bare name like 'summary_speedup', got {name!r}")
    folder = Path(directory) if directory is not None else images_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = {"png": folder / f"{name}.png", "pdf": folder / f"{name}.pdf"}
    with atomic_write(out["png"]) as fh:
        fig.savefig(fh, format="png", dpi=PNG_DPI)
    with atomic_write(out["pdf"]) as fh:
        fig.savefig(fh, format="pdf", metadata={"CreationDate": None, "ModDate": None})
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return out


# --------------------------------------------------------------------------- labels, colours


def strategy_color(strategy: Any) -> str:
    """Stable colour of a strategy (unknown names get a fixed palette entry by hash)."""
    key = str(strategy).split(" (")[0]  # "allreduce (strong)" keeps allreduce's colour
    if key in STRATEGY_COLORS:
        return STRATEGY_COLORS[key]
    return PALETTE[zlib.crc32(key.encode()) % len(PALETTE)]


def _text(value: Any, default: str = "?") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value)


def series_label(strategy: Any = None, host: Any = None, device: Any = None,
                 extra: str | None = None) -> str:
    """``"<strategy> [extra] @ <host> (<device>)"``: every series names its machine."""
    head = _text(strategy, "")
    if extra:
        head = f"{head} {extra}".strip()
    return f"{head} @ {_text(host)} ({_text(device)})".strip()


def _host_styles(df: pd.DataFrame) -> dict[str, tuple[str, str]]:
    hosts = list(dict.fromkeys(_text(h) for h in df.get("host", pd.Series(dtype=object))))
    return {h: (HOST_MARKERS[i % len(HOST_MARKERS)], HOST_LINESTYLES[i % len(HOST_LINESTYLES)])
            for i, h in enumerate(hosts)}


def machines_footer(df: pd.DataFrame) -> str:
    """One line per host: ``host: CPU; GPU`` (from the ``host``/``cpu``/``gpu`` columns)."""
    if df is None or "host" not in df.columns or not len(df):
        return ""
    lines = []
    for host, grp in df.groupby(df["host"].map(_text), sort=False):
        if host == "?":  # rows without a host (modelled, not measured) name no machine
            continue
        cpu = next((c for c in grp.get("cpu", []) if isinstance(c, str) and c), None)
        gpu = next((g for g in grp.get("gpu", []) if isinstance(g, str) and g), None)
        devices = sorted({_text(d) for d in grp.get("device", [])} - {"?"})
        line = f"{host}: {cpu or 'CPU unknown'}"
        if gpu:
            line += f"; GPU {gpu}"
        if devices:
            line += f"; devices {', '.join(devices)}"
        lines.append(line)
    return "\n".join(lines)


def _footer(fig: Any, df: pd.DataFrame, note: str | None = None, top: bool = False) -> None:
    """The machines of ``df`` under the figure (``top=True``: above it, when a legend
    sits under the axes)."""
    text = machines_footer(df)
    if note:
        text = f"{note}\n{text}" if text else note
    if text:
        fig.text(0.0, 1.0 if top else -0.01, text, ha="left", va="bottom" if top else "top",
                 fontsize=7, color="#444444", transform=fig.transFigure)


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce")


def _workers(df: pd.DataFrame) -> pd.Series:
    return _num(df, "processes").fillna(1) * _num(df, "threads").fillna(1)


def _new_figure(ncols: int = 1, figsize: tuple[float, float] | None = None):
    import matplotlib.pyplot as plt

    apply_style()
    fig, axes = plt.subplots(1, ncols, figsize=figsize or (3.6 * ncols + 0.4, 3.6))
    return fig, (np.atleast_1d(axes).tolist())


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="#666666", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- figures


def training_curves(df: pd.DataFrame, x: str = "epoch", title: str | None = None) -> Any:
    """Training loss and test accuracy per epoch, one series per (strategy, host, device).

    Uses ``train_loss`` (else ``final_loss``) and ``test_loss`` when present, and
    ``test_acc``. ``x`` is ``epoch`` (else ``epochs``, else the row number).
    """
    fig, (ax_loss, ax_acc) = _new_figure(2, (8.0, 3.6))
    if df is None or not len(df):
        _empty(ax_loss, "no training rows")
        _empty(ax_acc, "no training rows")
        return fig
    xcol = x if x in df.columns else ("epochs" if "epochs" in df.columns else None)
    styles = _host_styles(df)
    keys = [c for c in ("experiment", "strategy", "host", "device") if c in df.columns]
    groups = df.groupby([df[k].map(_text) for k in keys], sort=False) if keys else [((), df)]
    for key, grp in groups:
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        grp = grp.sort_values(xcol) if xcol else grp
        xs = _num(grp, xcol) if xcol else pd.Series(np.arange(1, len(grp) + 1))
        color = strategy_color(key.get("strategy"))
        marker, _ = styles.get(key.get("host", "?"), ("o", "-"))
        label = series_label(key.get("strategy"), key.get("host"), key.get("device"))
        loss_col = "train_loss" if "train_loss" in grp.columns else "final_loss"
        ax_loss.plot(xs, _num(grp, loss_col), marker=marker, color=color,
                     label=f"train: {label}")
        if "test_loss" in grp.columns and _num(grp, "test_loss").notna().any():
            ax_loss.plot(xs, _num(grp, "test_loss"), marker=marker, color=color,
                         linestyle="--", alpha=0.7, label=f"test: {label}")
        ax_acc.plot(xs, _num(grp, "test_acc"), marker=marker, color=color, label=label)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel(xcol or "row")
    ax_loss.set_ylabel("mean cross-entropy")
    ax_loss.set_title("loss")
    ax_acc.set_xlabel(xcol or "row")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("test accuracy")
    ax_loss.legend(loc="upper right")
    ax_acc.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    _footer(fig, df)
    return fig


def speedup_efficiency(df: pd.DataFrame, metric: str = "wall_s",
                       baseline_strategy: str = "sequential",
                       by: Sequence[str] | None = None, x: str = "workers",
                       strategies: Iterable[str] | None = None, title: str | None = None,
                       log2: bool | None = None, by_batch: bool = False) -> Any:
    """Speedup and efficiency against the same-host baseline, with the ideal line.

    If ``df`` has no ``speedup`` column it goes through
    :func:`cnn.results.speedup_table` (``metric``, ``baseline_strategy``, ``by``;
    ``by`` defaults to host, model, dataset, batch size plus ``input_shape`` and
    ``filters`` where present). ``x`` is ``workers`` (processes x threads),
    ``processes`` or ``threads``. One series per (strategy, host, device), medians
    over repeats and epochs; ``by_batch=True`` splits series by batch size too.
    """
    from cnn.results import speedup_table

    fig, (ax_s, ax_e) = _new_figure(2, (8.4, 3.8))
    if df is None or not len(df):
        _empty(ax_s, "no rows")
        _empty(ax_e, "no rows")
        return fig
    if "speedup" not in df.columns:
        if by is None:
            by = ["host", "model", "dataset", "batch_size"] + [
                c for c in ("input_shape", "filters") if c in df.columns]
        df = speedup_table(df, baseline_strategy=baseline_strategy, metric=metric, by=by)
    df = df.copy()
    if "workers" not in df.columns:
        df["workers"] = _workers(df)
        if "efficiency" not in df.columns:
            df["efficiency"] = _num(df, "speedup") / df["workers"]
    xs_all = _num(df, x)
    df = df.loc[_num(df, "speedup").notna() & xs_all.notna()]
    if strategies is not None:
        df = df.loc[df["strategy"].isin(list(strategies))]
    if not len(df):
        msg = f"no rows with a same-host '{baseline_strategy}' baseline"
        _empty(ax_s, msg)
        _empty(ax_e, msg)
        return fig
    styles = _host_styles(df)
    keys = [c for c in ("strategy", "host", "device") if c in df.columns]
    if "experiment" in df.columns and df["experiment"].nunique() > 1:
        keys.insert(0, "experiment")  # the same strategy from two experiments: say which
    many_batches = by_batch and "batch_size" in df.columns
    if many_batches:
        keys.append("batch_size")
    for key, grp in df.groupby([df[k].map(_text) for k in keys], sort=False):
        key = dict(zip(keys, key, strict=True))
        agg = grp.assign(_x=_num(grp, x)).groupby("_x")[["speedup", "efficiency"]].median()
        agg = agg.sort_index()
        marker, ls = styles.get(key.get("host", "?"), ("o", "-"))
        if "(weak)" in str(key.get("strategy")):
            ls = "--"
        b = key.get("batch_size", "?").removesuffix(".0")
        extra = f"b={b}" if many_batches and b not in ("?", "nan") else None
        label = series_label(key.get("strategy"), key.get("host"), key.get("device"), extra)
        if "experiment" in key:
            label = f"{key['experiment']}: {label}"
        color = strategy_color(key.get("strategy"))
        ax_s.plot(agg.index, agg["speedup"], marker=marker, linestyle=ls, color=color,
                  label=label)
        ax_e.plot(agg.index, agg["efficiency"], marker=marker, linestyle=ls, color=color,
                  label=label)
    lo, hi = float(_num(df, x).min()), float(_num(df, x).max())
    ideal = np.linspace(min(1.0, lo), max(hi, 1.0), 50)
    ax_s.plot(ideal, ideal, color="#888888", linestyle=":", linewidth=1, label="ideal")
    ax_e.axhline(1.0, color="#888888", linestyle=":", linewidth=1, label="ideal")
    if log2 if log2 is not None else hi / max(lo, 1) >= 8:
        for ax in (ax_s, ax_e):
            ax.set_xscale("log", base=2)
    ax_s.set_xlabel(x)
    ax_e.set_xlabel(x)
    metrics = set(df["metric"].dropna()) if "metric" in df.columns else {metric}
    names = {"samples_per_s": "throughput", "wall_s": "wall time"}
    what = " or ".join(sorted(names.get(m, m) for m in metrics))
    ax_s.set_ylabel(f"speedup vs same-host {baseline_strategy}")
    ax_s.text(0.99, 0.01, f"metric: {what}", transform=ax_s.transAxes, ha="right",
              va="bottom", fontsize=7, color="#444444")
    ax_e.set_ylabel("efficiency = speedup / workers")
    ax_e.set_ylim(bottom=0)
    ax_s.set_title("speedup")
    ax_e.set_title("efficiency")
    handles, labels = ax_s.get_legend_handles_labels()
    many = len(labels) > 6
    if not many:
        ax_s.legend(loc="upper left")
    else:  # many series: one legend under both panels, the figure grows to hold it
        fig.set_size_inches(8.4, 3.8 + 0.17 * math.ceil(len(labels) / 2))
        fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=7)
    if title:
        fig.suptitle(title)
    _footer(fig, df, top=many)
    return fig


def throughput_bars(df: pd.DataFrame, label_cols: Sequence[str] = ("experiment", "strategy",
                    "backend", "processes", "threads", "batch_size"), title: str | None = None,
                    max_bars: int = 40) -> Any:
    """Horizontal bars of ``samples_per_s`` per configuration, labelled with host and device.

    Whiskers show the interquartile range of the step time (``step_ms_iqr``) turned
    into throughput, when ``step_ms_median`` and ``batch_size`` are present.
    """
    rows = df.loc[_num(df, "samples_per_s").notna()] if df is not None and len(df) else df
    n = 0 if rows is None else min(len(rows), max_bars)
    fig, (ax,) = _new_figure(1, (7.6, max(2.4, 0.28 * n + 1.2)))
    if not n:
        _empty(ax, "no throughput rows")
        return fig
    rows = rows.sort_values("samples_per_s", ascending=True).tail(max_bars)
    labels, colors, lows, highs = [], [], [], []
    thr = _num(rows, "samples_per_s")
    med, iqr = _num(rows, "step_ms_median"), _num(rows, "step_ms_iqr")
    for i, (_, r) in enumerate(rows.iterrows()):
        parts = []
        for c in label_cols:
            if c in rows.columns and _text(r.get(c), "") not in ("", "nan"):
                v = r.get(c)
                short = {"processes": "P", "threads": "T", "batch_size": "b"}.get(c)
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                parts.append(f"{short}={v}" if short else str(v))
        labels.append(series_label(" ".join(dict.fromkeys(parts)), r.get("host"), r.get("device")))
        colors.append(strategy_color(r.get("strategy")))
        m, q = med.iloc[i], iqr.iloc[i]
        if all(np.isfinite([m, q])) and m > q / 2:  # step-time IQR as a throughput range
            lows.append(thr.iloc[i] * (1 - m / (m + q / 2)))
            highs.append(thr.iloc[i] * (m / (m - q / 2) - 1))
        else:
            lows.append(0.0)
            highs.append(0.0)
    ypos = np.arange(len(rows))
    ax.barh(ypos, thr, color=colors, xerr=[lows, highs], error_kw={"elinewidth": 0.8,
            "capsize": 2, "ecolor": "#333333"})
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.set_xlabel("training throughput (samples/s)")
    ax.grid(axis="y", visible=False)
    for y, v in zip(ypos, thr, strict=True):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=6)
    if title:
        ax.set_title(title)
    _footer(fig, rows)
    return fig


def compute_comm_split(df: pd.DataFrame, normalise: bool = False,
                       title: str | None = None) -> Any:
    """Stacked bars: compute (``wall_s - comm_s``) and communication (``comm_s``) seconds.

    One bar per (strategy, processes, threads, host, device), medians over repeats;
    ``normalise=True`` shows fractions of the wall time.
    """
    rows = df.loc[_num(df, "wall_s").notna() & _num(df, "comm_s").notna()] \
        if df is not None and len(df) else df
    keys = [c for c in ("strategy", "processes", "threads", "host", "device")
            if rows is not None and c in rows]
    nbars = len(rows.groupby([rows[k].map(_text) for k in keys])) if rows is not None and \
        len(rows) and keys else 0
    fig, (ax,) = _new_figure(1, (max(7.6, 0.3 * nbars + 1.5), 4.2))
    if rows is None or not len(rows):
        _empty(ax, "no rows with both wall_s and comm_s")
        return fig
    agg = rows.assign(_wall=_num(rows, "wall_s"), _comm=_num(rows, "comm_s")).groupby(
        [rows[k].map(_text) for k in keys], sort=False)[["_wall", "_comm"]].median()
    comm = agg["_comm"].clip(lower=0)
    compute = (agg["_wall"] - comm).clip(lower=0)
    if normalise:
        total = (compute + comm).replace(0, np.nan)
        compute, comm = compute / total, comm / total
    labels = []
    for key in agg.index:
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        extra = " ".join(f"{s}={_text(key.get(c)).removesuffix('.0')}"
                         for c, s in (("processes", "P"), ("threads", "T")) if c in key)
        labels.append(series_label(key.get("strategy"), key.get("host"), key.get("device"),
                                   extra))
    pos = np.arange(len(agg))
    colors = [strategy_color(k[0] if isinstance(k, tuple) else k) for k in agg.index]
    ax.bar(pos, compute, color=colors, alpha=0.55, label="compute")
    ax.bar(pos, comm, bottom=compute, color=colors, hatch="///", edgecolor="#333333",
           linewidth=0.5, label="communication")
    ax.set_xticks(pos, labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("fraction of wall time" if normalise else "seconds (median)")
    ax.grid(axis="x", visible=False)
    top = 1.0 if normalise else float((compute + comm).max())
    ax.set_ylim(0, top * 1.18)
    ax.legend(loc="upper left", ncol=2)
    if title:
        ax.set_title(title)
    _footer(fig, rows)
    return fig


def cpu_utilisation(samples: pd.DataFrame | Mapping[str, Sequence[float]],
                    title: str | None = None, host: str | None = None) -> Any:
    """Per-core CPU utilisation over time.

    ``samples`` is wide (a time column ``t``/``time_s``/``elapsed_s`` and one column
    per core ``cpu0``, ``cpu1``, ... in percent) or long (``time_s``, ``core``,
    ``percent``). The host comes from ``host=``, a ``host`` column or
    ``samples.attrs["host"]``. The mean over cores is drawn in black.
    """
    fig, (ax,) = _new_figure(1, (7.0, 3.2))
    df = pd.DataFrame(samples) if not isinstance(samples, pd.DataFrame) else samples
    if not len(df):
        _empty(ax, "no CPU samples")
        return fig
    host = host or (df["host"].iloc[0] if "host" in df.columns else df.attrs.get("host"))
    tcol = next((c for c in ("t", "time_s", "elapsed_s", "time") if c in df.columns), None)
    if {"core", "percent"} <= set(df.columns):
        df = df.pivot_table(index=tcol, columns="core", values="percent").reset_index()
        df.columns = [tcol] + [f"cpu{c}" for c in df.columns[1:]]
    cores = [c for c in df.columns if str(c).startswith("cpu") and
             pd.api.types.is_numeric_dtype(df[c])]
    t = _num(df, tcol) if tcol else pd.Series(np.arange(len(df)), dtype=float)
    for i, c in enumerate(cores):
        ax.plot(t, _num(df, c), color=PALETTE[i % len(PALETTE)], linewidth=1, alpha=0.8,
                label=str(c))
    if cores:
        ax.plot(t, df[cores].apply(pd.to_numeric, errors="coerce").mean(axis=1), color="black",
                linewidth=2, label="mean")
    ax.set_ylim(0, 105)
    ax.set_xlabel("seconds" if tcol else "sample")
    ax.set_ylabel("CPU utilisation (%)")
    ax.set_title(title or f"CPU utilisation per core @ {_text(host)}")
    ax.legend(loc="lower right", ncol=min(4, len(cores) + 1))
    return fig


def sample_grid(x: np.ndarray, y: np.ndarray, classes: Sequence[str], per_class: int = 6,
                title: str | None = None) -> Any:
    """The first ``per_class`` images of every class as one mosaic (rows = classes).

    One ``imshow`` of a tiled array (fast, and one image object in the PDF); each
    image is rescaled to [0, 1] for display.
    """
    import matplotlib.pyplot as plt

    apply_style()
    x = np.asarray(x)
    k = len(classes)
    imgs = x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else (
        np.moveaxis(x, 1, -1) if x.ndim == 4 else x)
    h, w = imgs.shape[1:3]
    pad = max(1, h // 14)
    channels = imgs.shape[3:] if imgs.ndim == 4 else ()
    mosaic = np.ones((k * (h + pad) + pad, per_class * (w + pad) + pad, *channels))
    for c in range(k):
        for j, i in enumerate(np.flatnonzero(np.asarray(y) == c)[:per_class]):
            img = imgs[i].astype(float)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
            r0, c0 = pad + c * (h + pad), pad + j * (w + pad)
            mosaic[r0:r0 + h, c0:c0 + w] = img if channels else 1.0 - img
    fig, ax = plt.subplots(figsize=(per_class * 0.55 + 1.6, k * 0.55 + 0.5))
    ax.imshow(mosaic, cmap=None if channels else "gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_yticks([pad + c * (h + pad) + h / 2 for c in range(k)], [str(c) for c in classes],
                  fontsize=8)
    ax.set_xticks([])
    ax.grid(False)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], title: str | None = None,
                     normalise: bool = True, host: str | None = None) -> Any:
    """Confusion matrix (rows = true class, columns = predicted), row-normalised by default."""
    import matplotlib.pyplot as plt

    apply_style()
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalise else cm
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    ax.grid(False)
    k = len(classes)
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    for i in range(k):
        for j in range(k):
            v = shown[i, j]
            if v >= 0.005 or not normalise:
                ax.text(j, i, f"{v:.2f}" if normalise else f"{int(v)}", ha="center",
                        va="center", fontsize=6, color="white" if v > 0.5 * shown.max()
                        else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class" if normalise
                 else "count")
    if title:
        ax.set_title(title)
    _host_note(fig, host)
    return fig


def twin_errors(df: pd.DataFrame, title: str | None = None, host: str | None = None) -> Any:
    """Max relative error against the torch twin per model and quantity, float32 vs float64.

    ``df`` is :func:`cnn.study.twin_checks` output (model, dtype, quantity, max_rel_err).
    """
    fig, (ax,) = _new_figure(1, (7.6, 3.6))
    if df is None or not len(df):
        _empty(ax, "no twin checks")
        return fig
    dtypes = list(dict.fromkeys(df["dtype"]))
    models = list(dict.fromkeys(df["model"]))
    width = 0.8 / max(len(dtypes), 1)
    table = df.pivot_table(index=["model", "quantity"], columns="dtype", values="max_rel_err",
                           aggfunc="max")
    order = [mq for mq in dict.fromkeys(zip(df["model"], df["quantity"], strict=True))]
    table = table.reindex(pd.MultiIndex.from_tuples(order))
    # x positions: quantities side by side, a gap between models
    gaps = np.cumsum([0] + [1 if order[i][0] != order[i - 1][0] else 0
                            for i in range(1, len(order))])
    base = np.arange(len(order)) + gaps
    zeros = []
    for di, d in enumerate(dtypes):
        vals = table[d].to_numpy(dtype=float)
        xs = base + di * width
        pos_mask = vals > 0
        ax.bar(xs[pos_mask], vals[pos_mask], width, color=PALETTE[di % len(PALETTE)], label=d)
        zeros += list(xs[(vals == 0)])
    pos = base + width * (len(dtypes) - 1) / 2
    labels = [f"{m}: {q}" for m, q in order]
    del models
    ax.set_yscale("log")
    bottom = ax.get_ylim()[0]
    for xpos in zeros:
        ax.text(xpos, bottom, "0", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(pos, labels, rotation=90, fontsize=6)
    ax.set_ylabel("max |numpy - torch| / max |torch|")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="center right", title="dtype" + (" (0 = exact)" if zeros else ""))
    ax.set_title(title or "NumPy network vs PyTorch twin: logits, loss, every gradient")
    _host_note(fig, host)
    return fig


def _host_note(fig: Any, host: str | None) -> None:
    """Footer for figures computed live (no results frame): this machine."""
    from cnn import runinfo

    counts = runinfo.cpu_count()
    text = (f"computed on {host or runinfo.host()}: {runinfo.cpu_model()} "
            f"({counts.get('physical')} cores, {counts.get('logical')} threads); device cpu")
    fig.text(0.0, -0.01, text, ha="left", va="top", fontsize=7, color="#444444",
             transform=fig.transFigure)


def accuracy_bars(df: pd.DataFrame, label_cols: Sequence[str] = ("experiment", "strategy",
                  "processes", "threads"), title: str | None = None) -> Any:
    """Final test accuracy per configuration (last epoch of each run), host-labelled."""
    rows = df.loc[_num(df, "test_acc").notna()] if df is not None and len(df) else df
    fig, (ax,) = _new_figure(1, (7.0, max(2.4, 0.3 * (0 if rows is None else len(rows)) + 1)))
    if rows is None or not len(rows):
        _empty(ax, "no rows with test_acc")
        return fig
    labels = []
    for _, r in rows.iterrows():
        parts = [f"{c[0].upper()}={int(r[c])}" if c in ("processes", "threads")
                 and pd.notna(r.get(c)) else _text(r.get(c), "") for c in label_cols
                 if c in rows.columns]
        labels.append(series_label(" ".join(p for p in parts if p), r.get("host"),
                                   r.get("device")))
    pos = np.arange(len(rows))
    acc = _num(rows, "test_acc")
    ax.barh(pos, acc, color=[strategy_color(s) for s in rows.get("strategy", [None] * len(rows))])
    ax.set_yticks(pos, labels, fontsize=7)
    for y, v in zip(pos, acc, strict=True):
        ax.text(v, y, f" {v:.4f}", va="center", fontsize=6)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("test accuracy")
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title)
    _footer(fig, rows)
    return fig


def amdahl(df: pd.DataFrame, serial_fraction: float, p_max: int = 64, x: str = "workers",
           title: str | None = None) -> Any:
    """Measured speedups (``df``: ``speedup`` and ``x`` columns) against Amdahl's law
    ``S(P) = 1 / (f + (1 - f) / P)`` extrapolated to ``p_max``, with ``f`` given
    (e.g. the Karp-Flatt serial fraction at the largest measured P)."""
    fig, (ax,) = _new_figure(1, (6.4, 3.8))
    ps = np.unique(np.round(np.geomspace(1, max(p_max, 2), 60)))
    f = float(serial_fraction)
    ax.plot(ps, 1 / (f + (1 - f) / ps), color="#444444", label=f"Amdahl, f = {f:.3f}")
    ax.plot(ps, ps, color="#888888", linestyle=":", linewidth=1, label="ideal")
    if df is not None and len(df):
        styles = _host_styles(df)
        keys = [c for c in ("strategy", "host", "device") if c in df.columns]
        for key, grp in df.groupby([df[k].map(_text) for k in keys], sort=False):
            key = dict(zip(keys, key, strict=True))
            g = grp.assign(_x=_num(grp, x)).groupby("_x")["speedup"].median()
            marker, _ = styles.get(key.get("host", "?"), ("o", "-"))
            ax.plot(g.index, g.values, marker=marker, linestyle="none", markersize=7,
                    color=strategy_color(key.get("strategy")),
                    label=series_label(key.get("strategy"), key.get("host"), key.get("device")))
        _footer(fig, df)
    from matplotlib.ticker import ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
    ax.axhline(1 / f if f > 0 else np.nan, color="#444444", linestyle="--", linewidth=0.8,
               label=f"limit 1/f = {1 / f:.1f}" if f > 0 else None)
    ax.set_xlabel(x)
    ax.set_ylabel("speedup")
    ax.legend(loc="upper left")
    ax.set_title(title or "Amdahl extrapolation of the measured strong scaling")
    return fig


def costmodel_curves(df: pd.DataFrame, x: str = "processes", title: str | None = None) -> Any:
    """A cost-model frame, whichever shape it has.

    - extrapolation (``*efficiency`` columns against ``processes``, per ``network``):
      efficiency curves, weak solid, strong dashed;
    - model check (``time_s`` and ``predicted_s`` against ``bytes``): measured times as
      markers, predictions as lines, per process count;
    - otherwise: measured time columns (markers) and any ``*pred*``/``*model*``/``*fit*``
      column (lines) against ``x``.
    """
    fig, (ax,) = _new_figure(1, (7.0, 3.8))
    if df is None or not len(df):
        _empty(ax, "no cost-model rows")
        return fig
    if not _num(df, x).notna().any():  # the process count may be spelled "P"
        x = next((c for c in ("P", "ranks", "workers") if _num(df, c).notna().any()), x)
    cols = set(df.columns)
    eff = [c for c in df.columns if str(c).endswith("efficiency") and _num(df, c).notna().any()]
    if eff and "processes" in cols:
        group = next((c for c in ("network_name", "network") if c in cols), None)
        groups = df.groupby(df[group].map(_text), sort=False) if group else [("model", df)]
        for i, (name, g) in enumerate(groups):
            for c in eff:
                gg = g.assign(_x=_num(g, "processes"), _y=_num(g, c)).dropna(subset=["_x", "_y"])
                gg = gg.groupby("_x")["_y"].median().sort_index()
                ax.plot(gg.index, gg.values, color=PALETTE[i % len(PALETTE)], marker="o",
                        linestyle="--" if "strong" in c else "-", label=f"{name}: {c}")
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("processes (modelled)")
        ax.set_ylabel("efficiency")
        ax.set_title(title or "Cost model: extrapolated efficiency")
    elif {"time_s", "predicted_s", "bytes"} <= cols:
        pcol = "processes" if "processes" in cols else None
        groups = df.groupby(_num(df, pcol), sort=True) if pcol else [("", df)]
        for i, (p, g) in enumerate(groups):
            g = g.sort_values("bytes")
            color = PALETTE[i % len(PALETTE)]
            label = f"P={int(p)}" if pcol else ""
            ax.plot(_num(g, "bytes"), _num(g, "time_s"), "o", color=color,
                    label=f"measured {label}")
            ax.plot(_num(g, "bytes"), _num(g, "predicted_s"), "-", color=color,
                    label=f"model {label}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("time (s)")
        ax.set_title(title or "Cost model: measured vs modelled communication time")
    elif x in cols:
        numeric = [c for c in df.columns if c != x and pd.api.types.is_numeric_dtype(df[c])
                   and _num(df, c).notna().any()]
        modelled = [c for c in numeric if any(k in c.lower() for k in ("pred", "model", "fit"))]
        measured = [c for c in ("step_ms_median", "comm_ms", "comm_s", "wall_s", "time_s")
                    if c in numeric]
        for i, col in enumerate(measured + modelled):
            g = df.assign(_x=_num(df, x), _y=_num(df, col)).dropna(subset=["_x", "_y"])
            g = g.groupby("_x")["_y"].median().sort_index()
            kw = {"marker": "o", "linestyle": "none"} if col in measured else {"linestyle": "-"}
            ax.plot(g.index, g.values, color=PALETTE[i % len(PALETTE)], label=col, **kw)
        ax.set_xlabel(x)
        ax.set_ylabel("time (units of each column)")
        ax.set_title(title or "Cost model: measured (markers) vs modelled (lines)")
    else:
        _empty(ax, f"cost-model frame has no '{x}', '*efficiency' or 'predicted_s' columns")
        return fig
    ax.legend(loc="best", fontsize=7)
    _footer(fig, df)
    return fig


__all__ = [
    "PALETTE", "PNG_DPI", "STRATEGY_COLORS", "accuracy_bars", "amdahl", "apply_style",
    "compute_comm_split", "confusion_matrix", "costmodel_curves", "cpu_utilisation", "images_dir",
    "machines_footer", "sample_grid", "save_figure", "series_label", "speedup_efficiency",
    "strategy_color", "throughput_bars", "training_curves", "twin_errors",
]
