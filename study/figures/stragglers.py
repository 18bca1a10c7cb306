"""The stragglers family's figures (notebook 05, section 5; the report's async section).

Designed for the report: `time_to_accuracy` (test accuracy against training seconds, one
panel per scenario, the target as a line; median of trials with 95% CIs) and `scenarios`
(time to the target per scenario, synchronous and asynchronous strategies apart).
Notebook extras: `staleness` (the distribution of staleness, no straggler and one worker
4x slower) and `momentum` (HOGWILD's momentum options against one worker, per batch).
Every function takes the family's frames (`study.experiments.stragglers.run` or ``load``),
draws the latest session, returns the figure and saves it unless ``save=False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from study.experiments import stragglers as st
from study.experiments import stragglers_analysis as sa
from study.figures import style
from study.figures.style import empty_figure

CI_NOTE = "median of trials with 95% bootstrap CI"
WAIT_FOR_ALL = ("allreduce", "param-server", "param-server-backup", "model-average")
ASYNC = ("async-param-server", "async-param-server-stale", "async-param-server-stale1",
         *st.HOGWILD_OPTIONS)
MARKERS = {"hogwild (local)": "o", "hogwild (shared)": "s", "hogwild (scaled)": "^",
           "async-param-server": "o", "async-param-server-stale": "s",
           "async-param-server-stale1": "^", "allreduce": "o", "param-server": "s",
           "param-server-backup": "D", "model-average": "v", "sequential": "x"}
STYLES = {"hogwild (shared)": "--", "hogwild (scaled)": ":", "async-param-server-stale": "--",
          "async-param-server-stale1": ":"}


def _runs(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    return sa.runs(frames.get(st.RESULTS[0]))


def _draw(ax: Any, x: Any, pts: pd.DataFrame, series: str, label: str | None = None) -> None:
    style.with_ci(ax, x, pts["median"], pts["lo"], pts["hi"], label or series, series,
                  marker=MARKERS.get(series, "o"), linestyle=STYLES.get(series, "-"))


def best_hogwild(df: pd.DataFrame) -> str | None:
    """The HOGWILD momentum option with the best median accuracy with no straggler."""
    r = sa.runs(df)
    r = r[(r["mode"] == "none") & r["series"].isin(st.HOGWILD_OPTIONS)] if len(r) else r
    if not len(r):
        return None
    return str(r.groupby("series")["test_acc"].median().idxmax())


def curve_series(df: pd.DataFrame, scenario: str) -> list[str]:
    """At most six series per panel: allreduce, the backup worker, async plain and
    staleness-aware (the variant where it ran), model averaging, HOGWILD's best option."""
    have = set(sa.runs(df).query("mode == @scenario")["series"]) if len(sa.runs(df)) else set()
    stale = "async-param-server-stale1" if "async-param-server-stale1" in have else \
        "async-param-server-stale"
    want = ["allreduce", "param-server-backup", "async-param-server", stale, "model-average",
            best_hogwild(df)]
    return [s for s in want if s in have]


def time_to_accuracy(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
                     save: bool = True) -> Any:
    """Test accuracy against training seconds, one panel per scenario, target as a line."""
    df = frames.get(st.RESULTS[0])
    pts = sa.curve_points(df)
    if not len(pts):
        return empty_figure("stragglers_time_to_accuracy", "stragglers not measured yet "
                            "(notebook 05)", scale, save)
    scenarios = [s for s in st.SCENARIOS if s in set(pts["mode"])]
    ncols = min(2, len(scenarios))
    nrows = math.ceil(len(scenarios) / ncols)
    fig, axes = style.new_figure(ncols, height=2.6 * nrows, nrows=nrows, sharey=True)
    target = float(sa.runs(df)["target_acc"].iloc[0])
    best = best_hogwild(df)
    for ax, sc in zip(axes, scenarios, strict=False):
        for series in curve_series(df, sc):
            p = pts[(pts["mode"] == sc) & (pts["series"] == series)].sort_values("step")
            lab = series + (", best option" if series == best else "")
            _draw(ax, p["wall_s"], p, series, lab)
        ax.axhline(target, color="#888888", linestyle=":", linewidth=1.0)
        ax.set_title(st.SCENARIOS[sc])
        ax.set_xlabel("training seconds")
    for ax in axes[len(scenarios):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("test accuracy")
    labels: dict[str, Any] = {}
    for ax in axes[:len(scenarios)]:
        handles, names = ax.get_legend_handles_labels()
        style.check_series(len(handles), f"stragglers_time_to_accuracy: {ax.get_title()}")
        labels.update(zip(names, handles, strict=True))
    fig.legend(list(labels.values()), list(labels), loc="outside right upper")
    note = (f"{sa.runs(df)['config'].iloc[0]}\ndotted: the target {target:.0%}; copies "
            f"evaluated outside the timed region; accuracy: {CI_NOTE}; seconds: median")
    style.footer(fig, sa.runs(df), note)
    if save:
        style.save_figure(fig, "stragglers_time_to_accuracy", scale)
    return fig


def scenarios(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
              save: bool = True) -> Any:
    """Time to the target per scenario: strategies that wait for every worker (left) and
    asynchronous ones (right)."""
    df = frames.get(st.RESULTS[0])
    pts = sa.tta_points(df)
    if not len(pts):
        return empty_figure("stragglers_scenarios", "stragglers not measured yet (notebook 05)",
                            scale, save)
    order = [s for s in st.SCENARIOS if s in set(pts["mode"])]
    fig, axes = style.new_figure(2, height=3.0, sharey=True)
    for ax, group, title in ((axes[0], WAIT_FOR_ALL, "waiting for every worker"),
                             (axes[1], ASYNC, "asynchronous")):
        for i, series in enumerate(s for s in group if s in set(pts["series"])):
            p = pts[pts["series"] == series].set_index("mode").reindex(order)
            x = np.arange(len(order)) + 0.09 * (i - 2.5)
            style.with_ci(ax, x, p["median"], p["lo"], p["hi"], series, series,
                          marker=MARKERS.get(series, "o"), linestyle="none")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(order)))
        ax.set_xticklabels([st.SCENARIOS[s].replace("one worker ", "") for s in order],
                           rotation=20)
        ax.set_title(title)
    axes[0].set_ylabel(f"seconds to {float(pts['target_acc'].iloc[0]):.0%} test accuracy")
    note = (f"{pts['config'].iloc[0]}\na missing point: not run, or the target not reached "
            f"(scenario table); {CI_NOTE}")
    return style.finish(fig, axes, sa.runs(df), note, "stragglers_scenarios", scale, save)


def staleness(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
              save: bool = True) -> Any:
    """Notebook extra: how stale applied updates are, without and with a 4x straggler."""
    df = frames.get(st.RESULTS[0])
    r = sa.runs(df)
    show = [s for s in ("async-param-server", "async-param-server-stale", "hogwild (local)",
                        "hogwild (shared)") if len(r) and s in set(r["series"])]
    panels = [s for s in ("none", "slow4x") if len(r) and s in set(r["mode"])]
    if not show or not panels:
        return empty_figure("stragglers_staleness", "no staleness measured yet", scale, save)
    fig, axes = style.new_figure(len(panels), sharey=True)
    for ax, sc in zip(axes, panels, strict=True):
        for i, series in enumerate(show):
            h = sa.staleness_distribution(df, sc, series)[:12]
            x = np.arange(len(h)) + 0.18 * (i - 1.5)
            ax.bar(x, h, width=0.18, color=style.color(series), label=series,
                   hatch={1: "//", 3: ".."}.get(i, ""))
        ax.set_title(st.SCENARIOS[sc])
    fig.supxlabel("staleness (updates applied since the weights were read)", fontsize=9)
    axes[0].set_ylabel("share of updates")
    note = "every applied update of every trial; stalenesses above 11 not drawn"
    return style.finish(fig, axes, r, note, "stragglers_staleness", scale, save)


def momentum(frames: Mapping[str, pd.DataFrame], scale: str = "standard",
             save: bool = True) -> Any:
    """Notebook extra: HOGWILD's momentum options minus one worker (points), per batch."""
    mt = sa.momentum_table(frames)
    if not len(mt):
        return empty_figure("stragglers_momentum", "HOGWILD momentum options not measured yet",
                            scale, save)
    fig, axes = style.new_figure(1)
    ax = axes[0]
    for series in st.HOGWILD_OPTIONS:
        m = mt[mt["option"] == series].sort_values("batch")
        if len(m):
            _draw(ax, m["batch"], m.rename(columns={"gap": "median"}), series)
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    ax.axhline(-sa.GAP_POINTS, color="#888888", linestyle=":", linewidth=1.0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(mt["batch"])))
    ax.set_xticklabels([str(b) for b in sorted(set(mt["batch"]))])
    ax.set_xlabel("batch per worker")
    ax.set_ylabel("test accuracy minus one worker (points)")
    note = (f"2 workers, equal epochs, no straggler; dotted: the target (-{sa.GAP_POINTS} "
            f"point); {CI_NOTE}")
    return style.finish(fig, axes, sa.runs(sa.momentum_frame(frames), latest=False), note,
                        "stragglers_momentum", scale, save)


def draw(frames: Mapping[str, pd.DataFrame], scale: str = "standard", save: bool = True
         ) -> dict[str, Any]:
    """Every figure of the family, by name."""
    return {"stragglers_time_to_accuracy": time_to_accuracy(frames, scale, save),
            "stragglers_scenarios": scenarios(frames, scale, save),
            "stragglers_staleness": staleness(frames, scale, save),
            "stragglers_momentum": momentum(frames, scale, save)}
