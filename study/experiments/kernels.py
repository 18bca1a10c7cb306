"""Single-process kernels (notebook 02): NumPy, Numba CPU and PyTorch steps side by side.

One training step of the sequential NumPy reference, the Numba CPU backend and the
PyTorch twin, timed by the same code in one process.

    python -m study.experiments.kernels --help
    python -m study.experiments.kernels --scale quick
    python -m study.experiments.kernels --parts roofs,steps

Every part writes its rows into ``results/kernels.pkl`` under its own ``experiment``:

  roofs    bench_roof     the host's GEMM GFLOP/s and copy GB/s at each thread count
  steps    bench_step     numpy 1t, numba and torch at each thread count, per input shape
                          and batch: the trials of one shape/batch interleaved (ABC, CAB...)
  kernels  bench_kernel   each layer's forward/backward kernel, the loss and the update alone
  grid     bench_grid     conv filters x batch: numpy 1t, numba 1t and numba at all threads
  compile  bench_compile  the JIT apart: a training CLI in fresh processes, Numba's cache
                          cold and warm, numpy for reference (startup_s, compile_s)

Before timing, each backend's step is checked against the NumPy reference (same loss and
weights, `study.steps.agreement`); peak memory is taken in an untimed pass. Headlines:
Numba against NumPy and against PyTorch at 1 and 2 threads, at the seed configuration
(seed CNN, 3x32x32, batch 128) and at the MPI/HOGWILD one (1x28x28, batch 64), each a ratio
of medians with its bootstrap CI over the interleaved trials (docs/DESIGN.md).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from cnn import runinfo
from cnn.metrics import make_row, to_frame
from study import analysis, measure, schema, steps
from study.config import DEFAULT_SCALE, preset
from study.experiments import cli, load_saved

RESULTS = ("kernels",)  # not bench_cpu.pkl: the old-format file stays for its readers
NAME = RESULTS[0]
PARTS = ("roofs", "steps", "kernels", "grid", "compile")
EXPERIMENT = {"roofs": "bench_roof", "steps": "bench_step", "kernels": "bench_kernel",
              "grid": "bench_grid", "compile": "bench_compile"}
MODEL = "seed_cnn"
SEED_FILTERS = (32, 64)
#: The configurations headlines are read at: (input shape, batch size), seed CNN filters.
SEED = ("3x32x32", 128)
MPI = ("1x28x28", 64)
SOURCE = "results/kernels.pkl"
Log = Callable[[str], Any] | None


# --- configurations and rows ------------------------------------------------------------

def config_label(shape: str, batch: int, filters: Sequence[int] | str) -> str:
    """The ``config`` of a step row: rows equal in it differ only in backend and threads."""
    f = filters if isinstance(filters, str) else steps.label(filters, ",")
    return f"{MODEL} {shape} f{f} b{int(batch)}"


def series_plan(threads: Sequence[int], backends: Sequence[str] = ("numpy", "numba", "torch"),
                log: Log = print) -> list[tuple[str, int]]:
    """The (backend, threads) pairs to compare: numpy at 1 thread, the rest at each count
    that this process can pin; what cannot run is logged with its reason and left out."""
    status = steps.backend_status(backends)
    out = []
    for backend in backends:
        if status[backend] != "ok":
            _say(log, f"skip {backend}: {status[backend]}")
            continue
        for t in threads:
            problem = steps.thread_problem(backend, t)
            if problem is None:
                out.append((backend, int(t)))
            elif backend != "numpy":
                _say(log, f"skip {steps.series(backend, t)}: {problem}")
    return out


def _say(log: Log, msg: str) -> None:
    if log:
        log(msg)


def step_configs(pairs: Sequence[tuple[str, int]], shape: str, batch: int,
                 filters: Sequence[int], reps: int) -> measure.Plan:
    """The interleaved plan of one shape/batch/filters cell: one config per series."""
    configs: list[dict[str, Any]] = [dict(backend=b, threads=t, shape=shape, batch=int(batch),
                                          filters=tuple(filters), steps=reps) for b, t in pairs]
    return measure.Plan(configs, [f"{steps.series(b, t)} {shape} f{steps.label(filters, ',')}"
                                  f" b{batch}" for b, t in pairs])


def step_row(cfg: Mapping[str, Any], device: str, experiment: str, **fields: Any) -> dict:
    """A results row of one configuration (``cfg`` as `step_configs` builds it)."""
    b, t = cfg["backend"], int(cfg["threads"])
    return make_row(experiment=experiment, strategy=steps.STRATEGY.get(b, b), backend=b,
                    processes=1, threads=t, device=device, model=MODEL, dataset="synthetic",
                    batch_size=int(cfg["batch"]), epochs=0.0, comm_s=0.0,
                    input_shape=cfg["shape"], filters=steps.label(cfg["filters"], ","),
                    config=config_label(cfg["shape"], cfg["batch"], cfg["filters"]),
                    blas_threads=steps.blas_threads(b, t),
                    peak_mem_mb=cfg.get("peak_mem_mb", math.nan), **fields)


def time_step(cfg: Mapping[str, Any], experiment: str = "bench_step") -> pd.DataFrame:
    """One trial of one configuration: a fresh setup, its first call and one warm-up step
    apart (``first_step_s``, ``compile_s``), then ``steps`` timed steps; one row."""
    b, t, batch = cfg["backend"], int(cfg["threads"]), int(cfg["batch"])
    with steps.pinned(b, t):
        setup = steps.make_setup(b, t, batch, steps.parse_shape(cfg["shape"]), cfg["filters"])
        timed = measure.time_calls(setup.step, int(cfg["steps"]), warmup=1, sync=setup.sync)
    median_s = timed["step_ms_median"] / 1e3
    return to_frame([step_row(
        cfg, setup.device, experiment, samples=batch * int(cfg["steps"]), wall_s=timed["wall_s"],
        compile_s=timed["compile_s"], first_step_s=timed["first_call_s"],
        step_ms_median=timed["step_ms_median"], step_ms_iqr=timed["step_ms_iqr"],
        samples_per_s=batch / median_s, final_loss=float(timed["result"]),
        gflops=gflops(setup.flops_per_sample, batch, median_s))])


def gflops(flops_per_sample: float, batch: int, seconds: float) -> float:
    """Achieved GFLOP/s of a step: FLOPs of the batch (multiply-add = 2) per second."""
    return float(flops_per_sample) * int(batch) / float(seconds) / 1e9


def time_kernels(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One trial of every kernel of a step, each called alone ``steps`` times; one row each."""
    b, t, batch = cfg["backend"], int(cfg["threads"]), int(cfg["batch"])
    rows = []
    with steps.pinned(b, t):
        setup = steps.make_setup(b, t, batch, steps.parse_shape(cfg["shape"]), cfg["filters"])
        for k in setup.kernels():
            timed = measure.time_calls(k.fn, int(cfg["steps"]), warmup=1, sync=setup.sync,
                                       collect=False)
            s = timed["step_ms_median"] / 1e3
            rows.append(step_row(
                cfg, setup.device, "bench_kernel", kernel=k.name, direction=k.direction,
                kernel_flops=k.flops, kernel_bytes=k.nbytes, step_ms_median=s * 1e3,
                step_ms_iqr=timed["step_ms_iqr"], wall_s=timed["wall_s"],
                compile_s=timed["compile_s"], first_step_s=timed["first_call_s"],
                gflops=k.flops / s / 1e9 if k.flops else math.nan,
                gbytes_per_s=k.nbytes / s / 1e9))
    return to_frame(rows)


def time_roof(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One trial of a roof: a float32 n^3 GEMM (GFLOP/s) or a large copy (GB/s)."""
    t = int(cfg["threads"])
    base = dict(backend="numpy", threads=t, shape="", batch=0, filters=None)
    if cfg["model"] == "gemm":
        n = int(cfg["n"])
        value = measure.gemm_gflops(t, n, int(cfg["repeats"]))
        fields = dict(gflops=value, kernel_flops=2.0 * n**3, kernel=f"sgemm {n}^3")
    else:
        nbytes = int(cfg["mb"]) * measure.MB
        value = measure.copy_gbps(nbytes, int(cfg["repeats"]), threads=t)
        fields = dict(gbytes_per_s=value, kernel_bytes=2.0 * nbytes, kernel=f"copy {cfg['mb']} MB")
    row = step_row(base, "cpu", "bench_roof", **fields)
    row.update(strategy="roof", model=cfg["model"], config=f"{cfg['model']} roof",
               blas_threads=t, input_shape=None, filters=None)
    return to_frame([row])


# --- the parts -------------------------------------------------------------------------

def roofs_of(df: pd.DataFrame | None, host: str | None = None) -> dict[tuple[str, int], float]:
    """``{("gemm"|"copy", threads): median}`` of the latest roof session (of ``host``)."""
    if df is None or not len(df) or "experiment" not in df:
        return {}
    r = df[df["experiment"] == "bench_roof"]
    if host is not None:
        r = r[r["host"] == host]
    if not len(r):
        return {}
    r = r[r["session"] == latest_session(r)]
    out = {}
    for (model, t), g in r.groupby(["model", "threads"]):
        col = "gflops" if model == "gemm" else "gbytes_per_s"
        out[(str(model), int(t))] = float(np.nanmedian(pd.to_numeric(g[col])))
    return out


def latest_session(df: pd.DataFrame) -> str:
    """The session of the most recent row."""
    return str(df.loc[pd.to_datetime(df["timestamp"], utc=True, format="ISO8601").idxmax(),
                      "session"])


def with_roofs(df: pd.DataFrame, roofs: Mapping[tuple[str, int], float]) -> pd.DataFrame:
    """``pct_gemm_roof`` (and ``pct_copy_roof`` where GB/s are known) at the same threads."""
    out = df.copy()
    t = pd.to_numeric(out["threads"]).astype(int)
    if "gflops" in out:
        gemm = t.map(lambda n: roofs.get(("gemm", n), math.nan))
        out["pct_gemm_roof"] = 100 * pd.to_numeric(out["gflops"]) / gemm
    if "gbytes_per_s" in out:
        copy = t.map(lambda n: roofs.get(("copy", n), math.nan))
        out["pct_copy_roof"] = 100 * pd.to_numeric(out["gbytes_per_s"]) / copy
    return out


def flag(df: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Each point's anomaly (wide CI, too few trials) onto its rows."""
    pts = analysis.points(df, list(by), value)
    if len(pts):
        pts["anomaly"] = [analysis.point_anomaly(p) for p in pts.to_dict("records")]
    return analysis.flag_rows(df, pts, list(by))


def flag_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Speedups against the best one-thread run of the same config and session, flagged
    (superlinear, wide CI, few trials) onto the step rows."""
    pts = analysis.speedups(df, "samples_per_s", series=("backend",))
    if not len(pts):
        return df
    return analysis.flag_rows(df, pts, ["host", "session", "config", "backend", "workers"])


def _finish(raw: pd.DataFrame, scale: str, session: str) -> pd.DataFrame:
    return schema.rows(raw, scale=scale, session=session)


def _memory(plan: measure.Plan, log: Log) -> None:
    """Peak memory of each configuration in an untimed pass (written into its config)."""
    for cfg in plan.configs:
        make = partial(steps.make_setup, cfg["backend"], cfg["threads"], cfg["batch"],
                       steps.parse_shape(cfg["shape"]), cfg["filters"])
        with steps.pinned(cfg["backend"], cfg["threads"]):
            cfg["peak_mem_mb"] = steps.peak_memory(make)["peak_mem_mb"]
    _say(log, "  peak memory: " + ", ".join(
        f"{steps.series(c['backend'], c['threads'])} {c['peak_mem_mb']:.0f} MB"
        for c in plan.configs))


def check_agreement(pairs: Sequence[tuple[str, int]], shapes: Sequence[str], log: Log) -> None:
    """Refuse to time a backend whose step differs from the NumPy reference."""
    backends = sorted({b for b, _ in pairs} - {"numpy"})
    for shape in shapes:
        got = steps.agreement(backends, steps.parse_shape(shape), 4, SEED_FILTERS)
        bad = [c.line() for c in got if not c.ok]
        if bad:
            raise RuntimeError(f"{shape}: a backend's step differs from the NumPy reference, "
                               "so timing it would compare different work:\n" + "\n".join(bad))
        worst = max(got, key=lambda c: c.rel_err, default=None)
        _say(log, f"{shape}: {', '.join(backends)} agree with numpy after 2 steps (worst: "
                  f"{worst.line() if worst else '-'})")


def run_steps(p: Mapping[str, Any], scale: str, session: str, log: Log) -> pd.DataFrame:
    pairs = series_plan(p["threads"], log=log)
    frames = []
    for shape in p["shapes"]:
        for batch in p["batches"]:
            plan = step_configs(pairs, shape, batch, SEED_FILTERS, p["steps"])
            _memory(plan, log)
            frames.append(measure.run_interleaved(plan, time_step, p["trials"], log=log,
                                                  quiet=scale != "quick"))
    return flag_speedups(_finish(pd.concat(frames, ignore_index=True), scale, session))


def run_kernels(p: Mapping[str, Any], scale: str, session: str, log: Log) -> pd.DataFrame:
    shape, batch = p["kernel_config"]
    plan = step_configs(series_plan(p["threads"], log=log), shape, batch, SEED_FILTERS,
                        p["steps"])
    df = measure.run_interleaved(plan, time_kernels, p["trials"], log=log,
                                 quiet=scale != "quick")
    return flag(_finish(df, scale, session),
                ["host", "session", "config", "backend", "threads", "kernel", "direction"],
                "step_ms_median")


def run_roofs(p: Mapping[str, Any], scale: str, session: str, log: Log) -> pd.DataFrame:
    threads = [t for t in p["threads"] if steps.thread_problem("numba", t) is None]
    configs = [dict(model="gemm", threads=t, n=p["gemm_size"], repeats=p["roof_repeats"])
               for t in threads]
    configs += [dict(model="copy", threads=t, mb=p["copy_mb"], repeats=p["roof_repeats"])
                for t in threads]
    plan = measure.Plan(configs, [f"{c['model']} {c['threads']}t" for c in configs])
    df = measure.run_interleaved(plan, time_roof, p["trials"], log=log, quiet=scale != "quick")
    df = _finish(df, scale, session)
    df = pd.concat([flag(df[df["model"] == m], ["host", "session", "model", "threads"], col)
                    for m, col in (("gemm", "gflops"), ("copy", "gbytes_per_s"))],
                   ignore_index=True)
    for (m, t), v in roofs_of(df).items():
        _say(log, f"roof {m} {t}t: {v:.1f} {'GFLOP/s' if m == 'gemm' else 'GB/s'}")
    return df


def run_grid(p: Mapping[str, Any], scale: str, session: str, log: Log) -> pd.DataFrame:
    pairs = series_plan(p["threads"], backends=("numpy", "numba"), log=log)
    top = max((t for b, t in pairs if b == "numba"), default=1)
    pairs = [(b, t) for b, t in pairs if t in (1, top)]
    frames = []
    # small cells first: a big step leaves state behind that slows a small one after it
    for batch in sorted(p["grid_batches"]):
        for filters in sorted(p["grid_filters"]):
            plan = step_configs(pairs, p["grid_shape"], batch, filters, p["grid_steps"])
            frames.append(measure.run_interleaved(
                plan, partial(time_step, experiment="bench_grid"), p["trials"], log=log,
                quiet=scale != "quick"))
    return flag_speedups(_finish(pd.concat(frames, ignore_index=True), scale, session))


def time_fresh_process(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One training CLI run in a fresh process: start-up, first step and JIT measured apart."""
    cmd = measure.python_module(
        "cnn.train", "--backend", cfg["backend"], "--dataset", "synthetic", "--epochs", "1",
        "--max-steps", str(cfg["steps"]), "--batch-size", str(cfg["batch"]), "--threads", "1",
        "--test-subset", "16", "--experiment", "bench_compile")
    if cfg["cache"] == "cold":
        with tempfile.TemporaryDirectory(prefix="numba_cold_") as empty:
            df = measure.run_cli(cmd, env=measure.pinned_env(1, NUMBA_CACHE_DIR=empty))
    else:
        df = measure.run_cli(cmd, env=measure.pinned_env(1))
    df = df.assign(strategy=steps.STRATEGY[cfg["backend"]], jit_cache=cfg["cache"] or "",
                   input_shape="3x32x32", filters=steps.label(SEED_FILTERS, ","),
                   processes=1, config=f"train CLI {MODEL} 3x32x32 b{cfg['batch']}",
                   first_step_s=pd.to_numeric(df["compile_s"])
                   + pd.to_numeric(df["step_ms_median"]) / 1e3)
    return df


def run_compile(p: Mapping[str, Any], scale: str, session: str, log: Log) -> pd.DataFrame:
    base = dict(steps=max(3, int(p["steps"])), batch=p["compile_batch"])
    configs = [dict(base, backend="numba", cache="cold"),  # an empty cache per trial
               dict(base, backend="numba", cache="warm"),  # this process's cache
               dict(base, backend="numpy", cache="")]
    time_fresh_process(configs[1])  # makes sure the warm cache is filled, untimed
    plan = measure.Plan(configs, ["numba, cold JIT cache", "numba, warm JIT cache",
                                  "numpy (no JIT)"])
    df = measure.run_interleaved(plan, time_fresh_process, p["compile_trials"], log=log,
                                 quiet=scale != "quick")
    return flag(_finish(df, scale, session), ["host", "session", "backend", "jit_cache"],
                "compile_s")


RUNNERS = {"roofs": run_roofs, "steps": run_steps, "kernels": run_kernels, "grid": run_grid,
           "compile": run_compile}


def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Log = print) -> dict[str, pd.DataFrame]:
    """Measure the chosen parts (default all), save each as it finishes, return the file.

    Before any step is timed, every backend's step is checked against NumPy's at each
    input shape (`check_agreement`). Steps and kernels get ``pct_gemm_roof`` from this
    session's roofs, else from the latest roofs saved for this host at this scale.
    """
    chosen = list(PARTS if parts is None else parts)
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    p = preset("kernels", scale)
    session = measure.new_session()
    saved = load_saved(RESULTS, scale).get(NAME)
    host = runinfo.run_info()["host"]
    roofs = roofs_of(saved, host)
    if {"steps", "kernels", "grid"} & set(chosen):
        shapes = dict.fromkeys([*p["shapes"], p["kernel_config"][0], p["grid_shape"]])
        check_agreement(series_plan(p["threads"], log=None), list(shapes), log)
    for part in [x for x in PARTS if x in chosen]:
        _say(log, f"== {part} ({EXPERIMENT[part]}), scale {scale}")
        df = RUNNERS[part](p, scale, session, log)
        if not len(df):
            _say(log, f"{part}: nothing could run here")
            continue
        if part == "roofs":
            roofs = roofs_of(df)
        elif part in ("steps", "kernels", "grid"):
            df = with_roofs(df, roofs)
        schema.save(df, NAME, scale)
    return load(scale)


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    """The saved ``kernels`` frame (absent until measured)."""
    return load_saved(RESULTS, scale)


def section(part: str, scale: str = DEFAULT_SCALE, measure_it: bool = True,
            log: Log = print) -> pd.DataFrame:
    """A notebook section: measure one part (or, with ``measure_it`` False, only load),
    then every saved row of the family (empty frame when nothing is saved yet)."""
    frames = run(scale, parts=[part], log=log) if measure_it else load(scale)
    return frames.get(NAME, pd.DataFrame())


# --- reading the rows --------------------------------------------------------------------

def rows_of(df: pd.DataFrame | None, part: str) -> pd.DataFrame:
    """The rows of one part (``experiment`` of it), with a ``series`` column."""
    if df is None or not len(df) or "experiment" not in df:
        return pd.DataFrame(columns=["series"])
    r = df[df["experiment"] == EXPERIMENT[part]].copy()
    r["series"] = [steps.series(b, t) for b, t in zip(r["backend"], r["threads"], strict=True)]
    return r


def table(df: pd.DataFrame | None, part: str) -> pd.DataFrame:
    """Median and 95% CI per point of a part, in the order the figures use."""
    r = rows_of(df, part)
    if not len(r):
        return pd.DataFrame()
    by, value = {
        "steps": (["input_shape", "batch_size", "series"], "samples_per_s"),
        "grid": (["filters", "batch_size", "series"], "samples_per_s"),
        "kernels": (["series", "kernel", "direction"], "step_ms_median"),
        "roofs": (["model", "threads"], "gflops"),
        "compile": (["backend", "jit_cache"], "compile_s"),
    }[part]
    if part == "roofs":
        r["value"] = np.where(r["model"] == "gemm", r["gflops"], r["gbytes_per_s"])
        value = "value"
    out = analysis.points(r, by, value).rename(columns={"median": f"{value} median"})
    if part == "compile":
        extra = r.groupby(by, sort=False)[["startup_s", "first_step_s", "step_ms_median"]]
        out = out.merge(extra.median().reset_index(), on=by, how="left")
    return out


def ratio(df: pd.DataFrame | None, part: str, num: tuple[str, int], den: tuple[str, int],
          shape: str, batch: int, filters: str = "32,64") -> dict[str, Any]:
    """``samples_per_s`` of ``num`` over ``den`` at one configuration: the ratio of medians
    and its bootstrap CI over the trials of the latest session that has both sides."""
    r = rows_of(df, part)
    if len(r):
        r = r[(r["input_shape"] == shape) & (pd.to_numeric(r["batch_size"]) == int(batch))
              & (r["filters"] == filters)]
    a, b = steps.series(*num), steps.series(*den)
    both = [s for s, g in r.groupby("session") if {a, b} <= set(g["series"])] if len(r) else []
    if not both:
        return {"ratio": math.nan, "n": 0, "rows": r.iloc[:0] if len(r) else r}
    r = r[r["session"] == latest_session(r[r["session"].isin(both)])]
    na, nb = r[r["series"] == a], r[r["series"] == b]
    value, lo, hi = analysis.ratio_ci(na["samples_per_s"], nb["samples_per_s"])
    n = int(min(len(na), len(nb)))
    own = analysis.point_anomaly({"median": value, "lo": lo, "hi": hi, "n": n})
    parts = [own, *r.loc[r["series"].isin([a, b]), "anomaly"]]
    anomaly = "; ".join(dict.fromkeys(x for p in parts for x in str(p or "").split("; ") if x))
    return {"ratio": value, "ratio_lo": lo, "ratio_hi": hi, "n": n, "anomaly": anomaly,
            "session": str(r["session"].iloc[0]), "host": str(r["host"].iloc[0]),
            "config": str(r["config"].iloc[0]), "rows": r[r["series"].isin([a, b])]}


def grid_ratios(df: pd.DataFrame | None) -> pd.DataFrame:
    """Per grid cell (filters, batch): numba at the most threads over numpy 1t, with CI."""
    r = rows_of(df, "grid")
    if not len(r):
        return pd.DataFrame()
    top = int(r.loc[r["backend"] == "numba", "threads"].max())
    out = []
    for (shape, f, b), _ in r.groupby(["input_shape", "filters", "batch_size"], sort=False):
        q = ratio(df, "grid", ("numba", top), ("numpy", 1), shape, int(b), f)
        if np.isfinite(q["ratio"]):
            out.append({"input_shape": shape, "filters": f, "batch_size": int(b),
                        "threads": top, **{k: v for k, v in q.items() if k != "rows"}})
    return pd.DataFrame(out)


# --- headlines -----------------------------------------------------------------------------

def _ratio_headline(df: pd.DataFrame | None, key: str, label: str, num: tuple[str, int],
                    den: tuple[str, int], where: tuple[str, int], part: str = "steps",
                    filters: str = "32,64", note: str = "") -> analysis.Headline:
    q = ratio(df, part, num, den, where[0], where[1], filters)
    if not np.isfinite(q["ratio"]):
        return analysis.not_measured(key, label, f"no interleaved {steps.series(*num)} and "
                                     f"{steps.series(*den)} trials at {where[0]}, batch "
                                     f"{where[1]} in {SOURCE}")
    return analysis.headline_from_point(key, label, q, "x", value="ratio",
                                        source=f"{SOURCE} ({EXPERIMENT[part]})",
                                        rows=q["rows"], note=note)


def headlines(frames: Mapping[str, pd.DataFrame]) -> list[analysis.Headline]:
    """Numba vs NumPy and vs PyTorch, 1 and 2 threads, at the seed configuration and at the
    MPI/HOGWILD one; the best grid cell (labelled so); the cold JIT compile."""
    df = frames.get(NAME)
    out = []
    for where, tag, what in ((SEED, "seed", "seed CNN"), (MPI, "mpi", "MPI/HOGWILD config")):
        at = f"{what}, {where[0]}, batch {where[1]}"
        for t in (1, 2):
            out.append(_ratio_headline(df, f"numba{t}t_vs_numpy_{tag}",
                                       f"Numba {t}t over sequential NumPy ({at})",
                                       ("numba", t), ("numpy", 1), where))
            out.append(_ratio_headline(df, f"numba{t}t_vs_torch{t}t_{tag}",
                                       f"Numba {t}t over PyTorch {t}t ({at})",
                                       ("numba", t), ("torch", t), where))
    cells = grid_ratios(df)
    if len(cells):
        best = cells.loc[cells["ratio"].idxmax()]
        out.append(_ratio_headline(
            df, "numba_vs_numpy_grid_best",
            f"Numba {best['threads']}t over NumPy, best cell of the grid ({best['input_shape']},"
            f" filters {best['filters']}, batch {best['batch_size']})",
            ("numba", int(best["threads"])), ("numpy", 1),
            (best["input_shape"], int(best["batch_size"])), "grid", best["filters"],
            note="best cell of the filter x batch grid, not the seed configuration"))
    else:
        out.append(analysis.not_measured("numba_vs_numpy_grid_best",
                                         "Numba over NumPy, best cell of the grid",
                                         f"no grid rows in {SOURCE}"))
    out.append(compile_headline(df))
    return out


def headline_frame(df: pd.DataFrame | None) -> pd.DataFrame:
    """The headlines as a table: label, value with CI, trials, scale, anomaly, note."""
    hs = headlines({NAME: df} if df is not None and len(df) else {})
    return pd.DataFrame([{"key": h.key, "headline": h.label, "value [95% CI]": h.text(),
                          "trials": h.trials, "scale": h.scale, "anomaly": h.anomaly,
                          "note": h.note} for h in hs]).set_index("key")


def compile_headline(df: pd.DataFrame | None) -> analysis.Headline:
    """The cold JIT compile of a training step (fresh process, empty Numba cache)."""
    key, label = "numba_cold_compile", "Numba JIT compile of a training step, cold cache"
    r = rows_of(df, "compile")
    r = r[(r["backend"] == "numba") & (r["jit_cache"] == "cold")] if len(r) else r
    if not len(r):
        return analysis.not_measured(key, label, f"no bench_compile rows in {SOURCE}")
    r = r[r["session"] == latest_session(r)]
    med, lo, hi = analysis.median_ci(r["compile_s"])
    p = {"median": med, "lo": lo, "hi": hi, "n": len(r), "config": str(r["config"].iloc[0]),
         "session": str(r["session"].iloc[0]), "host": str(r["host"].iloc[0])}
    p["anomaly"] = analysis.point_anomaly(p)
    return analysis.headline_from_point(key, label, p, "s", value="median",
                                        source=f"{SOURCE} (bench_compile)", rows=r,
                                        note="first step minus a steady step, fresh process")


def main(argv: Sequence[str] | None = None) -> int:
    return cli("kernels", __doc__, run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
