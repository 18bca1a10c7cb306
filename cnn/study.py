"""Run the whole study: the notebooks in order, then the summary and the report.

    python -m cnn.study                        # notebooks 01..06 at scale "standard",
                                               # then results/summary.json and report.pdf
    python -m cnn.study --scale quick          # small, fast versions of every notebook
    python -m cnn.study --only 01,06           # just these notebooks (then summary + report)
    python -m cnn.study summary                # only results/*.pkl -> results/summary.json
    python -m cnn.study report                 # summary, then report/report.typ -> report.pdf
    python -m cnn.study report --no-summary    # the report from the existing summary.json

Notebooks run headless through papermill with their working directory set to
``notebooks/`` (as in JupyterLab) and the ``scale`` parameter injected; each
executed notebook replaces the original only when it ran to the end (written to
a temporary file, then renamed). One line per notebook says its name, seconds
and ``ok`` / ``FAILED`` / ``missing (not built yet)``. A failure names the
notebook and the cell (index and first line of its source), keeps the original
notebook untouched (the failed copy goes to ``build/study/``) and stops with a
non-zero exit status. Results are never deleted: notebooks merge their rows into
``results/*.pkl`` so rows measured on other machines (a GPU host, a cluster) stay.

This module also holds the logic notebook 01 shows (twin checks, the reduced
baseline run, the confusion matrix), so the notebook only calls it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.summary import project_root

SCALES = ("quick", "standard", "full")
DEFAULT_SCALE = "standard"
#: The six notebooks, in order (a missing one is reported, not faked).
NOTEBOOKS = (
    "01_sequential_baseline",
    "02_numba_cpu",
    "03_numba_cuda",
    "04_mpi_data_parallel",
    "05_async_hogwild_kfold",
    "06_speedup_summary",
)
REPORT_SOURCE = Path("report") / "report.typ"
REPORT_PDF = Path("report.pdf")
FAILED_DIR = Path("build") / "study"


# --------------------------------------------------------------------------- the runner


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


def _failed_cell(nb: Any, original: Any | None, exc: BaseException
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


def run_notebook(path: Path, scale: str = DEFAULT_SCALE, timeout: float | None = None,
                 kernel_name: str | None = None, cwd: Path | None = None,
                 failed_dir: Path | None = None,
                 parameters: dict[str, Any] | None = None) -> NotebookRun:
    """Execute one notebook with papermill; replace it only on success (temp file + rename)."""
    import nbformat
    import papermill as pm

    path = Path(path)
    params = {"scale": scale, **(parameters or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".ipynb", dir=path.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        try:
            pm.execute_notebook(str(path), tmp, parameters=params, kernel_name=kernel_name,
                                cwd=str(cwd or path.parent), progress_bar=False,
                                log_output=False, execution_timeout=timeout)
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
            idx, source = _failed_cell(nb, original, exc)
            first = next((ln.strip() for ln in (source or "").splitlines() if ln.strip()), "")
            ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
            what = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
            copy = None
            if nb is not None:
                folder = failed_dir or path.parent.parent / FAILED_DIR
                folder.mkdir(parents=True, exist_ok=True)
                copy = folder / path.name
                os.replace(tmp, copy)
            return NotebookRun(path.stem, "FAILED", seconds, path, what.strip().splitlines()[0]
                               if what.strip() else what, idx, first, copy)
        seconds = time.perf_counter() - t0
        os.replace(tmp, path)
        return NotebookRun(path.stem, "ok", seconds, path)
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
                  kernel_name: str | None = None, log: Callable[[str], None] = print
                  ) -> list[NotebookRun]:
    """Run the notebooks in order; raise :class:`StudyError` at the first failure."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    folder = Path(folder) if folder is not None else project_root() / "notebooks"
    runs = []
    for name, path in select_notebooks(folder, only):
        if path is None:
            run = NotebookRun(name, "missing (not built yet)")
            log(run.line())
            runs.append(run)
            continue
        run = run_notebook(path, scale=scale, timeout=timeout, kernel_name=kernel_name)
        log(run.line())
        runs.append(run)
        if run.status != "ok":
            raise StudyError(failure_message(run))
    return runs


# --------------------------------------------------------------------------- summary, report


def write_summary(results: Path | None = None, out: Path | None = None, twin: bool = True
                  ) -> dict[str, Any]:
    from cnn import summary as S

    folder = Path(results) if results is not None else S.results_dir()
    data = S.build_summary(folder, twin=twin)
    S.write_summary(data, Path(out) if out is not None else folder / "summary.json")
    if results is None and out is None:  # the study's own results: keep the README's table
        S.update_readme(data, S.project_root() / "README.md")
    return data


def build_report(out: str | os.PathLike | None = None, summary: Any = None,
                 root: str | os.PathLike | None = None,
                 source: str | os.PathLike | None = None) -> Path:
    """Compile ``report/report.typ`` to ``report.pdf`` (atomically) with the typst package.

    ``summary`` is a dict (or a JSON file) handed to the report through
    ``sys.inputs``; by default the report reads ``/results/summary.json`` under
    ``root`` (the project root, which also holds ``images/``).
    """
    import typst

    from cnn.io import atomic_write

    root = Path(root) if root is not None else project_root()
    source = Path(source) if source is not None else root / REPORT_SOURCE
    out = Path(out) if out is not None else root / REPORT_PDF
    inputs: dict[str, str] = {}
    if summary is not None:
        text = Path(summary).read_text() if isinstance(summary, str | os.PathLike) else \
            json.dumps(summary)
        inputs["summary"] = text
    elif not (root / "results" / "summary.json").is_file():
        raise FileNotFoundError(f"{root / 'results' / 'summary.json'} is missing: run "
                                "'python -m cnn.summary' (or 'python -m cnn.study report')")
    try:
        pdf = typst.compile(str(source), root=str(root), sys_inputs=inputs)
    except typst.TypstError as exc:  # the diagnostic names file, line and column
        raise RuntimeError(f"typst could not compile {source}:\n"
                           f"{getattr(exc, 'diagnostic', None) or exc}") from None
    with atomic_write(out) as fh:
        fh.write(pdf)
    return out


# --------------------------------------------------------------------------- notebook 01 logic


def twin_checks(models: Sequence[str] = ("seed_cnn", "lenet5", "mlp"),
                dtypes: Sequence[Any] = (np.float32, np.float64), batch: int = 4,
                seed: int = 0) -> pd.DataFrame:
    """Max relative error of the NumPy network against its torch twin, live.

    One row per (model, dtype, quantity): quantity is ``logits``, ``loss`` or a
    gradient name (``0.weight``, ...); ``max_rel_err`` = max|a - b| / max|b|.
    Inputs: seed_cnn and lenet5 on Fashion-MNIST-shaped (1, 28, 28) random
    batches, mlp on iris-shaped (4,) ones.
    """
    import torch

    from cnn.models import build
    from cnn.twin import torch_loss_and_grads, torch_twin

    shapes = {"seed_cnn": ((1, 28, 28), 10), "lenet5": ((1, 28, 28), 10), "mlp": ((4,), 3)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name in models:
            shape, k = shapes[name]
            for dtype in dtypes:
                dtype = np.dtype(dtype)
                net = build(name, shape, k, dtype=dtype, seed=seed)
                rng = np.random.default_rng(seed)
                x = rng.standard_normal((batch, *shape)).astype(dtype)
                y = rng.integers(0, k, batch)
                logits = net.forward(x)
                loss = net.loss_and_grad(x, y)
                grads = {s.name: net.grads[s.offset:s.offset + s.size].reshape(s.shape).copy()
                         for s in net.slots}
                tloss, tlogits, tgrads = torch_loss_and_grads(torch_twin(net), x, y)
                pairs = [("logits", logits, tlogits), ("loss", loss, tloss)]
                pairs += [(g, grads[g], tgrads[g]) for g in grads]
                for quantity, a, b in pairs:
                    rows.append({"model": name, "dtype": dtype.name, "quantity": quantity,
                                 "max_rel_err": _rel_err(a, b), "params": net.num_params})
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows)


def _rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def twin_table(df: pd.DataFrame) -> pd.DataFrame:
    """``twin_checks`` as a table: rows = (model, quantity) in check order, columns = dtype."""
    table = df.pivot_table(index=["model", "quantity"], columns="dtype", values="max_rel_err",
                           aggfunc="max")
    order = list(dict.fromkeys(zip(df["model"], df["quantity"], strict=True)))
    table = table.reindex(pd.MultiIndex.from_tuples(order, names=["model", "quantity"]))
    table.columns.name = None
    return table


#: The baseline run at each scale (notebook 01 trains it when no saved baseline exists).
BASELINE_SCALES: dict[str, dict[str, Any]] = {
    "quick": dict(subset=2048, test_subset=1000, epochs=2, max_steps=None, batch_size=32),
    "standard": dict(subset=20000, test_subset=10000, epochs=3, max_steps=None, batch_size=64),
    "full": dict(subset=None, test_subset=None, epochs=15, max_steps=None, batch_size=64),
}


def load_dataset(name: str = "fashion-mnist", subset: int | None = None,
                 test_subset: int | None = None):
    """``(train, test, dataset, note)``: the named dataset, else digits with the reason."""
    from cnn import data as cdata
    from cnn.errors import DataError

    try:
        train = cdata.load(name, "train", subset=subset, download=False)
        test = cdata.load(name, "test", subset=test_subset, download=False)
        return train, test, name, f"{name} found on this machine"
    except DataError as exc:
        first = str(exc).splitlines()[0]
        train, test = cdata.load("digits", "train"), cdata.load("digits", "test")
        return train, test, "digits", f"{name} not available ({first}); using digits instead"


def train_baseline(scale: str = "quick", dataset: str = "fashion-mnist", seed: int = 0,
                   log: Callable[[str], None] | None = None):
    """The seed CNN trained sequentially at a reduced size for ``scale``.

    Returns ``(frame, net, (x_test, y_test), info)``: the per-epoch rows (as
    ``cnn.train.fit`` makes them; nothing is written to ``results/``), the trained
    network, the test split and a dict saying what was run.
    """
    import warnings

    from cnn.models import seed_cnn
    from cnn.optim import make_optimizer, make_schedule
    from cnn.train import fit

    with warnings.catch_warnings():  # tqdm.auto warns about ipywidgets; no bar is shown here
        warnings.simplefilter("ignore")
        import tqdm.auto  # noqa: F401

    cfg = dict(BASELINE_SCALES[scale])
    train, test, used, note = load_dataset(dataset, cfg["subset"], cfg["test_subset"])
    x, y = train
    shape = x.shape[1:]
    net = seed_cnn(shape, int(y.max()) + 1, padding=int(min(shape[1:]) < 16), seed=seed,
                   threads=1)
    steps = -(-len(y) // cfg["batch_size"]) * cfg["epochs"]
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    opt = make_optimizer("sgd", net, lr=0.05, momentum=0.9)
    sched = make_schedule("cosine", 0.05, steps)
    df = fit(net, train, test, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
             optimizer=opt, schedule=sched, seed=seed, max_steps=cfg["max_steps"],
             progress=False, log=log, experiment=f"baseline_{scale}", strategy="sequential",
             processes=1, model="seed_cnn", dataset=used)
    info = dict(scale=scale, dataset=used, note=note, train_samples=len(y),
                test_samples=len(test[1]), steps=steps, **cfg)
    return df, net, test, info


def confusion(y_true: Any, y_pred: Any, k: int) -> np.ndarray:
    """``k x k`` counts: rows = true class, columns = predicted."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def saved_weights(stem: str = "baseline_fashion_mnist") -> Path | None:
    """Weights saved next to a results pickle (``results/<stem>*.npz``), if any."""
    from cnn.summary import results_dir

    hits = sorted(results_dir().glob(f"{stem}*.npz"))
    return hits[-1] if hits else None


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cnn.study",
        description=__doc__.split("\n\nThis module also")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=["run", "summary", "report"],
                   help="run (default): notebooks + summary + report; summary: "
                        "results/summary.json only; report: summary + report.pdf")
    p.add_argument("--scale", default=DEFAULT_SCALE, choices=SCALES,
                   help="the 'scale' parameter injected into every notebook (default: "
                        f"{DEFAULT_SCALE})")
    p.add_argument("--only", default=None, metavar="01,06",
                   help="comma-separated notebook numbers (or names) to run")
    p.add_argument("--timeout", type=float, default=None,
                   help="per-cell timeout in seconds (default: none)")
    p.add_argument("--kernel", default=None,
                   help="Jupyter kernel name (default: the notebook's own)")
    p.add_argument("--no-summary", action="store_true",
                   help="do not regenerate results/summary.json")
    p.add_argument("--no-report", action="store_true", help="do not build report.pdf")
    p.add_argument("--no-twin", action="store_true",
                   help="summary: skip the live NumPy-vs-PyTorch twin check")
    p.add_argument("--out", default=None, help=f"report PDF (default: <root>/{REPORT_PDF})")
    p.add_argument("--list", action="store_true", help="list the notebooks and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = project_root()
    if args.list:
        for name, path in select_notebooks(root / "notebooks",
                                           args.only.split(",") if args.only else None):
            print(f"{name:<30} {'present' if path else 'missing (not built yet)'}")
        return 0
    t0 = time.perf_counter()
    if args.command == "run":
        print(f"study: scale={args.scale}, notebooks in {root / 'notebooks'}", flush=True)
        try:
            runs = run_notebooks(root / "notebooks", args.scale,
                                 args.only.split(",") if args.only else None, args.timeout,
                                 args.kernel, log=lambda s: print(s, flush=True))
        except StudyError as exc:
            print(f"study FAILED: {exc}", file=sys.stderr, flush=True)
            return 1
        ok = sum(r.status == "ok" for r in runs)
        missing = [r.name for r in runs if r.status.startswith("missing")]
        print(f"notebooks: {ok} ok, {len(missing)} missing"
              + (f" ({', '.join(missing)})" if missing else ""), flush=True)
    if not args.no_summary:
        t = time.perf_counter()
        data = write_summary(twin=not args.no_twin)
        c = data["counts"]
        print(f"{'summary':<30} {time.perf_counter() - t:7.1f} s  ok  (results/summary.json: "
              f"{c['measured']} headline(s) measured, {c['not_measured']} not measured)",
              flush=True)
    if args.command in ("run", "report") and not args.no_report:
        t = time.perf_counter()
        try:
            out = build_report(args.out)
        except (RuntimeError, FileNotFoundError) as exc:
            print(f"{'report':<30} {time.perf_counter() - t:7.1f} s  FAILED\n{exc}",
                  file=sys.stderr, flush=True)
            return 1
        print(f"{'report':<30} {time.perf_counter() - t:7.1f} s  ok  ({out})", flush=True)
    print(f"study done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
