"""The analysis of the stragglers family (study/experiments/stragglers.py): pure functions of
its frames. Time to a target accuracy per scenario and strategy (median + 95% CI over
trials), how much sooner than allreduce, accuracy at equal epochs against the synchronous
server and against one worker, the staleness distribution, the issue's three targets, and
the estimate of how long the family takes to measure.

A "series" is a strategy, and for HOGWILD its momentum option: ``hogwild (shared)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from study import analysis

#: The issue's targets: points of accuracy at equal epochs, and how much sooner.
GAP_POINTS = 0.5
SOONER = 1.5
STALE = ("async-param-server-stale", "async-param-server-stale1")
REMEDIES = ("param-server-backup", "async-param-server", *STALE)
KEYS = ("host", "session", "mode", "strategy", "momentum_mode", "batch_size")


# --- one run ------------------------------------------------------------------------------

def time_to_target(walls: Sequence[float], accs: Sequence[float], target: float) -> float:
    """Training seconds at which the accuracy first reaches ``target``: linear between the
    last evaluation below it and the first at or above it (the first evaluation's own time
    when that one already reaches it); NaN when the run never reaches it."""
    prev: tuple[float, float] | None = None
    for t, a in zip(walls, accs, strict=True):
        if np.isfinite(a) and a >= target:
            if prev is None or a <= prev[1]:
                return float(t)
            return float(prev[0] + (target - prev[1]) / (a - prev[1]) * (t - prev[0]))
        if np.isfinite(a):
            prev = (float(t), float(a))
    return math.nan


def add_histograms(hists: Iterable[Any]) -> list[int]:
    """The element-wise sum of count lists of different lengths (staleness 0, 1, 2, ...)."""
    out: list[int] = []
    for h in hists:
        if not isinstance(h, list | tuple | np.ndarray):
            continue
        for i, c in enumerate(h):
            if i == len(out):
                out.append(0)
            out[i] += int(c)
    return out


# --- points ---------------------------------------------------------------------------------

def series_name(strategy: Any, momentum_mode: Any) -> str:
    mode = "" if momentum_mode is None or (isinstance(momentum_mode, float)
                                           and math.isnan(momentum_mode)) else str(momentum_mode)
    return f"{strategy} ({mode})" if strategy == "hogwild" and mode else str(strategy)


def runs(df: pd.DataFrame | None, latest: bool = True) -> pd.DataFrame:
    """The run rows (of the latest session), with their ``series``."""
    if df is None or not len(df) or "kind" not in df:
        return pd.DataFrame()
    d = analysis.latest_session(df) if latest else df
    r = d[d["kind"] == "run"].copy()
    mode = r["momentum_mode"] if "momentum_mode" in r else pd.Series("", index=r.index)
    r["series"] = [series_name(s, m) for s, m in zip(r["strategy"], mode, strict=True)]
    return r


def tta_points(df: pd.DataFrame) -> pd.DataFrame:
    """Time to the target per scenario (``mode``) and series: median + CI over the trials
    that reached it, and how many did; flagged when some did not."""
    r = runs(df)
    if not len(r):
        return pd.DataFrame()
    out = []
    for (mode, series, batch), g in r.groupby(["mode", "series", "batch_size"], sort=False):
        t = pd.to_numeric(g["time_to_target_s"], errors="coerce")
        med, lo, hi = analysis.median_ci(t)
        reached = int(np.isfinite(t).sum())
        row = dict(host=str(g["host"].iloc[0]), session=str(g["session"].iloc[0]), mode=mode,
                   series=series, strategy=str(g["strategy"].iloc[0]),
                   momentum_mode=str(g["momentum_mode"].iloc[0] or ""), batch_size=int(batch),
                   config=str(g["config"].iloc[0]), median=med, lo=lo, hi=hi, n=len(g),
                   reached=reached, target_acc=float(g["target_acc"].iloc[0]))
        why = [analysis.point_anomaly(dict(row, n=reached))] if reached else []
        if reached < len(g):
            why.append(f"target {row['target_acc']:.0%} not reached in {len(g) - reached} of "
                       f"{len(g)} trials")
        row["anomaly"] = "; ".join(w for w in why if w)
        out.append(row)
    return pd.DataFrame(out)


def tta_ratio(df: pd.DataFrame, scenario: str, series: str, base: str = "allreduce"
              ) -> dict[str, Any]:
    """How many times sooner ``series`` reaches the target than ``base`` in ``scenario``:
    median(base) / median(series) with its bootstrap CI (trials that never reach it are
    left out, and said so)."""
    r = runs(df)
    r = r[r["mode"] == scenario]
    a = pd.to_numeric(r[r["series"] == base]["time_to_target_s"], errors="coerce")
    b = pd.to_numeric(r[r["series"] == series]["time_to_target_s"], errors="coerce")
    ratio, lo, hi = analysis.ratio_ci(a, b)
    n = int(min(np.isfinite(a).sum(), np.isfinite(b).sum())) if len(a) and len(b) else 0
    p = dict(speedup=ratio, speedup_lo=lo, speedup_hi=hi, n=n, series=series, base=base,
             mode=scenario)
    if len(r):
        p.update(host=str(r["host"].iloc[0]), session=str(r["session"].iloc[0]),
                 config=str(r["config"].iloc[0]))
    why = [analysis.point_anomaly(dict(median=ratio, lo=lo, hi=hi, n=n))]
    missing = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
    if missing:
        why.append(f"{missing} run(s) never reached the target and are left out")
    p["anomaly"] = "; ".join(w for w in why if w)
    return p


def acc_gap(df: pd.DataFrame, series: str, ref: str, scenario: str = "none",
            batch: int | None = None) -> dict[str, Any]:
    """Final test accuracy of ``series`` minus ``ref``'s at equal epochs, in points: per
    trial against the same trial of ``ref`` (its median when ``ref`` ran fewer trials,
    e.g. a deterministic one-worker run), then median + CI."""
    r = runs(df)
    r = r[r["mode"] == scenario]
    if batch is not None:
        r = r[pd.to_numeric(r["batch_size"]) == batch]
    mine, base = r[r["series"] == series], r[r["series"] == ref]
    if not len(mine) or not len(base):
        return dict(median=math.nan, lo=math.nan, hi=math.nan, n=0, series=series, ref=ref)
    by_trial = base.set_index("trial")["test_acc"]
    ref_acc = mine["trial"].map(by_trial).fillna(float(by_trial.median()))
    diff = 100.0 * (mine["test_acc"].to_numpy(float) - ref_acc.to_numpy(float))
    med, lo, hi = analysis.median_ci(diff)
    p = dict(median=med, lo=lo, hi=hi, n=len(diff), series=series, ref=ref,
             host=str(mine["host"].iloc[0]), session=str(mine["session"].iloc[0]),
             config=str(mine["config"].iloc[0]), ref_acc=float(by_trial.median()),
             acc=float(np.median(mine["test_acc"])))
    p["anomaly"] = "" if len(diff) >= 3 else f"only {len(diff)} trial(s): no CI"
    return p


def staleness_distribution(df: pd.DataFrame, scenario: str, series: str) -> np.ndarray:
    """Fraction of applied updates at staleness 0, 1, 2, ... over every trial."""
    r = runs(df)
    r = r[(r["mode"] == scenario) & (r["series"] == series)]
    hist = np.asarray(add_histograms(r["staleness_hist"]) if len(r) else [], dtype=float)
    return hist / hist.sum() if hist.sum() else hist


def curve_points(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy against training seconds per scenario and series (latest session): at each
    evaluated step, the median accuracy with its CI and the median seconds."""
    if df is None or not len(df):
        return pd.DataFrame()
    d = analysis.latest_session(df)
    e = d[d["kind"] == "eval"].copy()
    if not len(e):
        return pd.DataFrame()
    e["series"] = [series_name(s, m) for s, m in zip(e["strategy"], e["momentum_mode"],
                                                      strict=True)]
    out = []
    for (mode, series, batch, step), g in e.groupby(["mode", "series", "batch_size", "step"],
                                                    sort=True):
        med, lo, hi = analysis.median_ci(g["test_acc"])
        out.append(dict(mode=mode, series=series, batch_size=int(batch), step=int(step),
                        wall_s=float(np.median(g["wall_s"])), median=med, lo=lo, hi=hi,
                        n=len(g)))
    return pd.DataFrame(out)


def flag(df: pd.DataFrame) -> pd.DataFrame:
    """Run rows get the anomalies of their time-to-target point."""
    out = df.copy()
    mask = (out["kind"] == "run").to_numpy()
    pts = tta_points(out)
    if not mask.any() or not len(pts):
        return out
    r = analysis.flag_rows(out[mask], pts, list(KEYS))
    out.loc[mask, "anomaly"] = r["anomaly"].to_numpy()
    return out


# --- tables and targets ---------------------------------------------------------------------

def scenario_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per series: the time to the target in each scenario (median [CI] s, and how
    much sooner than allreduce), and the accuracy at equal epochs with no straggler."""
    pts = tta_points(df)
    if not len(pts):
        return pd.DataFrame()
    scenarios = list(dict.fromkeys(pts["mode"]))
    rows = []
    for series in dict.fromkeys(pts["series"]):
        row: dict[str, Any] = {"strategy": series}
        for sc in scenarios:
            p = pts[(pts["series"] == series) & (pts["mode"] == sc)]
            if not len(p):
                row[sc] = "not run"
                continue
            p = p.iloc[0]
            txt = analysis.point_text(p["median"], p["lo"], p["hi"], "{:.1f}")
            if p["reached"] < p["n"]:
                txt = (txt + " " if txt else "") + f"({p['reached']}/{p['n']} reached)"
            if series != "allreduce" and p["reached"]:
                q = tta_ratio(df, sc, series)
                if np.isfinite(q["speedup"]):
                    txt += f", {q['speedup']:.2f}x"
            row[sc] = txt
        r = runs(df)
        acc = r[(r["series"] == series) & (r["mode"] == "none")]["test_acc"]
        row["test acc, no straggler"] = analysis.point_text(*analysis.median_ci(acc), "{:.4f}")
        rows.append(row)
    return pd.DataFrame(rows)


def momentum_table(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per HOGWILD momentum option and batch: accuracy minus one worker's (points)."""
    df = momentum_frame(frames)
    r = runs(df, latest=False)
    rows = []
    for b in sorted({int(v) for v in r["batch_size"]}) if len(r) else []:
        for series in sorted(s for s in set(r["series"]) if s.startswith("hogwild (")):
            g = acc_gap(df, series, "sequential", batch=b)
            if g["n"]:
                rows.append(dict(batch=b, option=series, gap=g["median"], lo=g["lo"],
                                 hi=g["hi"], n=g["n"], acc=g["acc"], sequential=g["ref_acc"]))
    return pd.DataFrame(rows)


def momentum_frame(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The no-straggler HOGWILD and one-worker runs of both parts (latest session of each):
    the scenarios part measures the scenarios' batch, the momentum part the others."""
    got = [analysis.latest_session(frames[k]) for k in ("stragglers_runs",
                                                        "stragglers_momentum")
           if frames.get(k) is not None and len(frames[k])]
    if not got:
        return pd.DataFrame()
    d = pd.concat(got, ignore_index=True, sort=False)
    d = d[(d["mode"] == "none") & d["strategy"].isin(["hogwild", "sequential"])]
    # one comparison across both parts, named by the sittings it draws on
    return d.assign(session="+".join(sorted(set(d["session"].astype(str)))))


def targets(frames: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """The issue's targets, measured: value, CI, threshold, met or by how much missed."""
    df = frames.get("stragglers_runs")
    r = runs(df)
    out = []
    # 1. staleness-aware async within 0.5 point of the synchronous server, no straggler
    gaps = [acc_gap(df, s, "param-server") for s in STALE] if len(r) else []
    gaps = [g for g in gaps if g["n"]]
    best = max(gaps, key=lambda g: g["median"]) if gaps else None
    out.append(_gap_target("stragglers_async_gap", "Staleness-aware async parameter server "
                           "minus synchronous, equal epochs, no straggler", best,
                           "the synchronous parameter server", r))
    # 2. the best HOGWILD momentum option within 0.5 point of one worker at every batch
    mt = momentum_table(frames)
    for b in sorted(set(mt["batch"])) if len(mt) else [32, 64]:
        m = mt[mt["batch"] == b] if len(mt) else mt
        best_m = m.loc[m["gap"].idxmax()].to_dict() if len(m) else None
        if best_m:
            best_m = dict(best_m, median=best_m["gap"], series=best_m["option"])
        out.append(_gap_target(f"stragglers_hogwild_gap_b{b}", f"Best HOGWILD momentum option "
                               f"minus one worker, equal epochs, batch {b}", best_m,
                               "one worker (sequential SGD)", runs(momentum_frame(frames),
                                                                   latest=False)))
    # 3. one worker 4x slower: the best remedy reaches the target >= 1.5x sooner
    ratios = [tta_ratio(df, "slow4x", s) for s in REMEDIES] if len(r) else []
    ratios = [q for q in ratios if np.isfinite(q["speedup"])]
    lab = "Time to the target accuracy, one worker 4x slower: best of async and backup " \
          "workers vs allreduce"
    if not ratios:
        out.append(dict(key="stragglers_slow4x_sooner", label=lab, value=math.nan))
    else:
        q = max(ratios, key=lambda q: q["speedup"])
        met = q["speedup"] >= SOONER
        miss = "met" if met else f"missed by {SOONER - q['speedup']:.2f}x"
        verdict = (f"{q['series']}, the best remedy: {q['speedup']:.2f}x sooner than allreduce "
                   f"(target >= {SOONER}x: {miss})")
        out.append(dict(key="stragglers_slow4x_sooner", label=lab, value=q["speedup"],
                        point=q, unit="x", value_col="speedup", verdict=verdict, met=met,
                        rows=r[r["mode"] == "slow4x"]))
    return out


def targets_table(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The targets for reading: what, the measured value with its CI, the verdict."""
    rows = []
    for t in targets(frames):
        p = t.get("point") or {}
        col = t.get("value_col", "median")
        lo, hi = (p.get("lo"), p.get("hi")) if col == "median" else (
            p.get("speedup_lo"), p.get("speedup_hi"))
        fmt = "{:+.2f}" if t.get("unit") == "points" else "{:.2f}"
        rows.append({"target": t["label"],
                     "measured": analysis.point_text(t["value"], *(
                         math.nan if v is None else v for v in (lo, hi)), fmt) or
                     "not measured", "unit": t.get("unit", ""),
                     "verdict": t.get("verdict", "not measured yet")})
    return pd.DataFrame(rows)


def _gap_target(key: str, label: str, p: dict[str, Any] | None, ref: str,
                rows: pd.DataFrame) -> dict[str, Any]:
    if not p or not np.isfinite(p.get("median", math.nan)):
        return dict(key=key, label=label, value=math.nan)
    met = p["median"] >= -GAP_POINTS
    miss = "" if met else f" by {-GAP_POINTS - p['median']:.2f} points"
    verdict = (f"{p['series']} vs {ref}: {p['median']:+.2f} points (target within "
               f"{GAP_POINTS} point: {'met' if met else 'missed'}{miss})")
    return dict(key=key, label=label, value=p["median"], point=p, unit="points",
                value_col="median", verdict=verdict, met=met, rows=rows)


# --- how long the family takes ----------------------------------------------------------------

#: Seconds on the 2-core reference VM (quiet; from earlier standard-scale rows): fixed start-up
#: of a fresh run (interpreter, imports, data, MPI or worker spawn), the quiet-host check
#: before each trial, training ms per sample on one core at a batch size, evaluation ms per
#: test sample (forward only, one core).
COSTS: dict[str, Any] = dict(startup_mpi=2.5, startup_hogwild=2.0, quiet_check=0.3,
                             sample_ms={16: 0.6, 32: 0.5, 64: 0.42, 128: 0.4}, eval_ms=0.14,
                             cores=2)


def slowdown(kind: str, scenario: str, step_ms: float, delay_ms: float) -> float:
    """How much longer a run takes than with no straggler (two workers): synchronous
    strategies wait for the slowest worker, a backup worker lets the fastest set the pace,
    the asynchronous ones share the work by speed (``--assign dynamic``)."""
    if scenario == "none" or kind == "one":
        return 1.0
    if scenario in ("slow2x", "slow4x"):
        f = float(scenario[4])
        return {"sync": f, "backup": 1.0}.get(kind, 2.0 / (1.0 + 1.0 / f))
    m = delay_ms / step_ms  # exponential delays: E[max of 2] = 1.5 m, E[min of 2] = 0.5 m
    return {"sync": 1 + 1.5 * m, "backup": 1 + 0.5 * m}.get(kind, 1 + m)


def kind_of(key: str) -> str:
    if key in ("allreduce", "param-server", "model-average"):
        return "sync"
    return {"param-server-backup": "backup", "sequential": "one"}.get(key, "async")


def estimate_seconds(p: Mapping[str, Any], runs_of: Mapping[str, Any],
                     costs: Mapping[str, Any] = COSTS) -> dict[str, float]:
    """Estimated seconds of each part at preset ``p`` (``runs_of``: part -> list of
    (strategy key, scenario, batch, processes, trainers, evaluations, runner, trials))."""
    n = (p["subset"] or 60000) * int(p["epochs"])
    out = {}
    for part, items in runs_of.items():
        total = 0.0
        for key, scenario, b, procs, trainers, evals, runner, trials in items:
            ms = costs["sample_ms"].get(int(b), 0.5)
            train = n * ms / 1e3 / min(trainers, costs["cores"])
            train *= slowdown(kind_of(key), scenario, ms * b, float(p["delay_ms"]))
            ev = evals * (p["test_subset"] or 10000) * costs["eval_ms"] / 1e3
            ev /= min(procs, costs["cores"]) if runner == "mpi" else 1
            start = costs["startup_mpi" if runner == "mpi" else "startup_hogwild"]
            start += costs["quiet_check"]  # run_interleaved's look at the host's load
            total += trials * (train + ev + start)
        out[part] = total
    out["total"] = sum(out.values())
    return out
