"""What the MPI family's rows say: speedup and efficiency points, the start-up
amortisation, accuracy against sequential, the compute/communication split and the cost
model's check and extrapolation. Pure functions of the saved frames (the measuring is in
`study.experiments.mpi`; the rules in `study.analysis`, docs/DESIGN.md "Numbers a reader
can trust").

How efficiency counts workers: ``workers`` = training ranks x threads. The parameter
servers' rank 0 serves and does not train, so a P-process server run has P - 1 workers,
and its efficiency is speedup / (P - 1); per process it would be speedup / P.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cnn.parallel import costmodel as cm
from study import analysis
from study.analysis import Headline

#: Timing strategies in the order they are drawn and listed.
STRATEGIES: tuple[str, ...] = ("allreduce", "allreduce-overlap", "param-server",
                               "async-param-server", "model-average")
#: Strategies whose rank 0 serves instead of training.
SERVERS: tuple[str, ...] = ("param-server", "async-param-server")
#: Strategies compared for accuracy (overlap is allreduce's arithmetic).
ACCURACY_STRATEGIES: tuple[str, ...] = ("allreduce", "param-server", "async-param-server",
                                        "model-average")
EFFICIENCY_NOTE = ("efficiency = speedup / workers, workers = training ranks x threads; "
                   "the parameter servers' rank 0 serves and does not train, so their "
                   "P-process runs count P - 1 workers (per process: speedup / P)")
#: A baseline is a one-worker run of one process: sequential or one MPI rank.
ONE_PROCESS = "processes == 1"
#: Speedup within this fraction of its steady-state value counts as amortised.
AMORTISED = 0.9
#: The family's results files (``results/<name>.pkl``), one per part.
SCALING, HYBRID, ACCURACY, COSTMODEL = ("mpi_scaling_runs", "mpi_hybrid_runs",
                                        "mpi_accuracy_runs", "mpi_costmodel_runs")
RESULTS: tuple[str, ...] = (SCALING, HYBRID, ACCURACY, COSTMODEL)


def trainers(strategy: str, processes: int) -> int:
    """Training ranks of a run: every rank, except the servers' rank 0."""
    return int(processes) - 1 if strategy in SERVERS else int(processes)


def current(df: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of the most recent session (`study.analysis.latest_session`)."""
    return analysis.latest_session(df)


# --- speedup and efficiency ------------------------------------------------------------

def scaling_points(df: pd.DataFrame, series: Sequence[str] = ("strategy",)) -> pd.DataFrame:
    """Speedup and efficiency (median, 95% CI) of every (series, workers) point against
    the best one-process one-worker run of its configuration and session, with the
    point's ``processes``, ``threads``, ``physical_cores`` and ``oversubscribed``."""
    if df is None or not len(df):
        return pd.DataFrame()
    series = list(series)
    pts = analysis.speedups(df, "samples_per_s", group=("host", "session", "config", "mode"),
                            series=series, baseline_query=ONE_PROCESS)
    pts["workers"] = pts["workers"].astype(int)
    keys = ["host", "session", "config", *series, "workers"]
    meta_cols = [c for c in ("processes", "threads", "physical_cores", "global_batch",
                             "batch_size") if c not in keys]
    meta = df.groupby(keys, sort=False)[meta_cols].max().reset_index()
    for c in [c for c in keys if c in meta]:
        meta[c] = meta[c].astype(pts[c].dtype)
    pts = pts.merge(meta, on=keys, how="left")
    pts["oversubscribed"] = pts["processes"] * pts["threads"] > pts["physical_cores"]
    over = [f"oversubscribed: {int(p)} processes x {int(t)} threads on {int(c)} physical "
            "cores (ranks share cores: not a scaling point)" if o else ""
            for p, t, c, o in pts[["processes", "threads", "physical_cores",
                                   "oversubscribed"]].itertuples(index=False)]
    served = [f"efficiency {e:.2f} > {analysis.SUPERLINEAR} counting training ranks only: "
              f"rank 0 serves on a core of its own (per process {s / p:.2f})"
              if name in SERVERS and np.isfinite(e) and e > analysis.SUPERLINEAR else ""
              for name, e, s, p in pts[["strategy", "efficiency", "speedup", "processes"]]
              .itertuples(index=False)] if "strategy" in pts else [""] * len(pts)
    pts["anomaly"] = ["; ".join(x for x in (a, v, o) if x) for a, v, o in zip(
        pts["anomaly"], served, over, strict=True)]
    return pts


def flag(df: pd.DataFrame, pts: pd.DataFrame, series: Sequence[str] = ("strategy",)
         ) -> pd.DataFrame:
    """``df`` with each point's anomaly (oversubscription included) copied onto its rows."""
    if not len(pts):
        return df
    return analysis.flag_rows(df, pts, ["host", "session", "config", *series, "workers"])


def largest_fitting(pts: pd.DataFrame) -> pd.DataFrame:
    """Per (session, mode, strategy): the point at the most processes that fit the
    physical cores (at least 2 processes)."""
    if not len(pts):
        return pts
    ok = pts[~pts["oversubscribed"] & (pts["processes"] >= 2)]
    if not len(ok):
        return ok
    idx = ok.groupby(["host", "session", "mode", "strategy"], sort=False)["processes"].idxmax()
    return ok.loc[idx.to_numpy()].reset_index(drop=True)


def scaling_table(df: pd.DataFrame, series: Sequence[str] = ("strategy",)) -> pd.DataFrame:
    """The current session's points as a readable table (speedup and efficiency with CIs)."""
    pts = scaling_points(current(df), series)
    if not len(pts):
        return pts
    fmt = analysis.FORMATS
    out = pts[["mode", *series, *[c for c in ("processes", "threads") if c not in series],
               "workers"]].copy()
    out["samples/s"] = [fmt["samples/s"].format(v) for v in pts["median"]]
    out["speedup"] = [ci_text(m, lo, hi, "x") for m, lo, hi in pts[
        ["speedup", "speedup_lo", "speedup_hi"]].itertuples(index=False)]
    out["efficiency"] = [ci_text(m, lo, hi, "%") for m, lo, hi in pts[
        ["efficiency", "efficiency_lo", "efficiency_hi"]].itertuples(index=False)]
    out["trials"] = pts["n"]
    out["baseline"] = pts["baseline"]
    out["anomaly"] = pts["anomaly"]
    return out.reset_index(drop=True)


def ci_text(value: float, lo: float, hi: float, unit: str) -> str:
    """``value [lo, hi]`` in the unit's format, as the headlines print it."""
    return analysis.point_text(value, lo, hi, analysis.FORMATS[unit])


# --- fixed costs: how many steps amortise start-up ------------------------------------------

def run_time(df: pd.DataFrame, steps: float) -> pd.Series:
    """Modelled wall time of a run of ``steps`` steps per worker from its measured parts:
    start-up + first step (JIT) + (steps - 1) steady steps."""
    mean = df["wall_s"] / (df["step"] - 1)
    return df["startup_s"] + df["first_step_s"] + (steps - 1) * mean


def amortisation(df: pd.DataFrame | None, steps: Sequence[int]) -> pd.DataFrame:
    """Speedup (with CI) of whole runs of ``steps`` steps per worker, start-up included,
    against the best one-process run of the same length: how much work per worker a
    strategy needs before its steady-state speedup shows."""
    if df is None or not len(df):
        return pd.DataFrame()
    base = df[pd.to_numeric(df["step"]) > 1]
    out = []
    for s in steps:
        d = base.copy()
        d["samples_per_s"] = d["global_batch"] * s / run_time(d, s)
        p = scaling_points(d)
        if len(p):
            p["steps_per_worker"] = int(s)
            out.append(p)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def amortisation_table(df: pd.DataFrame, steps: Sequence[int]) -> pd.DataFrame:
    """At the largest P that fits the cores: speedup of whole runs by steps per worker,
    the steady-state speedup, and the first listed length reaching 90% of it."""
    df = current(df)
    steady = largest_fitting(scaling_points(df))
    am = amortisation(df, steps)
    if not len(steady) or not len(am):
        return pd.DataFrame()
    rows = []
    for p in steady.itertuples(index=False):
        g = am[(am["mode"] == p.mode) & (am["strategy"] == p.strategy)
               & (am["workers"] == p.workers)].sort_values("steps_per_worker")
        row: dict[str, Any] = {"mode": p.mode, "strategy": p.strategy,
                               "processes": int(p.processes), "workers": int(p.workers)}
        for s, v in zip(g["steps_per_worker"], g["speedup"], strict=True):
            row[f"{s} steps"] = round(float(v), 2)
        row["steady"] = round(float(p.speedup), 2)
        reached = g[g["speedup"] >= AMORTISED * p.speedup]["steps_per_worker"]
        row[f"steps to {AMORTISED:.0%} of steady"] = (int(reached.iloc[0]) if len(reached)
                                                       else f"> {max(steps)}")
        sel = df[(df["strategy"] == p.strategy) & (df["workers"] == p.workers)
                 & (df["mode"] == p.mode)]
        row["startup_s"] = float(sel["startup_s"].median())
        row["first_step_s"] = float(sel["first_step_s"].median())
        rows.append(row)
    return pd.DataFrame(rows)


# --- compute and communication ------------------------------------------------------------

def comm_split(df: pd.DataFrame) -> pd.DataFrame:
    """Per (mode, strategy) at the largest P that fits the cores, and the mode's baseline
    (best one-process run): steady step time (median, CI), its compute and communication."""
    df = current(df)
    if not len(df):
        return pd.DataFrame()
    top = largest_fitting(scaling_points(df))
    keep = pd.Series(False, index=df.index)
    for p in top.itertuples(index=False):
        keep |= ((df["mode"] == p.mode) & (df["strategy"] == p.strategy)
                 & (df["processes"] == p.processes))
        keep |= (df["mode"] == p.mode) & (df["strategy"] == p.baseline) & (
            df["processes"] == 1)
    d = df[keep & (df["step"] > 1)].copy()
    d["step_ms"] = d["wall_s"] / (d["step"] - 1) * 1e3
    d["comm_ms"] = d["comm_s"].fillna(0.0) / d["step"] * 1e3
    rows = []
    for (mode, strategy, procs), g in d.groupby(["mode", "strategy", "processes"], sort=False):
        med, lo, hi = analysis.median_ci(g["step_ms"])
        comm = float(np.median(g["comm_ms"]))
        rows.append({"mode": mode, "strategy": strategy, "processes": int(procs),
                     "workers": int(g["workers"].iloc[0]), "step_ms": med, "lo": lo, "hi": hi,
                     "comm_ms": comm, "compute_ms": max(med - comm, 0.0),
                     "comm_share": comm / med if med else math.nan, "n": len(g)})
    return pd.DataFrame(rows)


# --- accuracy at equal epochs ------------------------------------------------------------

def accuracy_points(df: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: final test accuracy (median, CI over seeds) and its difference from
    sequential in points, paired by seed (``trial``), with CI."""
    df = current(df)
    if not len(df):
        return pd.DataFrame()
    key = ["session", "config", "strategy", "trial"]
    diverged = df[df["anomaly"].astype(str).str.startswith("diverged")]
    lost = diverged.groupby(["host", "session", "config", "strategy"]).size().to_dict()
    last = pd.concat([df[df["epoch"] == df.groupby(key)["epoch"].transform("max")], diverged])
    seq = last[last["strategy"] == "sequential"].set_index(["session", "config", "trial"])
    rows = []
    for (host, session, config, strategy), g in last.groupby(
            ["host", "session", "config", "strategy"], sort=False):
        k = int(lost.get((host, session, config, strategy), 0))
        g = g[~g["anomaly"].astype(str).str.startswith("diverged")]
        paired = [(a, seq.loc[(session, config, t), "test_acc"]) for a, t in zip(
            g["test_acc"], g["trial"], strict=True) if (session, config, t) in seq.index]
        diffs = [100.0 * (a - float(np.asarray(b).ravel()[0])) for a, b in paired]
        med, lo, hi = analysis.median_ci(diffs)
        acc, alo, ahi = analysis.median_ci(g["test_acc"])
        n = len(diffs)
        flags = [f"only {n} seed(s): no confidence interval"] if n < 3 else []
        if k:
            flags.insert(0, f"diverged (NaN loss) in {k} of {n + k} seed(s) at this learning "
                            "rate; the accuracy is over the runs that did not")
        row = {"host": host, "session": session, "config": config, "strategy": strategy,
               "processes": int(diverged_or(g, diverged, strategy, "processes")),
               "workers": int(diverged_or(g, diverged, strategy, "workers")),
               "epochs": float(g["epoch"].max()) if len(g) else float("nan"),
               "test_acc": acc, "acc_lo": alo, "acc_hi": ahi, "median": med, "lo": lo,
               "hi": hi, "n": n, "diverged": k, "anomaly": "; ".join(flags)}
        if "staleness_mean" in g:
            row["staleness_mean"] = float(pd.to_numeric(g["staleness_mean"]).median())
        rows.append(row)
    return pd.DataFrame(rows)


def diverged_or(g: pd.DataFrame, diverged: pd.DataFrame, strategy: str, col: str) -> float:
    """``col`` of a strategy's runs, from its diverged rows when every run diverged."""
    src = g if len(g) else diverged[diverged["strategy"] == strategy]
    return float(src[col].iloc[0])


def accuracy_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy by epoch per strategy: median and CI over seeds."""
    df = current(df)
    return analysis.points(df, ["strategy", "epoch"], "test_acc") if len(df) else df


# --- the cost model ------------------------------------------------------------------------

@dataclass(frozen=True)
class CostModel:
    """Hockney latency/bandwidth, the fitted compute line, the gradient's size and how
    latency and bandwidth were fitted."""

    alpha: float
    beta: float
    compute: cm.Compute
    nbytes: int
    method: str = "calibrate"


def fit_costmodel(df: pd.DataFrame | None) -> CostModel | None:
    """Calibrate on the current session's ping-pong rows and fit C(b) on its compute rows
    (medians over trials of each size); None when either is missing.

    `cnn.parallel.costmodel.calibrate` (latency from small messages, bandwidth from a
    line through the large ones) first; when noise leaves the large messages without a
    bandwidth, a relative least-squares fit over every size (``fit_hockney``), named in
    ``method``. ValueError when neither fits: the message says why.
    """
    df = current(df)
    if not len(df):
        return None
    pp = df[(df["experiment"] == "mpi_comm") & (df["strategy"] == "pingpong")]
    comp = df[df["experiment"] == "mpi_compute"]
    if not len(pp) or not len(comp):
        return None
    pp = pp.groupby("bytes", as_index=False)["time_s"].median()
    method = "calibrate"
    try:
        alpha, beta = cm.calibrate(pp)
    except ValueError as first:
        method = f"fit_hockney over every size ({first})"
        try:
            alpha, beta = cm.fit_hockney(pp["bytes"], pp["time_s"])
        except ValueError as exc:
            raise ValueError(f"the ping-pong times of session {df['session'].iloc[0]} fit no "
                             f"latency/bandwidth model ({first}; over every size: {exc}): "
                             "re-measure on a quieter machine or with more repeats") from None
    c = comp.groupby("batch_size", as_index=False)["time_min_s"].median()
    compute = cm.Compute.fit(c["batch_size"], c["time_min_s"])
    return CostModel(alpha, beta, compute, int(comp["bytes"].iloc[0]), method)


def unfitted(exc: Exception) -> pd.DataFrame:
    """The one-row frame that says why the cost model could not be fitted."""
    return pd.DataFrame({"why": [str(exc)]})


def costmodel_check(costmodel_df: pd.DataFrame, scaling_df: pd.DataFrame | None = None
                    ) -> pd.DataFrame:
    """The model against measurements: every measured Allreduce (``kind`` allreduce) and,
    with scaling rows, every steady step of allreduce, the parameter server and the
    one-process runs (``kind`` step). Measured median and CI over trials, modelled time,
    relative error (predicted - measured) / measured. A model that cannot be fitted gives
    one ``why`` row instead (`unfitted`)."""
    try:
        model = fit_costmodel(costmodel_df)
    except ValueError as exc:
        return unfitted(exc)
    if model is None:
        return pd.DataFrame()
    a, b = model.alpha, model.beta
    rows = []
    comm = current(costmodel_df)
    ar = comm[(comm["experiment"] == "mpi_comm") & (comm["strategy"] == "allreduce")]
    for (procs, nbytes), g in ar.groupby(["processes", "bytes"]):
        med, lo, hi = analysis.median_ci(g["time_s"])
        rows.append({"kind": "allreduce", "mode": "", "strategy": "allreduce",
                     "processes": int(procs), "batch_size": 0, "bytes": float(nbytes),
                     "time_s": med, "lo": lo, "hi": hi, "n": len(g),
                     "predicted_s": cm.ring_allreduce_time(nbytes, int(procs), a, b)})
    steps = pd.DataFrame()
    if scaling_df is not None and len(scaling_df):
        # only the steps of the sitting the model was calibrated in: another sitting's
        # compute speed drifts by as much as the model's error (study/sittings.py)
        steps = scaling_df[scaling_df["session"].isin(set(comm["session"]))]
    if len(steps):
        d = steps[steps["strategy"].isin(["sequential", "allreduce", "param-server"])
                  & (steps["step"] > 1)].copy()
        d["step_s"] = d["wall_s"] / (d["step"] - 1)
        for (mode, strategy, procs, batch), g in d.groupby(
                ["mode", "strategy", "processes", "batch_size"], sort=False):
            model_strategy = "param-server" if strategy == "param-server" else "allreduce"
            pred = cm.step_time(model.compute, batch, int(procs), model.nbytes, a, b,
                                model_strategy)
            med, lo, hi = analysis.median_ci(g["step_s"])
            rows.append({"kind": "step", "mode": mode, "strategy": strategy,
                         "processes": int(procs), "batch_size": int(batch),
                         "bytes": float(model.nbytes), "time_s": med, "lo": lo, "hi": hi,
                         "n": len(g), "predicted_s": pred})
    out = pd.DataFrame(rows)
    if len(out):
        out["rel_error"] = (out["predicted_s"] - out["time_s"]) / out["time_s"]
    return out


def extrapolation(costmodel_df: pd.DataFrame, batch_per_rank: int = 64,
                  global_batch: int = 4096) -> pd.DataFrame:
    """Modelled allreduce efficiency at 16..1024 ranks: this host's measured shared
    memory and the stated interconnects of `cnn.parallel.costmodel.NETWORKS` (one ``why``
    row when the model cannot be fitted)."""
    try:
        model = fit_costmodel(costmodel_df)
    except ValueError as exc:
        return unfitted(exc)
    if model is None:
        return pd.DataFrame()
    nets = {"shm": cm.Network("shared memory (this host, measured)", model.alpha, model.beta),
            **cm.NETWORKS}
    return cm.extrapolate(model.compute, model.nbytes, nets, batch_per_rank=batch_per_rank,
                          global_batch=global_batch)


# --- headlines -------------------------------------------------------------------------------

def scaling_headlines(df: pd.DataFrame | None) -> list[Headline]:
    """Each strategy's weak and strong efficiency at the largest P that fits the cores."""
    df = current(df)
    top = largest_fitting(scaling_points(df)) if len(df) else pd.DataFrame()
    out = []
    for mode in ("weak", "strong"):
        for strategy in STRATEGIES:
            key = f"mpi_{mode}_{strategy}"
            label = (f"MPI {strategy} {mode}-scaling efficiency at the largest P that fits "
                     "the cores")
            hit = top[(top["mode"] == mode) & (top["strategy"] == strategy)] if len(top) else top
            if not len(hit):
                why = (f"results/{SCALING}.pkl has no rows yet: run notebooks/"
                       "04_mpi_data_parallel.ipynb" if not len(df) else
                       "no run of it with 2 or more processes within the physical cores")
                out.append(analysis.not_measured(key, label, why))
                continue
            p = hit.iloc[0]
            if int(p["workers"]) < 2:
                out.append(analysis.not_measured(key, label, (
                    f"at P = {int(p['processes'])} (the cores) rank 0 serves, leaving "
                    f"{int(p['workers'])} training worker: no parallel efficiency to report; "
                    "it needs 3 or more cores (notebook 04 shows the one-worker point)")))
                continue
            rows = df[(df["config"] == p["config"]) & (df["session"] == p["session"])]
            counted = (EFFICIENCY_NOTE if strategy in SERVERS else
                       "efficiency = speedup / workers (training ranks x threads)")
            note = (f"P = {int(p['processes'])} processes, {int(p['workers'])} worker(s), "
                    f"against the best one-process run ({p['baseline']}); {counted}")
            h = analysis.headline_from_point(key, label, p, "%", value="efficiency",
                                             source=f"results/{SCALING}.pkl", rows=rows, note=note)
            h.extra = {"strategy": strategy, "mode": mode, "processes": int(p["processes"]),
                       "workers": int(p["workers"]), "speedup": float(p["speedup"])}
            out.append(h)
    return out


def accuracy_headlines(df: pd.DataFrame | None) -> list[Headline]:
    """Each strategy's final test accuracy minus sequential's, in points, at equal epochs."""
    df = current(df)
    pts = accuracy_points(df) if len(df) else pd.DataFrame()
    out = []
    for strategy in ACCURACY_STRATEGIES:
        key = f"mpi_accuracy_{strategy}"
        label = f"MPI {strategy} test accuracy minus sequential at equal epochs"
        hit = pts[pts["strategy"] == strategy] if len(pts) else pts
        if not len(hit):
            out.append(analysis.not_measured(key, label, f"results/{ACCURACY}.pkl has no "
                                             f"{strategy} rows yet"))
            continue
        p = hit.iloc[0]
        rows = df[(df["config"] == p["config"]) & (df["session"] == p["session"])]
        h = analysis.headline_from_point(
            key, label, p, "points", value="median", source=f"results/{ACCURACY}.pkl", rows=rows,
            note=f"paired by seed over {int(p['n'])} seed(s), {int(p['workers'])} training "
                 f"ranks, {p['epochs']:g} epochs; accuracy {p['test_acc']:.2%}"
                 + (f"; diverged in {int(p['diverged'])} seed(s)" if p.get("diverged") else ""))
        out.append(h)
    return out


def costmodel_headlines(costmodel_df: pd.DataFrame | None,
                        scaling_df: pd.DataFrame | None = None) -> list[Headline]:
    """How well the calibrated model predicts the measured allreduce steps (median |error|
    with CI over the measured points), and what it extrapolates to: weak-scaling
    efficiency at 1024 ranks on EDR InfiniBand (a model number, labelled so)."""
    label_err = "Cost model: median |error| of modelled allreduce steps against measured ones"
    label_ext = "Cost model: modelled allreduce weak-scaling efficiency at 1024 ranks (EDR IB)"
    check = costmodel_check(costmodel_df, scaling_df) if costmodel_df is not None else (
        pd.DataFrame())
    if not len(check) or "why" in check:
        why = (check["why"].iloc[0] if "why" in check else
               f"results/{COSTMODEL}.pkl has no rows yet: run notebooks/04_mpi_data_parallel.ipynb")
        return [analysis.not_measured("costmodel_step_error", label_err, why),
                analysis.not_measured("costmodel_weak_1024_ib", label_ext, why)]
    rows = current(costmodel_df)
    meta = dict(source=f"results/{COSTMODEL}.pkl", scale=",".join(sorted(set(
        rows["scale"].astype(str)))), session=str(rows["session"].iloc[0]),
        host=str(rows["host"].iloc[0]), cpu=str(rows["cpu"].iloc[0]))
    quick = "" if meta["scale"] in ("standard", "full") else (
        f"{meta['scale']}-scale rows in a standard headline")
    steps = check[(check["kind"] == "step") & (check["strategy"] == "allreduce")
                  & (check["processes"] >= 2)]
    out = []
    if len(steps):
        med, lo, hi = analysis.median_ci(steps["rel_error"].abs())
        out.append(Headline("costmodel_step_error", label_err, med, lo, hi, "error",
                            config="allreduce steady steps at P >= 2, weak and strong",
                            trials=len(steps), anomaly=quick,
                            note="the model has no term for ranks slowing each other's "
                                 "compute on one host", **meta))
    else:
        out.append(analysis.not_measured(
            "costmodel_step_error", label_err,
            f"no allreduce scaling steps with P >= 2 from the sitting the model was "
            f"calibrated in ({meta['session']}): run the scaling and cost-model parts of "
            f"notebook 04 together"))
    ext = extrapolation(costmodel_df)
    hit = ext[(ext["network"] == "IB-100G") & (ext["processes"] == 1024)] if len(ext) else ext
    if len(hit):
        out.append(Headline("costmodel_weak_1024_ib", label_ext,
                            float(hit["weak_efficiency"].iloc[0]), unit="modelled %",
                            config="64 per rank, seed CNN gradient, this host's compute",
                            anomaly=quick, note="modelled, not measured: "
                                                + cm.NETWORKS["IB-100G"].note, **meta))
    return out


def headlines(frames: Mapping[str, pd.DataFrame]) -> list[Headline]:
    """The family's numbers for the README and the report."""
    return [*scaling_headlines(frames.get(SCALING)), *accuracy_headlines(frames.get(ACCURACY)),
            *costmodel_headlines(frames.get(COSTMODEL), frames.get(SCALING))]


def headline_table(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The headlines as a table: label, value with CI, configuration, anomaly, note."""
    return pd.DataFrame([{"headline": h.label, "value": h.text(), "config": h.config,
                          "scale": h.scale, "anomaly": h.anomaly, "note": h.note}
                         for h in headlines(frames)])
