"""Notebook 06 and the report's discussion: every headline ratio on one forest plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from study.analysis import Headline
from study.figures import style


def forest(headlines: Sequence[Headline], unit: str = "x", reference: float = 1.0,
           title: str = "") -> Any:
    """One row per measured headline in ``unit``: the median and its 95% CI, a line at
    ``reference``; flagged headlines drawn hollow so they read as not-a-finding."""
    rows = [h for h in headlines if h.unit == unit and h.measured]
    fig, (ax,) = style.new_figure(1, height=0.32 * max(len(rows), 2) + 1.0)
    if not rows:
        style.empty(ax, f"no measured headline in {unit!r} yet")
        return fig
    ys = np.arange(len(rows))[::-1]
    for y, h in zip(ys, rows, strict=True):
        c = style.color_of_key(h.key)
        lo = h.lo if np.isfinite(h.lo) else h.value
        hi = h.hi if np.isfinite(h.hi) else h.value
        ax.plot([lo, hi], [y, y], color=c, linewidth=2)
        ax.plot([h.value], [y], marker="o", markersize=6, color=c,
                markerfacecolor="white" if h.anomaly else c)
    ax.axvline(reference, color="#888888", linestyle=":", linewidth=1.0)
    values = [v for h in rows for v in (h.lo, h.value, h.hi) if np.isfinite(v) and v > 0]
    if unit == "x" and values and max(values) / min(values) > 10:
        # ratios from 0.5x to 60x: on a log axis 1.2x and 0.8x stay apart and readable
        ax.set_xscale("log")
        ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100)
                 if min(values) / 1.5 <= t <= max(values) * 1.5]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
    ax.set_yticks(ys, [h.label + (" (flagged)" if h.anomaly else "") for h in rows])
    ax.set_xlabel({"x": "ratio (median, 95% CI)", "%": "efficiency (median, 95% CI)"}.get(
        unit, unit))
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title)
    return fig
