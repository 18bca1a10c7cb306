"""A run's record: one row of measurements per epoch or run, with the machine it ran on.

Every CLI of the library (`cnn.train`, `cnn.parallel.*`) reports what it measured as
rows built by `make_row`, so a frame from any strategy has the same columns and carries
its host, CPU, GPU, library versions and commit. The study validates these rows against
its typed schema (`study/schema.py`, docs/DESIGN.md "Results") before it keeps them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn import runinfo
from cnn.io import save_pickle

#: The schema, in order. Frames built here always start with these columns.
COLUMNS: list[str] = [
    "experiment",
    "strategy",
    "backend",
    "processes",
    "threads",
    "device",
    "model",
    "dataset",
    "batch_size",
    "epochs",
    "samples",
    "wall_s",
    "compile_s",
    "step_ms_median",
    "step_ms_iqr",
    "samples_per_s",
    "comm_s",
    "test_acc",
    "final_loss",
    "host",
    "cpu",
    "physical_cores",
    "gpu",
    "versions",
    "commit",
    "timestamp",
]

#: Columns that hold numbers; missing ones are NaN rather than None.
NUMERIC_COLUMNS: frozenset[str] = frozenset(
    {
        "processes",
        "threads",
        "physical_cores",
        "batch_size",
        "epochs",
        "samples",
        "wall_s",
        "compile_s",
        "step_ms_median",
        "step_ms_iqr",
        "samples_per_s",
        "comm_s",
        "test_acc",
        "final_loss",
    }
)

#: Columns filled from :func:`cnn.runinfo.run_info` when the caller leaves them out.
MACHINE_COLUMNS: tuple[str, ...] = ("host", "cpu", "physical_cores", "gpu", "versions", "commit",
                                    "timestamp")


def is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def _cpu_label(info: Mapping[str, Any]) -> str:
    """``"<model> (<physical> cores, <logical> threads)"`` from a run_info dict."""
    model = info.get("cpu") or "unknown"
    counts = info.get("cpu_count") or {}
    physical, logical = counts.get("physical"), counts.get("logical")
    if physical is None and logical is None:
        return str(model)
    return f"{model} ({physical if physical is not None else '?'} cores, {logical} threads)"


def _physical_cores(info: Mapping[str, Any]) -> int | None:
    counts = info.get("cpu_count") or {}
    return counts.get("physical") or counts.get("logical")


def make_row(**fields: Any) -> dict[str, Any]:
    """One result row: the given fields, every schema column present, machine facts filled.

    ``host``, ``cpu``, ``gpu``, ``versions``, ``commit`` and ``timestamp`` come from
    :func:`cnn.runinfo.run_info` unless given (a given ``None`` also counts as
    absent, except for ``gpu`` where ``None`` means "no GPU" and is kept). Other
    missing schema columns are NaN (numeric ones) or ``None``. Extra fields are kept,
    after the schema columns, in the order given.
    """
    need = [
        c for c in MACHINE_COLUMNS if c not in fields or (c != "gpu" and is_missing(fields[c]))
    ]
    info = runinfo.run_info() if need else {}
    machine = {
        "host": info.get("host"),
        "cpu": _cpu_label(info) if info else None,
        "physical_cores": _physical_cores(info) if info else None,
        "gpu": info.get("gpu"),
        "versions": info.get("versions"),
        "commit": info.get("commit"),
        "timestamp": info.get("timestamp"),
    }
    row: dict[str, Any] = {}
    for col in COLUMNS:
        if col in need:
            row[col] = machine[col]
        elif col in fields:
            row[col] = fields[col]
        else:
            row[col] = np.nan if col in NUMERIC_COLUMNS else None
    for key, value in fields.items():
        if key not in row:
            row[key] = value
    return row


def _ordered_columns(columns: Iterable[str]) -> list[str]:
    extras = [c for c in dict.fromkeys(columns) if c not in COLUMNS]
    return COLUMNS + extras


def to_frame(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """A DataFrame of ``rows`` with :data:`COLUMNS` first (missing ones added) then extras."""
    if isinstance(rows, pd.DataFrame):
        df = rows.copy()
    else:
        rows = [dict(r) for r in rows]
        df = pd.DataFrame(rows)
    cols = _ordered_columns(df.columns)
    for col in cols:
        if col not in df.columns:
            df[col] = np.nan if col in NUMERIC_COLUMNS else None
    return df.loc[:, cols].reset_index(drop=True)


def step_stats(times_s: Sequence[float], warmup: int) -> dict[str, float]:
    """Split per-step durations into JIT/first-call overhead and steady-state statistics.

    ``times_s`` are step durations in seconds; the first ``warmup`` steps are warm-up.
    Returns ``compile_s`` = sum(warm-up steps) - warmup * median(rest), clamped at 0
    (the time the warm-up steps took beyond an ordinary step), and
    ``step_ms_median`` / ``step_ms_iqr`` (75th - 25th percentile, linear
    interpolation) in milliseconds over the steps after warm-up.
    """
    times = np.asarray(times_s, dtype=np.float64).ravel()
    warmup = int(warmup)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if times.size <= warmup:
        raise ValueError(
            f"need more steps than warmup: got {times.size} step time(s) with warmup={warmup}"
        )
    if not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ValueError("step times must be finite and non-negative")
    rest = times[warmup:]
    median = float(np.median(rest))
    q25, q75 = np.percentile(rest, [25.0, 75.0])
    compile_s = max(0.0, float(times[:warmup].sum()) - warmup * median)
    return {
        "compile_s": compile_s,
        "step_ms_median": median * 1e3,
        "step_ms_iqr": float(q75 - q25) * 1e3,
    }



def save_metrics(df: pd.DataFrame | Iterable[Mapping[str, Any]], path: str | os.PathLike
                 ) -> Path:
    """Pickle a run's rows to ``path`` atomically (the CLIs' ``--save-metrics``)."""
    return save_pickle(to_frame(df), path)


__all__ = ["COLUMNS", "MACHINE_COLUMNS", "NUMERIC_COLUMNS", "make_row", "save_metrics",
           "step_stats", "to_frame"]
