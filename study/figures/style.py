"""One look for every figure: palette (one colour per strategy, everywhere), sizes that
read at print size, saving (PNG + vector PDF, atomically), the provenance footer, and
the shared drawing helpers (a series with its confidence band, the ideal line).

Figure rules (docs/DESIGN.md): at most `MAX_SERIES` series per panel, every point a
median with its 95% CI drawn, labels at least 8 pt at the report's width.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.io import atomic_write
from study import paths

MAX_SERIES = 6
PNG_DPI = 200
#: Width of one report column figure, inches (A4 text width is about 6.3 in).
WIDTH = 6.3

#: Okabe-Ito (colour-blind safe) and its companions; a strategy keeps its colour.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000", "#999999", "#882255"]
STRATEGY_COLORS: dict[str, str] = {
    "sequential": "#000000",
    "numpy": "#000000",
    "numba": "#0072B2",
    "torch": "#999999",
    "cuda": "#009E73",
    "allreduce": "#D55E00",
    "allreduce-overlap": "#AA4499",
    "param-server": "#E69F00",
    "param-server-backup": "#B8860B",
    "async-param-server": "#44AA99",
    "async-param-server-stale": "#117733",
    "model-average": "#CC79A7",
    "hybrid": "#882255",
    "hogwild": "#56B4E9",
    "hogwild-locked": "#332288",
    "kfold": "#117733",
    "torch-ddp": "#7F7F7F",
    "torch-hogwild": "#A6A6A6",
    "joblib-kfold": "#5F5F5F",
}

STYLE: dict[str, Any] = {
    "figure.figsize": (WIDTH, 3.2),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "axes.grid": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}


def apply_style() -> None:
    """Set the study's matplotlib style (idempotent); the backend stays the caller's."""
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update({**STYLE, "axes.prop_cycle": cycler(color=PALETTE)})


def color(strategy: Any) -> str:
    """The strategy's colour (an unknown name gets a fixed palette entry by hash)."""
    key = str(strategy).split(" (")[0]
    if key in STRATEGY_COLORS:
        return STRATEGY_COLORS[key]
    return PALETTE[zlib.crc32(key.encode()) % len(PALETTE)]


def color_of_key(key: str) -> str:
    """The colour of the longest strategy name inside a headline key (``mpi_weak_allreduce``
    is allreduce's), else the key's first word's."""
    hits = [name for name in STRATEGY_COLORS if name.replace("-", "_") in key]
    return color(max(hits, key=len) if hits else key.split("_")[0])


def new_figure(ncols: int = 1, height: float = 2.9, width: float = WIDTH,
               sharey: bool = False, nrows: int = 1) -> tuple[Any, list[Any]]:
    """A figure of ``nrows`` x ``ncols`` panels; the axes come row by row in one list."""
    import matplotlib.pyplot as plt

    apply_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), sharey=sharey,
                             squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Any, name: str, scale: str = "standard",
                directory: str | os.PathLike | None = None, close: bool = False
                ) -> dict[str, Path]:
    """Write ``<images>/<name>.png`` (200 dpi) and ``.pdf`` (vector) atomically.

    PDF metadata carries no date, so an unchanged figure gives an identical file.
    """
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"figure name must be a bare name like 'mpi_scaling', got {name!r}")
    folder = Path(directory) if directory is not None else paths.images_dir(scale)
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


def footer(fig: Any, rows: pd.DataFrame, note: str = "") -> None:
    """Provenance under the figure: machine, scale, sessions, trials."""
    parts = []
    if rows is not None and len(rows):
        if "cpu" in rows:
            parts.append(", ".join(sorted(set(rows["cpu"].astype(str)))))
        if "scale" in rows:
            parts.append("scale " + ",".join(sorted(set(rows["scale"].astype(str)))))
        if "trial" in rows:
            parts.append(f"{int(pd.to_numeric(rows['trial']).max()) + 1} trial(s) per point")
    text = "; ".join(parts)
    if note:
        text = f"{note}\n{text}" if text else note
    if text:
        fig.text(0.0, -0.01, text, ha="left", va="top", fontsize=7, color="#444444",
                 transform=fig.transFigure)


def check_series(n: int, where: str) -> None:
    """Refuse a panel with more series than a reader can tell apart."""
    if n > MAX_SERIES:
        raise ValueError(f"{where}: {n} series in one panel (at most {MAX_SERIES}); "
                         "split the figure or filter the series")


def finish(fig: Any, axes: Sequence[Any], rows: pd.DataFrame, note: str, name: str,
           scale: str = "standard", save: bool = True) -> Any:
    """Close a figure the same way everywhere: refuse a panel with too many series, draw
    each panel's legend, add the provenance footer, save (unless ``save`` is False)."""
    for ax in axes:
        handles = ax.get_legend_handles_labels()[0]
        check_series(len(handles), f"{name}: {ax.get_title() or 'panel'}")
        if handles:
            ax.legend()
    footer(fig, rows, note)
    if save:
        save_figure(fig, name, scale)
    return fig


def with_ci(ax: Any, x: Sequence[float], med: Sequence[float], lo: Sequence[float],
            hi: Sequence[float], label: str, strategy: str | None = None,
            marker: str = "o", linestyle: str = "-") -> None:
    """A series of medians with its 95% CI as error bars (drawn where known)."""
    x, med = np.asarray(x, float), np.asarray(med, float)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    c = color(strategy if strategy is not None else label)
    known = np.isfinite(lo) & np.isfinite(hi)
    # a percentile bound can miss the median by rounding (0.66 vs 0.6600000001): clip at 0
    yerr = np.clip(np.vstack([np.where(known, med - lo, 0.0), np.where(known, hi - med, 0.0)]),
                   0.0, None)
    ax.errorbar(x, med, yerr=yerr, marker=marker, linestyle=linestyle, color=c, label=label,
                capsize=3, elinewidth=1.0)


def ideal_line(ax: Any, workers: Sequence[float], kind: str = "speedup") -> None:
    """The ideal: speedup = workers, or efficiency = 1."""
    w = np.asarray(sorted(set(float(v) for v in workers)))
    if not len(w):
        return
    y = w if kind == "speedup" else np.ones_like(w)
    ax.plot(w, y, linestyle=":", color="#888888", linewidth=1.0, label="ideal")


def empty(ax: Any, message: str) -> None:
    """A panel that says why it has no data (nothing measured is never drawn as zero)."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
            fontsize=8, color="#666666", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def empty_figure(name: str, message: str, scale: str, save: bool = True) -> Any:
    """A one-panel figure that says why it has no data, saved as ``name`` so a rerun
    replaces a stale image instead of leaving it."""
    fig, axes = new_figure(1)
    empty(axes[0], message)
    if save:
        save_figure(fig, name, scale)
    return fig


def text(value: Any, default: str = "?") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value)
