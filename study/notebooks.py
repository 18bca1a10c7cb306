"""Runs the numbered notebooks headless with papermill, one line per notebook.

    python -m study notebooks --scale quick --only 01,06

Each notebook gets its ``scale`` parameter (and ``measure``) injected. A committed scale
rewrites the notebook in place with its outputs; a quick run writes its executed copies
under ``build/quick/notebooks`` and leaves the committed notebooks alone. A failure names
the notebook and the cell, and keeps the executed copy with the traceback.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import paths
from study.config import DEFAULT_SCALE
from study.schema import SCALES


def output_path(path: Path, scale: str) -> Path:
    """Where the executed copy of ``path`` goes at ``scale``."""
    if scale in paths.COMMITTED_SCALES:
        return Path(path)
    return paths.scratch_dir(scale) / "notebooks" / Path(path).name


#: The six notebooks, in order (a missing one is reported, not faked).
NOTEBOOKS = (
    "01_sequential_baseline",
    "02_numba_cpu",
    "03_numba_cuda",
    "04_mpi_data_parallel",
    "05_async_hogwild_kfold",
    "06_speedup_summary",
)
class StudyError(RuntimeError):
    """A notebook failed; the message names it and the cell."""


@dataclass
class NotebookRun:
    name: str
    status: str  # "ok", "FAILED", "missing (not built yet)"
    seconds: float = 0.0
    path: Path | None = None
    error: str | None = None
    cell_index: int | None = None
    cell_source: str | None = None
    failed_copy: Path | None = None

    def line(self) -> str:
        secs = f"{self.seconds:7.1f} s" if self.status != "missing (not built yet)" else " " * 9
        return f"{self.name:<30} {secs}  {self.status}"


def select_notebooks(folder: Path, only: Sequence[str] | None = None
                     ) -> list[tuple[str, Path | None]]:
    """``[(name, path or None)]`` for 01..06 (or the ``only`` prefixes), in order.

    A number with no ``NN_*.ipynb`` file gives ``(expected name, None)``; extra
    numbered notebooks in the folder (07_..., when added) run after the six.
    """
    wanted = [o.strip() for o in only] if only else None
    known = {n[:2]: n for n in NOTEBOOKS}
    for p in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        known.setdefault(p.name[:2], p.stem)
    out = []
    for prefix in sorted(known):
        if wanted is not None and prefix not in wanted and known[prefix] not in wanted:
            continue
        hits = sorted(folder.glob(f"{prefix}_*.ipynb"))
        out.append((hits[0].stem, hits[0]) if hits else (known[prefix], None))
    if wanted:
        unknown = [w for w in wanted if not any(w in (n[:2], n) for n, _ in out)]
        if unknown:
            raise SystemExit(f"--only: no notebook numbered {', '.join(unknown)} "
                             f"(have {', '.join(n[:2] for n, _ in out) or 'none'})")
    return out


def failed_cell(nb: Any, original: Any | None, exc: BaseException
                 ) -> tuple[int | None, str | None]:
    """Index of the failing cell in the notebook as written (without papermill's injected
    parameters cell or its error banner) and the cell's source."""
    cells = list(getattr(nb, "cells", []) or [])
    failed = None
    for cell in cells:  # the cell with an error output, else the one papermill marked
        if cell.get("cell_type") == "code" and any(
                o.get("output_type") == "error" for o in cell.get("outputs", [])):
            failed = cell
            break
    if failed is None:
        for cell in cells:
            meta = cell.get("metadata", {}).get("papermill", {})
            if meta.get("exception") or meta.get("status") in ("failed", "running"):
                failed = cell
                break
    source = failed.get("source", "") if failed is not None else getattr(exc, "source", None)
    if original is None:
        return None, source
    if failed is not None and failed.get("id") is not None:
        for j, oc in enumerate(original.cells):
            if oc.get("id") == failed.get("id"):
                return j, source
    if source:
        hits = [j for j, oc in enumerate(original.cells) if oc.get("source") == source]
        if len(hits) == 1:
            return hits[0], source
    return None, source


@contextlib.contextmanager
def inline_figures() -> Iterator[None]:
    """The kernel without ``$MPLBACKEND`` (the Makefile and the tests set ``agg`` for
    scripts): a notebook then draws with Jupyter's inline backend and its saved outputs
    carry the figures as images, not ``<Figure size ...>``."""
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


def run_notebook(path: Path, scale: str = DEFAULT_SCALE, timeout: float | None = None,
                 kernel_name: str | None = None, cwd: Path | None = None,
                 out: Path | None = None,
                 parameters: dict[str, Any] | None = None) -> NotebookRun:
    """Execute one notebook with papermill and write it, with its outputs, to ``out``
    (default: in place for committed scales, else under ``build/<scale>/notebooks``) only
    on success (temp file + rename): a quick run never replaces a committed notebook."""
    import nbformat
    import papermill as pm

    path = Path(path)
    out = Path(out) if out is not None else output_path(path, scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {"scale": scale, **(parameters or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".ipynb", dir=out.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        try:
            with inline_figures():
                pm.execute_notebook(str(path), tmp, parameters=params,
                                    kernel_name=kernel_name, cwd=str(cwd or path.parent),
                                    progress_bar=False, log_output=False,
                                    execution_timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 -- report every way a notebook can fail
            if isinstance(exc, KeyboardInterrupt):
                raise
            seconds = time.perf_counter() - t0
            try:
                nb = nbformat.read(tmp, as_version=4)
            except Exception:
                nb = None
            try:
                original = nbformat.read(path, as_version=4)
            except Exception:
                original = None
            idx, source = failed_cell(nb, original, exc)
            first = next((ln.strip() for ln in (source or "").splitlines() if ln.strip()), "")
            ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
            what = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
            copy = None
            if nb is not None:
                folder = paths.scratch_dir(scale) / "failed"
                folder.mkdir(parents=True, exist_ok=True)
                copy = folder / path.name
                os.replace(tmp, copy)
            return NotebookRun(path.stem, "FAILED", seconds, path, what.strip().splitlines()[0]
                               if what.strip() else what, idx, first, copy)
        seconds = time.perf_counter() - t0
        os.replace(tmp, out)
        return NotebookRun(path.stem, "ok", seconds, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def failure_message(run: NotebookRun) -> str:
    cell = (f"cell {run.cell_index} ({run.cell_source!r})" if run.cell_index is not None
            else f"an unknown cell{f' ({run.cell_source!r})' if run.cell_source else ''}")
    msg = f"{run.name}.ipynb failed in {cell}: {run.error}"
    if run.failed_copy:
        msg += f"\n  executed copy with the traceback: {run.failed_copy}"
    return msg


def run_notebooks(folder: Path | None = None, scale: str = DEFAULT_SCALE,
                  only: Sequence[str] | None = None, timeout: float | None = None,
                  kernel_name: str | None = None, log: Callable[[str], None] = print,
                  parameters: dict[str, Any] | None = None) -> list[NotebookRun]:
    """Run the notebooks in order; raise :class:`StudyError` at the first failure."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    folder = Path(folder) if folder is not None else paths.notebooks_dir()
    runs = []
    for name, path in select_notebooks(folder, only):
        if path is None:
            run = NotebookRun(name, "missing (not built yet)")
            log(run.line())
            runs.append(run)
            continue
        run = run_notebook(path, scale=scale, timeout=timeout, kernel_name=kernel_name,
                           parameters=parameters)
        log(run.line())
        runs.append(run)
        if run.status != "ok":
            raise StudyError(failure_message(run))
    return runs
