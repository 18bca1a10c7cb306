"""Asynchronous k-fold (notebook 05): folds on ipyparallel engines against serial folds.

Parts (``python -m study.experiments.kfold --scale quick --parts work``):

``engines`` -> results/kfold_runs.pkl
    The seed point (the preset's subset and epochs): serial folds in one process
    (``python -m study.kfold_serial``) and the folds on E = 1, 2, ... engines
    (``python -m cnn.parallel.kfold --engines E``), every run a fresh process, trials
    interleaved. Speedup against the best one-worker run (serial or one engine), on the
    training wall time and end to end (engine start-up included); per-core CPU
    utilisation; per-fold accuracies checked identical to the serial run's
    (`study.checks.compare`, recorded in ``fold_acc_match`` / ``fold_acc_rel_err``).
``work`` -> results/kfold_work.pkl
    The same at the preset's other (subset, epochs) points: where does the work per engine
    amortise the engines' start-up (speedup against work per engine)?

Rows: one per fold (``kind == "fold"``) and one per run (``kind == "run"``). Rules:
docs/DESIGN.md, "Numbers a reader can trust".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from study import analysis, paths, schema
from study.affinity import usable_cores
from study.checks import compare
from study.config import DEFAULT_SCALE, preset
from study.experiments import chosen_parts, cli, load_saved, save_part
from study.measure import Plan, new_session, python_module, run_cli, run_interleaved

RESULTS: tuple[str, ...] = ("kfold_runs", "kfold_work")
PARTS: tuple[str, ...] = ("engines", "work")
EXPERIMENT = {"engines": "kfold", "work": "kfold_work"}
#: The seed study's training settings, equal for every run compared here.
TRAINING: dict[str, Any] = dict(model="seed_cnn", lr=0.05, momentum=0.9, schedule="cosine",
                                seed=0)
#: Speedup on what: the folds' wall time, or the whole process (start-up included).
MEASURES = {"training": "wall_s", "end to end": "process_wall_s"}
KEYS = ("host", "session", "config", "strategy", "workers")


# --- plans (pure) ------------------------------------------------------------------------

def config_label(p: Mapping[str, Any], subset: int | None, epochs: int) -> str:
    """The configuration a speedup is taken within: equal for serial and every E."""
    return (f"{p['dataset']}/{subset or 'all'}, {p['folds']} folds x {int(epochs)} epochs, "
            f"batch {p['batch_size']}, {p['backend']} 1 thread/engine")


def seed_point(p: Mapping[str, Any]) -> tuple[int | None, int]:
    return (p["subset"], int(p["epochs"]))


def seed_config(scale: str = DEFAULT_SCALE) -> str:
    p = preset("kfold", scale)
    return config_label(p, *seed_point(p))


def work_points(p: Mapping[str, Any]) -> list[tuple[int | None, int]]:
    """The sweep's (subset, epochs) points other than the seed point (measured apart)."""
    return [(s, int(e)) for s, e in p["work"] if (s, int(e)) != seed_point(p)]


def label(cfg: Mapping[str, Any]) -> str:
    who = "serial" if cfg["strategy"] == "sequential" else f"{cfg['engines']} engine(s)"
    return f"{who}, {cfg['subset'] or 'all'} x {cfg['epochs']} ep"


def plan(p: Mapping[str, Any], points: Sequence[tuple[int | None, int]], cores: int) -> Plan:
    """Serial and every engine count that fits the cores, at each (subset, epochs) point."""
    configs = []
    for subset, epochs in points:
        configs.append(dict(strategy="sequential", engines=0, subset=subset, epochs=epochs))
        configs += [dict(strategy="kfold", engines=int(e), subset=subset, epochs=epochs)
                    for e in p["engines"] if int(e) <= cores]
    return Plan(configs, [label(c) for c in configs])


def command(p: Mapping[str, Any], cfg: Mapping[str, Any], experiment: str) -> list[str]:
    """The run's CLI: the k-fold CLI for engines, the serial launcher for serial folds."""
    args = ["--backend", str(p["backend"]), "--threads", "1", "--model", TRAINING["model"],
            "--dataset", str(p["dataset"]), "--epochs", str(cfg["epochs"]),
            "--folds", str(p["folds"]), "--batch-size", str(p["batch_size"]),
            "--lr", str(TRAINING["lr"]), "--momentum", str(TRAINING["momentum"]),
            "--schedule", TRAINING["schedule"], "--seed", str(TRAINING["seed"]),
            "--cpu-interval", str(p["cpu_interval"]), "--experiment", experiment]
    if cfg.get("subset"):
        args += ["--subset", str(cfg["subset"])]
    if cfg["strategy"] == "sequential":
        return python_module("study.kfold_serial", *args)
    return python_module("cnn.parallel.kfold", *args, "--engines", str(cfg["engines"]),
                         "--timeout", str(p["timeout_s"]))


# --- one run -------------------------------------------------------------------------------

def tidy(raw: pd.DataFrame, cfg: Mapping[str, Any], config: str, experiment: str
         ) -> pd.DataFrame:
    """A CLI's fold and run rows as study rows (schema columns only)."""
    df = raw.copy()
    df["experiment"] = experiment
    df["config"] = config
    df["workers"] = max(1, int(cfg["engines"]))
    return df[[c for c in df.columns if c in schema.COLUMNS]]


def measure_one(p: Mapping[str, Any], cfg: Mapping[str, Any], experiment: str) -> pd.DataFrame:
    raw = run_cli(command(p, cfg, experiment), timeout=float(p["timeout_s"]), what=label(cfg))
    return tidy(raw, cfg, config_label(p, cfg["subset"], cfg["epochs"]), experiment)


# --- analysis (pure functions of frames) --------------------------------------------------

def runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "run"] if len(df) and "kind" in df else df.iloc[0:0]


def _fold_accs(df: pd.DataFrame, run: pd.Series) -> np.ndarray:
    sel = (df["kind"] == "fold") & np.logical_and.reduce(
        [df[c].astype(str) == str(run[c]) for c in ("session", "config", "trial", "strategy")])
    sel &= pd.to_numeric(df["workers"]) == float(run["workers"])
    return df[sel].sort_values("fold")["test_acc"].to_numpy(np.float64)


def check_folds(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's per-fold accuracies against the serial run of the same session and
    configuration (same trial when there is one): ``fold_acc_rel_err``, ``fold_acc_match``,
    and an anomaly when they differ (same seeds must give the same folds anywhere)."""
    out = df.copy()
    out["fold_acc_rel_err"] = math.nan
    out["fold_acc_match"] = None
    r = runs(out)
    for i, run in r.iterrows():
        serial = r[(r["session"] == run["session"]) & (r["config"] == run["config"])
                   & (r["strategy"] == "sequential")]
        if not len(serial):
            continue
        same = serial[serial["trial"] == run["trial"]]
        want = _fold_accs(out, (same if len(same) else serial).iloc[0])
        check = compare(_fold_accs(out, run), want, name="per-fold accuracy")
        out.at[i, "fold_acc_rel_err"] = check.rel_err
        out.at[i, "fold_acc_match"] = bool(check.ok)
        if not check.ok:
            note = f"per-fold accuracies differ from the serial run's ({check.line()})"
            out.at[i, "anomaly"] = "; ".join(x for x in (str(out.at[i, "anomaly"] or ""),
                                                         note) if x)
    return out


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Per point: wall time median + CI and speedup against the best one-worker run
    (serial or one engine), on training time and end to end (``measure`` column)."""
    r = runs(df)
    if not len(r):
        return pd.DataFrame()
    frames = []
    for measure, col in MEASURES.items():
        if col not in r or not pd.to_numeric(r[col]).notna().any():
            continue
        pts = analysis.speedups(r, col, higher_is_better=False)
        pts.insert(0, "measure", measure)
        frames.append(pts)
    pts = pd.concat(frames, ignore_index=True)
    samples = r.groupby("config")["samples"].median()
    pts["samples"] = pts["config"].map(samples)
    pts["work_per_worker"] = pts["samples"] / pts["workers"]
    return pts


def flag(df: pd.DataFrame) -> pd.DataFrame:
    """Run rows get the anomalies of their training-time point and the fold check."""
    out = check_folds(df)
    mask = (out["kind"] == "run").to_numpy()
    pts = speedups(out)
    if mask.any() and len(pts):
        r = analysis.flag_rows(out[mask], pts[pts["measure"] == "training"], KEYS)
        out.loc[mask, "anomaly"] = r["anomaly"].to_numpy()
    return out


def work_curve(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Speedup against work per engine: the seed point (kfold_runs) and the sweep
    (kfold_work), latest session of each, both measures."""
    parts = [analysis.latest_session(frames[n]) for n in RESULTS
             if n in frames and len(frames[n])]
    if not parts:
        return pd.DataFrame()
    pts = pd.concat([speedups(d) for d in parts], ignore_index=True)
    return pts.sort_values(["measure", "workers", "work_per_worker"]).reset_index(drop=True)


def speedup_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per run type of the latest session: wall time, speedup (training and end
    to end), start-up, per-core utilisation, fold check; medians with 95% CIs."""
    d = analysis.latest_session(df)
    pts = speedups(d)
    if not len(pts):
        return pd.DataFrame()
    r = runs(d)
    rows = []
    for (config, strategy, w), g in pts.groupby(["config", "strategy", "workers"], sort=False):
        sel = ((r["config"] == config) & (r["strategy"] == strategy)
               & (pd.to_numeric(r["workers"]) == w))
        rr = r[sel]
        tr = g[g["measure"] == "training"].iloc[0]
        e2e = g[g["measure"] == "end to end"]
        run = "serial" if strategy == "sequential" else f"{int(w)} engine(s)"
        row = {"config": config, "run": run, "workers": int(w),
               "wall s": analysis.point_text(tr["median"], tr["lo"], tr["hi"], "{:.2f}"),
               "speedup": analysis.point_text(tr["speedup"], tr["speedup_lo"],
                                              tr["speedup_hi"], "{:.2f}")}
        if len(e2e):
            e = e2e.iloc[0]
            row["speedup end to end"] = analysis.point_text(e["speedup"], e["speedup_lo"],
                                                            e["speedup_hi"], "{:.2f}")
        row["startup s"] = analysis.point_text(*analysis.median_ci(rr["startup_s"]), "{:.1f}")
        if "cpu_busy_min" in rr:
            row["least busy core %"] = analysis.point_text(
                *analysis.median_ci(rr["cpu_busy_min"]), "{:.0f}")
        if "cpu_own_mean" in rr:
            row["own CPU % of 1 core"] = analysis.point_text(
                *analysis.median_ci(rr["cpu_own_mean"]), "{:.0f}")
        if "fold_acc_match" in rr:
            row["folds = serial"] = bool(rr["fold_acc_match"].fillna(False).astype(bool).all())
        row["anomaly"] = tr["anomaly"]
        rows.append(row)
    return pd.DataFrame(rows)


def fold_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-fold held-out accuracy of the latest session's first trial, one column per run
    (serial, E engines), for the seed configuration (or the first one)."""
    d = analysis.latest_session(df)
    folds = d[d["kind"] == "fold"] if len(d) else d
    if not len(folds):
        return pd.DataFrame()
    folds = folds[(folds["config"] == folds["config"].iloc[0])
                  & (folds["trial"] == folds["trial"].min())]
    run = np.where(folds["strategy"] == "sequential", "serial",
                   folds["workers"].astype(int).astype(str) + " engine(s)")
    table = folds.assign(run=run).pivot_table(index="fold", columns="run", values="test_acc",
                                              aggfunc="first")
    table = table[sorted(table.columns, key=lambda c: (c != "serial", c))]
    table.index = [f"fold {int(k)}" for k in table.index]
    table.columns.name = None
    return table


def cpu_trace(df: pd.DataFrame) -> pd.DataFrame:
    """The per-core samples of one trial per run type (latest session, seed config):
    rows with ``run``, ``cpu_times``, ``cpu_samples``, ``wall_s``, ``cpu_busy``."""
    r = runs(analysis.latest_session(df))
    if not len(r) or "cpu_samples" not in r:
        return pd.DataFrame()
    r = r[(r["config"] == r["config"].iloc[0]) & (r["trial"] == r["trial"].min())]
    r = r.assign(run=np.where(r["strategy"] == "sequential", "serial",
                              r["workers"].astype(int).astype(str) + " engine(s)"))
    return r[["run", "workers", "cpu_times", "cpu_samples", "wall_s", "cpu_busy"]
             ].reset_index(drop=True)


# --- the family contract -------------------------------------------------------------------

def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    """Measure the chosen parts (interleaved trials), check and flag, validate and save."""
    p = preset("kfold", scale)
    chosen = chosen_parts("kfold", parts, PARTS)
    cores = len(usable_cores())
    session = new_session()
    out: dict[str, pd.DataFrame] = {}
    for part in chosen:
        points = [seed_point(p)] if part == "engines" else work_points(p)
        pl = plan(p, points, cores)
        if not pl.configs:
            continue
        experiment = EXPERIMENT[part]
        if log:
            log(f"{experiment}: {len(pl.configs)} configurations x {p['trials']} trial(s), "
                f"interleaved ({cores} usable cores)")
        raw = run_interleaved(pl, partial(measure_one, p, experiment=experiment),
                              int(p["trials"]), quiet=scale != "quick", log=log)
        name = RESULTS[PARTS.index(part)]
        out[name] = save_part(raw, name, scale, session, flag)
    return out


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    return load_saved(RESULTS, scale)


def headlines(frames: Mapping[str, pd.DataFrame]) -> list[analysis.Headline]:
    """k-fold on 2 engines against the best one-worker run at the seed configuration, on
    the folds' wall time and end to end (engine start-up included)."""
    df = frames.get(RESULTS[0])
    scale = str(df["scale"].iloc[0]) if df is not None and len(df) else "standard"
    source = paths.shown(schema.path_of(RESULTS[0], scale))
    why = f"{source} not found: run notebook 05 (study.experiments.kfold)"
    d = analysis.latest_session(df) if df is not None and len(df) else None
    pts = speedups(d) if d is not None else pd.DataFrame()
    out = []
    for measure, key in (("training", "kfold_speedup"), ("end to end", "kfold_speedup_e2e")):
        lab = (f"Async k-fold on 2 engines vs the best one-worker run ({measure}"
               f"{', engine start-up included' if measure == 'end to end' else ''})")
        p = pts[(pts["measure"] == measure) & (pts["strategy"] == "kfold")
                & (pts["workers"] == 2)] if len(pts) else pts
        out.append(analysis.headline_from_point(key, lab, p.iloc[0], "x", source=source,
                                                rows=runs(d)) if len(p)
                   else analysis.not_measured(key, lab, why))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli("kfold", __doc__, run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
