"""Checkpoint, exact resume and stop-on-signal for the MPI strategies.

One checkpoint per run, ``<--checkpoint-dir>/checkpoint.npz`` (:mod:`cnn.checkpoint`: arrays
plus JSON, no pickle), written by rank 0 alone, atomically. It holds the weights, rank 0's
optimiser state, every rank's state where ranks differ (model averaging: each rank's
weights, momentum, averaging counters and losses; the asynchronous server: its counters,
statistics, per-epoch snapshots and every worker's step counter), each rank's MPI
seconds, the global step and data-order position, the schedule and the run's flags.
Rank 0 also reads it on ``--resume`` and broadcasts it: the other ranks need not see the
file system rank 0 sees.

Synchronous strategies (allreduce, ``--overlap``, param-server, model-average, hybrid) run
through :func:`cnn.train.fit` with :class:`cnn.checkpoint.Hooks`: after every step the
ranks agree with one ``Allreduce(MAX)`` of their stop flags (a signal seen by any rank
stops all of them at the same global step), so a checkpoint is always taken between two
steps on every rank, and a resumed run at the same P repeats the uninterrupted one bit
for bit. The asynchronous parameter server checkpoints on the server between two
messages; a stop drains each worker's in-flight gradient (not applied, and redone after
the resume: no global batch is applied twice or skipped) and answers it with a stop
marker (version -1).

What a resumed run may change: where it reads and writes, ``--checkpoint-every``,
``--server-wait``, ``--inject-failure``, and for allreduce and the synchronous parameter
server the number of ranks, as long as the global batch (training ranks x
``--batch-size``) stays the same: it alone defines the maths. Model averaging and the
asynchronous server keep per-rank state, so they resume on the same number of ranks.
Anything else is refused before training, naming the flag.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np

from cnn import checkpoint as ckpt_io
from cnn import cli
from cnn.errors import CheckpointError
from cnn.parallel.mpi_strategies import TAG_GRAD, TAG_WEIGHTS, CollectiveError
from cnn.train import CHECKPOINT, KEY_FLAGS, RESUME_FREE_FLAGS, resume_args

__all__ = ["MPI_FREE_FLAGS", "PER_RANK_STATE", "TAG_STOP", "MPICheckpoint", "global_batch"]

#: A worker's "please stop" to the asynchronous server (its own signal).
TAG_STOP = 21
#: Flags a resumed MPI run may change besides cnn.train's: ``--batch-size`` is per rank
#: (the global batch is compared instead), the others change nothing that is computed.
MPI_FREE_FLAGS: frozenset[str] = RESUME_FREE_FLAGS | {
    "batch_size", "server_wait", "inject_failure", "checkpoint_every"}
#: Strategies whose ranks hold different state: resumed on the same number of ranks only.
PER_RANK_STATE: frozenset[str] = frozenset({"model-average", "async-param-server"})
_SERVER_STRATEGIES = ("param-server", "async-param-server")


def global_batch(strategy: str, ranks: int, batch_size: int) -> tuple[int, int]:
    """``(training ranks, global batch)`` of ``strategy`` on ``ranks`` ranks."""
    trainers = ranks - 1 if strategy in _SERVER_STRATEGIES else ranks
    return trainers, trainers * batch_size


def _split(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _opt_state(opt: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, meta = {}, {}
    for k, v in opt.state_dict().items():
        (arrays if isinstance(v, np.ndarray) else meta)[k] = v
    return arrays, meta


class MPICheckpoint:
    """The checkpoint of one MPI run, on every rank (collective methods say so).

    Made from the parsed flags, so that :meth:`preflight` refuses a wrong resume before any
    data is loaded; ``run`` (the :class:`~cnn.parallel.mpi_strategies.Run`) is set once it
    exists. ``flag`` is the process's :class:`cnn.checkpoint.StopFlag`; ``signal_at``
    (testing, ``--inject-failure R:S:signal``) makes rank R send itself SIGUSR1 at its S-th
    step.
    """

    def __init__(self, comm: Any, args: argparse.Namespace, flag: ckpt_io.StopFlag,
                 signal_at: tuple[int, int] | None = None):
        self.comm, self.args, self.run = comm, args, None
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.dir = Path(args.checkpoint_dir)
        self.path = self.dir / CHECKPOINT
        self.resume, self.every = bool(args.resume), args.checkpoint_every
        self.flag, self.signal_at = flag, signal_at
        self.trainers, self.global_batch = global_batch(args.strategy, self.size,
                                                        args.batch_size)
        unsaved = [f for f, on in (("--backup-workers", getattr(args, "backup_workers", 0)),
                                   ("--eval-every", getattr(args, "eval_every", None))) if on]
        if unsaved:
            raise CollectiveError(f"--checkpoint-dir: runs with {' and '.join(unsaved)} cannot "
                                  f"be checkpointed (their mid-run state is not saved); drop "
                                  f"--checkpoint-dir or {' and '.join(unsaved)}")
        self.agreed = 0  # the signal every rank agreed to stop on
        self._loaded: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
        self._stop_sent = False

    # --- what the checkpoint records about the run -----------------------------------

    def run_args(self) -> dict[str, Any]:
        """The flags a resume must repeat (see the module docstring for those it may not)."""
        return {k: v for k, v in resume_args(self.args).items() if k not in MPI_FREE_FLAGS}

    def mpi_meta(self) -> dict[str, Any]:
        a = self.args
        return {"strategy": a.strategy, "processes": self.size, "trainers": self.trainers,
                "batch_per_rank": a.batch_size, "global_batch": self.global_batch}

    # --- reading: rank 0 reads, everyone gets it -------------------------------------

    def read(self, path: Path | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: rank 0 loads the file and broadcasts it (collective the first
        time). A missing or unreadable file is a CollectiveError naming it, on every rank."""
        if self._loaded is None:
            got: Any = None
            if self.rank == 0:
                try:
                    if not self.path.exists():
                        raise CheckpointError(
                            f"--resume: no checkpoint in {self.dir} (looked for {self.path}); "
                            f"drop --resume to start a new run there")
                    got = ckpt_io.load(self.path)
                except CheckpointError as exc:
                    got = str(exc)
            got = self.comm.bcast(got, root=0)
            if isinstance(got, str):
                raise CollectiveError(got)
            self._loaded = got
        return self._loaded

    def preflight(self) -> None:
        """Refuse, on every rank and before training, a checkpoint this run cannot continue:
        another strategy, model, dataset or global batch, another number of ranks where
        ranks hold their own state, any other differing flag. Collective."""
        _, meta = self.read()
        saved_mpi = (meta.get("extra") or {}).get("mpi")
        if saved_mpi is None:
            raise CollectiveError(
                f"--resume: {self.path} was not written by cnn.parallel.mpi (a cnn.train or "
                f"HOGWILD checkpoint?); resume it with the command that wrote it")
        saved_run, now_run = meta.get("run") or {}, ckpt_io.jsonable(self.run_args())
        diff = ckpt_io.changed_flags(saved_run, now_run)
        first = [k for k in KEY_FLAGS if k in diff]

        def said(k: str) -> str:
            return (f"{cli.flag(k)} was {saved_run.get(k, 'not set')!r}, now "
                    f"{now_run.get(k, 'not set')!r}")

        parts = [said(k) for k in first]
        a, P = self.args, self.size
        if saved_mpi["global_batch"] != self.global_batch:
            parts.append(
                f"the global batch (training ranks x --batch-size) was "
                f"{saved_mpi['trainers']} x {saved_mpi['batch_per_rank']} = "
                f"{saved_mpi['global_batch']}, now {self.trainers} x {a.batch_size} = "
                f"{self.global_batch} (it defines the run: choose --batch-size or the number "
                f"of ranks to give {saved_mpi['global_batch']})")
        if a.strategy in PER_RANK_STATE and saved_mpi["processes"] != P:
            parts.append(
                f"{a.strategy} keeps state on every rank and the checkpoint holds "
                f"{saved_mpi['processes']} ranks' state: resume it on "
                f"{saved_mpi['processes']} ranks (mpiexec -n {saved_mpi['processes']}), "
                f"not {P}")
        parts += [said(k) for k in diff if k not in first]
        if parts:
            raise CollectiveError(
                f"--resume: the checkpoint {self.path} was written by a different run: "
                f"{'; '.join(parts)}. Resume with the same flags, or start a new run in "
                f"another --checkpoint-dir")

    # --- stopping --------------------------------------------------------------------

    def _inject(self) -> None:
        if self.signal_at == (self.rank, self.run.steps):
            self.signal_at = None
            os.kill(os.getpid(), signal.SIGUSR1)

    def stop_now(self, step: int) -> bool:
        """After every synchronous step: did any rank get a stop signal? One Allreduce(MAX),
        so every rank answers the same at the same step. Collective."""
        from mpi4py import MPI

        self._inject()
        buf = np.array([self.flag.signum], dtype=np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        self.agreed = int(buf[0])
        return self.agreed != 0

    def stopped(self, step: int) -> ckpt_io.Stopped:
        return ckpt_io.Stopped(step, self.path, self.agreed or self.flag.signum or None)

    # --- synchronous strategies: cnn.train.fit's hooks -------------------------------

    def fit_kwargs(self, net: Any, opt: Any, losses: list[tuple[int, float, int]] | None = None
                   ) -> dict[str, Any]:
        """The keywords :func:`cnn.train.fit` takes to checkpoint, resume and stop this rank.
        ``losses``: model averaging's per-step (epoch, loss x samples, samples) list."""
        run, comm = self.run, self.comm
        per_rank = run.args.strategy in PER_RANK_STATE

        def state() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            mine: dict[str, Any] = {"comm_s": run.comm_s}
            if per_rank:
                arrays, meta = _opt_state(opt)
                arrays["param"] = np.array(net.backend.to_host(net.params), copy=True)
                arrays["losses"] = np.asarray(losses or [], dtype=np.float64).reshape(-1, 3)
                mine.update(arrays=arrays, optimizer=meta,
                            average=dict(run.extra.get("model_average", {})))
            every = comm.gather(mine, root=0)
            if run.rank != 0:
                return {}, {}
            out: dict[str, np.ndarray] = {}
            ranks = []
            for r, m in enumerate(every):
                for k, v in m.pop("arrays", {}).items():
                    out[f"rank{r}/{k}"] = v
                ranks.append(m)
            return out, {"mpi": self.mpi_meta(), "ranks": ranks}

        def restore(arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
            ranks = extra.get("ranks") or []
            if len(ranks) == run.size:
                run.comm_s = float(ranks[run.rank]["comm_s"])
            elif ranks:  # another number of ranks: each starts from the mean
                run.comm_s = float(np.mean([m["comm_s"] for m in ranks]))
            if per_rank:
                mine = ranks[run.rank]
                own = _split(f"rank{run.rank}/", arrays)
                net.backend.copy_into(net.params, np.ascontiguousarray(own.pop("param"),
                                                                      dtype=net.dtype))
                saved_losses = own.pop("losses")
                opt.load_state_dict({**mine["optimizer"], **own})
                run.extra.get("model_average", {}).update(mine["average"])
                if losses is not None:
                    losses[:] = [(int(e), float(s), int(c)) for e, s, c in saved_losses]
            self._loaded = None  # loaded into the network: free the broadcast copy

        hooks = ckpt_io.Hooks(write=run.rank == 0, read=self.read, state=state,
                              restore=restore, stop=self.stop_now, signum=lambda: self.agreed)
        return dict(checkpoint_dir=self.dir, resume=self.resume, run_args=self.run_args(),
                    checkpoint_every=self.every, hooks=hooks)

    # --- the asynchronous parameter server -------------------------------------------

    def async_resume(self, net: Any, opt: Any, wbuf: np.ndarray) -> AsyncState:
        """Load (on ``--resume``) and share the server's weights, optimiser and counters;
        each worker learns the piece it computes first. Collective."""
        run = self.run
        st = AsyncState(self, net, opt, wbuf)
        if not self.resume:
            return st
        arrays, meta = self.read()
        saved = meta.get("async")
        if saved is None:
            raise CollectiveError(f"--resume: {self.path} holds no asynchronous server state")
        net.load_state_dict(_split("param/", arrays))
        opt.load_state_dict({**meta["optimizer"], **_split("optimizer/", arrays)})
        st.assigned = [int(c) for c in arrays["async/next_piece"]]
        st.u, st.applied, st.handed = (int(saved[k]) for k in ("messages", "applied", "handed"))
        st.loss_sum, st.count, st.seen = saved["loss_sum"], saved["count"], saved["seen"]
        st.wall, st.ep_stats = saved["wall"], saved["epochs"]
        bounds = np.cumsum([0, *[e.pop("stale_n") for e in st.ep_stats]])
        flat = arrays["async/epoch_stale"]
        for e, lo, hi in zip(st.ep_stats, bounds[:-1], bounds[1:], strict=True):
            e["stale"] = flat[lo:hi].tolist()
        st.stale = arrays["async/stale"].tolist()
        st.snapshots = list(arrays["async/snapshots"])
        ranks = meta.get("extra", {}).get("ranks") or []
        if len(ranks) == run.size:
            run.comm_s = float(ranks[run.rank]["comm_s"])
        wbuf[net.num_params] = st.applied  # workers' first gradients are read at this version
        if run.rank != 0:
            st.first_piece = st.assigned[run.rank - 1]
        self._loaded = None
        return st

    def agree_stopped(self, st: AsyncState) -> None:
        """After the asynchronous loops: raise Stopped on every rank if the server stopped
        (workers that had finished learn it here). Collective."""
        stopped = self.comm.bcast(st.stopped_at if self.run.rank == 0 else None, root=0)
        self.agreed = self.comm.bcast(self.agreed, root=0)
        if stopped is not None:
            raise self.stopped(stopped)


class AsyncState:
    """The asynchronous parameter server's resumable state, and the stop protocol.

    The server hands out pieces (one worker slice of one global batch, see
    :func:`cnn.parallel.mpi_async.train_async`); ``assigned[w]`` is the piece worker w+1
    was last told to compute (-1: none left), which is not applied yet at any cut between
    two messages. A checkpoint saves it with the server's counters, statistics and
    snapshots; a resumed worker starts with that piece, so every piece is applied exactly
    once. A stop drains: the server takes each worker's in-flight gradient without applying
    it and answers with piece -2, which ends the worker's loop like -1 ("done") does.
    """

    STOP_PIECE = -2

    def __init__(self, owner: MPICheckpoint, net: Any, opt: Any, wbuf: np.ndarray):
        self.owner, self.net, self.opt, self.wbuf = owner, net, opt, wbuf
        W = owner.size - 1
        self.u = self.applied = 0
        self.handed = W
        self.loss_sum = self.count = self.seen = self.wall = 0.0
        self.stale: list[int] = []
        self.ep_stats: list[dict[str, Any]] = []
        self.snapshots: list[np.ndarray] = []
        self.assigned = list(range(W))  # worker rank r starts with piece r - 1
        self.first_piece = owner.rank - 1
        self.stopped_at: int | None = None

    # --- server ----------------------------------------------------------------------

    def server_after(self, u_done: int, src: int, nxt: int, total_msgs: int,
                     per_epoch_msgs: int, rbuf: np.ndarray, state: dict[str, Any]) -> bool:
        """After the server handled message ``u_done`` (from rank ``src``, told to compute
        piece ``nxt`` next): checkpoint when due, and on a stop request (its own signal, a
        worker's, or a test's) checkpoint, drain the workers and return True (the server
        loop then ends)."""
        from mpi4py import MPI

        own = self.owner
        self.assigned[src - 1] = int(nxt)
        own._inject()
        W = own.size - 1
        if u_done == total_msgs:  # the end: the final state, as fit saves it
            self.save(u_done, state)
            return False
        stop = own.flag.requested
        if not stop and own.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            own.comm.recv(source=MPI.ANY_SOURCE, tag=TAG_STOP)
            stop = True
        if stop and not own.agreed:
            own.agreed = own.flag.signum or int(signal.SIGUSR1)
        due = (u_done % per_epoch_msgs == 0 or
               (own.every is not None and u_done % (W * own.every) == 0))
        if due or stop:
            self.save(u_done, state)
        if stop:
            self._drain(rbuf)
            self.stopped_at = u_done // W
        return stop

    def _drain(self, rbuf: np.ndarray) -> None:
        """Every worker with a piece has sent (or is sending) its gradient: take it without
        applying it and answer with the stop piece; then collect stray stop notices."""
        from mpi4py import MPI

        comm, n = self.owner.comm, self.net.num_params
        self.wbuf[n + 1] = self.STOP_PIECE
        for w, piece in enumerate(self.assigned):
            if piece >= 0:
                comm.Recv(rbuf, source=w + 1, tag=TAG_GRAD)
                comm.Send(self.wbuf, dest=w + 1, tag=TAG_WEIGHTS)
        while comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            comm.recv(source=MPI.ANY_SOURCE, tag=TAG_STOP)

    def save(self, u_done: int, s: dict[str, Any]) -> None:
        """Write the server's state (rank 0): weights, optimiser, counters, statistics."""
        own = self.owner
        opt_arrays, opt_meta = _opt_state(self.opt)
        arrays = {f"param/{k}": v for k, v in self.net.state_dict().items()}
        arrays.update({f"optimizer/{k}": v for k, v in opt_arrays.items()})
        arrays["async/epoch_stale"] = np.asarray(
            [x for e in s["ep_stats"] for x in e["stale"]], dtype=np.int64)
        epochs = [{**{k: v for k, v in e.items() if k != "stale"}, "stale_n": len(e["stale"])}
                  for e in s["ep_stats"]]
        arrays["async/stale"] = np.asarray(s["stale"], dtype=np.int64)
        n = self.net.num_params
        arrays["async/snapshots"] = (np.stack(s["snapshots"]) if s["snapshots"] else
                                     np.zeros((0, n), dtype=self.net.dtype))
        arrays["async/next_piece"] = np.asarray(self.assigned, dtype=np.int64)
        W = own.size - 1
        meta = {"run": own.run_args(), "optimizer": opt_meta,
                "global_step": u_done // W, "messages": u_done,
                "async": {"messages": u_done, "applied": s["applied"], "handed": s["handed"],
                          "loss_sum": s["loss_sum"], "count": s["count"], "seen": s["seen"],
                          "wall": s["wall"], "epochs": epochs},
                "extra": {"mpi": own.mpi_meta(), "ranks": [{"comm_s": own.run.comm_s}]}}
        ckpt_io.save(own.path, arrays, meta)

    # --- worker ----------------------------------------------------------------------

    def worker_after(self) -> None:
        """After a worker's reply: a worker that got a signal tells the server once (the
        server then stops everyone, this worker included, with the stop piece)."""
        own = self.owner
        own._inject()
        if own.flag.requested and not own._stop_sent:
            own.comm.send(own.flag.signum, dest=0, tag=TAG_STOP)
            own._stop_sent = True
