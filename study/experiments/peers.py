"""Peers (notebooks 04, 05): each strategy against what a user would pick instead, side by side.

    python -m study.experiments.peers --scale quick --parts ddp,kfold

Parts, all into results/peers.pkl (experiment ``peers_<part>``):

``ddp``      ``allreduce`` (``mpiexec -n P python -m cnn.parallel.mpi``, numba, 1 thread
             per rank) against ``torch-ddp`` (``python -m study.peer_runners ddp``:
             DistributedDataParallel, gloo, the seed CNN's torch twin, 1 torch thread).
``hogwild``  ``hogwild`` (``python -m cnn.parallel.hogwild``) against ``torch-hogwild``
             (PyTorch's mnist_hogwild scheme, ``python -m study.peer_runners hogwild``).
``kfold``    ``kfold`` on E ipyparallel engines (``python -m cnn.parallel.kfold``) against
             ``joblib-kfold`` (``joblib.Parallel(n_jobs=E)``, loky, over the same folds).

Both sides get the same data, initial weights, batch order, per-worker batch, lr schedule,
momentum and epochs (study/peer_runners.py says how each peer is made to match), and every
pool at one thread per worker. Every run is a fresh process; project and peer at W = 1, 2
(more on a bigger host) are interleaved trials of one plan. Per run: steady throughput
(``samples_per_s``; the ddp part takes the first step apart as ``first_step_s``), the test
accuracy at equal epochs, and ``startup_s``: everything in the process that is not a
training step (interpreter, imports, data, process/engine/pool start, warm-up, evaluation).
The ratio project/peer of the medians comes with its bootstrap CI (`analysis.ratio_ci`), on
training throughput and end to end (samples / the whole process; the project's HOGWILD also
evaluates a snapshot after every epoch, the mnist_hogwild scheme once at the end, and the
end-to-end ratio carries that). The k-fold peer must give the per-fold accuracies of the
engines bit for bit (``fold_acc_match``).

torch is optional (the ``compare`` extra): without it the ddp and hogwild parts are skipped
with the reason, and their headlines say "not measured" and why.
"""

from __future__ import annotations

import importlib.util
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
from study.experiments import chosen_parts, cli, load_saved
from study.experiments import hogwild as hw
from study.experiments import kfold as kf
from study.measure import (
    Plan,
    mpiexec_module,
    new_session,
    pinned_env,
    python_module,
    run_cli,
    run_interleaved,
)
from study.peer_runners import TORCH_HINT

RESULTS: tuple[str, ...] = ("peers",)
PARTS: tuple[str, ...] = ("ddp", "hogwild", "kfold")
#: part -> (the project's strategy, the peer's)
PAIRS: dict[str, tuple[str, str]] = {"ddp": ("allreduce", "torch-ddp"),
                                     "hogwild": ("hogwild", "torch-hogwild"),
                                     "kfold": ("kfold", "joblib-kfold")}
EXPERIMENT = {part: f"peers_{part}" for part in PARTS}
TORCH_PARTS = ("ddp", "hogwild")
#: issue 12's targets at 2 workers: project/peer throughput at least this
TARGETS = {"ddp": 1.3, "hogwild": 1.3, "kfold": 1.0}
ACC_TARGET_POINTS = 0.5  # hogwild within this many points of torch-hogwild
TRAINING: dict[str, Any] = dict(model="seed_cnn", lr=0.05, momentum=0.9, schedule="cosine",
                                seed=0)
MEASURES = {"training": "samples_per_s", "end to end": "e2e_samples_per_s"}
KEYS = ("host", "session", "config", "strategy", "workers")


def torch_missing() -> str:
    """Why the torch parts cannot run here ('' when torch is installed)."""
    if importlib.util.find_spec("torch") is None:
        return f"torch is not installed: {TORCH_HINT}"
    return ""


def part_of(strategy: str) -> str:
    return next(part for part, pair in PAIRS.items() if strategy in pair)


# --- plans (pure) ------------------------------------------------------------------------

def config_label(p: Mapping[str, Any], part: str) -> str:
    """The configuration of a part: equal for project and peer at every worker count."""
    if part == "kfold":
        work = (f"{p['dataset']}/{p['kfold_subset'] or 'all'}, {p['folds']} folds x "
                f"{p['kfold_epochs']} epochs")
    else:
        work = f"{p['dataset']}/{p['subset'] or 'all'}, {p['epochs']} epochs"
    return f"{part}: {work}, batch {p['batch_size']} per worker, 1 thread/worker"


def label(cfg: Mapping[str, Any]) -> str:
    return f"{cfg['strategy']} x{cfg['workers']}"


def plan(p: Mapping[str, Any], part: str, cores: int) -> Plan:
    """Project and peer at every worker count of the preset that fits the cores."""
    configs = [dict(part=part, strategy=s, workers=int(w))
               for w in p["workers"] if int(w) <= cores for s in PAIRS[part]]
    return Plan(configs, [label(c) for c in configs])


def train_args(p: Mapping[str, Any], part: str) -> list[str]:
    """The flags every run of a part shares (the library CLIs' training flags)."""
    kfold = part == "kfold"
    args = ["--backend", str(p["backend"]), "--threads", "1", "--model", TRAINING["model"],
            "--dataset", str(p["dataset"]),
            "--epochs", str(p["kfold_epochs"] if kfold else p["epochs"]),
            "--batch-size", str(p["batch_size"]), "--lr", str(TRAINING["lr"]),
            "--momentum", str(TRAINING["momentum"]), "--schedule", TRAINING["schedule"],
            "--seed", str(TRAINING["seed"]), "--experiment", EXPERIMENT[part]]
    subset = p["kfold_subset"] if kfold else p["subset"]
    if subset:
        args += ["--subset", str(subset)]
    if kfold:
        args += ["--folds", str(p["folds"]), "--cpu-interval", str(p["cpu_interval"])]
    elif p.get("test_subset"):
        args += ["--test-subset", str(p["test_subset"])]
    return args


def command(p: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    """The CLI call of one run: the library's for the project, study.peer_runners' for peers."""
    part, w = cfg["part"], str(cfg["workers"])
    args = train_args(p, part)
    return {
        "allreduce": lambda: mpiexec_module(int(w), "cnn.parallel.mpi", "--strategy",
                                            "allreduce", *args),
        "torch-ddp": lambda: python_module("study.peer_runners", "ddp", "--workers", w, *args),
        "hogwild": lambda: python_module("cnn.parallel.hogwild", *args, "--workers", w),
        "torch-hogwild": lambda: python_module("study.peer_runners", "hogwild", "--workers", w,
                                               *args),
        "kfold": lambda: python_module("cnn.parallel.kfold", *args, "--engines", w,
                                       "--timeout", str(p["timeout_s"])),
        "joblib-kfold": lambda: python_module("study.peer_runners", "joblib-kfold", *args,
                                              "--jobs", w),
    }[cfg["strategy"]]()


def env() -> dict[str, str]:
    """Every pool (OpenMP, BLAS, Numba, torch's OpenMP) at one thread per process."""
    e = pinned_env(1)
    e.setdefault("NUMBA_CACHE_DIR", str(paths.project_root() / ".numba_cache"))
    return e


# --- one run -------------------------------------------------------------------------------

def fit_run_row(raw: pd.DataFrame, workers: int, batch: int) -> pd.DataFrame:
    """The last epoch row of a `cnn.train.fit` run (allreduce, torch-ddp) as the run's row:
    the first step apart (``first_step_s`` = its excess + a median step), ``wall_s`` and
    ``samples_per_s`` the steady state after it."""
    df = raw.tail(1).copy().reset_index(drop=True)
    first = float(df["compile_s"].iloc[0]) + float(df["step_ms_median"].iloc[0]) / 1e3
    samples, epochs = float(df["samples"].iloc[0]), float(df["epochs"].iloc[0])
    steady = float(df["wall_s"].iloc[0]) - first
    first_batch = min(workers * batch, samples / max(epochs, 1.0))
    df["first_step_s"] = first
    df["wall_s"] = steady
    df["samples_per_s"] = (samples - first_batch) / steady if steady > 0 else math.nan
    return df


def tidy(raw: pd.DataFrame, cfg: Mapping[str, Any], config: str, batch: int) -> pd.DataFrame:
    """A CLI's rows as the part's study rows (schema columns only): one ``run`` row per
    run (and, for k-fold, one ``fold`` row per fold)."""
    part, strategy, w = cfg["part"], cfg["strategy"], int(cfg["workers"])
    experiment = EXPERIMENT[part]
    if part == "ddp":
        df = fit_run_row(raw, w, batch)
    elif strategy == "hogwild":
        df = hw.tidy(raw, dict(strategy="hogwild", workers=w, pinned=False), config, experiment)
        df = df[df["kind"] == "run"]
    elif part == "kfold":
        df = kf.tidy(raw, {"engines": w}, config, experiment)
    else:
        df = raw.copy()
    df = df.copy()
    df["kind"] = df["kind"] if "kind" in df and part == "kfold" else "run"
    fields = dict(experiment=experiment, strategy=strategy, config=config, workers=w,
                  batch_size=batch, peer=[s for s in PAIRS[part] if s != strategy][0])
    for k, v in fields.items():
        df[k] = v
    if "process_wall_s" in df:
        first = pd.to_numeric(df.get("first_step_s", pd.Series(0.0, index=df.index))).fillna(0)
        df["startup_s"] = (pd.to_numeric(df["process_wall_s"]) - pd.to_numeric(df["wall_s"])
                           - first).clip(lower=0.0)
        df.loc[df["kind"] == "fold", "startup_s"] = math.nan
    return df[[c for c in df.columns if c in schema.COLUMNS]].reset_index(drop=True)


def measure_one(p: Mapping[str, Any], cfg: Mapping[str, Any]) -> pd.DataFrame:
    raw = run_cli(command(p, cfg), env=env(), timeout=float(p["timeout_s"]), what=label(cfg))
    return tidy(raw, cfg, config_label(p, cfg["part"]), int(p["batch_size"]))


# --- analysis (pure functions of frames) ---------------------------------------------------

def runs(df: pd.DataFrame | None, part: str | None = None) -> pd.DataFrame:
    if df is None or not len(df) or "kind" not in df:
        return pd.DataFrame()
    r = df[df["kind"] == "run"]
    if part is not None:
        r = r[r["experiment"] == EXPERIMENT[part]]
    r = r.copy()
    r["e2e_samples_per_s"] = pd.to_numeric(r["samples"]) / pd.to_numeric(
        r.get("process_wall_s", pd.Series(math.nan, index=r.index)))
    return r


def latest(df: pd.DataFrame | None) -> pd.DataFrame:
    """Each part's rows of its most recent session (``--parts`` re-runs one part alone, the
    others keep the session they were measured in)."""
    if df is None or not len(df):
        return pd.DataFrame()
    return pd.concat([analysis.latest_session(g) for _, g in df.groupby("experiment",
                                                                         sort=False)])


def throughput(df: pd.DataFrame | None, part: str, measure: str = "training") -> pd.DataFrame:
    """Samples/s median + CI per strategy and worker count, and the speedup against the best
    one-worker run of the part (project or peer) in the same session."""
    r = runs(df, part)
    if not len(r):
        return pd.DataFrame()
    pts = analysis.speedups(r, MEASURES[measure])
    pts.insert(0, "part", part)
    return pts


def _same(r: pd.DataFrame, row: Mapping[str, Any], cols: Sequence[str]) -> np.ndarray:
    return np.logical_and.reduce([r[c].astype(str) == str(row[c]) for c in cols])


def ratios(df: pd.DataFrame | None) -> pd.DataFrame:
    """Per part, session and worker count: median(project) / median(peer) throughput with
    its bootstrap CI, on training and end to end, against the part's target."""
    out = []
    for part, (mine, peer) in PAIRS.items():
        r = runs(df, part)
        if not len(r):
            continue
        for (host, session, config, w), g in r.groupby(["host", "session", "config", "workers"],
                                                       sort=False):
            a, b = g[g["strategy"] == mine], g[g["strategy"] == peer]
            if not len(a) or not len(b):
                continue
            for measure, col in MEASURES.items():
                ratio, lo, hi = analysis.ratio_ci(a[col], b[col])
                n = min(int(a[col].notna().sum()), int(b[col].notna().sum()))
                out.append(dict(part=part, project=mine, peer=peer, host=host, session=session,
                                config=config, workers=float(w), measure=measure, ratio=ratio,
                                ratio_lo=lo, ratio_hi=hi, n=n, target=TARGETS[part],
                                anomaly=analysis.point_anomaly(dict(n=n, median=ratio, lo=lo,
                                                                    hi=hi))))
    return pd.DataFrame(out)


def accuracy(df: pd.DataFrame | None) -> pd.DataFrame:
    """Test accuracy at equal epochs per part and worker count: project and peer (median
    + CI) and their difference in points, paired by trial (median + CI)."""
    out = []
    for part, (mine, peer) in PAIRS.items():
        r = runs(df, part)
        if not len(r):
            continue
        for (session, config, w), g in r.groupby(["session", "config", "workers"], sort=False):
            a = g[g["strategy"] == mine].set_index("trial")["test_acc"].astype(float)
            b = g[g["strategy"] == peer].set_index("trial")["test_acc"].astype(float)
            if not len(a) or not len(b):
                continue
            both = a.index.intersection(b.index)
            diff = 100.0 * (a.loc[both] - b.loc[both]).to_numpy()
            row = dict(part=part, project=mine, peer=peer, session=session, config=config,
                       workers=float(w), host=str(g["host"].iloc[0]))
            for who, s in (("project", a), ("peer", b)):
                row[f"{who}_acc"], row[f"{who}_lo"], row[f"{who}_hi"] = analysis.median_ci(s)
            row["diff_points"], row["diff_lo"], row["diff_hi"] = analysis.median_ci(diff)
            row["n"] = len(diff)
            row["anomaly"] = analysis.point_anomaly(dict(n=len(diff)))
            out.append(row)
    return pd.DataFrame(out)


def fold_accs(df: pd.DataFrame, run: Mapping[str, Any]) -> np.ndarray:
    sel = (df["kind"] == "fold") & _same(df, run, ("session", "config", "trial", "strategy"))
    sel &= pd.to_numeric(df["workers"]) == float(run["workers"])
    return df[sel].sort_values("fold")["test_acc"].to_numpy(np.float64)


def check_folds(df: pd.DataFrame) -> pd.DataFrame:
    """Each joblib-kfold run's per-fold accuracies against the engines' run of the same
    session, trial and worker count: ``fold_acc_match`` (bit for bit), ``fold_acc_rel_err``
    (`study.checks.compare`), and an anomaly when they differ (same code, same seeds)."""
    out = df.copy()
    out["fold_acc_rel_err"] = math.nan
    out["fold_acc_match"] = None
    r = out[(out["kind"] == "run") & (out["experiment"] == EXPERIMENT["kfold"])]
    for i, run in r[r["strategy"] == "joblib-kfold"].iterrows():
        ref = r[_same(r, run, ("session", "config", "trial")) & (r["strategy"] == "kfold")
                & (pd.to_numeric(r["workers"]) == float(run["workers"]))]
        if not len(ref):
            continue
        got, want = fold_accs(out, run), fold_accs(out, ref.iloc[0])
        check = compare(got, want, name="per-fold accuracy")
        exact = bool(got.shape == want.shape and np.array_equal(got, want))
        out.at[i, "fold_acc_rel_err"] = check.rel_err
        out.at[i, "fold_acc_match"] = exact
        if not exact:
            note = f"per-fold accuracies differ from the engines' ({check.line()})"
            out.at[i, "anomaly"] = "; ".join(x for x in (str(out.at[i, "anomaly"] or ""), note)
                                             if x)
    return out


def flag(df: pd.DataFrame) -> pd.DataFrame:
    """Run rows get their throughput point's anomalies; joblib runs the fold check's."""
    out = check_folds(df)
    mask = (out["kind"] == "run").to_numpy()
    if not mask.any():
        return out
    pts = pd.concat([throughput(out, part) for part in PARTS], ignore_index=True)
    r = analysis.flag_rows(out[mask], pts, KEYS) if len(pts) else out[mask]
    out.loc[mask, "anomaly"] = r["anomaly"].to_numpy()
    return out


def summary_table(df: pd.DataFrame | None) -> pd.DataFrame:
    """One line per part and worker count (each part's latest session): throughput of both
    sides, the ratio project/peer (training and end to end), start-up, accuracy; medians
    + 95% CIs."""
    d = latest(df)
    rat, acc = ratios(d), accuracy(d)
    if not len(rat):
        return pd.DataFrame()
    rows = []
    for (part, w), g in rat.groupby(["part", "workers"], sort=False):
        mine, peer = PAIRS[part]
        r = runs(d, part)
        r = r[pd.to_numeric(r["workers"]) == w]
        tr, e2e = (g[g["measure"] == m].iloc[0] for m in MEASURES)
        row: dict[str, Any] = {"part": part, "project": mine, "peer": peer, "workers": int(w)}
        sides = {"project": r[r["strategy"] == mine], "peer": r[r["strategy"] == peer]}
        for who, s in sides.items():
            row[f"{who} samples/s"] = analysis.point_text(*analysis.median_ci(s["samples_per_s"]),
                                                          "{:,.0f}")
        row["ratio"] = analysis.point_text(tr["ratio"], tr["ratio_lo"], tr["ratio_hi"], "{:.2f}")
        row["ratio end to end"] = analysis.point_text(e2e["ratio"], e2e["ratio_lo"],
                                                      e2e["ratio_hi"], "{:.2f}")
        row["target"] = f">= {TARGETS[part]:g}"
        for who, s in sides.items():
            row[f"{who} startup s"] = analysis.point_text(*analysis.median_ci(s["startup_s"]),
                                                          "{:.1f}")
        a = acc[(acc["part"] == part) & (acc["workers"] == w)] if len(acc) else acc
        if len(a):
            a = a.iloc[0]
            row["acc project"] = analysis.point_text(a["project_acc"], a["project_lo"],
                                                     a["project_hi"], "{:.4f}")
            row["acc peer"] = analysis.point_text(a["peer_acc"], a["peer_lo"], a["peer_hi"],
                                                  "{:.4f}")
            row["acc diff (pts)"] = analysis.point_text(a["diff_points"], a["diff_lo"],
                                                        a["diff_hi"], "{:+.2f}")
        if part == "kfold" and "fold_acc_match" in r:
            got = r[r["strategy"] == "joblib-kfold"]["fold_acc_match"].dropna()
            row["folds identical"] = bool(len(got) and got.astype(bool).all())
        notes = [tr["anomaly"], *r["anomaly"].astype(str)]
        row["anomaly"] = "; ".join(dict.fromkeys(n for x in notes for n in x.split("; ") if n))
        rows.append(row)
    return pd.DataFrame(rows)


# --- the family contract -------------------------------------------------------------------

def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    """Measure the chosen parts (project and peer interleaved), check, flag and save."""
    p = preset("peers", scale)
    chosen = chosen_parts("peers", parts, PARTS)
    cores = len(usable_cores())
    session = new_session()
    frames = []
    for part in chosen:
        why = torch_missing() if part in TORCH_PARTS else ""
        if why:
            if log:
                log(f"{EXPERIMENT[part]}: skipped, {why}")
            continue
        pl = plan(p, part, cores)
        if log:
            log(f"{EXPERIMENT[part]}: {len(pl.configs)} configurations x {p['trials']} "
                f"trial(s), interleaved ({cores} usable cores)")
        raw = run_interleaved(pl, partial(measure_one, p), int(p["trials"]),
                              quiet=scale != "quick", log=log)
        frames.append(schema.rows(raw, scale=scale, session=session))
    if not frames:
        return {}
    df = flag(pd.concat(frames, ignore_index=True, sort=False))
    schema.save(df, RESULTS[0], scale)
    return {RESULTS[0]: df}


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    return load_saved(RESULTS, scale)


def target_note(part: str, value: float, lo: float, hi: float) -> str:
    """Whether the ratio meets issue 12's target, and whether its CI straddles it."""
    t = TARGETS[part]
    what = "no slower than the peer" if t == 1.0 else f">= {t:g}x the peer"
    straddles = np.isfinite(lo) and np.isfinite(hi) and lo < t <= hi
    if straddles:
        return (f"target {what}: not settled (the median is "
                f"{'above' if value >= t else 'below'} it, the 95% CI includes it)")
    return f"target {what}: {'met' if value >= t else 'missed'}"


HEADLINES = {"ddp": ("peers_allreduce_vs_torch_ddp", "allreduce vs PyTorch DDP (gloo)"),
             "hogwild": ("peers_hogwild_vs_torch_hogwild",
                         "HOGWILD vs PyTorch's mnist_hogwild scheme"),
             "kfold": ("peers_kfold_vs_joblib", "k-fold on ipyparallel engines vs joblib (loky)")}


def headlines(frames: Mapping[str, pd.DataFrame]) -> list[analysis.Headline]:
    """At 2 workers, the seed configuration of each part: throughput ratio project/peer
    (k-fold also end to end) with its CI, and HOGWILD's accuracy minus torch-hogwild's."""
    df = frames.get(RESULTS[0])
    d = latest(df) if df is not None and len(df) else None
    scale = str(d["scale"].iloc[0]) if d is not None and len(d) else "standard"
    source = paths.shown(schema.path_of(RESULTS[0], scale))
    rat, acc = ratios(d), accuracy(d)
    out = []
    for part in PARTS:
        key, what = HEADLINES[part]
        why = (torch_missing() if part in TORCH_PARTS else "") or (
            f"{source} has no {EXPERIMENT[part]} rows: run notebooks 04 and 05 "
            "(python -m study.experiments.peers)")
        r = runs(d, part)
        measures = ("training", "end to end") if part == "kfold" else ("training",)
        for measure in measures:
            k = key + ("_e2e" if measure == "end to end" else "")
            lab = (f"{what}, 2 workers: throughput ratio project/peer"
                   + (" (end to end, start-up included)" if measure == "end to end" else ""))
            p = rat[(rat["part"] == part) & (rat["measure"] == measure)
                    & (rat["workers"] == 2)] if len(rat) else rat
            if not len(p):
                out.append(analysis.not_measured(k, lab, why))
                continue
            p = p.iloc[0]
            out.append(analysis.headline_from_point(
                k, lab, p, "x", value="ratio", source=source, rows=r,
                note=target_note(part, p["ratio"], p["ratio_lo"], p["ratio_hi"])))
        if part == "hogwild":
            k, lab = ("peers_hogwild_acc_diff", "HOGWILD minus torch-hogwild test accuracy at "
                      "equal epochs, 2 workers")
            a = acc[(acc["part"] == part) & (acc["workers"] == 2)] if len(acc) else acc
            if not len(a):
                out.append(analysis.not_measured(k, lab, why))
                continue
            a = a.iloc[0].to_dict()
            a.update(diff_points_lo=a["diff_lo"], diff_points_hi=a["diff_hi"])
            ok = abs(a["diff_points"]) <= ACC_TARGET_POINTS
            out.append(analysis.headline_from_point(
                k, lab, a, "points", value="diff_points", source=source, rows=r,
                note=f"target within {ACC_TARGET_POINTS} point: {'met' if ok else 'missed'}"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli("peers", __doc__, run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
