"""The one timer: every version of every op timed the same way, by the study's rules.

* Thread pools pinned: Numba threads per cell, BLAS on 1 thread (``numba_cpu.configure``).
* The backend's recycled-array pool behaves as in a training loop, where shapes repeat:
  cycling through many cells' shapes must not make it drop idle shapes (``POOL_IDLE_TAKES``).
* The first call (JIT compile or cache load, first-touch allocation) is timed apart and
  reported as ``compile_s``; one more untimed call sizes the repetitions of a sample.
* Trials are interleaved: each trial runs one sample of every cell (version x shape x
  threads) round-robin, so a drifting machine moves all versions alike; >= 5 trials.
* Medians with bootstrap 95% CIs (``scipy.stats.bootstrap``, percentile method).
* GFLOP/s and GB/s against roofs measured in the same run, before and after the trials
  (the higher of the two: a roof is a best case): NumPy sgemm at t BLAS threads and a
  large copy split over t threads.

One row per (version, shape, threads, trial) via ``cnn.metrics.make_row`` (host, CPU,
versions, commit), written atomically.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cnn.metrics import make_row, save_metrics, to_frame

from .common import NB, Case, Op, Run, Version

EXPERIMENT = "kernel_ladder"


@dataclass
class Cell:
    op: Op
    case: Case
    version: Version
    threads: int
    run: Run
    first_s: float
    reps: int
    times_ms: list[float]


# --- roofs ------------------------------------------------------------------------------------

def gemm_roof(threads: int, n: int, repeats: int = 3) -> float:
    """GFLOP/s of an n x n x n float32 NumPy matmul with BLAS on ``threads`` threads."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=c)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c)
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / float(np.median(times)) / 1e9


def copy_roof(threads: int, mib: int, repeats: int = 5) -> float:
    """GB/s (bytes read + written) of a float32 copy of ``mib`` MiB split over threads."""
    n = mib * 2 ** 20 // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    edges = np.linspace(0, n, threads + 1).astype(int)

    def part(i: int) -> None:
        np.copyto(dst[edges[i]:edges[i + 1]], src[edges[i]:edges[i + 1]])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads)))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(part, range(threads)))
            times.append(time.perf_counter() - t0)
    return 2.0 * src.nbytes / float(np.median(times)) / 1e9


def roofs(threads: Sequence[int], quick: bool) -> dict[int, tuple[float, float]]:
    """{threads: (GEMM GFLOP/s, copy GB/s)}."""
    n, mib = (256, 8) if quick else (2048, 256)
    out = {t: (gemm_roof(t, n), copy_roof(t, mib)) for t in threads}
    NB.configure(max(threads))  # BLAS back on 1 thread
    return out


# --- statistics ---------------------------------------------------------------------------

def median_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(median, CI low, CI high): bootstrap 95% percentile interval of the median."""
    from scipy.stats import bootstrap

    x = np.asarray(values, np.float64)
    med = float(np.median(x))
    if x.size < 2 or np.all(x == x[0]):
        return med, med, med
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap((x,), np.median, confidence_level=0.95, n_resamples=2000,
                        method="percentile", rng=np.random.default_rng(seed))
    return med, float(res.confidence_interval.low), float(res.confidence_interval.high)


# --- the timer ------------------------------------------------------------------------------

def _prepare(op: Op, case: Case, inputs: dict, version: Version, threads: int,
             min_time: float) -> Cell:
    NB.configure(threads)
    run = version.prepare(inputs)
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, min(100_000, math.ceil(min_time / once)))
    return Cell(op, case, version, threads, run, first, reps, [])


def _sample(cell: Cell) -> float:
    NB.configure(cell.threads)
    run, reps = cell.run, cell.reps
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) / reps * 1e3


def time_cells(cells: list[Cell], trials: int, echo: Callable[[str], None] = print
               ) -> list[tuple[Cell, int, int]]:
    """``trials`` rounds; each round samples every cell once, starting one cell further on
    each round. Returns (cell, trial, global sequence number) per sample."""
    order = []
    seq = 0
    gc.collect()
    for trial in range(trials):
        start = trial * len(cells) // trials
        for cell in cells[start:] + cells[:start]:
            cell.times_ms.append(_sample(cell))
            order.append((cell, trial, seq))
            seq += 1
        echo(f"  trial {trial + 1}/{trials} done")
    return order


def run_timer(ops: Sequence[Op], quick: bool = False, threads: Sequence[int] | None = None,
              trials: int = 5, only: Sequence[str] = (), min_time: float | None = None,
              out: str | Path | None = None, echo: Callable[[str], None] = print
              ) -> pd.DataFrame:
    """Time every version of ``ops`` at every thread count; the rows (also written to
    ``out`` when given); prints a summary table per op, shape and thread count."""
    if trials < 5:
        raise ValueError(f"need >= 5 trials for medians and CIs, got {trials}")
    threads = sorted(set(threads or {1, NB.max_threads()}))
    if max(threads) > NB.max_threads():
        raise ValueError(f"{max(threads)} threads > NUMBA_NUM_THREADS={NB.max_threads()}; "
                         "set NUMBA_NUM_THREADS before Python starts")
    min_time = min_time if min_time is not None else (0.002 if quick else 0.05)
    idle = NB.POOL_IDLE_TAKES
    NB.POOL_IDLE_TAKES = 1 << 62
    try:
        return _run_timer(ops, quick, threads, trials, only, min_time, out, echo)
    finally:
        NB.POOL_IDLE_TAKES = idle


def _run_timer(ops: Sequence[Op], quick: bool, threads: list[int], trials: int,
               only: Sequence[str], min_time: float, out: str | Path | None,
               echo: Callable[[str], None]) -> pd.DataFrame:
    echo(f"roofs at {threads} thread(s) ...")
    before = roofs(threads, quick)
    cells = []
    for op in ops:
        for i, case in enumerate(op.timings(quick)):
            inputs = op.make(case, np.random.default_rng(2000 + i))
            for t in threads:
                for version in op.versions:
                    if only and version.name not in only:
                        continue
                    cells.append(_prepare(op, case, inputs, version, t, min_time))
    echo(f"{len(cells)} cells compiled and sized; {trials} interleaved trials ...")
    order = time_cells(cells, trials, echo)
    after = roofs(threads, quick)
    roof = {t: (max(before[t][0], after[t][0]), max(before[t][1], after[t][1]))
            for t in threads}
    frame = to_frame(_rows(order, roof, quick))
    if out is not None:
        save_metrics(frame, out)
        echo(f"wrote {len(frame)} rows to {out}")
    echo(summary_text(frame))
    return frame


def _rows(order: list[tuple[Cell, int, int]], roof: dict[int, tuple[float, float]],
          quick: bool) -> list[dict]:
    stats = {id(c): median_ci(c.times_ms) for c, _, _ in order}
    rows = []
    for cell, trial, seq in order:
        op, case, v = cell.op, cell.case, cell.version
        ms = cell.times_ms[trial]
        med, lo, hi = stats[id(cell)]
        flops, nbytes = op.flops(case), op.nbytes(case)
        gflops = flops / (ms / 1e3) / 1e9 if flops else float("nan")
        gbs = nbytes / (ms / 1e3) / 1e9
        gemm, copy = roof[cell.threads]
        rows.append(make_row(
            experiment=EXPERIMENT, strategy="kernel", backend="numba",
            threads=cell.threads, device="cpu", dataset="synthetic",
            batch_size=case.batch_size, samples=case.batch_size, epochs=0,
            compile_s=max(0.0, cell.first_s - med / 1e3), step_ms_median=med,
            family=op.family, kernel=op.name, version=v.name, what_changed=v.what,
            status=v.status, shape=case.label, trial=trial, seq=seq, reps=cell.reps,
            time_ms=ms, time_ms_median=med, ci_low_ms=lo, ci_high_ms=hi,
            first_call_s=cell.first_s, flops=flops, bytes=nbytes, gflops=gflops,
            gbytes_per_s=gbs, gemm_roof_gflops=gemm, copy_roof_gbs=copy,
            pct_gemm_roof=100.0 * gflops / gemm if flops else float("nan"),
            pct_copy_roof=100.0 * gbs / copy, blas_threads=1,
            scale="quick" if quick else "standard"))
    return rows


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per (op, shape, threads, version): median and CI, GFLOP/s, roofs, speedup
    over the op's first version at the same shape and threads."""
    keys = ["family", "kernel", "shape", "threads", "version"]
    g = frame.groupby(keys, sort=False)
    out = g.agg(status=("status", "first"), median_ms=("time_ms_median", "first"),
                ci_low_ms=("ci_low_ms", "first"), ci_high_ms=("ci_high_ms", "first"),
                gflops=("gflops", "median"), pct_gemm_roof=("pct_gemm_roof", "median"),
                pct_copy_roof=("pct_copy_roof", "median"), compile_s=("compile_s", "first"),
                what_changed=("what_changed", "first")).reset_index()
    base = out.groupby(keys[:-1], sort=False)["median_ms"].transform("first")
    out["speedup_vs_v1"] = base / out["median_ms"]
    return out


def summary_text(frame: pd.DataFrame) -> str:
    s = summary(frame)
    lines = []
    for (fam, kern, shape, t), part in s.groupby(["family", "kernel", "shape", "threads"],
                                                 sort=False):
        lines.append(f"\n{fam} / {kern} / {shape} / {t} thread(s)")
        lines.append(f"  {'ver':<4} {'status':<10} {'median ms':>10} {'95% CI':>19} "
                     f"{'GFLOP/s':>8} {'%GEMM':>6} {'%copy':>6} {'x v1':>7} {'first s':>8}")
        for r in part.itertuples():
            gf = "" if math.isnan(r.gflops) else f"{r.gflops:8.1f}"
            pg = "" if math.isnan(r.pct_gemm_roof) else f"{r.pct_gemm_roof:6.1f}"
            lines.append(f"  {r.version:<4} {r.status:<10} {r.median_ms:10.4f} "
                         f"[{r.ci_low_ms:8.4f},{r.ci_high_ms:8.4f}] {gf:>8} {pg:>6} "
                         f"{r.pct_copy_roof:6.1f} {r.speedup_vs_v1:7.2f} "
                         f"{r.compile_s:8.3f}")
    return "\n".join(lines)
