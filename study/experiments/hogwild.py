"""HOGWILD (notebook 05): lock-free and locked workers on one shared weight buffer, against
sequential ``cnn.train`` of the same configuration.

Parts (``python -m study.experiments.hogwild --scale quick --parts pinning``):

``throughput`` -> results/hogwild_runs.pkl
    At each batch size of the preset (issue 11: the conclusion must not rest on one):
    sequential training (``python -m cnn.train``) and HOGWILD with 1..W workers, lock-free
    and, for W > 1, locked (``python -m cnn.parallel.hogwild``). Every run is a fresh
    process and the trials are interleaved. Speedup is against the best one-worker run of
    the same configuration (sequential or one HOGWILD worker); accuracy is compared with
    sequential training at equal epochs, median over trials (HOGWILD is nondeterministic).
``pinning`` -> results/hogwild_pinning.pkl
    The seed batch's lock-free runs with each worker pinned to its own core
    (study/affinity.py) and unpinned, interleaved: does migration of a lone worker explain
    a 2-worker step being faster than a 1-worker step?

Each run gives one row per epoch (``kind == "epoch"``: accuracy, staleness) and one per run
(``kind == "run"``: steady-state throughput; start-up and JIT apart in ``startup_s`` and
``compile_s``). Rules: docs/DESIGN.md, "Numbers a reader can trust".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from study import analysis, paths, schema
from study.affinity import can_pin, pin_children, usable_cores
from study.config import DEFAULT_SCALE, preset
from study.experiments import chosen_parts, cli, load_saved, save_part
from study.measure import Plan, new_session, python_module, run_cli, run_interleaved

RESULTS: tuple[str, ...] = ("hogwild_runs", "hogwild_pinning")
PARTS: tuple[str, ...] = ("throughput", "pinning")
EXPERIMENT = {"throughput": "hogwild", "pinning": "hogwild_pinning"}
#: The seed study's training settings, equal for every run compared here.
TRAINING: dict[str, Any] = dict(model="seed_cnn", lr=0.05, momentum=0.9, schedule="cosine",
                                seed=0)
LOCKED = "hogwild-locked"
#: Series of a throughput point: the strategy (and, in the pinning part, pinned or not).
SERIES = {"throughput": ("strategy",), "pinning": ("strategy", "pinned")}
KEYS = ("host", "session", "config")


# --- plans (pure) ----------------------------------------------------------------------

def config_label(p: Mapping[str, Any], batch: int) -> str:
    """The configuration a speedup is taken within: equal for every worker count."""
    return (f"{p['dataset']}/{p['subset'] or 'all'}, batch {int(batch)}, {p['epochs']} epochs, "
            f"{p['backend']} 1 thread/worker")


def seed_config(scale: str = DEFAULT_SCALE) -> str:
    """The configuration the headlines name (the seed study's batch)."""
    p = preset("hogwild", scale)
    return config_label(p, p["seed_batch"])


def label(cfg: Mapping[str, Any]) -> str:
    pin = " pinned" if cfg.get("pinned") else ""
    return f"{cfg['strategy']} x{cfg['workers']} b{cfg['batch_size']}{pin}"


def worker_counts(p: Mapping[str, Any], cores: int) -> list[int]:
    """The preset's worker counts that fit the cores (no oversubscription)."""
    return [int(w) for w in p["workers"] if int(w) <= cores]


def throughput_plan(p: Mapping[str, Any], cores: int) -> Plan:
    """Sequential, HOGWILD lock-free at every worker count, locked above one, per batch."""
    configs = []
    for b in p["batches"]:
        configs.append(dict(strategy="sequential", workers=1, batch_size=int(b), pinned=False))
        for w in worker_counts(p, cores):
            configs.append(dict(strategy="hogwild", workers=w, batch_size=int(b), pinned=False))
            if w > 1:
                configs.append(dict(strategy=LOCKED, workers=w, batch_size=int(b), pinned=False))
    return Plan(configs, [label(c) for c in configs])


def pinning_plan(p: Mapping[str, Any], cores: int) -> Plan:
    """Lock-free HOGWILD at the seed batch, each worker count unpinned and pinned."""
    configs = [dict(strategy="hogwild", workers=w, batch_size=int(p["seed_batch"]), pinned=pin)
               for w in worker_counts(p, cores) for pin in (False, True)]
    return Plan(configs, [label(c) for c in configs])


def command(p: Mapping[str, Any], cfg: Mapping[str, Any], experiment: str) -> list[str]:
    """The library CLI call of one configuration (one thread per process)."""
    args = ["--backend", str(p["backend"]), "--threads", "1", "--model", TRAINING["model"],
            "--dataset", str(p["dataset"]), "--epochs", str(p["epochs"]),
            "--batch-size", str(cfg["batch_size"]), "--lr", str(TRAINING["lr"]),
            "--momentum", str(TRAINING["momentum"]), "--schedule", TRAINING["schedule"],
            "--seed", str(TRAINING["seed"]), "--experiment", experiment]
    if p.get("subset"):
        args += ["--subset", str(p["subset"])]
    if p.get("test_subset"):
        args += ["--test-subset", str(p["test_subset"])]
    if cfg["strategy"] == "sequential":
        return python_module("cnn.train", *args)
    lock = ["--lock"] if cfg["strategy"] == LOCKED else []
    return python_module("cnn.parallel.hogwild", *args, "--workers", str(cfg["workers"]), *lock)


# --- one run -----------------------------------------------------------------------------

def run_row(epochs: pd.DataFrame, jit_in_wall: bool) -> dict[str, Any]:
    """The run's row from its epoch rows: steady-state throughput over the whole run.

    ``jit_in_wall``: ``cnn.train`` times its first step (JIT) inside ``wall_s`` and reports
    the excess as ``compile_s``; it is taken out, as HOGWILD's workers warm up untimed.
    Both report the run's compile_s on its epoch rows (``cnn.train`` on every row, the
    same cumulative number; HOGWILD on the first), so the run's is the largest.
    """
    ep = epochs.sort_values("epoch")
    last = ep.iloc[-1]
    compile_s = float(pd.to_numeric(ep["compile_s"]).fillna(0.0).max())
    wall = float(last["wall_s"]) - (compile_s if jit_in_wall else 0.0)
    row = last.to_dict()
    row.update(kind="run", epoch=math.nan, wall_s=wall, compile_s=compile_s,
               samples_per_s=float(last["samples"]) / max(wall, 1e-12),
               step_ms_median=float(pd.to_numeric(ep["step_ms_median"]).median()),
               step_ms_iqr=float(pd.to_numeric(ep["step_ms_iqr"]).median()))
    for col, how in (("staleness_mean", "mean"), ("overlap_frac", "mean"),
                     ("step_cpu_ms", "median"), ("staleness_max", "max"),
                     ("lock_wait_s", "sum")):
        if col in ep:
            row[col] = float(getattr(pd.to_numeric(ep[col]), how)())
    return row


def tidy(raw: pd.DataFrame, cfg: Mapping[str, Any], config: str, experiment: str,
         pinned_workers: int = 0) -> pd.DataFrame:
    """A CLI's per-epoch rows as study rows (schema columns only) plus the run's row.

    ``startup_s`` becomes everything of the process that is not steady training (start-up,
    data, worker spawn, JIT warm-up, evaluation), for sequential and HOGWILD alike.
    """
    ep = raw.copy()
    ep["experiment"] = experiment
    ep["strategy"] = cfg["strategy"]
    ep["workers"] = int(cfg["workers"])
    ep["kind"] = "epoch"
    ep["config"] = config
    ep["pinned"] = bool(cfg.get("pinned", False))
    ep["pinned_workers"] = float(pinned_workers)
    ep = ep[[c for c in ep.columns if c in schema.COLUMNS]]
    run = run_row(ep, jit_in_wall=cfg["strategy"] == "sequential")
    out = pd.concat([ep, pd.DataFrame([run])], ignore_index=True)
    if "process_wall_s" in out:
        out["startup_s"] = max(0.0, float(run["process_wall_s"]) - run["wall_s"])
    if cfg.get("pinned") and pinned_workers < int(cfg["workers"]):
        out["anomaly"] = (f"only {pinned_workers} of {cfg['workers']} worker(s) were pinned: "
                          "not a pinned run")
    return out


def measure_one(p: Mapping[str, Any], cfg: Mapping[str, Any], experiment: str) -> pd.DataFrame:
    """One configuration in a fresh process (workers pinned when ``cfg['pinned']``)."""
    cmd = command(p, cfg, experiment)
    kw = dict(timeout=float(p["timeout_s"]), what=label(cfg))
    if cfg.get("pinned"):
        with pin_children(usable_cores()) as pins:
            raw = run_cli(cmd, **kw)
        pinned = len(pins)
    else:
        raw, pinned = run_cli(cmd, **kw), 0
    return tidy(raw, cfg, config_label(p, cfg["batch_size"]), experiment, pinned)


# --- analysis (pure functions of frames) ------------------------------------------------

def runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "run"] if len(df) and "kind" in df else df.iloc[0:0]


def _with_batch(pts: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    if len(pts):
        pts = pts.copy()
        pts["batch_size"] = pts["config"].map(rows.groupby("config")["batch_size"].first())
    return pts


def throughput(df: pd.DataFrame, series: Sequence[str] = SERIES["throughput"]) -> pd.DataFrame:
    """Samples/s median + CI and speedup against the best one-worker run, per point."""
    r = runs(df)
    if not len(r):
        return pd.DataFrame()
    return _with_batch(analysis.speedups(r, "samples_per_s", series=series), r)


def step_points(df: pd.DataFrame, series: Sequence[str] = SERIES["throughput"]
                ) -> pd.DataFrame:
    """Median step (ms, per worker step) + CI per point, and the per-step ratio
    ``step(1 worker) / step(W workers)`` of the same series: above 1.05 a W-worker step is
    faster than a lone worker's, which no amount of parallelism explains (flagged)."""
    r = runs(df)
    if not len(r):
        return pd.DataFrame()
    by = [*KEYS, *series, "workers"]
    pts = analysis.points(r, by, "step_ms_median")
    ratios, notes = [], []
    for _, pt in pts.iterrows():
        same = np.logical_and.reduce([r[c].astype(str) == str(pt[c]) for c in (*KEYS, *series)])
        one = r[same & (pd.to_numeric(r["workers"]) == 1)]["step_ms_median"]
        mine = r[same & (pd.to_numeric(r["workers"]) == pt["workers"])]["step_ms_median"]
        ratio = analysis.ratio_ci(one, mine) if len(one) else (math.nan,) * 3
        ratios.append(ratio)
        note = ""
        if pt["workers"] > 1 and np.isfinite(ratio[0]) and ratio[0] > analysis.SUPERLINEAR:
            note = (f"per-step superlinear: a {int(pt['workers'])}-worker step takes "
                    f"{pt['median']:.1f} ms, a 1-worker step {np.median(one):.1f} ms "
                    f"(ratio {ratio[0]:.2f}); compare the pinned runs (hogwild_pinning) to "
                    "see whether migration of the lone worker explains it")
        notes.append(note)
    pts["step_ratio"], pts["step_ratio_lo"], pts["step_ratio_hi"] = zip(*ratios, strict=True)
    pts["anomaly"] = notes
    return _with_batch(pts, r)


def flag(df: pd.DataFrame, series: Sequence[str] = SERIES["throughput"]) -> pd.DataFrame:
    """Run rows get the anomalies of their throughput point and of their step point."""
    out = df.copy()
    mask = (out["kind"] == "run").to_numpy()
    if not mask.any():
        return out
    keys = [*KEYS, *series, "workers"]
    r = out[mask]
    r = analysis.flag_rows(r, throughput(out, series), keys)
    r = analysis.flag_rows(r, step_points(out, series), keys)
    out.loc[mask, "anomaly"] = r["anomaly"].to_numpy()
    return out


def accuracy_points(df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy per epoch: median over trials + CI, per strategy and worker count
    (latest session)."""
    ep = analysis.latest_session(df)
    ep = ep[ep["kind"] == "epoch"] if len(ep) else ep
    if not len(ep):
        return pd.DataFrame()
    return analysis.points(ep, ["config", "batch_size", "strategy", "workers", "epoch"],
                           "test_acc")


def accuracy_gap(df: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy minus sequential's at equal epochs, in points: per trial (paired
    with the sequential run of the same trial), then median + CI over trials."""
    r = runs(df)
    out = []
    for (sess, config), g in r.groupby(["session", "config"], sort=False):
        seq = g[g["strategy"] == "sequential"].set_index("trial")["test_acc"]
        if not len(seq):
            continue
        for (strategy, w), s in g[g["strategy"] != "sequential"].groupby(
                ["strategy", "workers"], sort=False):
            base = s["trial"].map(seq).fillna(float(seq.median()))
            diff = 100.0 * (s["test_acc"].to_numpy(float) - base.to_numpy(float))
            med, lo, hi = analysis.median_ci(diff)
            out.append(dict(host=str(g["host"].iloc[0]), session=sess, config=config,
                            batch_size=int(g["batch_size"].iloc[0]), strategy=strategy,
                            workers=float(w), median=med, lo=lo, hi=hi, n=len(diff),
                            sequential_acc=float(seq.median()),
                            anomaly=analysis.point_anomaly(dict(n=len(diff)))))
    return pd.DataFrame(out)


def summary_table(df: pd.DataFrame, series: Sequence[str] = SERIES["throughput"]
                  ) -> pd.DataFrame:
    """One line per point of the latest session: throughput, speedup, step, accuracy and
    its gap to sequential, staleness, start-up; medians with 95% CIs."""
    d = analysis.latest_session(df)
    tp = throughput(d, series)
    if not len(tp):
        return pd.DataFrame()
    st = step_points(d, series)
    st = st.assign(workers=st["workers"].astype(float)).set_index([*series, "config", "workers"])
    gap = accuracy_gap(d)
    gap = gap.set_index(["strategy", "config", "workers"]) if len(gap) else None
    r = runs(d)
    rows = []
    for _, p in tp.iterrows():
        key = tuple(p[c] for c in series)
        sel = np.logical_and.reduce([r[c].astype(str) == str(p[c]) for c in
                                     (*series, "config")]) & (r["workers"] == p["workers"])
        g = r[sel]
        row = {"batch": int(p["batch_size"]), **{c: p[c] for c in series},
               "workers": int(p["workers"]),
               "samples/s": analysis.point_text(p["median"], p["lo"], p["hi"], "{:,.0f}"),
               "speedup": analysis.point_text(p["speedup"], p["speedup_lo"], p["speedup_hi"],
                                      "{:.2f}")}
        s = st.loc[(*key, p["config"], p["workers"])]
        row["step ms"] = analysis.point_text(s["median"], s["lo"], s["hi"], "{:.1f}")
        row["test acc"] = analysis.point_text(*analysis.median_ci(g["test_acc"]), "{:.4f}")
        k = (p["strategy"], p["config"], p["workers"])
        if gap is not None and k in gap.index:
            a = gap.loc[k]
            row["acc - seq (pts)"] = analysis.point_text(a["median"], a["lo"], a["hi"], "{:+.2f}")
        row["staleness"] = round(float(pd.to_numeric(g["staleness_mean"]).median()), 2) \
            if "staleness_mean" in g else math.nan
        row["startup s"] = analysis.point_text(*analysis.median_ci(g["startup_s"]), "{:.1f}")
        row["anomaly"] = "; ".join(x for x in (p["anomaly"], s["anomaly"]) if x)
        rows.append(row)
    return pd.DataFrame(rows)


def pinning_effect(df: pd.DataFrame) -> pd.DataFrame:
    """Per worker count (latest session): the step unpinned and pinned (median + CI), their
    ratio, and the per-step ratio ``step(1) / step(W)`` of each variant."""
    st = step_points(analysis.latest_session(df), SERIES["pinning"])
    if not len(st):
        return pd.DataFrame()
    r = runs(analysis.latest_session(df))
    out = []
    for w, g in st.groupby("workers", sort=True):
        row: dict[str, Any] = {"workers": int(w)}
        for pin in (False, True):
            s = g[g["pinned"].astype(bool) == pin]
            if not len(s):
                continue
            s = s.iloc[0]
            tag = "pinned" if pin else "unpinned"
            row[f"step_ms_{tag}"] = s["median"]
            row[f"step_ms_{tag}_lo"], row[f"step_ms_{tag}_hi"] = s["lo"], s["hi"]
            row[f"step_ratio_{tag}"] = s["step_ratio"]
            row[f"step_ratio_{tag}_lo"] = s["step_ratio_lo"]
            row[f"step_ratio_{tag}_hi"] = s["step_ratio_hi"]
        sel = pd.to_numeric(r["workers"]) == w
        pinned = r[sel & r["pinned"].astype(bool)]["step_ms_median"]
        free = r[sel & ~r["pinned"].astype(bool)]["step_ms_median"]
        row["pinned_over_unpinned"], row["lo"], row["hi"] = analysis.ratio_ci(pinned, free)
        out.append(row)
    return pd.DataFrame(out)


def pinning_table(df: pd.DataFrame | None) -> pd.DataFrame:
    """`pinning_effect` for reading: medians with their 95% CIs, one line per worker count."""
    eff = pinning_effect(df)
    if not len(eff):
        return eff
    out = pd.DataFrame({"workers": eff["workers"]})
    for tag in ("unpinned", "pinned"):
        if f"step_ms_{tag}" not in eff:
            continue
        c = f"step_ms_{tag}"
        out[f"step ms, {tag}"] = [analysis.point_text(m, lo, hi, "{:.2f}") for m, lo, hi in zip(
            eff[c], eff[f"{c}_lo"], eff[f"{c}_hi"], strict=True)]
        c = f"step_ratio_{tag}"
        out[f"1-worker / W-worker step, {tag}"] = [
            analysis.point_text(m, lo, hi, "{:.2f}") for m, lo, hi in zip(
                eff[c], eff[f"{c}_lo"], eff[f"{c}_hi"], strict=True)]
    out["pinned / unpinned step"] = [analysis.point_text(m, lo, hi, "{:.2f}") for m, lo, hi in
                                     zip(eff["pinned_over_unpinned"], eff["lo"], eff["hi"],
                                         strict=True)]
    return out


def pinning_verdict(df: pd.DataFrame) -> str:
    """One sentence, from the numbers: is a W-worker step faster than a lone worker's,
    unpinned and pinned, and does pinning remove the difference?"""
    eff = pinning_effect(df)
    if not len(eff) or eff["workers"].max() < 2 or "step_ratio_pinned" not in eff:
        return "Not measured: the pinning part needs 1 and 2 workers on a Linux host."
    one, two = eff[eff["workers"] == 1].iloc[0], eff[eff["workers"] == 2].iloc[0]
    up, pp = two["step_ratio_unpinned"], two["step_ratio_pinned"]

    def txt(row: pd.Series, col: str) -> str:
        return analysis.point_text(row[col], row[f"{col}_lo"], row[f"{col}_hi"], "{:.2f}")

    head = (f"A 1-worker step over a 2-worker step: {txt(two, 'step_ratio_unpinned')} "
            f"unpinned, {txt(two, 'step_ratio_pinned')} pinned; pinning the lone worker "
            "changes its step by x" + analysis.point_text(
                one["pinned_over_unpinned"], one["lo"], one["hi"], "{:.2f}") + ". ")
    s = analysis.SUPERLINEAR
    if up <= s:
        return head + "Unpinned, a 2-worker step is not faster than a lone worker's here."
    if pp <= s:
        return head + ("Pinned, the difference is gone: migration of the lone worker "
                       "explains the per-step superlinearity.")
    return head + ("Pinned, a 2-worker step is still faster: migration does not explain "
                   "it (look at the VM's scheduling of busy vCPUs, or clock boost).")


# --- the family contract ------------------------------------------------------------------

def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    """Measure the chosen parts (interleaved trials), flag anomalies, validate and save."""
    p = preset("hogwild", scale)
    chosen = chosen_parts("hogwild", parts, PARTS)
    cores = len(usable_cores())
    session = new_session()
    out: dict[str, pd.DataFrame] = {}
    for part in chosen:
        if part == "pinning" and not can_pin():
            if log:
                log("pinning: skipped (needs os.sched_setaffinity, i.e. Linux)")
            continue
        plan = (throughput_plan if part == "throughput" else pinning_plan)(p, cores)
        experiment = EXPERIMENT[part]
        if log:
            log(f"{experiment}: {len(plan.configs)} configurations x {p['trials']} trial(s), "
                f"interleaved ({cores} usable cores)")
        raw = run_interleaved(plan, partial(measure_one, p, experiment=experiment),
                              int(p["trials"]), quiet=scale != "quick", log=log)
        name = RESULTS[PARTS.index(part)]
        out[name] = save_part(raw, name, scale, session, partial(flag, series=SERIES[part]))
    return out


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    return load_saved(RESULTS, scale)


def _two_workers(pts: pd.DataFrame, batch: int) -> pd.DataFrame:
    if not len(pts):
        return pts
    return pts[(pts["strategy"] == "hogwild") & (pts["workers"] == 2)
               & (pts["batch_size"] == batch)]


def headlines(frames: Mapping[str, pd.DataFrame]) -> list[analysis.Headline]:
    """HOGWILD at 2 workers against the best one-worker run, and its accuracy against
    sequential in points, at every batch size (the seed batch named as such)."""
    df = frames.get(RESULTS[0])
    std = preset("hogwild", "standard")
    batches = [int(b) for b in std["batches"]]
    source = paths.shown(schema.path_of(RESULTS[0], "standard"))
    if df is not None and len(df):
        d = analysis.latest_session(df)
        batches = sorted({int(b) for b in d["batch_size"]})
        scale = str(d["scale"].iloc[0])
        seed_b = int(preset("hogwild", scale)["seed_batch"])
        source = paths.shown(schema.path_of(RESULTS[0], scale))
        tp, gap = throughput(d), accuracy_gap(d)
    else:
        d, seed_b, tp, gap = None, int(std["seed_batch"]), pd.DataFrame(), pd.DataFrame()
    out = []
    for b in batches:
        tag = " (seed configuration)" if b == seed_b else ""
        key_s, key_a = f"hogwild_speedup_b{b}", f"hogwild_acc_gap_b{b}"
        lab_s = f"HOGWILD 2 workers vs the best one-worker run, batch {b}{tag}"
        lab_a = f"HOGWILD 2 workers: test accuracy minus sequential's, batch {b}{tag}"
        why = f"{source} not found: run notebook 05 (study.experiments.hogwild)"
        p, a = (_two_workers(t, b) for t in (tp, gap))
        rows = runs(d)[runs(d)["batch_size"] == b] if d is not None else None
        out.append(analysis.headline_from_point(key_s, lab_s, p.iloc[0], "x", source=source,
                                                rows=rows) if len(p)
                   else analysis.not_measured(key_s, lab_s, why))
        out.append(analysis.headline_from_point(key_a, lab_a, a.iloc[0], "points",
                                                value="median", source=source, rows=rows)
                   if len(a) else analysis.not_measured(key_a, lab_a, why))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli("hogwild", __doc__, run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
