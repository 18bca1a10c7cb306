"""Notebook 01's figures: the data, the twin check, the training curves, the confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from study.figures import style


def sample_grid(x: np.ndarray, y: np.ndarray, classes: Sequence[str], per_class: int = 8,
                title: str = "") -> Any:
    """The first ``per_class`` images of every class as one mosaic (rows are classes)."""
    import matplotlib.pyplot as plt

    style.apply_style()
    x = np.asarray(x)
    imgs = x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else (
        np.moveaxis(x, 1, -1) if x.ndim == 4 else x)
    h, w = imgs.shape[1:3]
    pad = max(1, h // 14)
    channels = imgs.shape[3:] if imgs.ndim == 4 else ()
    k = len(classes)
    mosaic = np.ones((k * (h + pad) + pad, per_class * (w + pad) + pad, *channels))
    for c in range(k):
        for j, i in enumerate(np.flatnonzero(np.asarray(y) == c)[:per_class]):
            img = imgs[i].astype(float)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
            r0, c0 = pad + c * (h + pad), pad + j * (w + pad)
            mosaic[r0:r0 + h, c0:c0 + w] = img if channels else 1.0 - img
    fig, ax = plt.subplots(figsize=(per_class * 0.5 + 1.6, k * 0.5 + 0.5))
    ax.imshow(mosaic, cmap=None if channels else "gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_yticks([pad + c * (h + pad) + h / 2 for c in range(k)], [str(c) for c in classes])
    ax.set_xticks([])
    ax.grid(False)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    if title:
        ax.set_title(title)
    return fig


def twin_errors(df: pd.DataFrame) -> Any:
    """Worst relative error against the torch twin per model, float32 and float64."""
    fig, (ax,) = style.new_figure(1, height=2.6)
    if df is None or not len(df):
        style.empty(ax, "no twin check rows")
        return fig
    worst = df.groupby(["model", "dtype"], sort=False)["rel_err"].max().unstack("dtype")
    xs = np.arange(len(worst))
    for i, dtype in enumerate(worst.columns):
        vals = worst[dtype].to_numpy(float)
        ax.bar(xs + (i - 0.5) * 0.38, np.where(vals > 0, vals, np.nan), 0.36,
               label=dtype, color=style.PALETTE[i])
    ax.axhline(1e-4, color="#888888", linestyle=":", linewidth=1.0)
    ax.text(len(worst) - 0.5, 1.3e-4, "float32 tolerance", ha="right", fontsize=7,
            color="#666666")
    ax.set_yscale("log")
    ax.set_xticks(xs, list(worst.index))
    ax.set_ylabel("worst max|ours - torch| / max|torch|")
    ax.set_title("NumPy network vs PyTorch twin: logits, loss and every gradient")
    ax.legend(loc="upper left")
    style.footer(fig, df)
    return fig


def training_curves(df: pd.DataFrame, title: str = "") -> Any:
    """Training loss and test accuracy per epoch of the baseline run."""
    fig, (ax_loss, ax_acc) = style.new_figure(2, height=2.8)
    if df is None or not len(df):
        for ax in (ax_loss, ax_acc):
            style.empty(ax, "no training rows")
        return fig
    d = df.sort_values("epoch")
    c = style.color("sequential")
    ax_loss.plot(d["epoch"], d["train_loss"], marker="o", color=c, label="train")
    if d["test_loss"].notna().any():
        ax_loss.plot(d["epoch"], d["test_loss"], marker="s", color=c, linestyle="--",
                     label="test")
    ax_acc.plot(d["epoch"], d["test_acc"], marker="o", color=c)
    ax_loss.set(xlabel="epoch", ylabel="mean cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    ax_loss.legend()
    if title:
        fig.suptitle(title)
    style.footer(fig, df)
    return fig


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], title: str = "") -> Any:
    """Row-normalised confusion matrix (rows the true class)."""
    import matplotlib.pyplot as plt

    style.apply_style()
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    k = len(classes)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    for i in range(k):
        for j in range(k):
            if shown[i, j] >= 0.005:
                ax.text(j, i, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if shown[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if title:
        ax.set_title(title)
    return fig
