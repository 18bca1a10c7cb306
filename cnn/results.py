"""The results schema: one pandas row per measured run, pickled under ``results/``.

Every timing or accuracy measurement of the study becomes one row with the
columns in :data:`COLUMNS` (plus any extra columns an experiment wants). Rows
carry the machine they were measured on (``host``, ``cpu``, ``gpu``) and the
library versions and commit, so frames from several machines can be merged and
speedups are only ever computed against a baseline from the same host.
"""

from __future__ import annotations

import glob as _glob
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.io import save_pickle

# Transitional: the study side moves to study/schema.py; the library keeps cnn.metrics.
from cnn.metrics import (  # noqa: F401
    COLUMNS,
    MACHINE_COLUMNS,
    NUMERIC_COLUMNS,
    is_missing,
    make_row,
    step_stats,
    to_frame,
)


def _key(value: Any) -> Any:
    """Hashable, NaN-insensitive form of a cell for collision checks."""
    if is_missing(value):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return repr(sorted(value.items()))
    if isinstance(value, list | np.ndarray):
        return repr(list(value))
    return value


def _keys(df: pd.DataFrame, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    if not columns:
        return [() for _ in range(len(df))]
    cols = [df[c].tolist() if c in df.columns else [None] * len(df) for c in columns]
    return [tuple(_key(v) for v in vals) for vals in zip(*cols, strict=True)]


def save_results(
    df: pd.DataFrame | Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    merge_on: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Pickle a results frame to ``path`` atomically; return what was written.

    Without ``merge_on`` the file is replaced. With ``merge_on`` (column names) and
    an existing file, the existing rows are kept when they were measured on another
    machine (their ``(host, device)`` pair does not occur in ``df``) and do not
    collide with a new row on the ``merge_on`` columns; so results measured on
    another machine survive a re-run here, while this machine's old rows are
    superseded by the new run. New rows come first, kept rows after.
    """
    new = to_frame(df)
    path = Path(path)
    out = new
    if merge_on is not None and path.exists():
        on = [merge_on] if isinstance(merge_on, str) else list(merge_on)
        old = to_frame(pd.read_pickle(path))
        here = set(_keys(new, ["host", "device"]))
        new_keys = set(_keys(new, on))
        keep = [
            hd not in here and k not in new_keys
            for hd, k in zip(_keys(old, ["host", "device"]), _keys(old, on), strict=True)
        ]
        kept = old.loc[keep]
        if len(kept):
            out = to_frame(pd.concat([new, kept], ignore_index=True, sort=False))
    save_pickle(out, path)
    return out


def load_results(path_or_glob: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Load one results pickle, every pickle matching a glob, or a list of paths, concatenated.

    Raises ``FileNotFoundError`` (naming the pattern) when nothing matches.
    """
    if isinstance(path_or_glob, str | os.PathLike):
        pattern = os.fspath(path_or_glob)
        paths = sorted(_glob.glob(pattern)) if _glob.has_magic(pattern) else [pattern]
    else:
        paths = [os.fspath(p) for p in path_or_glob]
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        raise FileNotFoundError(f"no results file matches {path_or_glob!r}")
    frames = [to_frame(pd.read_pickle(p)) for p in paths]
    frames = [f for f in frames if len(f)] or frames[:1]
    return to_frame(pd.concat(frames, ignore_index=True, sort=False))


_HIGHER_IS_BETTER = frozenset({"samples_per_s"})


def speedup_table(
    df: pd.DataFrame,
    baseline_strategy: str = "sequential",
    metric: str = "wall_s",
    by: Sequence[str] = ("host", "model", "dataset", "batch_size"),
) -> pd.DataFrame:
    """Add ``baseline_<metric>``, ``workers``, ``speedup`` and ``efficiency`` columns.

    Rows are grouped by ``by`` (host, model, dataset, batch size by default); in
    each group the baseline is the median ``metric`` of the rows whose ``strategy``
    is ``baseline_strategy``. A baseline measured on another host is never used: a
    group without its own baseline gets NaN. ``speedup`` is baseline/metric for
    times (``wall_s``, ``step_ms_median``, ...) and metric/baseline for
    throughputs (``samples_per_s``); ``efficiency`` = speedup / workers, where
    workers = processes x threads (missing counts as 1).
    """
    out = to_frame(df)
    by = list(by)
    base_col = f"baseline_{metric}"
    values = pd.to_numeric(out[metric], errors="coerce")
    is_base = (out["strategy"] == baseline_strategy).tolist()
    keys = _keys(out, by)
    groups: dict[tuple[Any, ...], list[float]] = {}
    for key, value, base in zip(keys, values, is_base, strict=True):
        if base and not is_missing(value):
            groups.setdefault(key, []).append(float(value))
    medians = {key: float(np.median(vals)) for key, vals in groups.items()}
    out[base_col] = np.array([medians.get(key, np.nan) for key in keys], dtype=np.float64)
    if metric in _HIGHER_IS_BETTER:
        out["speedup"] = values / out[base_col]
    else:
        out["speedup"] = out[base_col] / values
    procs = pd.to_numeric(out["processes"], errors="coerce").fillna(1)
    threads = pd.to_numeric(out["threads"], errors="coerce").fillna(1)
    out["workers"] = procs * threads
    out["efficiency"] = out["speedup"] / out["workers"]
    return out




def numeric_column(df: pd.DataFrame, col: str) -> pd.Series:
    """``df[col]`` as floats (NaN where absent or not a number): results files differ in
    which optional columns they carry, and analysis must not fail on that."""
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce")


def text_column(df: pd.DataFrame, col: str) -> pd.Series:
    """``df[col]`` as strings, ``""`` where absent or missing (None, NaN, NA)."""
    if col not in df.columns:
        return pd.Series("", index=df.index, dtype=object)
    return df[col].map(lambda v: "" if v is None or v is pd.NA or (
        isinstance(v, float | np.floating) and math.isnan(v)) else str(v))

