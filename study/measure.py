"""The measurement harness: pinned thread pools, one timer, interleaved trials, the
quiet-host guard, the GEMM and copy roofs, memory peaks, and fresh-process runners.

The rules (docs/DESIGN.md, "Numbers a reader can trust"): every configuration is
repeated, and the repeats of the configurations being compared are interleaved
(A B C, then C A B, ...) so minute-scale drift of a shared VM hits all of them alike;
JIT, start-up and the first step are timed apart from the steady state; every thread
pool is pinned; a trial that starts on a busy machine waits (bounded) and records the
load it saw.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.metrics import step_stats

MB = 2**20


# --- thread pools ------------------------------------------------------------------------

def _numba() -> Any:
    try:
        import numba
    except ImportError:
        return None
    return numba


def max_threads() -> int | None:
    """The most threads `pinned_threads` can give Numba (``NUMBA_NUM_THREADS``)."""
    numba = _numba()
    return None if numba is None else int(numba.config.NUMBA_NUM_THREADS)


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@contextlib.contextmanager
def pinned_threads(n: int, blas: int | None = None) -> Iterator[int]:
    """Pin Numba, every OpenMP/BLAS pool (threadpoolctl; BLAS gets ``blas``, default ``n``)
    and PyTorch (when already imported) to ``n`` threads inside the block; restore after."""
    from threadpoolctl import threadpool_limits

    n, blas = int(n), int(n if blas is None else blas)
    if n < 1 or blas < 1:
        raise ValueError(f"threads must be >= 1, got {n} (BLAS {blas})")
    numba = _numba()
    torch = sys.modules.get("torch")
    if numba is not None and n > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"{n} threads is more than Numba's NUMBA_NUM_THREADS="
                         f"{numba.config.NUMBA_NUM_THREADS}; set NUMBA_NUM_THREADS={n} in the "
                         "environment before starting Python to oversubscribe")
    saved_numba = numba.get_num_threads() if numba is not None else None
    saved_torch = torch.get_num_threads() if torch is not None else None
    limiter = threadpool_limits(limits={"openmp": n, "blas": blas})
    try:
        if numba is not None:
            numba.set_num_threads(n)
        if torch is not None:
            torch.set_num_threads(n)
        yield n
    finally:
        if torch is not None:
            torch.set_num_threads(saved_torch)
        if numba is not None:
            numba.set_num_threads(saved_numba)
        limiter.restore_original_limits()


def pinned_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """Environment for a child process whose pools must all be ``threads`` wide."""
    t = str(int(threads))
    return {**os.environ, "OMP_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
            "MKL_NUM_THREADS": t, "NUMBA_NUM_THREADS": t, **extra}


# --- the one timer ---------------------------------------------------------------------

def _noop() -> None:
    return None


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 0,
               sync: Callable[[], None] = _noop, collect: bool = True) -> dict[str, Any]:
    """Time ``fn()``: the first call (JIT) and ``warmup`` more apart, then ``repeats`` timed
    calls; ``sync()`` runs before each timer stops; the garbage collector runs once
    (untimed) before the timed calls.

    Returns `cnn.metrics.step_stats` (``compile_s``, ``step_ms_median``, ``step_ms_iqr``)
    plus ``first_call_s``, ``wall_s`` (sum of the timed calls), ``times_s``, ``result``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    times, result = [], None
    for i in range(1 + warmup + repeats):
        if collect and i == 1 + warmup:
            gc.collect()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    timed = times[1 + warmup:]
    return {**step_stats(times, 1 + warmup), "first_call_s": times[0], "wall_s": sum(timed),
            "times_s": timed, "result": result}


# --- roofs ---------------------------------------------------------------------------

def gemm_gflops(threads: int = 1, n: int = 2048, repeats: int = 7) -> float:
    """The host's practical compute roof: float32 ``n^3`` NumPy matmul at ``threads``."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), dtype=np.float32)
    with pinned_threads(threads):
        t = time_calls(partial(np.matmul, a, b, out=c), repeats, warmup=1)
    return 2.0 * n**3 / (t["step_ms_median"] / 1e3) / 1e9


def copy_gbps(nbytes: int = 256 * MB, repeats: int = 7, threads: int = 1) -> float:
    """The host's practical memory roof: GB/s moved (read + write) by a large array copy,
    split over ``threads`` threads (``np.copyto`` releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    edges = np.linspace(0, src.size, int(threads) + 1).astype(int)
    chunks = [(dst[a:b], src[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
    with ThreadPoolExecutor(int(threads)) as pool:
        def copy() -> None:
            list(pool.map(lambda c: np.copyto(*c), chunks))

        t = time_calls(copy if threads > 1 else partial(np.copyto, dst, src), repeats, warmup=1)
    return 2.0 * src.nbytes / (t["step_ms_median"] / 1e3) / 1e9


# --- memory ----------------------------------------------------------------------------

def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            match = re.search(r"^VmHWM:\s+(\d+)\s*kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def malloc_trim() -> None:
    """Hand freed heap back to the OS, so that RSS rises measured next are real."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def memory_probe() -> Iterator[dict[str, Any]]:
    """The block's peak memory: the yielded dict gets ``traced_mem_mb`` (tracemalloc),
    ``rss_mem_mb`` (rise of the peak resident set), ``peak_mem_mb`` (the larger)."""
    gc.collect()
    malloc_trim()
    hwm = _reset_rss_peak() and _rss_peak_bytes() is not None
    rss0 = _rss_bytes()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    out: dict[str, Any] = {}
    try:
        yield out
    finally:
        traced = max(0, tracemalloc.get_traced_memory()[1] - traced0) / MB
        if started:
            tracemalloc.stop()
        peak = max(_rss_peak_bytes() or 0, _rss_bytes()) if hwm else _rss_bytes()
        rss = max(0, peak - rss0) / MB
        out.update(traced_mem_mb=traced, rss_mem_mb=rss, peak_mem_mb=max(traced, rss))


# --- the quiet-host guard ----------------------------------------------------------------

def others_busy_cores(interval: float = 0.25) -> float:
    """Cores' worth of CPU used by processes other than this one and its children."""
    import psutil

    me = psutil.Process()
    family = {me.pid, *(c.pid for c in me.children(recursive=True))}

    def own() -> float:
        total = 0.0
        for pid in family:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        return total

    cpu0, own0, t0 = psutil.cpu_times(), own(), time.perf_counter()
    time.sleep(interval)
    cpu1, own1, t1 = psutil.cpu_times(), own(), time.perf_counter()
    busy = (cpu1.user + cpu1.system + cpu1.nice) - (cpu0.user + cpu0.system + cpu0.nice)
    return max(0.0, (busy - (own1 - own0)) / (t1 - t0))


def wait_quiet(limit: float = 0.3, timeout: float = 30.0,
               log: Callable[[str], None] | None = None) -> tuple[float, float]:
    """Wait (at most ``timeout`` s) until other processes use at most ``limit`` cores.

    Returns (seconds waited, their cores when it stopped waiting). A trial that ran
    beside a busy core records it (``host_load``); analysis flags it, it is not hidden.
    """
    t0 = time.perf_counter()
    busy = others_busy_cores()
    while busy > limit and time.perf_counter() - t0 < timeout:
        busy = others_busy_cores(0.5)
    waited = time.perf_counter() - t0
    if log and waited > 1.0:
        log(f"  (waited {waited:.0f}s for a quiet machine; others now use {busy:.2f} cores)")
    return waited, busy


# --- interleaved trials ------------------------------------------------------------------

def new_session() -> str:
    """An id for one sitting: rows sharing it were measured interleaved, side by side."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class Trial:
    """One run of one configuration: its index in the plan, the trial number and order."""
    config: int
    trial: int
    order: int


def interleaved_order(n_configs: int, trials: int, seed: int = 0) -> list[Trial]:
    """Every configuration once per round, rounds in a different (rotated, then shuffled)
    order each time, so no configuration always runs first or last."""
    rng = np.random.default_rng(seed)
    out: list[Trial] = []
    for t in range(trials):
        order = list(range(n_configs))
        order = order[t % n_configs:] + order[:t % n_configs] if n_configs else order
        if t >= n_configs:
            rng.shuffle(order)
        out += [Trial(c, t, len(out)) for c in order]
    return out


@dataclass
class Plan:
    """Configurations to compare: ``labels[i]`` names ``configs[i]`` in logs."""
    configs: list[Mapping[str, Any]]
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = [str(dict(c)) for c in self.configs]


def run_interleaved(plan: Plan, run_one: Callable[[Mapping[str, Any]], pd.DataFrame],
                    trials: int, *, quiet: bool = True, log: Callable[[str], None] | None = print,
                    seed: int = 0) -> pd.DataFrame:
    """Run every configuration ``trials`` times, interleaved; one frame of all rows.

    Each returned frame gets ``trial``, ``host_load`` (other processes' cores when the
    trial started) and keeps what ``run_one`` put in. The caller adds the session id.
    """
    from tqdm.auto import tqdm

    order = interleaved_order(len(plan.configs), trials, seed)
    frames = []
    bar = tqdm(order, desc="trials", disable=True if log is None else None, leave=False)
    for item in bar:
        load = wait_quiet(log=log)[1] if quiet else float("nan")
        t0 = time.perf_counter()
        df = run_one(plan.configs[item.config]).copy()
        df["trial"] = item.trial
        df["host_load"] = load
        frames.append(df)
        if log:
            bar.write(f"  trial {item.trial + 1}/{trials}  {plan.labels[item.config]}  "
                      f"({time.perf_counter() - t0:.1f}s)")
    bar.close()
    return pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()


# --- fresh processes -------------------------------------------------------------------

class RunFailed(RuntimeError):
    """A child process (a CLI run, an mpiexec job) failed or timed out; carries its output."""


class RunDiverged(RunFailed):
    """The run stopped because its loss became NaN or infinite: a result at this learning
    rate, not a crash. ``why`` is the library's one-line message."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def divergence(output: str) -> str | None:
    """The library's one-line divergence message in a failed run's output, else None."""
    for line in output.splitlines():
        if "DivergenceError" in line or "loss became nan" in line or "loss became inf" in line:
            return "diverged: " + line.split("DivergenceError:")[-1].strip()
    return None


def tail(text: str, lines: int = 40) -> str:
    """The ``rank r failed`` lines first, then the last ``lines`` lines of ``text``."""
    all_lines = text.splitlines()
    failed = [ln for ln in all_lines if re.match(r"rank \d+ failed", ln)]
    head = "\n".join(failed) + "\n...\n" if failed else ""
    return head + "\n".join(all_lines[-lines:])


def find_mpiexec() -> str:
    """The ``mpiexec`` beside this Python (the pip ``mpich`` wheel's), else on ``$PATH``."""
    import shutil

    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if found is None:
        raise RunFailed("no mpiexec found: pip install mpich (or load your MPI module)")
    return found


def run_cli(cmd: Sequence[str], *, metrics_flag: str = "--save-metrics", timeout: float = 3600,
            env: Mapping[str, str] | None = None, what: str | None = None,
            progress_flag: str | None = "--no-progress") -> pd.DataFrame:
    """Run a library CLI in a fresh process; its ``--save-metrics`` frame, with
    ``startup_s`` = the process's wall time minus the training wall time it reports
    (interpreter, imports, data, JIT cache load, MPI start: the fixed cost of a run).
    ``progress_flag`` is None for a CLI without a progress bar (cnn.parallel.costmodel)."""
    what = what or " ".join(cmd[:4])
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "metrics.pkl"
        full = [*cmd, *([progress_flag] if progress_flag else []), metrics_flag, str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                  env=dict(env) if env is not None else pinned_env(1))
        except subprocess.TimeoutExpired as exc:
            text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            raise RunFailed(f"{what}: no result after {timeout:.0f}s\n{tail(text)}") from None
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            text = f"{what} failed with status {proc.returncode}\n" + \
                tail(proc.stdout + proc.stderr)
            why = divergence(proc.stdout + proc.stderr)
            if why is not None:
                raise RunDiverged(text, why)
            raise RunFailed(text)
        df = pd.read_pickle(out)
    train = float(pd.to_numeric(df["wall_s"], errors="coerce").max()) if len(df) else 0.0
    df["startup_s"] = max(0.0, elapsed - train)
    df["process_wall_s"] = elapsed
    return df


def python_module(module: str, *args: str) -> list[str]:
    """``[python, -m, module, *args]`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def mpiexec_module(n: int, module: str, *args: str, mpi_args: Sequence[str] = ()) -> list[str]:
    """``mpiexec -n n [mpi_args] python -m module args``."""
    return [find_mpiexec(), "-n", str(int(n)), *mpi_args, sys.executable, "-m", module, *args]
