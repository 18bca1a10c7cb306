"""Does a re-run reproduce the committed headlines? Then keep it as one more sitting.

    CNN_RESULTS_DIR=/tmp/rerun python -m study.experiments.mpi --scale standard  # re-run apart
    python -m study reproduce /tmp/rerun           # each re-run headline inside its interval?
    python -m study reproduce /tmp/rerun --pool    # ... then add it to results/ as a sitting

The re-run's headlines (its own newest sitting, not pooled) are compared with the committed
ones (pooled over the sittings in results/, study/sittings.py) *before* the re-run is pooled
in, and the table is appended to results/reproduction.json, which the report prints. Only
families the re-run measured are compared. ``make study`` (``python -m study all``) does the
same for the sitting its notebooks add to results/: the committed frames are read before
the notebooks measure, the new sitting's rows after (`new_rows`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cnn.io import atomic_write
from study import paths, report, schema, sittings
from study.config import DEFAULT_SCALE


@contextlib.contextmanager
def results_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Read (and write) results in ``folder`` instead of results/ while inside."""
    old = os.environ.get(paths.RESULTS_ENV)
    os.environ[paths.RESULTS_ENV] = str(Path(folder).resolve())
    try:
        yield Path(folder)
    finally:
        if old is None:
            os.environ.pop(paths.RESULTS_ENV, None)
        else:
            os.environ[paths.RESULTS_ENV] = old


Frames = Mapping[str, Mapping[str, pd.DataFrame]]


def sessions_of(frames: Frames) -> list[str]:
    """Every session of every family's frames, oldest first (`sittings.sessions` per family)."""
    return sorted({s for fr in frames.values() for s in sittings.sessions(fr)})


def new_rows(before: Frames, after: Frames) -> Frames:
    """The rows of ``after`` whose sitting ``before`` does not have: what a run just added."""
    old = set(sessions_of(before))
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for family, fr in after.items():
        for name, df in fr.items():
            if df is not None and len(df) and "session" in df:
                fresh = df[~df["session"].astype(str).isin(old)]
                if len(fresh):
                    out.setdefault(family, {})[name] = fresh
    return out


def check_record(committed_frames: Frames, rerun_frames: Frames,
                 scale: str = DEFAULT_SCALE) -> dict[str, Any]:
    """The re-run's own headlines (not pooled) against the committed (pooled) ones."""
    present = {f for f, fr in rerun_frames.items() if any(len(df) for df in fr.values())}
    rerun = report.all_headlines({f: fr for f, fr in rerun_frames.items() if f in present},
                                 pooled=False)
    committed = report.all_headlines(committed_frames)
    table = sittings.check(committed, rerun)
    measured = {h.key for h in rerun if h.measured}
    table = table[table["key"].isin(measured)].reset_index(drop=True)
    checked = table["inside"].map(lambda v: isinstance(v, bool))
    return {"checked": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "scale": scale, "families": sorted(present),
            "rerun_sessions": sessions_of({f: rerun_frames[f] for f in present}),
            "committed_sessions": sessions_of({f: committed_frames.get(f, {})
                                               for f in present}),
            "inside": int(table.loc[checked, "inside"].astype(bool).sum()),
            "compared": int(checked.sum()),
            "rows": table.to_dict("records")}


def compare(folder: str | os.PathLike, scale: str = DEFAULT_SCALE) -> dict[str, Any]:
    """The check of the re-run in ``folder`` against the committed results, as a record."""
    if not Path(folder).is_dir() or not any(Path(folder).glob("*.pkl")):
        raise FileNotFoundError(f"{folder}: no results (*.pkl) to compare; run a family with "
                                f"CNN_RESULTS_DIR={folder} first")
    with results_folder(folder):
        rerun_frames = report.family_frames(scale)
    return check_record(report.family_frames(scale), rerun_frames, scale)


def record_path(scale: str = DEFAULT_SCALE) -> Path:
    """results/reproduction.json: every check so far (`report.reproduction_checks`)."""
    return paths.results_dir(scale) / report.REPRODUCTION


def append_record(rec: Mapping[str, Any], scale: str = DEFAULT_SCALE) -> Path:
    path = record_path(scale)
    checks = [*report.reproduction_checks(scale), dict(rec)]
    with atomic_write(path, "w") as fh:
        json.dump(report.jsonable({"checks": checks}), fh, indent=1)
        fh.write("\n")
    return path


def pool_in(folder: str | os.PathLike, scale: str = DEFAULT_SCALE) -> list[Path]:
    """Add every results file of ``folder`` to results/ as a sitting (`schema.save` keeps
    the earlier sittings)."""
    saved = []
    for pkl in sorted(Path(folder).glob("*.pkl")):
        with results_folder(folder):
            df = schema.load(pkl.stem, scale)
        saved.append(schema.save(df, pkl.stem, scale))
    return saved


def table_text(rec: Mapping[str, Any]) -> str:
    lines = [f"re-run {', '.join(rec['rerun_sessions'])} ({', '.join(rec['families'])}) "
             f"against the committed results of {len(rec['committed_sessions'])} session(s): "
             f"{rec['inside']} of {rec['compared']} inside"]
    for r in rec["rows"]:
        mark = "n/a    " if r["inside"] is None else "inside " if r["inside"] else "OUTSIDE"
        lines.append(f"  {mark}  {r['key']:<36} committed {r['committed']:<28} "
                     f"re-run {r['rerun']}")
    return "\n".join(lines)


def main(folder: str, scale: str = DEFAULT_SCALE, pool: bool = False) -> int:
    rec = compare(folder, scale)
    print(table_text(rec))
    print(f"record: {append_record(rec, scale)}")
    if pool:
        for path in pool_in(folder, scale):
            print(f"pooled: {paths.shown(path)}")
    return 0
