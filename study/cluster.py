"""MPI ranks as ipyparallel engines: one strategy run on all of them, from a notebook.

    from study.cluster import MPICluster

    with MPICluster(n=2) as cl:                    # ipp.Cluster(engines="mpi", n=2)
        df = cl.run(["--strategy", "allreduce", "--dataset", "digits", "--epochs", "2"])

``run`` calls `cnn.parallel.mpi.main` on every engine at once (``view.apply``); the engines
were started by one ``mpiexec``, so ``MPI.COMM_WORLD`` spans them and the ranks talk to each
other directly, exactly as under ``mpiexec -n P python -m cnn.parallel.mpi``. Rank 0's
results frame comes back. The same from cells::

    %%px
    from cnn.parallel import mpi
    df = mpi.main(["--strategy", "allreduce", "--dataset", "digits", "--epochs", "2"])

then ``cl.pull_rank0("df")`` (``cl.view.activate()`` registers ``%px`` for the view).

The engines import this client's checkout (``push_code``, done by ``start``): the engine
functions below live in this module, so the engines must be able to import ``study`` (the
project installed in their environment, or the checkout on a shared file system).

Every wait has a timeout: starting (``start_timeout``), running (``run(..., timeout=)``) and
stopping (``stop_timeout``). Engines that exit while starting raise `EngineStartError`
with their ``mpiexec`` output. A rank that fails while running prints ``rank r failed:
...`` and aborts the MPI job (peers blocked in a collective could not be woken otherwise);
``run`` then raises `RankFailure` with that output, and the cluster must be restarted
(``cl.restart()``). Errors every rank raises identically (bad flags) come back as an
ordinary ipyparallel error and leave the engines running.

On a SLURM cluster pass ``engines="slurm"`` with the launcher's settings in ``config``
(``scripts/ipp_slurm.py``). Timing experiments run fresh ``mpiexec`` jobs instead
(`study.measure.run_cli`), so start-up is measured apart; this module is for driving and
demonstrating the strategies interactively (docs/DESIGN.md, "Running it").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from study.measure import RunFailed, find_mpiexec, tail

__all__ = ["EngineStartError", "MPICluster", "RankFailure", "engine_info", "engine_pull",
           "engine_run", "engine_sequential", "engine_unpack", "engine_use_path",
           "run_coroutine"]

#: Lines of engine output an error message carries.
OUTPUT_LINES = 60
#: Top-level packages the engines re-import from the client's checkout.
PACKAGES = ("cnn", "study")


class EngineStartError(RunFailed):
    """Engines did not start (or did not register in time); carries their output."""


class RankFailure(RunFailed):
    """A rank failed (or the run timed out) while running a strategy; carries the output."""


def run_coroutine(coro_fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """``await coro_fn()`` on a private event loop in a helper thread, at most ``timeout`` s.

    A helper thread works both from a script and inside Jupyter (whose own loop is already
    running); ipyparallel's coroutines create their resources per call, so a fresh loop
    per call is what its own synchronous wrappers do too.
    """

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ipp-call")
    try:
        return pool.submit(asyncio.run, bounded()).result(timeout + 10.0)
    except TimeoutError:
        raise TimeoutError(f"{what} took longer than {timeout:.0f}s") from None
    finally:
        pool.shutdown(wait=False)


# --- code run on the engines (module-level so ipyparallel imports them by name) -----------

def engine_info() -> dict[str, Any]:
    """Rank, size, host, pid and the cnn this engine imports."""
    import socket

    from mpi4py import MPI

    import cnn

    return {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size(),
            "host": socket.gethostname(), "pid": os.getpid(), "cnn": cnn.__file__,
            "cwd": os.getcwd()}


def engine_use_path(path: str, cwd: str | None) -> str:
    """Put ``path`` first on sys.path, drop cnn/study modules already imported, chdir."""
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        del sys.modules[name]
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    import cnn

    return cnn.__file__


def engine_unpack(blob: bytes, cwd: str | None) -> str:
    """Unpack a shipped copy of the packages into a fresh temporary folder and use it."""
    target = tempfile.mkdtemp(prefix="cnn-code-")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        zf.extractall(target)
    return engine_use_path(target, cwd)


def engine_run(argv: list[str]) -> Any:
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
        os.write(2, msg.encode())  # the engine's own stderr: the launcher's output
        time.sleep(1.0)  # mpiexec forwards output asynchronously: let it reach the client
        comm.Abort(1)
    return df if comm.Get_rank() == 0 else None


def engine_sequential(argv: list[str]) -> Any:
    """``python -m cnn.train argv`` inside an engine; its frame."""
    from cnn.train import main

    return main(list(argv))


def engine_pull(name: str) -> Any:
    """A global of the engine's namespace (what a ``%%px`` cell defined)."""
    import __main__

    return getattr(__main__, name, None)


# --- the cluster ---------------------------------------------------------------------

class MPICluster:
    """``ipp.Cluster(engines="mpi", n=P)`` with timeouts, output on failure and rank order.

    ``env`` is added to the engines' environment (``OMP_NUM_THREADS=1`` and, with
    ``threads``, ``NUMBA_NUM_THREADS`` are set unless given); ``mpi_args`` go to
    ``mpiexec`` (e.g. ``["-bind-to", "core:2"]``); ``config`` is merged into the
    ipyparallel traitlets config (launcher settings for ``engines="slurm"``); ``ship``
    zips the packages to the engines instead of pointing them at the checkout.
    """

    def __init__(self, n: int, *, engines: str = "mpi", controller: str | None = None,
                 mpiexec: str | None = None, mpi_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, threads: int | None = None,
                 start_timeout: float = 120.0, stop_timeout: float = 30.0,
                 profile_dir: str | None = None, config: Mapping[str, Any] | None = None,
                 ship: bool = False, log_level: int = logging.ERROR):
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
        self.own_profile = profile_dir is None
        self.profile_dir = profile_dir
        self.extra_config = dict(config or {})
        self.ship = ship
        self.log_level = log_level
        self.cluster: Any = None
        self.client: Any = None
        self.view: Any = None
        self.set_id: str | None = None
        self.ranks: dict[int, int] = {}  # engine id -> MPI rank
        self.info: pd.DataFrame | None = None
        self.last_result: Any = None

    # lifecycle -----------------------------------------------------------------------

    def start(self) -> MPICluster:
        """Start the controller and the engines, point them at this checkout, order by rank."""
        import ipyparallel as ipp
        from traitlets.config import Config

        if self.cluster is not None:
            raise RuntimeError("cluster already started; stop() it first")
        if self.own_profile:
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
            run_coroutine(self.cluster.start_controller, self.start_timeout,
                          "starting the controller")
            self.set_id = run_coroutine(
                lambda: self.cluster.start_engines(self.n, environment=dict(self.env)),
                self.start_timeout, "launching the engines")
            left = self.start_timeout - (time.monotonic() - t0)
            self.client = run_coroutine(self.cluster.connect_client, max(left, 5.0),
                                        "connecting a client")
            self.wait_for_engines(t0)
            self.view = self.client[:]
            self.push_code(ship=self.ship, timeout=self.start_timeout)
            info = self.view.apply_async(engine_info).get(timeout=self.start_timeout)
        except BaseException as exc:
            out = self.output()
            self.stop()
            if isinstance(exc, EngineStartError):
                raise
            raise EngineStartError(f"MPI engines did not start: {type(exc).__name__}: {exc}\n"
                                   f"--- engine output ---\n{tail(out, OUTPUT_LINES)}"
                                   ) from None
        self.ranks = {eid: d["rank"] for eid, d in zip(self.view.targets, info, strict=True)}
        self.view = self.client[sorted(self.ranks, key=self.ranks.get)]  # rank order
        self.info = pd.DataFrame([{"engine": e, **d} for e, d in zip(
            self.client.ids, info, strict=False)]).sort_values("rank").reset_index(drop=True)
        if sorted(self.ranks.values()) != list(range(self.n)) or set(self.info["size"]) != {
                self.n}:
            out = self.output()
            records = self.info.to_dict("records")
            self.stop()
            raise EngineStartError(f"engines are not one MPI job of {self.n} ranks: "
                                   f"{records}\n{tail(out, OUTPUT_LINES)}")
        return self

    def engine_set(self) -> Any:
        """ipyparallel's launcher of our engines (None before start or after stop)."""
        if self.cluster is None or not self.set_id:
            return None
        return self.cluster.engines.get(self.set_id)

    def engines_stopped(self) -> str | None:
        """Why the engines' launcher is gone (its ``mpiexec`` exited), or None if it runs.

        Looks at the process itself: in sync use no event loop runs between calls, so
        ipyparallel's own stop notifications may not have fired yet.
        """
        es = self.engine_set()
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

    def wait_for_engines(self, t0: float) -> None:
        """Until all ``n`` engines registered; EngineStartError with output otherwise."""
        while True:
            have = len(self.client.ids)
            if have >= self.n:
                return
            stopped = self.engines_stopped()
            if stopped:
                raise EngineStartError(
                    f"the engines' mpiexec exited while starting ({stopped}); {have}/{self.n} "
                    f"registered\n--- engine output ---\n{tail(self.output(), OUTPUT_LINES)}")
            if time.monotonic() - t0 > self.start_timeout:
                raise EngineStartError(
                    f"only {have}/{self.n} engines registered within {self.start_timeout:.0f}s"
                    f"\n--- engine output ---\n{tail(self.output(), OUTPUT_LINES)}")
            time.sleep(0.2)

    def wait_engines_exit(self, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and not self.engines_stopped():
            time.sleep(0.1)

    def output(self) -> str:
        """What the engines' launcher (``mpiexec`` and every rank) wrote so far."""
        es = self.engine_set()
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
                if self.view is not None and not self.engines_stopped():
                    self.client.shutdown(targets="all", hub=False, block=False)
                    self.wait_engines_exit(min(10.0, self.stop_timeout))
            with contextlib.suppress(Exception):
                self.client.close()
        if self.cluster is not None:
            try:
                run_coroutine(self.cluster.stop_cluster, self.stop_timeout,
                              "stopping the cluster")
            except Exception:  # noqa: BLE001 - escalate: kill what is left
                for launcher in [*self.cluster.engines.values(), self.cluster.controller]:
                    with contextlib.suppress(Exception):
                        if launcher is not None:
                            launcher.signal(9)
        self.cluster = self.client = self.view = None
        self.set_id = None
        self.ranks = {}
        if self.own_profile and self.profile_dir:
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
        """Make every engine import this client's ``cnn`` and ``study`` and work in its cwd.

        Default: put the checkout's folder first on the engines' ``sys.path`` (engines on
        this host or a shared file system). ``ship=True`` zips the packages' sources and
        unpacks them on every engine (engines on hosts without the checkout).
        """
        if self.view is None:
            raise RuntimeError("cluster not started: use start() or a with-block")
        import cnn

        root = Path(cnn.__file__).resolve().parent.parent
        cwd = os.getcwd()
        if ship:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for package in PACKAGES:
                    for f in sorted((root / package).rglob("*.py")):
                        zf.write(f, f.relative_to(root).as_posix())
            found = self.view.apply_async(engine_unpack, buf.getvalue(), cwd).get(
                timeout=timeout)
        else:
            found = self.view.apply_async(engine_use_path, str(root), cwd).get(timeout=timeout)
        return pd.DataFrame({"engine": self.view.targets,
                             "rank": [self.ranks.get(e) for e in self.view.targets],
                             "cnn": found})

    def run(self, argv: Sequence[str], timeout: float = 600.0) -> pd.DataFrame:
        """``cnn.parallel.mpi.main(argv)`` on every rank; rank 0's results frame.

        Raises `RankFailure` (with the engines' output) when a rank dies or the run
        outlasts ``timeout``; the engines are then stopped (a stuck collective cannot be
        resumed) and ``restart()`` gives fresh ones.
        """
        if self.view is None:
            raise RuntimeError("cluster not started: use start() or a with-block")
        ar = self.view.apply_async(engine_run, list(argv))
        self.last_result = ar
        t0 = time.monotonic()
        while not ar.ready():
            ar.wait(0.5)
            if ar.ready():
                break
            stopped = self.engines_stopped()
            if stopped or time.monotonic() - t0 > timeout:
                why = (f"the MPI job ended: {stopped}" if stopped
                       else f"no result after {timeout:.0f}s")
                time.sleep(0.5)  # let mpiexec flush what the ranks printed
                out = self.output()
                self.stop()
                raise RankFailure(f"{why} while running {list(argv)}\n--- engine output ---\n"
                                  f"{tail(out, OUTPUT_LINES)}")
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
                              f"--- engine output ---\n{tail(out, OUTPUT_LINES)}") from None
        return results[0]  # the view is in rank order: rank 0 first

    def apply(self, fn: Callable[..., Any], *args: Any, timeout: float = 600.0) -> list[Any]:
        """``fn(*args)`` on every engine at once (a collective function is fine); the
        results in rank order. Raises `RankFailure` with the output if no result comes."""
        if self.view is None:
            raise RuntimeError("cluster not started: use start() or a with-block")
        ar = self.view.apply_async(fn, *args)
        if not ar.wait(timeout):
            out = self.output()
            self.stop()
            raise RankFailure(f"{getattr(fn, '__name__', fn)} gave no result in {timeout:.0f}s"
                              f"\n--- engine output ---\n{tail(out, OUTPUT_LINES)}")
        return ar.get(timeout=self.stop_timeout)

    def sequential(self, argv: Sequence[str], timeout: float = 600.0) -> pd.DataFrame:
        """``python -m cnn.train argv`` on rank 0's engine (the other engines wait)."""
        if self.view is None:
            raise RuntimeError("cluster not started: use start() or a with-block")
        rank0 = min(self.ranks, key=self.ranks.get)
        return self.client[rank0].apply_async(engine_sequential, [*argv, "--no-progress"]
                                              ).get(timeout=timeout)

    def pull_rank0(self, name: str, timeout: float = 60.0) -> Any:
        """A global variable of rank 0's engine (after a ``%%px`` cell)."""
        rank0 = min(self.ranks, key=self.ranks.get)
        return self.client[rank0].apply_async(engine_pull, name).get(timeout=timeout)
