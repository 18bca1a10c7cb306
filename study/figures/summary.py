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
    ax.set_yticks(ys, [h.label + (" (flagged)" if h.anomaly else "") for h in rows])
    ax.set_xlabel({"x": "ratio (median, 95% CI)", "%": "efficiency (median, 95% CI)"}.get(
        unit, unit))
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title)
    return fig
