"""Notebook 03's figures: the simulator check and, once a GPU has run, the throughput."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from study import analysis
from study.figures import style


def simulator_check(df: pd.DataFrame) -> Any:
    """Relative error of every checked quantity, float32 and float64, against tolerance."""
    fig, (ax,) = style.new_figure(1, height=3.0)
    d = df[np.isfinite(df["rel_err"].astype(float))]
    quantities = list(dict.fromkeys(d["quantity"]))
    ys = np.arange(len(quantities))
    for i, dtype in enumerate(sorted(set(d["dtype"]))):
        part = d[d["dtype"] == dtype].set_index("quantity").reindex(quantities)
        vals = part["rel_err"].astype(float).to_numpy()
        ax.barh(ys + (i - 0.5) * 0.38, np.where(vals > 0, vals, np.nan), 0.36, label=dtype,
                color=style.PALETTE[i])
    ax.axvline(1e-4, color="#888888", linestyle=":", linewidth=1.0, label="float32 tolerance")
    ax.set_xscale("log")
    ax.set_yticks(ys, quantities)
    ax.invert_yaxis()
    ax.set_xlabel("max|cuda - numpy| / max|numpy|  (0 = bitwise equal: no bar)")
    ax.set_title("Numba CUDA backend vs NumPy in the CUDA simulator")
    ax.legend(loc="lower right")
    style.footer(fig, df)
    return fig


def throughput(bench: pd.DataFrame) -> Any:
    """Samples/s per batch size: CUDA, torch+cuDNN (TF32 off) and NumPy, median with CI."""
    fig, (ax,) = style.new_figure(1, height=3.0)
    d = bench[bench["input_shape"].astype(str) == "3x32x32"] if "input_shape" in bench else bench
    if "tf32" in d:
        d = d[~d["tf32"].map(lambda v: v is True or v == 1)]
    series = list(dict.fromkeys(d["backend"]))
    style.check_series(len(series), "gpu throughput")
    for b in series:
        pts = analysis.points(d[d["backend"] == b], ["batch_size"], "samples_per_s")
        pts = pts.sort_values("batch_size")
        style.with_ci(ax, pts["batch_size"], pts["median"], pts["lo"], pts["hi"], label=b,
                      strategy=b)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="batch size", ylabel="training samples / s",
           title="seed CNN 3x32x32, float32: one training step")
    ax.legend()
    style.footer(fig, bench)
    return fig
