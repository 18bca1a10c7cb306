"""The study's headline numbers, read from ``results/*.pkl`` into ``results/summary.json``.

    python -m cnn.summary                      # results/*.pkl -> results/summary.json
    python -m cnn.summary --print              # also print the headline table
    python -m cnn.summary --results-dir R --out R/summary.json --no-twin

Every headline is either measured, with the file, host, device, column and row
indices it came from::

    {"status": "measured", "value": 0.9012, "text": "90.12%", "unit": "accuracy",
     "source": "results/baseline_fashion_mnist.pkl", "host": "...", "device": "cpu",
     "column": "test_acc", "rows": [14], "selection": "...", "definition": "..."}

or ``{"status": "not measured", "reason": "..."}``: a missing part is never
invented. ``text`` is exactly what the report prints. The report
(``report/report.typ``) reads this file, so every number in it comes from here.

Column names beyond the DESIGN.md schema are read defensively (what exists is
used, with the choice recorded in ``selection``). Speedups are only ever taken
against a baseline measured on the same host.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.results import numeric_column as _num
from cnn.results import text_column as _str

SCHEMA = 1
RESULTS_ENV = "CNN_RESULTS_DIR"
ROOT_ENV = "CNN_STUDY_ROOT"
NOT_MEASURED = "not measured"
MEASURED = "measured"

#: Where each part's results come from (file pattern, the step that makes it).
SOURCES: dict[str, tuple[str, str]] = {
    "baseline": ("baseline_fashion_mnist.pkl",
                 "the sequential Fashion-MNIST baseline (python -m cnn.train --dataset "
                 "fashion-mnist ... --save-metrics results/baseline_fashion_mnist.pkl)"),
    "bench_cpu": ("bench_cpu.pkl", "notebooks/02_numba_cpu.ipynb (python -m cnn.bench)"),
    "bench_gpu": ("bench_gpu.pkl", "notebooks/03_numba_cuda.ipynb on a host with a CUDA GPU"),
    "mpi": ("mpi_*.pkl", "notebooks/04_mpi_data_parallel.ipynb"),
    "hogwild": ("hogwild.pkl", "notebooks/05_async_hogwild_kfold.ipynb"),
    "kfold": ("kfold.pkl", "notebooks/05_async_hogwild_kfold.ipynb"),
}

#: The order headlines appear in (report abstract, notebook 06, --print).
HEADLINES: dict[str, str] = {
    "baseline_accuracy": "Sequential baseline test accuracy (Fashion-MNIST)",
    "baseline_throughput": "Sequential baseline training throughput (Fashion-MNIST)",
    "numpy_vs_torch_1thread": "NumPy reference vs PyTorch, 1 thread (throughput ratio)",
    "numba_best_speedup": "Best Numba CPU speedup over NumPy 1 thread",
    "mpi_strong_efficiency": "MPI strong-scaling efficiency at the largest P that fits the cores",
    "mpi_weak_efficiency": "MPI weak-scaling efficiency at the largest P that fits the cores",
    "hogwild_speedup": "HOGWILD speedup over sequential at the most workers",
    "kfold_speedup": "Async k-fold speedup over sequential at the most engines",
    "gpu_throughput": "Numba CUDA training throughput (best)",
}

#: Figure name prefix -> notebook that writes it (for the report's reproduction table).
FIGURE_NOTEBOOKS: list[tuple[str, str]] = [
    ("baseline_", "notebooks/01_sequential_baseline.ipynb"),
    ("numba", "notebooks/02_numba_cpu.ipynb"),
    ("bench", "notebooks/02_numba_cpu.ipynb"),
    ("cpu_", "notebooks/02_numba_cpu.ipynb"),
    ("cuda", "notebooks/03_numba_cuda.ipynb"),
    ("gpu", "notebooks/03_numba_cuda.ipynb"),
    ("mpi", "notebooks/04_mpi_data_parallel.ipynb"),
    ("cost", "notebooks/04_mpi_data_parallel.ipynb"),
    ("hogwild", "notebooks/05_async_hogwild_kfold.ipynb"),
    ("kfold", "notebooks/05_async_hogwild_kfold.ipynb"),
    ("summary_", "notebooks/06_speedup_summary.ipynb"),
]

#: Captions of the figures notebooks 01 and 06 write.
CAPTIONS: dict[str, str] = {
    "baseline_samples": "Sample images per class: Fashion-MNIST (left) and the embedded "
                        "digits (right).",
    "baseline_samples_fashion_mnist": "Fashion-MNIST: the first training images of each class.",
    "baseline_samples_digits": "scikit-learn digits (8x8): the first training images of each "
                               "class.",
    "baseline_curves": "Sequential baseline: training loss and test accuracy per epoch.",
    "baseline_confusion": "Sequential baseline: confusion matrix on the test split "
                          "(row-normalised).",
    "baseline_twin": "Relative error of the NumPy network against its PyTorch twin.",
    "summary_speedup": "Speedup and efficiency of every strategy against the sequential "
                       "baseline measured on the same host.",
    "summary_throughput": "Training throughput per strategy and configuration.",
    "summary_accuracy": "Test accuracy per strategy.",
    "summary_comm": "Compute vs communication time of the parallel strategies.",
    "summary_costmodel": "Cost model: measured vs modelled times.",
    "summary_amdahl": "Measured strong-scaling speedups against Amdahl's law with the "
                      "Karp-Flatt serial fraction at the largest P, extrapolated to 64 workers.",
    "summary_gpu": "GPU against CPU throughput.",
    "summary_cpu": "Per-core CPU utilisation during the widest parallel run that recorded it.",
}

_STEP_EXCLUDE = ("kernel", "gemm-ceiling")


# --------------------------------------------------------------------------- locations


def project_root() -> Path:
    """The checkout: ``$CNN_STUDY_ROOT``, else the folder above this package when it holds
    ``pyproject.toml`` (editable install), else the nearest parent of the cwd that does."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).resolve()
    pkg_parent = Path(__file__).resolve().parent.parent
    if (pkg_parent / "pyproject.toml").is_file():
        return pkg_parent
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "cnn").is_dir():
            return folder
    return here


def results_dir() -> Path:
    """``$CNN_RESULTS_DIR``, else ``<root>/results``."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else project_root() / "results"


def _rel(path: Path) -> str:
    """``results/x.pkl`` style path (relative to the project root when inside it)."""
    try:
        return path.resolve().relative_to(project_root()).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------- small helpers


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return isinstance(value, float | np.floating) and math.isnan(value)
    except TypeError:
        return False


def jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset | np.ndarray | pd.Series):
        return [jsonable(v) for v in list(obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if _missing(obj):
        return None
    if isinstance(obj, pd.Timestamp | datetime):
        return obj.isoformat()
    return str(obj)


def not_measured(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": NOT_MEASURED, "reason": reason, **extra}


def fmt_pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def fmt_acc(v: float) -> str:
    return f"{100 * v:.2f}%"


def fmt_x(v: float) -> str:
    return f"{v:.2f}x"


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def _workers(df: pd.DataFrame) -> pd.Series:
    return _num(df, "processes").fillna(1) * _num(df, "threads").fillna(1)


def _one(values: Iterable[Any]) -> Any:
    """The single distinct value, or the distinct values as a list."""
    vals = list(dict.fromkeys(None if _missing(v) else (v if isinstance(v, str) else
                                                           jsonable(v)) for v in values))
    return vals[0] if len(vals) == 1 else vals


def _int(v: Any) -> Any:
    v = jsonable(v)
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _physical_cores(cpu: Any) -> int | None:
    """Physical cores from a ``"<model> (N cores, M threads)"`` CPU label."""
    m = re.search(r"\((\d+) cores", cpu) if isinstance(cpu, str) else None
    return int(m.group(1)) if m else None


def measured(value: float, text: str, unit: str, source: str, df: pd.DataFrame,
             rows: Sequence[Any], column: str, selection: str, definition: str,
             **details: Any) -> dict[str, Any]:
    """A measured headline: the value and exactly where it came from."""
    sub = df.loc[list(rows)]
    if "scale" in sub.columns and sub["scale"].notna().any():
        details.setdefault("scale", _one(sub["scale"]))
    cores = _physical_cores(_one(sub.get("cpu", [None])))
    workers = details.get("processes") or details.get("workers") or details.get("threads")
    if cores and isinstance(workers, int | float) and workers > cores:
        details.setdefault("oversubscribed", f"{_int(workers)} workers on {cores} physical "
                                             "cores")
    return {
        "status": MEASURED, "value": float(value), "text": text, "unit": unit,
        "source": source, "host": _one(sub.get("host", [None])),
        "device": _one(sub.get("device", [None])), "cpu": _one(sub.get("cpu", [None])),
        "gpu": _one(sub.get("gpu", [None])), "column": column,
        "rows": [_int(r) for r in rows], "selection": selection, "definition": definition,
        **details,
    }


# --------------------------------------------------------------------------- loading


def load_frames(folder: str | os.PathLike | None = None
                ) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """``({"results/x.pkl": frame}, {"results/y.pkl": "why it could not be read"})``."""
    from cnn.results import to_frame

    folder = Path(folder) if folder is not None else results_dir()
    frames: dict[str, pd.DataFrame] = {}
    errors: dict[str, str] = {}
    for path in sorted(folder.glob("*.pkl")):
        if path.name.startswith("."):
            continue
        try:
            obj = pd.read_pickle(path)
            if not isinstance(obj, pd.DataFrame):
                raise TypeError(f"holds a {type(obj).__name__}, not a DataFrame")
            frames[_rel(path)] = to_frame(obj.reset_index(drop=True))
        except Exception as exc:  # a broken file is reported, never fatal
            errors[_rel(path)] = f"{type(exc).__name__}: {exc}"
    return frames, errors


def _find(frames: Mapping[str, pd.DataFrame], pattern: str) -> list[str]:
    return [k for k in frames if fnmatch.fnmatch(Path(k).name, pattern)]


def _absent(part: str, errors: Mapping[str, str], folder: str = "results") -> str:
    pattern, how = SOURCES[part]
    bad = [f"{k} ({v})" for k, v in errors.items() if fnmatch.fnmatch(Path(k).name,
                                                                            pattern)]
    if bad:
        return f"{', '.join(bad)} could not be read"
    return f"{folder}/{pattern} not found: {how} has not produced it yet"


def _latest_host(df: pd.DataFrame) -> str | None:
    """The host of the most recent row (by ``timestamp``), else the most frequent host."""
    if "host" not in df.columns or not df["host"].notna().any():
        return None
    ts = pd.to_datetime(df.get("timestamp"), errors="coerce", utc=True)
    if ts is not None and ts.notna().any():
        return str(df.loc[ts.idxmax(), "host"])
    return str(df["host"].mode().iloc[0])


def _step_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Whole training-step rows of a bench frame (not kernels, not the GEMM ceiling)."""
    keep = ~_str(df, "strategy").isin(_STEP_EXCLUDE)
    if "kernel" in df.columns:
        keep &= df["kernel"].map(_missing)
    return df.loc[keep & _num(df, "samples_per_s").notna()]


_CONFIG = ("host", "model", "dataset", "batch_size", "input_shape", "filters")


def _config_key(row: Mapping[str, Any], cols: Sequence[str] = _CONFIG) -> tuple:
    return tuple(None if _missing(row.get(c)) else str(row.get(c)) for c in cols)


def _describe(row: Mapping[str, Any], cols: Sequence[str]) -> str:
    parts = []
    for c in cols:
        v = row.get(c)
        if not _missing(v):
            v = _int(v)
            parts.append(f"{c}={v}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- headlines


def baseline_headlines(frames, errors) -> dict[str, Any]:
    part = "baseline"
    hits = _find(frames, SOURCES[part][0])
    if not hits:
        reason = _absent(part, errors)
        return {"baseline_accuracy": not_measured(reason),
                "baseline_throughput": not_measured(reason)}
    src = hits[0]
    df = frames[src]
    sel = df.loc[_num(df, "test_acc").notna() | _num(df, "samples_per_s").notna()]
    notes = []
    if "strategy" in sel.columns and (sel["strategy"] == "sequential").any():
        sel = sel.loc[sel["strategy"] == "sequential"]
        notes.append("strategy == 'sequential'")
    host = _latest_host(sel)
    if host is not None and sel["host"].nunique() > 1:
        sel = sel.loc[sel["host"] == host]
        notes.append(f"host == {host!r} (the most recent run)")
    if "complete_epoch" in sel.columns and sel["complete_epoch"].fillna(False).astype(bool).any():
        sel = sel.loc[sel["complete_epoch"].fillna(False).astype(bool)]
        notes.append("complete epochs only")
    if not len(sel):
        reason = f"{src} has no rows with test_acc or samples_per_s"
        return {"baseline_accuracy": not_measured(reason),
                "baseline_throughput": not_measured(reason)}
    ecol = next((c for c in ("epoch", "epochs") if c in sel.columns and _num(sel, c).notna().any()),
                None)
    last = _num(sel, ecol).idxmax() if ecol else sel.index[-1]
    out: dict[str, Any] = {}
    acc = _num(sel, "test_acc").loc[last]
    where = " and ".join(notes) or "all rows"
    epochs = _int(sel.loc[last, ecol]) if ecol else None
    if math.isfinite(acc):
        out["baseline_accuracy"] = measured(
            acc, fmt_acc(acc), "test accuracy", src, df, [last], "test_acc",
            f"{where}; the last epoch (row with the largest {ecol or 'index'})",
            "fraction of the test split classified correctly after the last epoch",
            epochs=epochs, dataset=_one(sel.get("dataset", [None])),
            model=_one(sel.get("model", [None])),
            batch_size=_int(sel.loc[last].get("batch_size")),
            final_loss=jsonable(sel.loc[last].get("final_loss")),
            samples=_int(sel.loc[last].get("samples")),
            wall_s=jsonable(_num(sel, "wall_s").loc[last]))
    else:
        out["baseline_accuracy"] = not_measured(f"{src}: the last epoch row has no test_acc")
    thr = _num(sel, "samples_per_s").dropna()
    if len(thr):
        med = float(thr.median())
        out["baseline_throughput"] = measured(
            med, fmt_rate(med), "samples/s", src, df, list(thr.index), "samples_per_s",
            f"{where}; median over the {len(thr)} epoch rows",
            "training samples per second of the sequential NumPy step (1 BLAS thread), "
            "median over epochs", epochs=len(thr),
            step_ms_median=jsonable(_num(sel, "step_ms_median").median()),
            threads=_int(_one(sel.get("threads", [None]))))
    else:
        out["baseline_throughput"] = not_measured(f"{src} has no samples_per_s values")
    return out


def _pairs(df: pd.DataFrame, num_mask: pd.Series, den_mask: pd.Series
           ) -> list[tuple[Any, Any]]:
    """(numerator row, denominator row) pairs with the same config on the same host."""
    dens: dict[tuple, Any] = {}
    for idx in df.index[den_mask]:
        dens.setdefault(_config_key(df.loc[idx]), []).append(idx)
    pairs = []
    for idx in df.index[num_mask]:
        for d in dens.get(_config_key(df.loc[idx]), []):
            pairs.append((idx, d))
    return pairs


def _pick_config(pairs: list[tuple[Any, Any]], df: pd.DataFrame, prefer_batch: int = 128):
    """Prefer batch 128 (the bench default), else the largest batch."""
    batches = {p: _num(df, "batch_size").get(p[0], np.nan) for p in pairs}
    exact = [p for p in pairs if batches[p] == prefer_batch]
    if exact:
        return exact, f"batch_size == {prefer_batch}"
    top = max(b for b in batches.values() if not _missing(b)) if any(
        not _missing(b) for b in batches.values()) else None
    chosen = [p for p in pairs if batches[p] == top] if top is not None else pairs
    return chosen, (f"batch_size == {_int(top)} (largest measured)" if top is not None
                    else "all batch sizes")


def bench_cpu_headlines(frames, errors) -> dict[str, Any]:
    part = "bench_cpu"
    hits = _find(frames, SOURCES[part][0])
    if not hits:
        reason = _absent(part, errors)
        return {"numpy_vs_torch_1thread": not_measured(reason),
                "numba_best_speedup": not_measured(reason)}
    src = hits[0]
    df = frames[src]
    steps = _step_rows(df)
    if "filters" in steps:  # the seed CNN itself, not the filter-count grid around it
        steps = steps.loc[_str(steps, "filters").isin(["32,64", "(32, 64)"])]
    backend = _str(steps, "backend")
    threads = _num(steps, "threads")
    numpy1 = (backend == "numpy") & (threads == 1)
    torch1 = (backend == "torch") & (threads == 1)
    thr = _num(steps, "samples_per_s")
    out: dict[str, Any] = {}

    pairs = _pairs(steps, numpy1, torch1)
    if pairs:
        chosen, how = _pick_config(pairs, steps)
        ratios = {p: thr[p[0]] / thr[p[1]] for p in chosen}
        p = max(chosen, key=lambda q: (str(steps.loc[q[0]].get("timestamp")), ratios[q]))
        r = ratios[p]
        all_ratios = [{"config": _describe(steps.loc[a], _CONFIG), "ratio": jsonable(
            thr[a] / thr[b]), "rows": [_int(a), _int(b)]} for a, b in pairs]
        out["numpy_vs_torch_1thread"] = measured(
            r, fmt_x(r), "ratio", src, df, [p[0], p[1]], "samples_per_s",
            f"backend == 'numpy' and backend == 'torch', threads == 1, same host and "
            f"config ({_describe(steps.loc[p[0]], _CONFIG)}); {how}",
            "samples_per_s(numpy, 1 thread) / samples_per_s(torch, 1 thread): below 1 means "
            "the NumPy reference is slower than PyTorch",
            numpy_samples_per_s=jsonable(thr[p[0]]), torch_samples_per_s=jsonable(thr[p[1]]),
            batch_size=_int(steps.loc[p[0]].get("batch_size")), all_configs=all_ratios)
    else:
        why = ("no numpy and torch rows at 1 thread with the same host and configuration in "
               f"{src}")
        out["numpy_vs_torch_1thread"] = not_measured(why)

    numba = backend == "numba"
    pairs = _pairs(steps, numba, numpy1)
    if pairs:
        speed = {p: thr[p[0]] / thr[p[1]] for p in pairs}
        p = max(pairs, key=lambda q: speed[q])
        s = speed[p]
        row = steps.loc[p[0]]
        out["numba_best_speedup"] = measured(
            s, fmt_x(s), "speedup", src, df, [p[0], p[1]], "samples_per_s",
            "backend == 'numba' against backend == 'numpy', threads == 1, same host and "
            f"config, seed CNN (filters 32,64); the best over {len(pairs)} numba rows "
            f"({_describe(row, _CONFIG)}, "
            f"threads={_int(row.get('threads'))})",
            "samples_per_s(numba, T threads) / samples_per_s(numpy, 1 thread), same host, "
            "same network and batch", threads=_int(row.get("threads")),
            batch_size=_int(row.get("batch_size")), numba_samples_per_s=jsonable(thr[p[0]]),
            numpy_samples_per_s=jsonable(thr[p[1]]),
            efficiency=jsonable(s / max(float(_num(steps, "threads")[p[0]]), 1.0)))
    else:
        out["numba_best_speedup"] = not_measured(
            f"no numba rows with a same-host numpy 1-thread row of the same configuration in "
            f"{src}")
    return out


_MODE_COLUMNS = ("scaling", "scaling_mode", "scale_mode", "mode", "weak_strong", "kind", "sweep")


def _scaling_mode(df: pd.DataFrame, source: str) -> tuple[pd.Series, str]:
    """'weak' / 'strong' / '' per row, and where the label came from."""
    for col in _MODE_COLUMNS:
        if col in df.columns:
            vals = _str(df, col).str.lower()
            mode = vals.map(lambda v: "weak" if "weak" in v else ("strong" if "strong" in v
                                                                 else ""))
            if (mode != "").any():
                return mode, f"column {col!r}"
    exp = _str(df, "experiment").str.lower()
    mode = exp.map(lambda v: "weak" if "weak" in v else ("strong" if "strong" in v else ""))
    if (mode != "").any():
        return mode, "column 'experiment'"
    name = Path(source).name.lower()
    label = "weak" if "weak" in name else ("strong" if "strong" in name else "")
    return pd.Series(label, index=df.index, dtype=object), "file name"


def _scaling(df: pd.DataFrame, cand: pd.DataFrame, base: pd.DataFrame, mode: str,
             ) -> dict[str, Any] | None:
    """Efficiency of ``cand`` rows at their largest worker count against ``base`` rows."""
    pmax = float(_workers(cand).max())
    top = cand.loc[_workers(cand) == pmax]
    thr_top, thr_base = _num(top, "samples_per_s"), _num(base, "samples_per_s")
    if thr_top.notna().any() and thr_base.notna().any():
        metric = "samples_per_s"
        speed = float(thr_top.median() / thr_base.median())
        eff = speed / pmax
    else:
        metric = "wall_s"
        t_top, t_base = _num(top, "wall_s").median(), _num(base, "wall_s").median()
        if not (math.isfinite(t_top) and math.isfinite(t_base)) or t_top <= 0:
            return None
        eff = t_base / t_top / (pmax if mode == "strong" else 1.0)
        speed = eff * pmax
    return {"workers": pmax, "efficiency": eff, "speedup": speed, "metric": metric,
            "rows": list(top.index) + list(base.index)}


def _baseline_rows(df: pd.DataFrame, rows: pd.DataFrame, same: Sequence[str] = ("host",)
                   ) -> tuple[pd.DataFrame, str]:
    """Same-host baseline: sequential rows of the same run, else 1-worker rows of the strategy."""
    mask = pd.Series(True, index=df.index)
    for c in same:
        vals = set(_str(rows, c))
        if c in df.columns and len(vals) == 1:
            mask &= _str(df, c) == next(iter(vals))
    seq = df.loc[mask & (_str(df, "strategy") == "sequential")]
    for c in ("model", "dataset"):
        vals = set(_str(rows, c)) - {""}
        if len(vals) == 1 and c in seq.columns:
            narrowed = seq.loc[_str(seq, c).isin(vals | {""})]
            seq = narrowed if len(narrowed) else seq
    if len(seq):
        return seq, "strategy == 'sequential' on the same host"
    one = rows.loc[_workers(rows) == 1]
    if len(one):
        return one, "the same strategy with 1 worker on the same host"
    return rows.iloc[0:0], ""


def mpi_headlines(frames, errors) -> dict[str, Any]:
    part = "mpi"
    hits = [k for k in _find(frames, SOURCES[part][0]) if "cost" not in Path(k).name.lower()]
    keys = ("mpi_strong_efficiency", "mpi_weak_efficiency")
    if not hits:
        reason = _absent(part, errors)
        return {k: not_measured(reason) for k in keys}
    found: dict[str, list[dict[str, Any]]] = {"strong": [], "weak": []}
    unlabelled = []
    for src in hits:
        df = frames[src]
        mode, label_from = _scaling_mode(df, src)
        strat = _str(df, "strategy")
        for m in ("strong", "weak"):
            rows_m = df.loc[(mode == m) & (strat != "sequential")
                            & (_num(df, "samples_per_s").notna() | _num(df, "wall_s").notna())]
            for (s, host), grp in rows_m.groupby([_str(rows_m, "strategy"),
                                                 _str(rows_m, "host")], sort=False):
                cores = _physical_cores(_one(_str(grp, "cpu")))
                fits = grp.loc[_workers(grp) <= cores] if cores else grp
                if (_workers(fits) > 1).any():
                    grp = fits  # the widest run that does not oversubscribe the host's cores
                if _workers(grp).max() <= 1:
                    continue
                df_m = df.loc[(mode == m) | (mode == "")]
                base, how = _baseline_rows(df_m, grp)
                if not len(base):
                    continue
                res = _scaling(df, grp, base, m)
                if res is None:
                    continue
                res.update(source=src, strategy=s, host=host, label_from=label_from,
                           baseline=how, frame=df)
                found[m].append(res)
        timed = _num(df, "samples_per_s").notna() | _num(df, "wall_s").notna()
        if ((mode == "") & (strat != "sequential") & timed).any():
            unlabelled.append(src)
    out: dict[str, Any] = {}
    for m, key in zip(("strong", "weak"), keys, strict=True):
        cands = found[m]
        if not cands:
            why = f"no {m}-scaling rows with more than one process and a same-host baseline " \
                  f"in {', '.join(hits)}"
            if unlabelled:
                why += (f" (rows in {', '.join(unlabelled)} carry no weak/strong label: "
                        f"columns {', '.join(_MODE_COLUMNS)} or the experiment name)")
            out[key] = not_measured(why)
            continue
        # headline: allreduce if measured, at the largest P (the widest run wins)
        pref = [c for c in cands if c["strategy"] == "allreduce"] or cands
        best = max(pref, key=lambda c: (c["workers"], c["efficiency"]))
        p = best["workers"]
        karp = None
        if m == "strong" and p > 1 and best["speedup"] > 0:
            karp = (1 / best["speedup"] - 1 / p) / (1 - 1 / p)
        out[key] = measured(
            best["efficiency"], fmt_pct(best["efficiency"]), "efficiency", best["source"],
            best["frame"], best["rows"], best["metric"],
            f"{m} scaling (label from {best['label_from']}), strategy == "
            f"{best['strategy']!r}, host == {best['host']!r}, processes x threads == "
            f"{_int(p)} (median of the rows at the largest P) against {best['baseline']}",
            ("speedup / P with speedup = samples_per_s(P) / samples_per_s(baseline)"
             if best["metric"] == "samples_per_s" else
             ("T(baseline) / (P T(P))" if m == "strong" else "T(baseline) / T(P)")),
            processes=_int(p), strategy=best["strategy"], speedup=jsonable(best["speedup"]),
            karp_flatt_serial_fraction=jsonable(karp),
            all_strategies=[{"strategy": c["strategy"], "host": c["host"],
                             "source": c["source"], "workers": _int(c["workers"]),
                             "efficiency": jsonable(c["efficiency"]),
                             "speedup": jsonable(c["speedup"])} for c in cands])
    return out


JIT_DOMINATED = 0.5  # compile_s above this fraction of wall_s: not a steady-state timing


def jit_dominated(df: pd.DataFrame) -> pd.Series:
    """Rows whose wall time is mostly JIT compilation / first-call overhead (``compile_s``)."""
    return (_num(df, "compile_s") > JIT_DOMINATED * _num(df, "wall_s")).fillna(False)


def timing_frames(frames: Mapping[str, pd.DataFrame]
                  ) -> tuple[dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """Frames without JIT-dominated rows (for speedups), and what was left out."""
    out, excluded = {}, []
    for src, df in frames.items():
        bad = jit_dominated(df)
        out[src] = df.loc[~bad]
        if bad.any():
            excluded.append({"file": src, "rows": [_int(i) for i in df.index[bad]],
                             "strategies": sorted(set(_str(df.loc[bad], "strategy"))),
                             "reason": f"compile_s > {JIT_DOMINATED:.0%} of wall_s (JIT "
                                       "compilation dominates: not a steady-state timing)"})
    return out, excluded


def whole_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Whole-run rows of a frame that also holds per-fold rows (k-fold): ``kind == 'run'``,
    else the rows whose ``fold`` is empty; other frames unchanged."""
    if "kind" in df.columns and (_str(df, "kind") == "run").any() and \
            (_str(df, "kind") != "run").any():
        return df.loc[_str(df, "kind") == "run"], "whole-run rows (kind == 'run')"
    if "fold" in df.columns and df["fold"].map(_missing).any() and \
            (~df["fold"].map(_missing)).any():
        return df.loc[df["fold"].map(_missing)], "whole-run rows (fold is empty)"
    return df, ""


def _last_acc(rows: pd.DataFrame) -> float:
    """Test accuracy of the last epoch (largest ``epoch``/``epochs``), median over repeats."""
    acc = _num(rows, "test_acc")
    rows = rows.loc[acc.notna()]
    if not len(rows):
        return math.nan
    ecol = next((c for c in ("epoch", "epochs") if _num(rows, c).notna().any()), None)
    if ecol:
        rows = rows.loc[_num(rows, ecol) == _num(rows, ecol).max()]
    return float(_num(rows, "test_acc").median())


def _async_headline(frames, errors, part: str, strategy_names: Sequence[str],
                    prefer: Sequence[str], what: str) -> dict[str, Any]:
    hits = _find(frames, SOURCES[part][0])
    if not hits:
        return not_measured(_absent(part, errors))
    src = hits[0]
    df = frames[src]
    df, note = whole_runs(df)
    strat = _str(df, "strategy")
    notes = [note] if note else []
    mask = strat.str.lower().isin(strategy_names) if strategy_names else strat != "sequential"
    if not mask.any():
        mask = strat != "sequential"
    cands = []
    for host, grp in df.loc[mask].groupby(_str(df.loc[mask], "host"), sort=False):
        if _workers(grp).max() <= 1 and not (strat.loc[df.index] == "sequential").any():
            continue
        base, how = _baseline_rows(df, grp)
        if not len(base):
            continue
        top = grp.loc[_workers(grp) == _workers(grp).max()]
        for metric in prefer:
            a, b = _num(top, metric), _num(base, metric)
            if a.notna().any() and b.notna().any() and a.median() > 0 and b.median() > 0:
                s = (float(a.median() / b.median()) if metric == "samples_per_s"
                     else float(b.median() / a.median()))
                cands.append(dict(host=host, top=top, base=base, how=how, metric=metric,
                                  speedup=s, workers=float(_workers(top).max())))
                break
    if not cands:
        return not_measured(f"no {what} rows with a same-host baseline (strategy "
                            f"'sequential' or 1 worker) in {src}")
    best = max(cands, key=lambda c: (c["workers"], c["speedup"]))
    top, base = best["top"], best["base"]
    acc_top, acc_base = _last_acc(top), _last_acc(base)
    p = best["workers"]
    return measured(
        best["speedup"], fmt_x(best["speedup"]), "speedup", src, frames[src],
        list(top.index) + list(base.index), best["metric"],
        "; ".join(notes + [f"{what} rows on host {best['host']!r} at the most workers "
                           f"(processes x threads == {_int(p)}), median, against "
                           f"{best['how']}"]),
        (f"samples_per_s({what}) / samples_per_s(baseline)" if best["metric"] ==
         "samples_per_s" else f"{best['metric']}(baseline) / {best['metric']}({what})"),
        workers=_int(p), efficiency=jsonable(best["speedup"] / p),
        test_acc=jsonable(acc_top), baseline_test_acc=jsonable(acc_base),
        test_acc_text=fmt_acc(acc_top) if math.isfinite(acc_top) else "-",
        baseline_test_acc_text=fmt_acc(acc_base) if math.isfinite(acc_base) else "-",
        strategy=_one(top.get("strategy", [None])))


def async_headlines(frames, errors) -> dict[str, Any]:
    return {
        "hogwild_speedup": _async_headline(frames, errors, "hogwild", ("hogwild",),
                                           ("samples_per_s", "wall_s"), "HOGWILD"),
        "kfold_speedup": _async_headline(frames, errors, "kfold",
                                         ("kfold", "async-kfold", "async k-fold", "k-fold"),
                                         ("wall_s", "samples_per_s"), "async k-fold"),
    }


def gpu_headlines(frames, errors) -> dict[str, Any]:
    part = "bench_gpu"
    hits = _find(frames, SOURCES[part][0])
    if not hits:
        return {"gpu_throughput": not_measured(
            _absent(part, errors) + " (this build ran on a machine without a GPU)")}
    src = hits[0]
    df = frames[src]
    steps = _step_rows(df)
    cuda = steps.loc[(_str(steps, "backend") == "cuda")]
    if not len(cuda):
        return {"gpu_throughput": not_measured(f"{src} has no backend == 'cuda' step rows")}
    thr = _num(cuda, "samples_per_s")
    i = thr.idxmax()
    row = cuda.loc[i]
    details: dict[str, Any] = dict(batch_size=_int(row.get("batch_size")))
    # GPU rows record the device's name ("NVIDIA H100 ..."), so "not on the CPU" selects them
    torch_gpu = steps.loc[(_str(steps, "backend") == "torch") & (_str(steps, "device") != "cpu")]
    pairs = _pairs(steps, steps.index == i, steps.index.isin(torch_gpu.index))
    if pairs:
        details["torch_gpu_samples_per_s"] = jsonable(_num(steps, "samples_per_s")[pairs[0][1]])
        details["cuda_vs_torch_gpu"] = jsonable(thr[i] / _num(steps, "samples_per_s")[
            pairs[0][1]])
    return {"gpu_throughput": measured(
        thr[i], fmt_rate(thr[i]), "samples/s", src, df, [i], "samples_per_s",
        f"backend == 'cuda' whole-step rows; the largest samples_per_s ({_describe(row, _CONFIG)})",
        "training samples per second of the Numba CUDA step (weights resident on the GPU, "
        "timed with synchronisation)", **details)}


def costmodel_part(frames) -> dict[str, Any]:
    """Cost-model results (``*cost*.pkl``): fitted parameters, the model's error against
    measurements, and extrapolated efficiencies, whatever of these the files hold."""
    hits = [k for k in frames if "cost" in Path(k).name.lower()]
    if not hits:
        return not_measured("no results/*cost*.pkl (e.g. mpi_costmodel.pkl) found: the "
                            "cost-model fit of notebooks/04_mpi_data_parallel.ipynb has not "
                            "been saved yet")
    pat = re.compile(r"^(alpha|beta|gamma|c0|c1)(_|$)|latency|bandwidth|serial_fraction")
    params: dict[str, Any] = {}
    extrapolated: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    procs: set[Any] = set()
    hosts: list[Any] = []
    for src in hits:
        df = frames[src]
        hosts.append(_one(df.get("host", [None])))
        procs |= {_int(p) for p in _num(df, "processes").dropna()}
        procs |= {_int(p) for p in _num(df, "P").dropna()}
        for c in df.columns:
            if pat.search(c.lower()):
                v = _num(df, c).dropna()
                if len(v) and v.nunique() == 1:
                    params[c] = jsonable(v.iloc[0])
        eff_cols = [c for c in df.columns if c.endswith("efficiency")
                    and _num(df, c).notna().any()]
        if eff_cols and "processes" in df.columns:
            group = next((c for c in ("network_name", "network", "interconnect")
                          if c in df.columns), None)
            groups = df.groupby(_str(df, group), sort=False) if group else [("", df)]
            for name, g in groups:
                top = g.loc[_num(g, "processes") == _num(g, "processes").max()].iloc[0]
                for c in eff_cols:
                    if _missing(top.get(c)):
                        continue
                    extrapolated.append({"source": src, "network": name or "-",
                                         "processes": _int(top["processes"]), "column": c,
                                         "value": jsonable(top[c]),
                                         "text": fmt_pct(float(top[c]))})
        if {"predicted_s", "time_s"} <= set(df.columns):
            err = ((_num(df, "predicted_s") - _num(df, "time_s")) / _num(df, "time_s")).abs()
            if err.notna().any():
                checks.append({"source": src, "rows": int(err.notna().sum()),
                               "median_abs_rel_error": jsonable(err.median()),
                               "text": fmt_pct(float(err.median()))})
    return {"status": MEASURED, "source": ", ".join(hits), "files": hits,
            "rows": sum(len(frames[h]) for h in hits),
            "columns": sorted({c for h in hits for c in frames[h].columns}),
            "params": params, "extrapolated": extrapolated, "checks": checks,
            "host": _one(hosts), "processes": sorted(p for p in procs if p is not None)}


def cpu_samples_frame(row: Mapping[str, Any]) -> pd.DataFrame | None:
    """Per-core CPU samples stored in a row (``cpu_times``, ``cpu_samples``) as a wide frame
    (``time_s``, ``cpu0``, ``cpu1``, ...) with ``attrs["host"]``; None without samples."""
    times, samples = row.get("cpu_times"), row.get("cpu_samples")
    if not isinstance(samples, list | tuple | np.ndarray) or not len(samples):
        return None
    arr = np.asarray(samples, dtype=float)
    if arr.ndim != 2:
        return None
    df = pd.DataFrame(arr, columns=[f"cpu{i}" for i in range(arr.shape[1])])
    t = list(times) if isinstance(times, list | tuple | np.ndarray) else []
    df.insert(0, "time_s", t if len(t) == len(df) else np.arange(len(df), dtype=float))
    df.attrs["host"] = row.get("host")
    return df


def cpu_rows(frames: Mapping[str, pd.DataFrame]) -> list[tuple[str, pd.Series]]:
    """``(source, row)`` of every row that carries per-core CPU samples."""
    out = []
    for src, df in frames.items():
        if "cpu_samples" not in df.columns:
            continue
        for i, r in df.iterrows():
            if isinstance(r.get("cpu_samples"), list | tuple | np.ndarray) and \
                    len(r.get("cpu_samples")):
                out.append((src, df.loc[i]))
    return out


# --------------------------------------------------------------------------- context


def hosts_part(frames: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Every machine that produced a row: CPU, GPU, library versions, files, commits."""
    by_host: dict[str, dict[str, Any]] = {}
    for src, df in frames.items():
        if not len(df):
            continue
        ts = pd.to_datetime(df.get("timestamp"), errors="coerce", utc=True)
        for host, grp in df.groupby(_str(df, "host"), sort=False):
            if not host:  # model-only rows (e.g. an extrapolation) were measured nowhere
                continue
            h = by_host.setdefault(host or "unknown", {"host": host or "unknown", "files": [],
                                                       "rows": 0, "devices": set(),
                                                       "commits": set(), "_ts": None})
            h["files"].append(src)
            h["rows"] += len(grp)
            h["devices"] |= {d for d in _str(grp, "device") if d}
            h["commits"] |= {c for c in _str(grp, "commit") if c}
            t = ts.loc[grp.index] if ts is not None else None
            newest = grp.index[-1] if t is None or not t.notna().any() else t.idxmax()
            if h["_ts"] is None or (t is not None and t.notna().any()
                                    and t.max() >= h["_ts"]):
                r = df.loc[newest]
                h["_ts"] = t.max() if t is not None and t.notna().any() else h["_ts"]
                h["cpu"] = jsonable(r.get("cpu"))
                h["gpu"] = jsonable(r.get("gpu"))
                v = r.get("versions")
                h["versions"] = _short_versions(v) if isinstance(v, Mapping) else {}
                h["timestamp"] = jsonable(r.get("timestamp"))
    out = []
    for h in by_host.values():
        h.pop("_ts")
        h["devices"] = sorted(h["devices"])
        h["commits"] = sorted(h["commits"])
        out.append(h)
    return out


def _short_versions(v: Mapping[str, Any]) -> dict[str, str]:
    out = {k: str(val) for k, val in v.items() if k != "blas" and not _missing(val)}
    blas = v.get("blas") or []
    libs = [f"{b.get('internal_api')} {b.get('version')}" for b in blas
            if isinstance(b, Mapping) and b.get("internal_api")]
    if libs:
        out["blas"] = ", ".join(dict.fromkeys(libs))
    return out


def files_part(frames, errors) -> list[dict[str, Any]]:
    out = []
    for src, df in frames.items():
        ts = pd.to_datetime(df.get("timestamp"), errors="coerce", utc=True)
        out.append({
            "file": src, "rows": len(df),
            "experiments": sorted(set(_str(df, "experiment")) - {""}),
            "strategies": sorted(set(_str(df, "strategy")) - {""}),
            "hosts": sorted(set(_str(df, "host")) - {""}),
            "devices": sorted(set(_str(df, "device")) - {""}),
            "datasets": sorted(set(_str(df, "dataset")) - {""}),
            "synthetic": bool((_str(df, "dataset") == "synthetic").any()),
            "newest": ts.max().isoformat() if ts is not None and ts.notna().any() else None,
        })
    out += [{"file": k, "error": v} for k, v in errors.items()]
    return out


def strategies_part(frames) -> list[dict[str, Any]]:
    """Per file, strategy and host: rows, worker counts, best throughput, accuracy."""
    out = []
    for src, df in frames.items():
        if "bench" in Path(src).name:
            df = _step_rows(df)
        for (s, host, device), grp in df.groupby([_str(df, "strategy"), _str(df, "host"),
                                                  _str(df, "device")], sort=False):
            if not s:
                continue
            w = _workers(grp)
            thr = _num(grp, "samples_per_s")
            acc = _num(grp, "test_acc")
            out.append({
                "file": src, "strategy": s, "host": host, "device": device, "rows": len(grp),
                "workers_min": _int(w.min()), "workers_max": _int(w.max()),
                "best_samples_per_s": jsonable(thr.max()),
                "best_samples_per_s_text": fmt_rate(thr.max()) if thr.notna().any() else "-",
                "test_acc": jsonable(acc.dropna().iloc[-1]) if acc.notna().any() else None,
                "test_acc_text": fmt_acc(acc.dropna().iloc[-1]) if acc.notna().any() else "-",
                "comm_s_max": jsonable(_num(grp, "comm_s").max()),
            })
    return out


def equivalence_part(frames) -> list[dict[str, Any]]:
    """Columns other notebooks use to record equivalence checks (``*err*``, ``*diff*``)."""
    pat = re.compile(r"(rel|abs|max)_?(err|diff)|equiv|mismatch|weights?_diff")
    out = []
    for src, df in frames.items():
        for c in df.columns:
            if pat.search(c.lower()):
                v = _num(df, c).dropna()
                if len(v):
                    out.append({"file": src, "column": c, "rows": len(v),
                                "max": jsonable(v.abs().max()),
                                "max_text": f"{v.abs().max():.2e}",
                                "strategies": sorted(set(_str(df.loc[v.index], "strategy")))})
    return out


def network_part() -> dict[str, Any]:
    """The seed CNN on Fashion-MNIST as built by this commit: layers, parameters, FLOPs."""
    from cnn.models import seed_cnn

    net = seed_cnn((1, 28, 28), 10)
    layers = []
    for i, (layer, shape) in enumerate(zip(net.layers, net.shapes, strict=True)):
        layers.append({"index": i, "layer": repr(layer), "output": list(shape),
                       "params": sum(s.size for s in net.slots if s.layer == i)})
    n = net.num_params
    return {"model": "seed_cnn", "input_shape": list(net.input_shape), "layers": layers,
            "params": n, "params_text": f"{n:,}", "bytes_float32": 4 * n,
            "mbytes_float32_text": f"{4 * n / 2**20:.2f}",
            "flops_train_per_sample": net.flops(train=True),
            "mflops_train_text": f"{net.flops(train=True) / 1e6:.2f}",
            "flops_forward_per_sample": net.flops(train=False),
            "ring_allreduce": [{"P": p, "bytes_per_rank": 2 * (p - 1) / p * 4 * n,
                                "mbytes_text": f"{2 * (p - 1) / p * 4 * n / 2**20:.2f}",
                                "messages": 2 * (p - 1)} for p in (2, 4, 8, 16, 32)]}


def twin_part(batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """Live twin check (cnn.study.twin_checks): NumPy network vs its PyTorch twin."""
    try:
        from cnn.study import twin_checks

        df = twin_checks(batch=batch, seed=seed)
    except ImportError as exc:
        return not_measured(f"torch is not installed ({exc}); pip install -e '.[compare]'")
    worst = {}
    for dtype, grp in df.groupby("dtype"):
        worst[dtype] = {"max_rel_err": jsonable(grp["max_rel_err"].max()),
                        "text": f"{grp['max_rel_err'].max():.1e}"}
    by_model = []
    for (model, dtype), grp in df.groupby(["model", "dtype"], sort=False):
        q = grp.set_index("quantity")["max_rel_err"]
        grads = q.drop(["logits", "loss"], errors="ignore")
        by_model.append({"model": model, "dtype": dtype, "params": int(grp["params"].iloc[0]),
                         "tensors": len(grads), "logits": f"{q.get('logits', np.nan):.1e}",
                         "loss": f"{q.get('loss', np.nan):.1e}",
                         "grad_max": f"{grads.max():.1e}", "grad_worst": str(grads.idxmax())})
    return {"status": MEASURED, "batch": batch, "seed": seed,
            "rows": jsonable(df.to_dict(orient="records")), "worst": worst,
            "by_model": by_model,
            "how": "computed live by cnn.study.twin_checks when the summary was built"}


def figures_part(images: Path) -> list[dict[str, Any]]:
    out = []
    stems = sorted({p.stem for p in images.glob("*.pdf")} | {p.stem for p in images.glob("*.png")}
                   ) if images.is_dir() else []
    for stem in stems:
        if stem.startswith("."):
            continue
        pdf, png = images / f"{stem}.pdf", images / f"{stem}.png"
        nb = next((n for pre, n in FIGURE_NOTEBOOKS if stem.startswith(pre)), None)
        out.append({"name": stem,
                    "pdf": f"images/{stem}.pdf" if pdf.is_file() else None,
                    "png": f"images/{stem}.png" if png.is_file() else None,
                    "notebook": nb, "caption": CAPTIONS.get(stem)})
    return out


# --------------------------------------------------------------------------- frames for figures


def _bench_batch(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Bench step rows of one batch size (128 if measured, else the largest)."""
    steps = _step_rows(df)
    b = _num(steps, "batch_size")
    if not b.notna().any():
        return steps, ""
    pick = 128 if (b == 128).any() else b.max()
    return steps.loc[b == pick], f"batch {_int(pick)}"


def with_mode(df: pd.DataFrame, src: str) -> pd.DataFrame:
    """MPI rows with a weak/strong label get it in the strategy: ``allreduce (strong)``."""
    if not Path(src).name.startswith("mpi"):
        return df
    mode, _ = _scaling_mode(df, src)
    if not (mode != "").any():
        return df
    strat = _str(df, "strategy")
    lab = mode.map(lambda m: f" ({m})" if m else "")
    return df.assign(strategy=strat.where(strat == "sequential", strat + lab))


def speedup_frame(frames: Mapping[str, pd.DataFrame], include_reference: bool = False
                  ) -> pd.DataFrame:
    """Every strategy's rows with ``speedup``/``efficiency``/``workers`` against the
    sequential rows of the same file measured on the same host (``cnn.results.speedup_table``).

    Throughput (``samples_per_s``) is compared where the file has it, else ``wall_s``.
    Bench files keep one batch size; MPI rows with a weak/strong label get it appended
    to the strategy (``allreduce (strong)``). Sequential rows, and the torch reference
    unless ``include_reference``, are left out of the result. Extra columns:
    ``source``, ``metric``.
    """
    from cnn.results import speedup_table, to_frame

    parts = []
    for src, df in timing_frames(frames)[0].items():
        name = Path(src).name
        if "cost" in name.lower() or not len(df):
            continue
        df = df.copy()
        by = ["host", "model", "dataset"]
        if "bench" in name:
            df, _ = _bench_batch(df)
            by += ["batch_size", "input_shape", "filters"]
        if name.startswith("mpi"):
            mode, _ = _scaling_mode(df, src)
            if (mode != "").any():
                df["_mode"] = mode
                by.append("_mode")
                df = with_mode(df, src)
        df, _ = whole_runs(df)
        timed = _num(df, "samples_per_s").notna() | _num(df, "wall_s").notna()
        df = df.loc[timed]
        seq = _str(df, "strategy") == "sequential"
        if not len(df) or seq.all():
            continue
        baseline = "sequential"
        if not seq.any():  # no sequential rows: each strategy against its own 1-worker rows
            one = _workers(df) == 1
            if not one.any():
                continue
            df = df.assign(_group=_str(df, "strategy"))
            df.loc[one, "_group"] = df.loc[one, "strategy"]
            df = df.assign(_strategy=df["strategy"], strategy=np.where(one, "sequential",
                                                                     df["strategy"]))
            by.append("_group")
            baseline = "1 worker of the same strategy"
            seq = one
        metric = "samples_per_s" if _num(df.loc[~seq], "samples_per_s").notna().any() and \
            _num(df.loc[seq], "samples_per_s").notna().any() and "kfold" not in name \
            else "wall_s"
        by = [c for c in by if c in df.columns]
        out = speedup_table(df, baseline_strategy="sequential", metric=metric, by=by)
        if "_strategy" in out.columns:
            out["strategy"] = out["_strategy"]
            out = out.loc[_workers(out) > 1]
        out = out.loc[_str(out, "strategy") != "sequential"]
        out = out.assign(baseline=baseline).drop(columns=["_group", "_strategy"],
                                                 errors="ignore")
        if not include_reference:
            out = out.loc[_str(out, "backend") != "torch"]
        out = out.assign(source=src, metric=metric).drop(columns=["_mode"], errors="ignore")
        parts.append(out)
    if not parts:
        return to_frame([])
    return to_frame(pd.concat(parts, ignore_index=True, sort=False))


def throughput_rows(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows with ``samples_per_s`` from every file (bench files: one batch size)."""
    from cnn.results import to_frame

    parts = []
    for src, df in timing_frames(frames)[0].items():
        if "cost" in Path(src).name.lower():
            continue
        if "bench" in Path(src).name:
            df, _ = _bench_batch(df)
        df = whole_runs(df)[0]
        df = df.loc[_num(df, "samples_per_s").notna()]
        if len(df):  # one bar per configuration: the row nearest the median over epochs
            df = with_mode(df, src)
            keys = [_str(df, c) for c in ("experiment", "strategy", "backend", "host",
                                           "device")]
            keys += [_num(df, c).fillna(-1) for c in ("processes", "threads", "batch_size")]
            pick = []
            for _, g in df.groupby(keys, sort=False):
                thr = _num(g, "samples_per_s")
                pick.append((thr - thr.median()).abs().idxmin())
            parts.append(df.loc[pick].assign(source=src))
    return to_frame(pd.concat(parts, ignore_index=True, sort=False)) if parts else to_frame([])


def accuracy_rows(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per file, strategy, host and worker count: the last row with a ``test_acc``."""
    from cnn.results import to_frame

    rows = []
    for src, df in frames.items():
        df = with_mode(whole_runs(df)[0], src)
        df = df.loc[_num(df, "test_acc").notna()]
        if not len(df):
            continue
        keys = [_str(df, c) for c in ("strategy", "host", "device")] + [_workers(df)]
        for _, grp in df.groupby(keys, sort=False):
            rows.append(grp.iloc[-1].to_dict() | {"source": src})
    return to_frame(rows)


def comm_rows(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows of parallel strategies with both ``wall_s`` and a positive ``comm_s``."""
    from cnn.results import to_frame

    parts = []
    for src, df in frames.items():
        sel = df.loc[_num(df, "wall_s").notna() & (_num(df, "comm_s") > 0)]
        if len(sel):
            parts.append(with_mode(sel, src).assign(source=src))
    return to_frame(pd.concat(parts, ignore_index=True, sort=False)) if parts else to_frame([])


def costmodel_frames(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The cost-model files (``*cost*.pkl``)."""
    return {k: v for k, v in frames.items() if "cost" in Path(k).name.lower()}


def gpu_rows(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Step rows of the GPU bench plus the CPU bench rows of the same batch sizes."""
    from cnn.results import to_frame

    gpu = [df for k, df in frames.items() if Path(k).name == SOURCES["bench_gpu"][0]]
    if not gpu:
        return to_frame([])
    g = _step_rows(gpu[0])
    cpu = [df for k, df in frames.items() if Path(k).name == SOURCES["bench_cpu"][0]]
    parts = [g]
    if cpu:
        c = _step_rows(cpu[0])
        parts.append(c.loc[_num(c, "batch_size").isin(set(_num(g, "batch_size").dropna()))])
    return to_frame(pd.concat(parts, ignore_index=True, sort=False))


# --------------------------------------------------------------------------- conclusions


def conclusions(summary: Mapping[str, Any]) -> list[str]:
    """Sentences generated from the headline numbers (nothing is claimed without one)."""
    h = summary.get("headlines", {})
    m = {k: v for k, v in h.items() if v.get("status") == MEASURED}
    out = []
    if "baseline_accuracy" in m:
        a = m["baseline_accuracy"]
        s = (f"The sequential NumPy baseline reaches {a['text']} test accuracy on "
             f"{a.get('dataset') or 'Fashion-MNIST'} after {a.get('epochs')} epochs")
        if "baseline_throughput" in m:
            s += f", training at {m['baseline_throughput']['text']} samples/s on " \
                 f"{m['baseline_throughput']['host']}"
        out.append(s + ".")
    if "numpy_vs_torch_1thread" in m:
        r = m["numpy_vs_torch_1thread"]
        v = r["value"]
        rel = (f"reaches {r['text']} of PyTorch's throughput" if v < 1
               else f"is {r['text']} as fast as PyTorch")
        out.append(f"On one thread the NumPy reference {rel} (batch {r.get('batch_size')}, "
                   f"{r['host']}).")
    if "numba_best_speedup" in m:
        r = m["numba_best_speedup"]
        verdict = "faster than" if r["value"] > 1 else "no faster than"
        out.append(f"The best Numba CPU configuration ({r.get('threads')} threads, batch "
                   f"{r.get('batch_size')}) is {r['text']} the NumPy 1-thread step: "
                   f"{verdict} the reference.")
    for key, name in (("mpi_strong_efficiency", "strong"), ("mpi_weak_efficiency", "weak")):
        if key in m:
            r = m[key]
            quality = ("above 100%: superlinear, within the noise of a short run or a cache "
                       "effect" if r["value"] > 1.05 else
                       "near-ideal" if r["value"] >= 0.9 else "good" if r["value"] >= 0.7
                       else "poor" if r["value"] < 0.5 else "moderate")
            extra = "".join(f"; {x}" for x in (
                r.get("oversubscribed"), f"scale {r['scale']}" if r.get("scale") else None) if x)
            out.append(f"MPI {r.get('strategy')} {name} scaling keeps {r['text']} efficiency at "
                       f"P = {r.get('processes')} on {r['host']} ({quality}{extra}).")
    for key, name in (("hogwild_speedup", "HOGWILD"), ("kfold_speedup", "Async k-fold")):
        if key in m:
            r = m[key]
            pace = (f"runs {r['text']} faster than sequential" if r["value"] > 1.0 else
                    f"is no faster than sequential ({r['text']} its speed)")
            s = f"{name} {pace} with {r.get('workers')} workers on {r['host']}"
            if r.get("test_acc") is not None and r.get("baseline_test_acc") is not None:
                s += (f" (test accuracy {fmt_acc(r['test_acc'])} vs "
                      f"{fmt_acc(r['baseline_test_acc'])} sequential)")
            out.append(s + ".")
    if "gpu_throughput" in m:
        r = m["gpu_throughput"]
        s = f"The Numba CUDA step trains {r['text']} samples/s on {r.get('gpu') or r['host']}"
        if "baseline_throughput" in m and m["baseline_throughput"]["value"] > 0:
            ratio = r["value"] / m["baseline_throughput"]["value"]
            s += (f", {fmt_x(ratio)} the sequential baseline's rate (different hosts and "
                  f"batch sizes: indicative only)")
        out.append(s + ".")
    missing = [HEADLINES[k] for k, v in h.items() if v.get("status") != MEASURED]
    if missing:
        out.append("Not measured in this build: " + "; ".join(missing) + ".")
    return out


# --------------------------------------------------------------------------- entry points


def build_summary(results: str | os.PathLike | None = None,
                  images: str | os.PathLike | None = None, twin: bool = True
                  ) -> dict[str, Any]:
    """Read every ``*.pkl`` in ``results`` and return the summary dict (JSON-ready)."""
    from cnn import runinfo

    folder = Path(results) if results is not None else results_dir()
    if images is None:
        from cnn.plots import images_dir

        images = images_dir()
    frames, errors = load_frames(folder)
    timed, excluded = timing_frames(frames)
    headlines: dict[str, Any] = {}
    for part in (baseline_headlines, bench_cpu_headlines, gpu_headlines):
        headlines.update(part(frames, errors))
    for part in (mpi_headlines, async_headlines):  # speedups: steady-state rows only
        headlines.update(part(timed, errors))
    headlines = {k: headlines[k] for k in HEADLINES}
    for k, v in headlines.items():
        v["label"] = HEADLINES[k]
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": runinfo.git_commit(),
        "built_on": runinfo.host(),
        "results_dir": _rel(folder),
        "headlines": headlines,
        "counts": {"measured": sum(v["status"] == MEASURED for v in headlines.values()),
                   "not_measured": sum(v["status"] != MEASURED for v in headlines.values())},
        "hosts": hosts_part(frames),
        "files": files_part(frames, errors),
        "strategies": strategies_part(frames),
        "equivalence": equivalence_part(frames),
        "costmodel": costmodel_part(frames),
        "network": network_part(),
        "twin": twin_part() if twin else not_measured("skipped (--no-twin)"),
        "figures": figures_part(Path(images)),
        "synthetic_files": [f["file"] for f in files_part(frames, {}) if f.get("synthetic")],
        "excluded_from_speedups": excluded,
    }
    summary["conclusions"] = conclusions(summary)
    return jsonable(summary)


def write_summary(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the summary as pretty JSON, atomically."""
    from cnn.io import atomic_write

    text = json.dumps(jsonable(summary), indent=2, allow_nan=False, ensure_ascii=False)
    with atomic_write(path, "w") as fh:
        fh.write(text + "\n")
    return Path(path)


def headline_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for key, v in summary["headlines"].items():
        if v["status"] == MEASURED:
            rows.append(f"{HEADLINES.get(key, key):<58} {v['text']:>12}  "
                        f"({v['source']}, {v['host']}, {v['device']})")
        else:
            rows.append(f"{HEADLINES.get(key, key):<58} {'-':>12}  not measured: {v['reason']}")
    return "\n".join(rows)


README_START = "<!-- headlines:start (generated from results/summary.json by cnn.summary) -->"
README_END = "<!-- headlines:end -->"


def readme_table(summary: Mapping[str, Any]) -> str:
    """The headline numbers as a Markdown table, each with where it was measured."""
    rows = ["| headline | value | measured on | source |", "| --- | ---: | --- | --- |"]
    for key, v in summary["headlines"].items():
        label = v.get("label") or HEADLINES.get(key, key)
        if v["status"] == MEASURED:
            scale = f", {v['scale']} scale" if v.get("scale") else ""
            rows.append(f"| {label} | {v['text']} | {v['host']} ({v['device']}{scale}) | "
                        f"`{v['source']}` |")
        else:
            rows.append(f"| {label} | not measured | | {v['reason']} |")
    return "\n".join(rows)


def update_readme(summary: Mapping[str, Any], readme: str | os.PathLike) -> bool:
    """Rewrite the README's headline block from the summary; False if it has no markers.

    The README quotes the results, so it is regenerated with them and cannot drift.
    """
    from cnn.io import atomic_write

    path = Path(readme)
    if not path.is_file():
        return False
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    block = f"{README_START}\n{readme_table(summary)}\n{README_END}"
    new = text[:start] + block + text[end + len(README_END):]
    if new != text:
        with atomic_write(path, "w") as fh:
            fh.write(new)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cnn.summary",
                                description=__doc__.split("\n\nColumn names")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=None,
                   help=f"folder of the *.pkl results (default: ${RESULTS_ENV} or "
                        "<root>/results)")
    p.add_argument("--images-dir", default=None,
                   help="folder of the figures listed in the summary (default: "
                        "$CNN_IMAGES_DIR or <root>/images)")
    p.add_argument("--out", default=None, help="output JSON (default: <results-dir>/summary.json)")
    p.add_argument("--no-twin", action="store_true",
                   help="skip the live NumPy-vs-PyTorch twin check")
    p.add_argument("--print", action="store_true", dest="show", help="print the headlines")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    folder = Path(args.results_dir) if args.results_dir else results_dir()
    summary = build_summary(folder, args.images_dir, twin=not args.no_twin)
    out = Path(args.out) if args.out else folder / "summary.json"
    write_summary(summary, out)
    if args.results_dir is None and args.out is None:  # the study's own results
        update_readme(summary, project_root() / "README.md")
    c = summary["counts"]
    print(f"wrote {out}: {c['measured']} headline(s) measured, {c['not_measured']} not measured")
    if args.show:
        print(headline_table(summary))
    return summary


__all__ = [
    "HEADLINES", "README_END", "README_START", "accuracy_rows", "build_summary", "comm_rows",
    "conclusions", "costmodel_frames", "cpu_rows", "cpu_samples_frame", "gpu_rows",
    "headline_table", "load_frames", "main", "project_root", "readme_table", "results_dir",
    "speedup_frame", "throughput_rows", "update_readme", "whole_runs", "write_summary",
]

if __name__ == "__main__":
    main(sys.argv[1:])
