"""The kernel ladder's figure (notebook 02 and the report): how each kernel got fast."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from study.experiments import ladder as L
from study.figures import style

STATUS_COLORS = {"history": "#999999", "production": "#0072B2", "candidate": "#E69F00"}


def climb(frames: dict[str, pd.DataFrame], scale: str = "standard", save: bool = True) -> Any:
    """GFLOP/s of every rung (median, 95% CI) of the conv forward and backward kernels at
    the seed CNN's second layer, against the sgemm roof measured in the same run."""
    df = frames.get(L.RESULTS[0])
    fig, axes = style.new_figure(2, height=3.4)
    for ax, (family, kernel, shape) in zip(axes, L.HEADLINE_OPS, strict=True):
        t = L.table(df, family, kernel, shape)
        if not len(t):
            style.empty(ax, "ladder not measured yet (python -m study.experiments.ladder)")
            continue
        t = t[t["threads"] == t["threads"].max()].reset_index(drop=True)
        flops = t["gflops"] * t["ms"]  # GFLOP/s x ms is the same for every rung
        lo = flops / t["ms hi"]
        hi = flops / t["ms lo"]
        ys = np.arange(len(t))[::-1]
        ax.barh(ys, t["gflops"], color=[STATUS_COLORS[s] for s in t["status"]])
        ax.errorbar(t["gflops"], ys, xerr=np.vstack([t["gflops"] - lo, hi - t["gflops"]]),
                    fmt="none", ecolor="#333333", capsize=2, elinewidth=0.8)
        roof = t["gflops"] / (t["pct_gemm_roof"] / 100)
        ax.axvline(float(roof.median()), color="#D55E00", linestyle="--", linewidth=1.0)
        ax.text(float(roof.median()), ys.max() + 0.6, " sgemm roof", color="#D55E00",
                fontsize=7, va="bottom")
        ax.set_yticks(ys, t["version"])
        ax.set_xlabel(f"GFLOP/s at {int(t['threads'].iloc[0])} thread(s)")
        ax.set_title(f"{kernel}\n{shape}")
        ax.grid(axis="y", visible=False)
    handles = [style_patch(c, s) for s, c in STATUS_COLORS.items()]
    axes[0].legend(handles=handles, loc="center right")
    note = "median and 95% CI over interleaved trials; what each version changed: notebook 02"
    return style.finish(fig, axes, df, note, "kernels_ladder", scale, save)


def style_patch(color: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, label=label)
