"""The peers' figures (notebooks 04 and 05, the report's "against what users would pick" part).

Designed for the report: `throughput` (samples/s vs workers, project and peer side by side
with 95% CIs, one panel per part) and `ratio` (the ratio project/peer vs workers against
the targets, and the test-accuracy difference at equal epochs). Every function takes the
family's frames (`study.experiments.peers.run` or ``load``), draws each part's latest
session, returns the figure and saves it unless ``save=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from study.experiments import peers as pe
from study.figures import style

TITLES = {"ddp": "allreduce vs torch DDP", "hogwild": "HOGWILD vs torch HOGWILD",
          "kfold": "k-fold engines vs joblib"}
CI_NOTE = "median of trials with 95% bootstrap CI"


def _latest(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    return pe.latest(frames.get(pe.RESULTS[0]))


def _why(part: str) -> str:
    return ((pe.torch_missing() if part in pe.TORCH_PARTS else "")
            or f"{pe.EXPERIMENT[part]} not measured yet (notebooks 04 and 05)")


def throughput(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
               ) -> Any:
    """Training samples/s against workers, project and peer, one panel per part."""
    df = _latest(frames)
    fig, axes = style.new_figure(len(pe.PARTS), height=3.0)
    for ax, part in zip(axes, pe.PARTS, strict=True):
        tp = pe.throughput(df, part)
        if not len(tp):
            style.empty(ax, _why(part))
            ax.set_title(TITLES[part])
            continue
        for strategy, marker, ls in zip(pe.PAIRS[part], ("o", "s"), ("-", "--"), strict=True):
            s = tp[tp["strategy"] == strategy].sort_values("workers")
            style.with_ci(ax, s["workers"], s["median"], s["lo"], s["hi"], strategy, strategy,
                          marker=marker, linestyle=ls)
        ax.set_title(TITLES[part])
        ax.set_xlabel("workers")
        ax.set_xticks(sorted(set(tp["workers"].astype(int))))
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("training samples/s")
    note = f"same data, weights, batch order, batch 64/worker, 1 thread/worker; {CI_NOTE}"
    return style.finish(fig, axes, pe.runs(df), note, "peers_throughput", scale, save)


def ratio(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
          ) -> Any:
    """Left: throughput ratio project/peer vs workers per part, with the targets. Right:
    test accuracy minus the peer's at equal epochs, in points."""
    df = _latest(frames)
    rat, acc = pe.ratios(df), pe.accuracy(df)
    fig, axes = style.new_figure(2, height=3.0)
    if not len(rat):
        for ax in axes:
            style.empty(ax, "peers not measured yet (notebooks 04 and 05)")
        return style.finish(fig, axes, pe.runs(df), "", "peers_ratio", scale, save)
    tr = rat[rat["measure"] == "training"]
    for part, g in tr.groupby("part", sort=False):
        g = g.sort_values("workers")
        style.with_ci(axes[0], g["workers"], g["ratio"], g["ratio_lo"], g["ratio_hi"],
                      f"{pe.PAIRS[part][0]} / {pe.PAIRS[part][1]}", pe.PAIRS[part][0])
    workers = sorted(set(tr["workers"].astype(int)))
    axes[0].axhline(1.0, color="#888888", linestyle=":", linewidth=1.0, label="parity")
    axes[0].axhline(pe.TARGETS["ddp"], color="#888888", linestyle="--", linewidth=1.0,
                    label=f"target {pe.TARGETS['ddp']:g}x (ddp, hogwild)")
    axes[0].set_title("throughput, project / peer")
    axes[0].set_ylabel("ratio of medians")
    if len(acc):
        for part, g in acc.groupby("part", sort=False):
            g = g.sort_values("workers")
            style.with_ci(axes[1], g["workers"], g["diff_points"], g["diff_lo"], g["diff_hi"],
                          f"{pe.PAIRS[part][0]} - {pe.PAIRS[part][1]}", pe.PAIRS[part][0])
        axes[1].axhspan(-pe.ACC_TARGET_POINTS, pe.ACC_TARGET_POINTS, color="#DDDDDD",
                        alpha=0.5, label=f"within {pe.ACC_TARGET_POINTS} point")
    axes[1].set_title("test accuracy at equal epochs")
    axes[1].set_ylabel("project - peer (points)")
    for ax in axes:
        ax.set_xlabel("workers")
        ax.set_xticks(workers)
    note = f"ratio of medians, bootstrap 95% CI; accuracy difference paired by trial; {CI_NOTE}"
    return style.finish(fig, axes, pe.runs(df), note, "peers_ratio", scale, save)


def draw(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
         ) -> dict[str, Any]:
    """Every peers figure, by name."""
    return {"peers_throughput": throughput(frames, scale, save),
            "peers_ratio": ratio(frames, scale, save)}
