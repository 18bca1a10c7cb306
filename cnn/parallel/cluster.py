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
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["EngineStartError", "MPICluster", "RankFailure", "find_mpiexec"]


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
                 log_level: int = logging.WARNING):
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

    def pull_rank0(self, name: str, timeout: float = 60.0) -> Any:
        """A global variable of rank 0's engine (after a ``%%px`` cell)."""
        rank0 = min(self.ranks, key=self.ranks.get)
        return self.client[rank0].apply_async(_engine_pull, name).get(timeout=timeout)
