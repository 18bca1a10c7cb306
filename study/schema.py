"""The results schema, as code: every column the study keeps, its type, required or not.

One row per measured run, epoch or trial in ``results/<name>.pkl``. Frames are validated
on every save and every load; a file that does not match fails with an error naming the
file and the column. Rows of one scale never replace rows of another. A re-run on one
host adds a sitting beside that host's earlier ones of the same experiments and scale (the
newest five are kept and the headlines pool them), unless ``$CNN_REPLACE_SITTINGS`` asks
for a replacement (docs/DESIGN.md, "Results").

Results pickles are trusted input (unpickling runs code): they are read only from the
project's own results folder. `export` writes CSV (or Parquet, with pyarrow) for sharing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.io import atomic_write
from cnn.metrics import to_frame
from study import paths

SCALES: tuple[str, ...] = ("quick", "standard", "full")


class SchemaError(ValueError):
    """A results frame or file does not match the schema; the message names file and column."""


@dataclass(frozen=True)
class Column:
    kind: str  # "str" | "int" | "float" | "bool" | "object"
    required: bool
    doc: str


def _c(kind: str, doc: str, required: bool = False) -> Column:
    return Column(kind, required, doc)


#: Every column of the study's results. Required ones are present and non-missing in
#: every row; optional ones may be absent or missing (NaN / None).
COLUMNS: dict[str, Column] = {
    # what ran
    "experiment": _c("str", "family and part: mpi_weak, hogwild, bench_step, ...", True),
    "strategy": _c("str", "sequential, numba, allreduce, hogwild, torch-ddp, ...", True),
    "backend": _c("str", "numpy | numba | cuda | torch | mpi", True),
    "processes": _c("int", "OS processes of the run (ranks incl. a server, workers, engines)",
                    True),
    "threads": _c("int", "threads per process", True),
    "workers": _c("int", "the parallel degree speedups are taken over (trainers x threads)",
                  True),
    "device": _c("str", "cpu, the GPU's name, or cuda-simulator", True),
    "model": _c("str", "seed_cnn, lenet5, mlp, or gemm/copy for roofs", True),
    "dataset": _c("str", "digits, fashion-mnist, synthetic (timing only), ...", True),
    "batch_size": _c("int", "per worker (per rank) batch; global = workers x this", True),
    "mode": _c("str", "weak | strong | hybrid | accuracy | straggler scenario | ''", True),
    "config": _c("str", "the configuration a speedup is taken within (same work, same "
                 "layout but the worker count)"),
    "scale": _c("str", "quick | standard | full (study/config.py)", True),
    "trial": _c("int", "repeat number within the session (0-based)", True),
    "session": _c("str", "id of the sitting whose runs were interleaved", True),
    "anomaly": _c("str", "why this row must not be read as a finding ('' if none)", True),
    # what it measured
    "global_batch": _c("float", "samples per step over all workers (workers x batch_size)"),
    "epochs": _c("float", "epochs of training the row covers"),
    "samples": _c("float", "training samples processed"),
    "wall_s": _c("float", "training wall seconds (start-up and JIT excluded)"),
    "compile_s": _c("float", "JIT compile + first-step excess, seconds (reported apart)"),
    "startup_s": _c("float", "process/engine start-up before training, seconds (apart)"),
    "process_wall_s": _c("float", "the whole process, start-up included, seconds"),
    "first_step_s": _c("float", "the first training step, seconds (apart)"),
    "step_ms_median": _c("float", "median steady-state step, ms"),
    "step_ms_iqr": _c("float", "interquartile range of the steady-state step, ms"),
    "samples_per_s": _c("float", "steady-state training throughput"),
    "comm_s": _c("float", "seconds spent communicating"),
    "test_acc": _c("float", "test accuracy in [0, 1]"),
    "final_loss": _c("float", "mean training loss of the last epoch"),
    "time_to_target_s": _c("float", "wall seconds to first reach the target accuracy"),
    # where it ran
    "host": _c("str", "host label (hostname)", True),
    "physical_cores": _c("int", "physical CPU cores of the host", True),
    "cpu": _c("str", "CPU model and core counts", True),
    "gpu": _c("str", "GPU name, or missing when none"),
    "versions": _c("object", "library versions (dict)", True),
    "commit": _c("str", "git commit of the code that measured ('-dirty' if modified)", True),
    "timestamp": _c("str", "UTC ISO time of the measurement", True),
    "host_load": _c("float", "1-minute load average when the trial started"),
    # per-epoch rows
    "epoch": _c("float", "epoch number (1-based) of a per-epoch row"),
    "step": _c("float", "global step reached"),
    "train_loss": _c("float", "mean training loss over the epoch's batches"),
    "test_loss": _c("float", "test loss"),
    "lr": _c("float", "learning rate at the row's last step"),
    "complete_epoch": _c("bool", "False for a row cut short by --max-steps"),
    # asynchronous methods
    "staleness_mean": _c("float", "mean staleness of applied gradients (updates)"),
    "staleness_max": _c("float", "largest staleness seen"),
    "staleness_p95": _c("float", "95th percentile of staleness"),
    "staleness_hist": _c("object", "counts of staleness 0, 1, 2, ... (list)"),
    "dropped": _c("float", "gradients dropped by backup workers"),
    "straggler": _c("str", "straggler setting (RANK:FACTOR, exp:MEAN_MS, or '')"),
    "momentum_mode": _c("str", "HOGWILD momentum option: local | shared | scaled"),
    "worker_momentum": _c("float", "momentum each HOGWILD worker used (scaled lowers it)"),
    "rank_steps": _c("object", "steps each rank (HOGWILD: worker) computed (list; a "
                     "parameter server computes none)"),
    "target_acc": _c("float", "accuracy threshold of time_to_target_s"),
    # correctness checks
    "quantity": _c("str", "what a check compares: logits, loss, a gradient's name, weights"),
    "dtype": _c("str", "float32 | float64"),
    "rel_err": _c("float", "max|got - want| / max|want| (study/checks.py)"),
    "tolerance": _c("float", "the tolerance of the check (study/checks.py)"),
    "check_ok": _c("bool", "whether the check passed"),
    "torch_version": _c("str", "torch.__version__ of a torch row"),
    "overlap_frac": _c("float", "HOGWILD: share of updates that overlapped another worker's write"),
    "lock_wait_s": _c("float", "HOGWILD --lock: seconds per worker spent waiting for the lock"),
    "step_cpu_ms": _c("float", "CPU ms per step (equal at 1 and W workers: no contention)"),
    "pinned": _c("bool", "each worker pinned to its own core (os.sched_setaffinity)"),
    "pinned_workers": _c("float", "worker processes actually pinned in the run"),
    # kernels and roofs
    "input_shape": _c("str", "C x H x W of the input"),
    "filters": _c("str", "filters of conv1,conv2"),
    "kernel": _c("str", "kernel name of a per-kernel row"),
    "version": _c("str", "kernel version of a ladder row (v1..vN)"),
    "what_changed": _c("str", "what the ladder version changed, one line"),
    "family": _c("str", "kernel family of a ladder row (conv_forward, dense, ...)"),
    "status": _c("str", "ladder rung: history | production | candidate"),
    "seq": _c("float", "position of the ladder timing in the interleaved run order"),
    "reps": _c("float", "calls per ladder timing sample"),
    "time_ms": _c("float", "one ladder timing sample: ms per call"),
    "first_call_s": _c("float", "the first call (JIT compile included), seconds"),
    "flops": _c("float", "floating-point operations of one call (a multiply-add is 2)"),
    "gemm_roof_gflops": _c("float", "NumPy sgemm GFLOP/s measured in the same run"),
    "copy_roof_gbs": _c("float", "large-copy GB/s measured in the same run"),
    "gflops": _c("float", "achieved GFLOP/s"),
    "pct_gemm_roof": _c("float", "per cent of the measured GEMM ceiling"),
    "pct_copy_roof": _c("float", "per cent of the measured copy roof"),
    "peak_mem_mb": _c("float", "peak memory of the configuration, MB"),
    "direction": _c("str", "what a per-kernel row timed: fwd | bwd | fwd+bwd (loss) | update"),
    "kernel_flops": _c("float", "FLOPs of one call of the timed kernel (multiply-add = 2)"),
    "kernel_bytes": _c("float", "bytes one call reads and writes (estimate, for the roofline)"),
    "gbytes_per_s": _c("float", "achieved GB/s: kernel_bytes / median time (or a copy roof)"),
    "blas_threads": _c("float", "BLAS threads of the run (numpy and numba call BLAS on one)"),
    "jit_cache": _c("str", "Numba's on-disk cache at a fresh-process start: cold | warm | ''"),
    # peers
    "peer": _c("str", "what the row is compared with (torch-ddp, joblib-kfold, ...)"),
    "torch_threads": _c("float", "torch.get_num_threads() in the run"),
    "joblib_version": _c("str", "joblib.__version__ of a joblib row"),
    "warm_workers": _c("float", "pool processes the untimed warm-up reached (joblib-kfold)"),
    "pool_startup_s": _c("float", "start of the worker processes inside the run, seconds"),
    "tf32": _c("bool", "whether TF32 tensor cores were allowed (GPU rows)"),
    # k-fold
    "folds": _c("float", "number of folds"),
    "fold": _c("float", "fold index of a per-fold row"),
    "engines": _c("float", "ipyparallel engines"),
    "kind": _c("str", "run | fold | ..."),
    "cpu_busy_min": _c("float", "least busy core during the run, %"),
    "cpu_busy": _c("object", "mean % busy of each core during the run (list)"),
    "cpu_own_mean": _c("float", "CPU of the run's own processes, % of one core"),
    "cpu_times": _c("object", "seconds of each per-core CPU sample (list)"),
    "cpu_samples": _c("object", "per-core % busy, one list per sample (list of lists)"),
    "start_s": _c("float", "a fold's start, seconds after the first fold was submitted"),
    "end_s": _c("float", "a fold's end, seconds after the first fold was submitted"),
    "pid": _c("float", "process id that ran the fold (a timeline lane)"),
    "engine": _c("float", "ipyparallel engine id that ran the fold (-1 serial)"),
    "test_acc_std": _c("float", "std of the per-fold held-out accuracies"),
    "fold_acc_rel_err": _c("float", "checks.compare error of per-fold accuracies vs serial"),
    "fold_acc_match": _c("bool", "per-fold accuracies identical to the serial run's"),
    # cost model
    "bytes": _c("float", "message size, bytes"),
    "time_s": _c("float", "measured seconds of one operation"),
    "time_min_s": _c("float", "fastest of the repeats of one operation (steadier on a busy host)"),
    "predicted_s": _c("float", "what the cost model predicted"),
    "rel_error": _c("float", "(predicted - measured) / measured"),
    "network": _c("str", "network the cost model extrapolates to"),
    "weak_efficiency": _c("float", "modelled weak-scaling efficiency"),
    "strong_efficiency": _c("float", "modelled strong-scaling efficiency"),
}

REQUIRED: tuple[str, ...] = tuple(c for c, col in COLUMNS.items() if col.required)

#: Columns with a default the study fills when a library row lacks them.
DEFAULTS: dict[str, Any] = {"mode": "", "trial": 0, "anomaly": "", "session": "single"}


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float | np.floating) and math.isnan(v))


def _coerce(series: pd.Series, col: Column, where: str, name: str) -> pd.Series:
    """The column converted to its kind, or a SchemaError naming the first bad value."""
    if col.kind == "object":
        return series
    if col.kind == "str":
        bad = [v for v in series if not _missing(v) and not isinstance(v, str)]
        if bad:
            raise SchemaError(f"{where}: column {name!r} must hold text, found {bad[0]!r}")
        return series.astype(object)
    if col.kind == "bool":
        bad = [v for v in series if not _missing(v) and not isinstance(v, bool | np.bool_)]
        if bad:
            raise SchemaError(f"{where}: column {name!r} must hold True/False, found {bad[0]!r}")
        return series
    values = pd.to_numeric(series, errors="coerce")
    bad = [v for v, n in zip(series, values, strict=True) if not _missing(v) and _missing(n)]
    if bad:
        raise SchemaError(f"{where}: column {name!r} must be a number, found {bad[0]!r}")
    if col.kind == "int":
        fractional = values.dropna()[values.dropna() != np.floor(values.dropna())]
        if len(fractional):
            raise SchemaError(f"{where}: column {name!r} must hold integers, "
                              f"found {fractional.iloc[0]!r}")
        if col.required:
            return values.astype(np.int64)
    return values.astype(np.float64)


def validate(df: pd.DataFrame, where: str = "frame", strict: bool = False) -> pd.DataFrame:
    """``df`` with every schema column typed; SchemaError naming ``where`` and the column.

    Required columns must exist and be filled in every row; ``scale`` must be a known
    scale. With ``strict``, a column the schema does not declare is an error too.
    """
    if not isinstance(df, pd.DataFrame):
        raise SchemaError(f"{where}: not a results frame (got {type(df).__name__})")
    out = df.reset_index(drop=True).copy()
    for name in REQUIRED:
        if name not in out.columns:
            raise SchemaError(f"{where}: required column {name!r} is missing")
        holes = out[name].map(_missing)
        if holes.any():
            raise SchemaError(f"{where}: required column {name!r} is empty in row "
                              f"{int(np.flatnonzero(holes.to_numpy())[0])}")
    for name in out.columns:
        col = COLUMNS.get(name)
        if col is None:
            if strict:
                raise SchemaError(f"{where}: column {name!r} is not in study/schema.py")
            continue
        out[name] = _coerce(out[name], col, where, name)
    bad = sorted(set(out["scale"]) - set(SCALES))
    if bad:
        raise SchemaError(f"{where}: column 'scale' has {bad[0]!r}; scales are {SCALES}")
    return out


def rows(raw: pd.DataFrame | Iterable[Mapping[str, Any]], *, scale: str, session: str,
         **fields: Any) -> pd.DataFrame:
    """Library rows (cnn.metrics) made study rows: scale, session and defaults filled,
    ``workers`` derived when absent (processes x threads), then validated."""
    df = to_frame(raw)
    df["scale"] = scale
    df["session"] = session
    for name, value in fields.items():
        df[name] = value
    for name, value in DEFAULTS.items():
        if name not in df.columns:
            df[name] = value
        else:
            df[name] = df[name].map(lambda v, d=value: d if _missing(v) else v)
    if "workers" not in df.columns:
        df["workers"] = pd.to_numeric(df["processes"]).fillna(1) * pd.to_numeric(
            df["threads"]).fillna(1)
    return validate(df, where=f"rows of {sorted(set(df['experiment'].astype(str)))}")


def path_of(name: str, scale: str = "standard") -> Path:
    """``<results dir>/<name>.pkl``; ``name`` is a bare file stem, never a path."""
    if not name or Path(name).name != name or name.startswith("."):
        raise SchemaError(f"results name {name!r} must be a bare file name (no folders)")
    stem = name[:-4] if name.endswith(".pkl") else name
    return paths.results_dir(scale) / f"{stem}.pkl"


def load_file(path: str | os.PathLike, strict: bool = False) -> pd.DataFrame:
    """Read and validate one results pickle that lies inside a results folder of the project.

    Refuses a file outside those folders: unpickling runs code, so only the study's own
    files are read (README, "Results").
    """
    p = Path(path).resolve()
    allowed = {paths.results_dir(s).resolve() for s in SCALES}
    if p.parent not in allowed:
        raise SchemaError(f"{p}: results are read only from the project's results folders "
                          f"({', '.join(sorted(map(str, allowed)))}); pickles run code")
    try:
        df = pd.read_pickle(p)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file: name it
        raise SchemaError(f"{paths.shown(p)}: not a readable results pickle "
                          f"({type(exc).__name__}: {exc})") from None
    return validate(df, where=paths.shown(p), strict=strict)


def load(name: str, scale: str = "standard", strict: bool = False) -> pd.DataFrame:
    """The validated frame of ``results/<name>.pkl`` (FileNotFoundError when absent)."""
    return load_file(path_of(name, scale), strict=strict)


def load_all(scale: str = "standard", strict: bool = False) -> dict[str, pd.DataFrame]:
    """Every results file of a scale's folder, by stem. A bad file is an error, not a skip."""
    folder = paths.results_dir(scale)
    return {p.stem: load_file(p, strict=strict) for p in sorted(folder.glob("*.pkl"))}


#: Sittings (sessions) of one experiment kept per host and scale: the headlines pool them
#: (study/sittings.py), so a number is not one sitting's luck on a shared machine.
SITTINGS_KEPT = 5
#: Set (``--replace`` on a family's command line) to drop the earlier sittings instead of
#: pooling with them: after a change to the code or the preset that moves the numbers.
REPLACE_ENV = "CNN_REPLACE_SITTINGS"


def merge(old: pd.DataFrame, new: pd.DataFrame, replace: bool = False) -> pd.DataFrame:
    """``new`` plus the rows of ``old`` it does not supersede.

    A new row supersedes the old rows of the same experiment, host, scale and session
    (with ``replace``: of any session). Earlier sittings of the same experiment on the
    same host are kept, the newest `SITTINGS_KEPT` of them in all; rows measured
    elsewhere or at another scale are always kept.
    """
    key = ["experiment", "host", "scale"]
    same = key if replace else [*key, "session"]
    fresh = set(map(tuple, new[same].astype(str).to_numpy()))
    keep = [tuple(k) not in fresh for k in old[same].astype(str).to_numpy()]
    kept = old.loc[keep]
    if not len(kept):
        return new.reset_index(drop=True)
    out = pd.concat([new, kept], ignore_index=True, sort=False)
    newest: dict[tuple[str, ...], list[str]] = {}
    for k, sessions in out.groupby(key, sort=False)["session"]:
        newest[tuple(map(str, k))] = sorted(set(sessions.astype(str)),
                                            reverse=True)[:SITTINGS_KEPT]
    keep = [str(s) in newest[tuple(k)] for k, s in zip(
        out[key].astype(str).itertuples(index=False, name=None), out["session"], strict=True)]
    return out.loc[keep].reset_index(drop=True)


def save(df: pd.DataFrame, name: str, scale: str | None = None) -> Path:
    """Validate ``df`` and merge it into ``results/<name>.pkl`` atomically.

    ``scale`` defaults to the rows' own scale (they must agree): quick rows go to the
    scratch folder (study/paths.py) unless ``$CNN_RESULTS_DIR`` says otherwise.
    """
    new = validate(df, where=f"new rows for {name}")
    scales = sorted(set(new["scale"]))
    scale = scale or (scales[0] if len(scales) == 1 else None)
    if scale is None or scales != [scale]:
        raise SchemaError(f"new rows for {name}: one scale per save, got {scales}")
    path = path_of(name, scale)
    out = new
    if path.exists():
        out = merge(load_file(path), new, replace=bool(os.environ.get(REPLACE_ENV)))
    out = validate(out, where=paths.shown(path))
    with atomic_write(path) as fh:
        out.to_pickle(fh)
    return path


def export(name: str, dest: str | os.PathLike, scale: str = "standard") -> Path:
    """Write ``results/<name>.pkl`` as CSV or Parquet (by ``dest``'s suffix) for sharing."""
    df = load(name, scale)
    dest = Path(dest)
    flat = df.copy()
    for col in flat.columns:
        if flat[col].map(lambda v: isinstance(v, dict | list | tuple | np.ndarray)).any():
            flat[col] = flat[col].map(lambda v: json.dumps(v, default=str)
                                      if isinstance(v, dict | list | tuple)
                                      else json.dumps(np.asarray(v).tolist())
                                      if isinstance(v, np.ndarray) else v)
    if dest.suffix == ".csv":
        with atomic_write(dest, "w") as fh:
            flat.to_csv(fh, index=False)
    elif dest.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ModuleNotFoundError:
            raise SchemaError("Parquet export needs pyarrow: pip install pyarrow "
                              "(or export to .csv)") from None
        with atomic_write(dest) as fh:
            flat.to_parquet(fh, index=False)
    else:
        raise SchemaError(f"{dest}: export to .csv or .parquet")
    return dest


def describe() -> pd.DataFrame:
    """The schema as a table (docs and notebooks)."""
    return pd.DataFrame([{"column": n, "type": c.kind, "required": c.required, "meaning": c.doc}
                         for n, c in COLUMNS.items()])
