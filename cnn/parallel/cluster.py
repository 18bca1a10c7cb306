"""ipyparallel helpers: MPI ranks as notebook engines, one strategy run on all of them.

    from cnn.parallel.cluster import MPICluster

    with MPICluster(n=2) as cl:                    # ipp.Cluster(engines="mpi", n=2)
        cl.push_code()                             # engines import this checkout's cnn
        df = cl.run(["--strategy", "allreduce", "--dataset", "digits", "--epochs", "2"])

``run`` calls :func:`cnn.parallel.mpi.main` on every engine at once (``view.apply``); the
engines were started by one ``mpiexec``, so ``MPI.COMM_WORLD`` spans them and the ranks
talk to each other directly, exactly as under ``mpiexec -n P python -m
cnn.parallel.mpi``. Rank 0's results frame comes back. The same from cells::

    %%px
    from cnn.parallel import mpi
    df = mpi.main(["--strategy", "allreduce", "--dataset", "digits", "--epochs", "2"])

then ``cl.pull_rank0("df")``. (``cl.view.activate()`` registers ``%px`` for a view.)

Every wait has a timeout: starting (``start_timeout``), running (``run(..., timeout=)``) and
stopping (``stop_timeout``). Engines that exit while starting raise
:class:`EngineStartError` with their ``mpiexec`` output. A rank that fails while running
prints ``rank r failed: ...`` and aborts the MPI job (peers blocked in a collective could
not be woken otherwise); ``run`` then raises :class:`RankFailure` with that output, and the
cluster must be restarted (``cl.restart()``). Errors every rank raises identically (bad
flags) come back as an ordinary ipyparallel error and leave the engines running.

On a SLURM cluster, pass ``engines="slurm"`` (and ``controller="slurm"`` or leave the
controller local) with the launcher's settings in ``config``; see ``scripts/ipp_slurm.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["SCALES", "EngineStartError", "MPICluster", "RankFailure", "Runner", "accuracy_plan",
           "find_mpiexec", "hybrid_plan", "run_mpiexec", "run_plan", "run_sequential",
           "check_targets", "scaling_plan", "summarize_scaling"]


class EngineStartError(RuntimeError):
    """Engines did not start (or did not register in time); carries their output."""


class RankFailure(RuntimeError):
    """A rank failed (or the run timed out) while running a strategy; carries the output."""


def find_mpiexec() -> str:
    """The ``mpiexec`` beside this Python (the pip ``mpich`` wheel's), else on ``$PATH``."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if found is None:
        raise EngineStartError("no mpiexec found: pip install mpich (or load your MPI module)")
    return found


def _tail(text: str, lines: int = 60) -> str:
    """The ``rank r failed`` lines first, then the last ``lines`` lines of ``text``."""
    all_lines = text.splitlines()
    failed = [line for line in all_lines if re.match(r"rank \d+ failed", line)]
    head = "\n".join(failed) + "\n...\n" if failed else ""
    return head + "\n".join(all_lines[-lines:])


# --- code run on the engines (module-level so ipyparallel can pickle them by reference) ---

def _engine_info() -> dict[str, Any]:
    import socket

    from mpi4py import MPI

    import cnn

    return {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size(),
            "host": socket.gethostname(), "pid": os.getpid(), "cnn": cnn.__file__,
            "cwd": os.getcwd()}


def _engine_use_path(path: str, cwd: str | None) -> str:
    """Put ``path`` first on sys.path (dropping any cnn already imported) and chdir."""
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    for name in [m for m in sys.modules if m == "cnn" or m.startswith("cnn.")]:
        del sys.modules[name]
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    import cnn

    return cnn.__file__


def _engine_unpack(blob: bytes, cwd: str | None) -> str:
    """Unpack a shipped copy of the package into a fresh temporary folder and use it."""
    target = tempfile.mkdtemp(prefix="cnn-code-")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        zf.extractall(target)
    return _engine_use_path(target, cwd)


def _engine_run(argv: list[str]) -> Any:
    """Run one strategy on this rank; rank 0 returns its frame. Failures abort the job."""
    import traceback

    from mpi4py import MPI

    from cnn.parallel import mpi

    comm = MPI.COMM_WORLD
    try:
        df = mpi.main(list(argv), comm)
    except mpi.CollectiveError:
        raise  # every rank raises it: no peer is left waiting
    except BaseException as exc:  # noqa: BLE001 - peers may be blocked: end the job
        msg = (f"rank {comm.Get_rank()} failed: {type(exc).__name__}: {exc}\n"
               f"{''.join(traceback.format_exception(exc))}")
        print(msg, file=sys.stderr, flush=True)  # captured by ipyparallel, lost on abort
        os.write(2, msg.encode())  # the engine's own stderr: the launcher's output file
        comm.Abort(1)
    return df if comm.Get_rank() == 0 else None


def _engine_sequential(argv: list[str]) -> Any:
    """``python -m cnn.train argv`` inside an engine; its frame."""
    from cnn.train import main

    return main(list(argv))


def _engine_pull(name: str) -> Any:
    import __main__

    return getattr(__main__, name, None)


# --- the cluster ---------------------------------------------------------------------

class MPICluster:
    """``ipp.Cluster(engines="mpi", n=P)`` with timeouts, output on failure and rank order.

    ``env`` is added to the engines' environment (``OMP_NUM_THREADS=1`` and, with
    ``threads``, ``NUMBA_NUM_THREADS`` are set unless given); ``mpi_args`` go to
    ``mpiexec`` (e.g. ``["-bind-to", "core:2"]``); ``config`` is merged into the
    ipyparallel traitlets config (launcher settings for ``engines="slurm"``).
    """

    def __init__(self, n: int, *, engines: str = "mpi", controller: str | None = None,
                 mpiexec: str | None = None, mpi_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, threads: int | None = None,
                 start_timeout: float = 120.0, stop_timeout: float = 30.0,
                 profile_dir: str | None = None, config: Mapping[str, Any] | None = None,
                 log_level: int = logging.ERROR):
        if n < 1:
            raise ValueError(f"need at least one engine, got n={n}")
        self.n = int(n)
        self.engines = engines
        self.controller_kind = controller
        self.mpiexec = mpiexec
        self.mpi_args = list(mpi_args)
        self.env = {"OMP_NUM_THREADS": "1", **({"NUMBA_NUM_THREADS": str(threads)}
                                                 if threads else {}), **dict(env or {})}
        self.start_timeout = float(start_timeout)
        self.stop_timeout = float(stop_timeout)
        self._own_profile = profile_dir is None
        self.profile_dir = profile_dir
        self.extra_config = dict(config or {})
        self.log_level = log_level
        self.cluster: Any = None
        self.client: Any = None
        self.view: Any = None
        self.ranks: dict[int, int] = {}  # engine id -> MPI rank
        self.info: pd.DataFrame | None = None
        self.last_result: Any = None

    # lifecycle -----------------------------------------------------------------------

    def _call(self, coro_fn: Callable[[], Any], timeout: float, what: str) -> Any:
        """Run one of the cluster's coroutines to completion, at most ``timeout`` seconds."""

        async def bounded():
            return await asyncio.wait_for(coro_fn(), timeout)

        try:
            return self.cluster._synchronize(bounded)
        except TimeoutError:
            raise TimeoutError(f"{what} took longer than {timeout:.0f}s") from None

    def start(self) -> MPICluster:
        import ipyparallel as ipp
        from traitlets.config import Config

        if self.cluster is not None:
            raise RuntimeError("cluster already started; stop() it first")
        if self._own_profile:
            self.profile_dir = tempfile.mkdtemp(prefix="ipp-cnn-")
        cfg = Config()
        if self.engines == "mpi":
            cfg.MPILauncher.mpi_cmd = [self.mpiexec or find_mpiexec()]
            cfg.MPILauncher.mpi_args = self.mpi_args
        for section, values in self.extra_config.items():
            for key, value in dict(values).items():
                setattr(getattr(cfg, section), key, value)
        kw: dict[str, Any] = {}
        if self.controller_kind:
            kw["controller"] = self.controller_kind
        self.cluster = ipp.Cluster(engines=self.engines, n=self.n, config=cfg,
                                   profile_dir=self.profile_dir, log_level=self.log_level,
                                   engine_timeout=int(self.start_timeout), **kw)
        t0 = time.monotonic()
        try:
            self._call(self.cluster.start_controller, self.start_timeout, "starting the controller")
            self.set_id = self._call(
                lambda: self.cluster.start_engines(self.n, environment=dict(self.env)),
                self.start_timeout, "launching the engines")
            left = self.start_timeout - (time.monotonic() - t0)
            self.client = self._call(self.cluster.connect_client, max(left, 5.0),
                                     "connecting a client")
            self._wait_for_engines(t0)
            self.view = self.client[:]
            info = self.view.apply_async(_engine_info).get(timeout=self.start_timeout)
        except BaseException:
            out = self.output()
            self.stop()
            if sys.exc_info()[0] is EngineStartError:
                raise
            raise EngineStartError(f"MPI engines did not start: {sys.exc_info()[1]}\n"
                                   f"--- engine output ---\n{_tail(out)}") from None
        self.ranks = {eid: d["rank"] for eid, d in zip(self.view.targets, info, strict=True)}
        by_rank = sorted(self.ranks, key=self.ranks.get)
        self.view = self.client[by_rank]  # results come back in rank order
        self.info = pd.DataFrame([{"engine": e, **d} for e, d in zip(
            self.client.ids, info, strict=False)]).sort_values("rank").reset_index(drop=True)
        if sorted(self.ranks.values()) != list(range(self.n)) or set(self.info["size"]) != {
                self.n}:
            out = self.output()
            self.stop()
            raise EngineStartError(f"engines are not one MPI job of {self.n} ranks: "
                                   f"{self.info.to_dict('records')}\n{_tail(out)}")
        return self

    def _engine_set(self) -> Any:
        if self.cluster is None or not getattr(self, "set_id", None):
            return None
        return self.cluster.engines.get(self.set_id)

    def _engines_stopped(self) -> str | None:
        """Why the engines' launcher is gone (its ``mpiexec`` exited), or None if it runs.

        Looks at the process itself: in sync use no event loop runs between calls, so
        ipyparallel's own stop notifications may not have fired yet.
        """
        es = self._engine_set()
        if es is None:
            return None
        proc = getattr(es, "process", None)
        if proc is None:  # batch launchers (SLURM): only the launcher's own state
            return f"engine launcher {es.state}: {es.stop_data}" if es.stop_data else None
        import psutil

        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return None
            code = proc.wait(0)
        except psutil.NoSuchProcess:
            code = "unknown"
        except psutil.TimeoutExpired:
            return None
        return f"mpiexec (pid {proc.pid}) exited with status {code}"

    def _wait_for_engines(self, t0: float) -> None:
        while True:
            have = len(self.client.ids)
            if have >= self.n:
                return
            stopped = self._engines_stopped()
            if stopped:
                raise EngineStartError(
                    f"the engines' mpiexec exited while starting ({stopped}); "
                    f"{have}/{self.n} registered\n--- engine output ---\n{_tail(self.output())}")
            if time.monotonic() - t0 > self.start_timeout:
                raise EngineStartError(
                    f"only {have}/{self.n} engines registered within {self.start_timeout:.0f}s"
                    f"\n--- engine output ---\n{_tail(self.output())}")
            time.sleep(0.2)

    def _wait_engines_exit(self, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and not self._engines_stopped():
            time.sleep(0.1)

    def output(self) -> str:
        """What the engines' launcher (``mpiexec`` and every rank) wrote so far."""
        es = self._engine_set()
        if es is None:
            return ""
        try:
            return es.get_output() or ""
        except Exception as exc:  # noqa: BLE001 - best effort, used inside error paths
            return f"(could not read engine output: {exc})"

    def stop(self) -> None:
        """Stop engines and controller (bounded), close the client, remove our profile."""
        if self.client is not None:
            with contextlib.suppress(Exception):  # engines exit 0 instead of being TERM'd
                if self.view is not None and not self._engines_stopped():
                    self.client.shutdown(targets="all", hub=False, block=False)
                    self._wait_engines_exit(min(10.0, self.stop_timeout))
            with contextlib.suppress(Exception):
                self.client.close()
        if self.cluster is not None:
            try:
                self._call(self.cluster.stop_cluster, self.stop_timeout, "stopping the cluster")
            except Exception:  # noqa: BLE001 - escalate: kill what is left
                for launcher in [*self.cluster.engines.values(), self.cluster.controller]:
                    try:
                        if launcher is not None:
                            launcher.signal(9)
                    except Exception:  # noqa: BLE001
                        pass
        self.cluster = self.client = self.view = None
        self.ranks = {}
        if self._own_profile and self.profile_dir:
            shutil.rmtree(self.profile_dir, ignore_errors=True)

    def restart(self) -> MPICluster:
        self.stop()
        return self.start()

    def __enter__(self) -> MPICluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # work ----------------------------------------------------------------------------

    def push_code(self, ship: bool = False, timeout: float = 60.0) -> pd.DataFrame:
        """Make every engine import this client's ``cnn`` and work in its cwd.

        Default: put the checkout's folder first on the engines' ``sys.path`` (engines on
        this host or a shared file system). ``ship=True`` zips the package's sources and
        unpacks them on every engine (engines on hosts without the checkout).
        """
        import cnn

        root = Path(cnn.__file__).resolve().parent.parent
        cwd = os.getcwd()
        if ship:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted((root / "cnn").rglob("*.py")):
                    zf.write(f, f.relative_to(root).as_posix())
            paths = self.view.apply_async(_engine_unpack, buf.getvalue(), cwd).get(
                timeout=timeout)
        else:
            paths = self.view.apply_async(_engine_use_path, str(root), cwd).get(timeout=timeout)
        return pd.DataFrame({"engine": self.view.targets, "rank": [
            self.ranks[e] for e in self.view.targets], "cnn": paths})

    def run(self, argv: Sequence[str], timeout: float = 600.0) -> pd.DataFrame:
        """``cnn.parallel.mpi.main(argv)`` on every rank; rank 0's results frame.

        Raises :class:`RankFailure` (with the engines' output) when a rank dies or the run
        outlasts ``timeout``; the engines are then stopped (a stuck collective cannot be
        resumed) and ``restart()`` gives fresh ones.
        """
        if self.view is None:
            raise RuntimeError("cluster not started: use start() or a with-block")
        ar = self.view.apply_async(_engine_run, list(argv))
        self.last_result = ar
        t0 = time.monotonic()
        while not ar.ready():
            ar.wait(0.5)
            if ar.ready():
                break
            stopped = self._engines_stopped()
            elapsed = time.monotonic() - t0
            if stopped or elapsed > timeout:
                why = (f"the MPI job ended: {stopped}" if stopped
                       else f"no result after {timeout:.0f}s")
                out = self.output()
                self.stop()
                raise RankFailure(f"{why} while running {list(argv)}\n--- engine output ---\n"
                                  f"{_tail(out)}")
        try:
            results = ar.get(timeout=self.stop_timeout)
        except Exception as exc:
            import ipyparallel as ipp

            errors = exc.elist if isinstance(exc, ipp.error.CompositeError) else []
            died = any(e[0] == "EngineError" for e in errors) or isinstance(
                exc, ipp.error.EngineError)
            if not died:
                raise  # an error every rank raised (bad flags): the engines are fine
            time.sleep(0.5)  # let mpiexec flush what the ranks printed
            out = self.output()
            self.stop()
            raise RankFailure(f"a rank died while running {list(argv)}: {exc}\n"
                              f"--- engine output ---\n{_tail(out)}") from None
        return results[0]  # the view is in rank order: rank 0 first

    def apply(self, fn: Callable[..., Any], *args: Any, timeout: float = 600.0) -> list[Any]:
        """``fn(*args)`` on every engine at once (a collective function is fine); the
        results in rank order. Raises :class:`RankFailure` with the output if a rank dies."""
        if self.view is None:
            raise RuntimeError("cluster not started: use start() or a with-block")
        ar = self.view.apply_async(fn, *args)
        if not ar.wait(timeout):
            out = self.output()
            self.stop()
            raise RankFailure(f"{getattr(fn, '__name__', fn)} gave no result in {timeout:.0f}s"
                              f"\n--- engine output ---\n{_tail(out)}")
        return ar.get(timeout=self.stop_timeout)

    def pull_rank0(self, name: str, timeout: float = 60.0) -> Any:
        """A global variable of rank 0's engine (after a ``%%px`` cell)."""
        rank0 = min(self.ranks, key=self.ranks.get)
        return self.client[rank0].apply_async(_engine_pull, name).get(timeout=timeout)


# --- experiment drivers: the same runs through mpiexec or through ipyparallel engines ---

def _run_cli(cmd: list[str], out: Path, timeout: float, env: Mapping[str, str] | None,
             what: str) -> pd.DataFrame:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=full_env)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (
            exc.stdout or "")
        raise RankFailure(f"{what}: no result after {timeout:.0f}s\n{_tail(text)}") from None
    if proc.returncode != 0:
        raise RankFailure(f"{what} failed with status {proc.returncode}\n"
                          f"{_tail(proc.stdout + proc.stderr)}")
    return pd.read_pickle(out)


def run_sequential(argv: Sequence[str], timeout: float = 3600.0,
                   env: Mapping[str, str] | None = None) -> pd.DataFrame:
    """``python -m cnn.train argv`` in a fresh process; its per-epoch frame."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.pkl"
        cmd = [sys.executable, "-m", "cnn.train", *argv, "--no-progress",
               "--save-metrics", str(out)]
        return _run_cli(cmd, out, timeout, env, "python -m cnn.train")


def run_mpiexec(n: int, argv: Sequence[str], timeout: float = 3600.0,
                mpi_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                mpiexec: str | None = None) -> pd.DataFrame:
    """``mpiexec -n n python -m cnn.parallel.mpi argv``; rank 0's per-epoch frame."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.pkl"
        cmd = [mpiexec or find_mpiexec(), "-n", str(n), *mpi_args, sys.executable, "-m",
               "cnn.parallel.mpi", *argv, "--no-progress", "--save-metrics", str(out)]
        return _run_cli(cmd, out, timeout, env, f"mpiexec -n {n} cnn.parallel.mpi")


class Runner:
    """Runs a strategy on P ranks ``via`` ``"mpiexec"`` (a fresh job per run) or
    ``"ipyparallel"`` (an :class:`MPICluster` of P engines, kept while P and the thread
    count stay the same). Sequential baselines always run as ``python -m cnn.train``."""

    def __init__(self, via: str = "ipyparallel", mpi_args: Sequence[str] = (),
                 start_timeout: float = 180.0, run_timeout: float = 3600.0):
        if via not in ("mpiexec", "ipyparallel"):
            raise ValueError(f"via must be 'mpiexec' or 'ipyparallel', got {via!r}")
        self.via, self.mpi_args = via, list(mpi_args)
        self.start_timeout, self.run_timeout = start_timeout, run_timeout
        self._cluster: MPICluster | None = None
        self._key: tuple[int, int] | None = None

    def _env(self, threads: int) -> dict[str, str]:
        return {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": str(threads)}

    def sequential(self, argv: Sequence[str], threads: int = 1) -> pd.DataFrame:
        """``python -m cnn.train argv``: a fresh process, or (ipyparallel) ``cnn.train.main``
        on a 1-engine cluster, so the baseline runs where the P = 1 runs do."""
        if self.via == "mpiexec":
            return run_sequential(argv, self.run_timeout, self._env(threads))
        return self.call(_engine_sequential, [*argv, "--no-progress"], threads=threads)

    def call(self, fn: Callable[..., Any], *args: Any, threads: int = 1) -> Any:
        """``fn(*args)`` in this process (mpiexec runner) or on a 1-engine cluster."""
        if self.via == "mpiexec":
            return fn(*args)
        self._ensure(1, threads)
        assert self._cluster is not None
        return self._cluster.apply(fn, *args, timeout=self.run_timeout)[0]

    def mpi(self, n: int, argv: Sequence[str], threads: int = 1) -> pd.DataFrame:
        if self.via == "mpiexec":
            return run_mpiexec(n, argv, self.run_timeout, self.mpi_args, self._env(threads))
        self._ensure(n, threads)
        assert self._cluster is not None
        return self._cluster.run([*argv, "--no-progress"], timeout=self.run_timeout)

    def comm_measure(self, n: int, sizes: Sequence[int] | None = None,
                     repeats: int = 50) -> pd.DataFrame:
        """Ping-pong and Allreduce times on ``n`` ranks (:mod:`cnn.parallel.costmodel`)."""
        from cnn.parallel import costmodel

        sizes = list(sizes or costmodel.DEFAULT_SIZES)
        if self.via == "mpiexec":
            with tempfile.TemporaryDirectory() as d:
                out = Path(d) / "c.pkl"
                cmd = [find_mpiexec(), "-n", str(n), *self.mpi_args, sys.executable, "-m",
                       "cnn.parallel.costmodel", "--sizes", ",".join(map(str, sizes)),
                       "--repeats", str(repeats), "--save", str(out)]
                return _run_cli(cmd, out, self.run_timeout, self._env(1),
                                "cnn.parallel.costmodel")
        self._ensure(n, 1)
        assert self._cluster is not None
        return self._cluster.apply(costmodel.measure, None, sizes, repeats,
                                   timeout=self.run_timeout)[0]

    def _ensure(self, n: int, threads: int) -> None:
        if self._key != (n, threads) or self._cluster is None or self._cluster.view is None:
            self.close()
            self._cluster = MPICluster(n, mpi_args=self.mpi_args, env=self._env(threads),
                                       start_timeout=self.start_timeout).start()
            self._cluster.push_code()
            self._key = (n, threads)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
        self._cluster, self._key = None, None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Sizes of the scaling and accuracy experiments (notebook 04, scripts/mpi_scaling.py).
SCALES: dict[str, dict[str, Any]] = {
    # a smoke run for the test suite (about a minute on 2 cores): every code path, no numbers
    "quick": dict(subset=1024, test_subset=256, steps=4, acc_subset=1024, acc_test=256,
                  acc_epochs=1, max_ranks=2),
    # the measurements behind the study's numbers: enough steps for stable medians
    "standard": dict(subset=16384, test_subset=2000, steps=40, acc_subset=None,
                     acc_test=None, acc_epochs=3, max_ranks=None),
    # the whole of Fashion-MNIST, one timed epoch per point and 10 accuracy epochs
    "full": dict(subset=None, test_subset=None, steps=None, acc_subset=None, acc_test=None,
                 acc_epochs=10, max_ranks=None),
}

SCALING_STRATEGIES: dict[str, list[str]] = {
    "allreduce": ["--strategy", "allreduce"],
    "allreduce-overlap": ["--strategy", "allreduce", "--overlap"],
    "param-server": ["--strategy", "param-server"],
    "async-param-server": ["--strategy", "async-param-server"],
    "model-average": ["--strategy", "model-average", "--sync-every", "4"],
}
PS_LIKE = ("param-server", "async-param-server")


def _cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def scaling_plan(scale: str = "quick", backend: str = "numpy", batch_per_rank: int = 64,
                 global_batch: int = 128, ranks: Sequence[int] | None = None,
                 strategies: Sequence[str] | None = None, dataset: str = "fashion-mnist",
                 seed: int = 0) -> list[dict[str, Any]]:
    """The runs of the weak (fixed per-rank batch) and strong (fixed global batch) scaling
    experiments: a sequential baseline for each, then every strategy at every P.

    Ranks default to 1 .. physical cores + 1 (``max_ranks`` caps it; the parameter server
    starts at 2: its rank 0 does not train). Strong scaling skips a P whose training ranks
    do not divide the global batch. Each item: ``mode, strategy, processes, threads,
    argv`` (``processes = 0`` for the sequential baseline).
    """
    cfg = SCALES[scale]
    if ranks is None:
        top = _cores() + 1
        if cfg["max_ranks"]:
            top = min(top, cfg["max_ranks"])
        ranks = list(range(1, top + 1))
    common = ["--dataset", dataset, "--backend", backend, "--model", "seed_cnn", "--epochs",
              "1", "--seed", str(seed), "--schedule", "constant", "--lr", "0.01",
              "--threads", "1"]
    if cfg["subset"]:
        common += ["--subset", str(cfg["subset"])]
    common += ["--test-subset", str(cfg["test_subset"] or 1000)]
    if cfg["steps"]:
        common += ["--max-steps", str(cfg["steps"])]
    plan: list[dict[str, Any]] = []
    for mode in ("weak", "strong"):
        seq_batch = batch_per_rank if mode == "weak" else global_batch
        plan.append(dict(mode=mode, strategy="sequential", processes=0, threads=1,
                         argv=[*common, "--batch-size", str(seq_batch)]))
        for name in strategies or SCALING_STRATEGIES:
            for P in ranks:
                trainers = P - 1 if name in PS_LIKE else P
                if trainers < 1:
                    continue
                if mode == "weak":
                    b = batch_per_rank
                elif global_batch % trainers:
                    continue
                else:
                    b = global_batch // trainers
                plan.append(dict(mode=mode, strategy=name, processes=P, threads=1,
                                 argv=[*common, *SCALING_STRATEGIES[name], "--batch-size",
                                       str(b), "--experiment", f"mpi_{mode}"]))
    return plan


def hybrid_plan(scale: str = "quick", backend: str = "numba", batch_per_rank: int = 64,
                dataset: str = "fashion-mnist", cores: int | None = None) -> list[dict[str, Any]]:
    """Allreduce with P ranks x T threads for every P * T = cores (numba backend), weak
    scaling at ``batch_per_rank`` per rank, plus the sequential 1-thread baseline."""
    cores = cores or _cores()
    base = scaling_plan(scale, backend, batch_per_rank, ranks=[1], strategies=["allreduce"],
                        dataset=dataset)
    seq = next(p for p in base if p["mode"] == "weak" and p["strategy"] == "sequential")
    ar = next(p for p in base if p["mode"] == "weak" and p["strategy"] == "allreduce")
    plan = [dict(seq, mode="hybrid")]
    for P in range(1, cores + 1):
        if cores % P:
            continue
        T = cores // P
        argv = [a for a in ar["argv"]]
        argv[argv.index("--threads") + 1] = str(T)
        argv[argv.index("--experiment") + 1] = "mpi_hybrid"
        plan.append(dict(mode="hybrid", strategy="allreduce", processes=P, threads=T,
                         argv=argv))
    return plan


def accuracy_plan(scale: str = "quick", backend: str = "numpy", batch_per_rank: int = 32,
                  workers: int = 2, dataset: str = "fashion-mnist", seed: int = 0,
                  lr: float = 0.05) -> list[dict[str, Any]]:
    """Every strategy against sequential at equal epochs and equal global batch
    (``workers * batch_per_rank``): allreduce and model-average on ``workers`` ranks, the
    parameter servers on ``workers + 1``."""
    cfg = SCALES[scale]
    common = ["--dataset", dataset, "--backend", backend, "--epochs", str(cfg["acc_epochs"]),
              "--seed", str(seed), "--lr", str(lr), "--schedule", "cosine"]
    if cfg["acc_subset"]:
        common += ["--subset", str(cfg["acc_subset"])]
    if cfg["acc_test"]:
        common += ["--test-subset", str(cfg["acc_test"])]
    plan = [dict(mode="accuracy", strategy="sequential", processes=0, threads=1,
                 argv=[*common, "--batch-size", str(workers * batch_per_rank)])]
    for name, flags in SCALING_STRATEGIES.items():
        if name == "allreduce-overlap":
            continue  # the same arithmetic as allreduce
        P = workers + 1 if name in PS_LIKE else workers
        plan.append(dict(mode="accuracy", strategy=name, processes=P, threads=1,
                         argv=[*common, *flags, "--batch-size", str(batch_per_rank),
                               "--experiment", "mpi_accuracy"]))
    return plan


def run_plan(plan: Sequence[Mapping[str, Any]], runner: Runner,
             log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Run every item of a plan; one frame of all their rows with ``mode`` added."""
    from cnn.metrics import to_frame

    # same (P, T) back to back: an ipyparallel runner then starts each cluster once
    order = sorted(range(len(plan)), key=lambda k: (max(plan[k]["processes"], 1),
                                                     plan[k]["threads"], plan[k]["processes"]))
    frames: list[pd.DataFrame] = [pd.DataFrame()] * len(plan)
    for i, k in enumerate(order, 1):
        item = plan[k]
        t0 = time.monotonic()
        if item["processes"] == 0:
            df = runner.sequential(item["argv"], threads=item["threads"])
            df["experiment"] = f"mpi_{item['mode']}"
        else:
            df = runner.mpi(item["processes"], item["argv"], threads=item["threads"])
        df["mode"] = item["mode"]
        df["argv"] = " ".join(item["argv"])
        frames[k] = df
        if log:
            last = df.iloc[-1]
            log(f"[{i}/{len(plan)}] {item['mode']:<8} {item['strategy']:<19} "
                f"P={item['processes']} T={item['threads']}  step {last['step_ms_median']:.1f} ms"
                f"  acc {last['test_acc']:.3f}  ({time.monotonic() - t0:.0f}s)")
    return to_frame(pd.concat(frames, ignore_index=True, sort=False))


def summarize_scaling(df: pd.DataFrame, epoch_samples: int = 60000) -> pd.DataFrame:
    """Per run: steady step time, throughput, speedup and efficiency against the same
    mode's sequential baseline (same host), communication share, time per epoch.

    ``step_s`` is the mean step time without the first step (JIT, warm-up): from the rows'
    ``wall_s``, ``compile_s`` and median (the first step = compile_s + median). Means,
    not medians, so that model-average's every-k-step syncs count. The async server's
    rows use its wall clock. ``throughput`` = global batch / step_s; ``speedup`` =
    throughput / baseline throughput (equal global batch in strong mode, so the ratio of
    step times; P times the samples in weak mode, so the scaled speedup); ``efficiency`` =
    speedup / (processes x threads), every rank counted, the parameter server's too.
    ``epoch_s`` = time for ``epoch_samples`` samples at that throughput.
    """
    out = df.copy()
    med = out["step_ms_median"] / 1e3
    steps = out["step"].astype(float)
    first = out["compile_s"].fillna(0) + med
    mean = (out["wall_s"] - first) / (steps - 1).clip(lower=1)
    is_async = out["strategy"] == "async-param-server"
    mean[is_async] = out.loc[is_async, "wall_s"] / steps[is_async]
    out["step_s"] = mean.where(steps > 1, med)
    out["throughput"] = out["batch_size"] / out["step_s"]
    seq = out["strategy"] == "sequential"
    base = {(m, h): float(g["throughput"].median())
            for (m, h), g in out[seq].groupby(["mode", "host"])}
    out["baseline_throughput"] = [base.get((m, h), np.nan)
                                  for m, h in zip(out["mode"], out["host"], strict=True)]
    out["speedup"] = out["throughput"] / out["baseline_throughput"]
    procs = out["processes"].where(~seq, 1).fillna(1)
    out["workers"] = procs * out["threads"].fillna(1)
    out["efficiency"] = out["speedup"] / out["workers"]
    out["comm_share"] = out["comm_s"] / out["wall_s"]
    out["epoch_s"] = epoch_samples / out["throughput"]
    return out


def check_targets(summary: pd.DataFrame) -> pd.DataFrame:
    """The issue's measured targets, each with its value and pass/fail."""
    rows = []
    s = summary

    def pick(mode, strategy, P):
        r = s[(s["mode"] == mode) & (s["strategy"] == strategy) & (s["processes"] == P)]
        return float(r["efficiency"].iloc[0]) if len(r) else np.nan

    weak2, strong2 = pick("weak", "allreduce", 2), pick("strong", "allreduce", 2)
    rows.append(dict(target="weak-scaling efficiency, allreduce, 2 ranks >= 0.90",
                     value=weak2, ok=bool(weak2 >= 0.90)))
    rows.append(dict(target="strong-scaling efficiency, allreduce, 2 ranks, global 128 >= 0.85",
                     value=strong2, ok=bool(strong2 >= 0.85)))
    weak = s[s["mode"] == "weak"]
    for P in sorted(set(weak["processes"].dropna().astype(int))):
        if P < 2:
            continue
        ar = weak[(weak["strategy"] == "allreduce") & (weak["processes"] == P)]["epoch_s"]
        ps = weak[(weak["strategy"] == "param-server") & (weak["processes"] == P)]["epoch_s"]
        if len(ar) and len(ps):
            rows.append(dict(target=f"allreduce faster per epoch than param-server, P={P}",
                             value=float(ps.iloc[0] / ar.iloc[0]),
                             ok=bool(ar.iloc[0] < ps.iloc[0])))
    return pd.DataFrame(rows)
