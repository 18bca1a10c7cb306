"""The MPI strategies themselves: the per-rank run context, the step functions and the
synchronous training loop (``train_sync``, through ``cnn.train.fit``); the asynchronous
parameter server is :mod:`cnn.parallel.mpi_async`.

What each strategy computes, and why the synchronous ones equal one process, is in
:mod:`cnn.parallel.mpi` (the CLI and driver, ``python -m cnn.parallel.mpi``).
Everything here is collective: every rank of ``Run.comm`` calls the same functions.

Uneven workers (:mod:`cnn.parallel.delays`): every step function ends its compute with
``run.straggle(t0)``, which records the compute and sleeps what ``--straggler`` /
``--straggler-dist`` ask for, before the rank communicates. ``--backup-workers B``
(param-server, :func:`backup_server_step`), ``--staleness-aware`` and ``--assign dynamic``
(async-param-server, :func:`train_async`) are the remedies the study compares;
``--eval-every`` keeps weight copies for accuracy against time, evaluated after training.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cnn.errors import CnnError
from cnn.network import Network
from cnn.parallel.delays import (
    Delay,
    Snapshots,
    add_curve,
    add_rank_fields,
    object_column,
    straggler_label,
    stragglers,
)
from cnn.train import build_network, fit, make_training

TAG_GRAD, TAG_WEIGHTS = 11, 12


class CollectiveError(CnnError):
    """An error every rank detects identically (bad or mismatched flags): rank 0 reports it
    and every rank exits with status 2, no abort needed."""


# --- pure helpers (no MPI) -----------------------------------------------------------

def shard_bounds(n: int, parts: int, k: int) -> tuple[int, int]:
    """``[lo, hi)`` of part ``k`` when ``n`` items are split into ``parts`` contiguous parts,
    exactly as ``np.array_split(np.arange(n), parts)[k]`` (the first ``n % parts`` parts
    get one more)."""
    if parts < 1 or not 0 <= k < parts:
        raise ValueError(f"part {k} of {parts} does not exist")
    q, r = divmod(int(n), parts)
    lo = k * q + min(k, r)
    return lo, lo + q + (1 if k < r else 0)


@dataclass(frozen=True)
class Bucket:
    """A contiguous range ``[lo, hi)`` of the flat gradient buffer, ready once backward has
    finished layer ``ready_after`` (the lowest layer index it covers)."""

    ready_after: int
    lo: int
    hi: int


def make_buckets(net: Network, bucket_bytes: int) -> list[Bucket]:
    """Group whole parameter layers, from the output backwards (the order backward fills
    them), into buckets of at least ``bucket_bytes`` (the last one may be smaller)."""
    itemsize = net.dtype.itemsize
    layers: dict[int, list[int]] = {}
    for s in net.slots:
        lo_hi = layers.setdefault(s.layer, [s.offset, s.offset + s.size])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], s.offset), max(lo_hi[1], s.offset + s.size)
    buckets, cur = [], None
    for i in sorted(layers, reverse=True):
        lo, hi = layers[i]
        cur = [i, lo, hi] if cur is None else [i, lo, cur[2]]
        if (cur[2] - cur[1]) * itemsize >= bucket_bytes:
            buckets.append(Bucket(*cur))
            cur = None
    if cur is not None:
        buckets.append(Bucket(*cur))
    return buckets


# --- the run context -----------------------------------------------------------------

@dataclass
class Run:
    """Everything a strategy needs on one rank."""

    comm: Any
    args: argparse.Namespace
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int
    comm_s: float = 0.0
    steps: int = 0
    failure: tuple[int, int, str] | None = None
    training_rank: bool = True
    nan_due: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    delay: Delay = field(default_factory=Delay)
    #: checkpoint/resume/stop of this run (cnn.parallel.mpi_checkpoint), None without
    #: --checkpoint-dir
    ckpt: Any = None

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def network(self) -> Network:
        return build_network(self.args, self.train[0].shape[1:], self.num_classes)

    def network_in_buffer(self, extra: int) -> tuple[Network, np.ndarray]:
        """A network whose ``params`` are ``buf[:n]`` of a host buffer with ``extra`` more
        slots (a message carrying weights plus a loss or a version needs no copy)."""
        init = self.network()
        n = init.num_params
        buf = np.zeros(n + extra, dtype=init.dtype)
        buf[:n] = init.backend.to_host(init.params)
        net = build_network(self.args, self.train[0].shape[1:], self.num_classes,
                            params=buf[:n])
        return net, buf

    def tick(self) -> None:
        """Count a training step; fire an injected failure when it is due (``nan``: this
        rank's loss of the step becomes NaN, see :meth:`loss`)."""
        self.steps += 1
        f = self.failure
        if f is not None and f[0] == self.rank and f[1] == self.steps:
            if f[2] == "kill":
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if f[2] == "nan":
                self.nan_due = True
                return
            raise RuntimeError(f"injected failure at step {self.steps}")

    def straggle(self, t0: float) -> None:
        """This step computed since ``t0``: record it and sleep any injected delay
        (``--straggler``, ``--straggler-dist``) before the rank communicates."""
        self.delay.after(time.perf_counter() - t0)

    def loss(self, value: float) -> float:
        """The loss this rank reports for the step: NaN when an injected one is due."""
        if self.nan_due:
            self.nan_due = False
            return math.nan
        return value

    def comm_time(self) -> float:
        """Mean MPI seconds over the training ranks (collective: every rank calls it)."""
        from mpi4py import MPI

        buf = np.array([self.comm_s if self.training_rank else 0.0, float(self.training_rank)])
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return float(buf[0] / max(buf[1], 1.0))

    def sharded_evaluate(self, net: Network) -> Callable[..., tuple[float, float]]:
        """``net.evaluate`` replaced by: each rank evaluates its slice of the split, then one
        Allreduce of (loss sum, correct, count). Every rank must hold the same weights."""
        from mpi4py import MPI

        plain = Network.evaluate

        def evaluate(x, y, batch_size: int = 1000) -> tuple[float, float]:
            lo, hi = shard_bounds(len(y), self.size, self.rank)
            buf = np.zeros(3)
            if hi > lo:
                loss, acc = plain(net, x[lo:hi], y[lo:hi], batch_size)
                buf[:] = loss * (hi - lo), round(acc * (hi - lo)), hi - lo
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return float(buf[0] / buf[2]), float(buf[1] / buf[2])

        return evaluate

    def row_fields(self, strategy: str, **extra: Any) -> dict[str, Any]:
        from mpi4py import MPI

        a = self.args
        return dict(experiment=a.experiment, strategy=strategy, processes=self.size,
                    model=a.model, dataset=a.dataset, batch_per_rank=a.batch_size,
                    mpi=MPI.Get_library_version().splitlines()[0].strip(),
                    straggler=straggler_label(a), **extra)


def wait_all(reqs: Sequence[Any], spin: bool, status: Any = None) -> None:
    """Wait for ``reqs``; with ``spin=False`` poll with short, growing sleeps (up to 0.2 ms)
    so a waiting rank gives its core back to a computing one."""
    from mpi4py import MPI

    if spin:
        if status is not None and len(reqs) == 1:
            reqs[0].Wait(status)
        else:
            MPI.Request.Waitall(list(reqs))
        return
    delay = 2e-6
    if status is not None and len(reqs) == 1:
        while not reqs[0].Test(status):
            time.sleep(delay)
            delay = min(2 * delay, 2e-4)
        return
    while not MPI.Request.Testall(list(reqs)):
        time.sleep(delay)
        delay = min(2 * delay, 2e-4)


def wait_any(reqs: list[Any], spin: bool) -> int:
    """Index of a completed request of ``reqs`` (polled with short sleeps unless ``spin``)."""
    from mpi4py import MPI

    if spin:
        return int(MPI.Request.Waitany(reqs))
    delay = 2e-6
    while True:
        idx, done = MPI.Request.Testany(reqs)
        if done and idx != MPI.UNDEFINED:
            return int(idx)
        time.sleep(delay)
        delay = min(2 * delay, 2e-4)


def check_options(run: Run) -> None:
    """Refuse combinations every rank sees alike (a CollectiveError, exit status 2) and set
    up this rank's injected delay."""
    a, P = run.args, run.size
    server = a.strategy in ("param-server", "async-param-server")
    B = getattr(a, "backup_workers", 0) or 0
    if B and a.strategy != "param-server":
        raise CollectiveError("--backup-workers applies to --strategy param-server only")
    if B and B >= P - 1:
        raise CollectiveError(f"--backup-workers {B} leaves no gradient to apply: the server "
                              f"applies the first W-B of W={P - 1} worker gradients, so B < W "
                              f"(mpiexec -n {B + 3} or more)")
    if getattr(a, "staleness_aware", False) and a.strategy != "async-param-server":
        raise CollectiveError("--staleness-aware applies to --strategy async-param-server only")
    if getattr(a, "assign", "static") != "static" and a.strategy != "async-param-server":
        raise CollectiveError("--assign dynamic applies to --strategy async-param-server only "
                              "(the synchronous strategies split every global batch)")
    try:
        slow = stragglers(a)
    except ValueError as exc:
        raise CollectiveError(str(exc)) from None
    for r, f in sorted(slow.items()):
        if r >= P:
            raise CollectiveError(f"--straggler {r}:{f:g}: there is no rank {r} in a {P}-rank "
                                  f"job (ranks 0..{P - 1})")
        if server and r == 0:
            raise CollectiveError(f"--straggler 0:{f:g}: rank 0 is the parameter server, which "
                                  f"computes no gradients; slow a worker (ranks 1..{P - 1})")
    run.delay = Delay.for_rank(a, run.rank)


def evaluate_copies(run: Run, net: Network, copies: Sequence[np.ndarray]
                    ) -> list[tuple[float, float]]:
    """(test loss, test accuracy) of each weight copy rank 0 holds, evaluated after training
    (sharded over every rank, outside the timed region); the weights are restored after.
    Collective: the other ranks pass an empty list."""
    n_eval = run.comm.bcast(len(copies) if run.rank == 0 else None, root=0)
    if not n_eval:
        return []
    evaluate = run.sharded_evaluate(net)
    final = np.array(net.params, copy=True) if run.rank == 0 else None
    out = []
    for i in range(n_eval):
        if run.rank == 0:
            net.params[...] = copies[i]
        run.comm.Bcast(net.params, root=0)
        out.append(evaluate(*run.test))
    if run.rank == 0:
        net.params[...] = final
    run.comm.Bcast(net.params, root=0)
    return out


# --- synchronous strategies: fit() with a replaced step ------------------------------

def allreduce_step(run: Run, net: Network, opt: Any) -> Callable[..., float]:
    """The data-parallel step: local gradients of this rank's slice, one Allreduce."""
    from mpi4py import MPI

    comm, P, r = run.comm, run.size, run.rank
    grads = net.grads
    stats = np.zeros(1)

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        t0 = time.perf_counter()
        N = len(yb)
        lo, hi = shard_bounds(N, P, r)
        if hi > lo:
            loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
            np.multiply(grads, (hi - lo) / N, out=grads)
            stats[0] = loss * (hi - lo) / N
        else:
            grads[...] = 0
            stats[0] = 0.0
        run.straggle(t0)
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.SUM)
        run.comm_s += time.perf_counter() - t0
        opt.step(lr=lr)
        return float(stats[0])

    return step


def overlap_step(run: Run, net: Network, opt: Any) -> Callable[..., float]:
    """Allreduce with bucketed ``Iallreduce`` started during backward (PyTorch DDP style).

    Buckets are issued in the same order on every rank (a rank with an empty slice issues
    zeros). Between layers ``Testall`` nudges MPI progress; MPICH progresses a collective
    only inside MPI calls unless ``MPIR_CVAR_ASYNC_PROGRESS=1`` gives it a thread.
    """
    from mpi4py import MPI

    comm, P, r = run.comm, run.size, run.rank
    grads = net.grads
    buckets = make_buckets(net, max(1, run.args.bucket_kb) * 1024)
    by_layer: dict[int, list[Bucket]] = {}
    for b in buckets:
        by_layer.setdefault(b.ready_after, []).append(b)
    stats = np.zeros(1)
    run.extra["buckets"] = len(buckets)

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        t_compute = time.perf_counter()
        N = len(yb)
        lo, hi = shard_bounds(N, P, r)
        w = (hi - lo) / N
        reqs: list[Any] = []

        def start(layer: int) -> None:
            for b in by_layer.get(layer, ()):
                grads[b.lo:b.hi] *= w
            t0 = time.perf_counter()
            for b in by_layer.get(layer, ()):
                reqs.append(comm.Iallreduce(MPI.IN_PLACE, grads[b.lo:b.hi], op=MPI.SUM))
            if reqs:
                MPI.Request.Testall(reqs)
            run.comm_s += time.perf_counter() - t0

        if hi > lo:
            loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi], on_layer=start)
        else:
            loss = 0.0
            grads[...] = 0
            for b in buckets:
                start(b.ready_after)
        stats[0] = loss * w
        run.straggle(t_compute)  # the buckets already started wait for this rank meanwhile
        t0 = time.perf_counter()
        reqs.append(comm.Iallreduce(MPI.IN_PLACE, stats, op=MPI.SUM))
        MPI.Request.Waitall(reqs)
        run.comm_s += time.perf_counter() - t0
        opt.step(lr=lr)
        return float(stats[0])

    return step


def server_step(run: Run, net: Network, opt: Any, sendbuf: np.ndarray) -> Callable[..., float]:
    """Synchronous server: one gradient from every worker, summed in rank order, one step,
    the new weights (and the global loss) back to every worker."""
    comm, W = run.comm, run.size - 1
    n = net.num_params
    recv = np.empty((W, n + 1), dtype=net.dtype)
    spin = run.args.server_wait == "spin"
    grads = net.grads

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        t0 = time.perf_counter()
        wait_all([comm.Irecv(recv[w], source=w + 1, tag=TAG_GRAD) for w in range(W)], spin)
        t1 = time.perf_counter()
        grads[...] = recv[0, :n]
        for w in range(1, W):
            np.add(grads, recv[w, :n], out=grads)
        loss = float(recv[:, n].astype(np.float64).sum())
        opt.step(lr=lr)
        sendbuf[n] = loss
        t2 = time.perf_counter()
        wait_all([comm.Isend(sendbuf, dest=w + 1, tag=TAG_WEIGHTS) for w in range(W)], spin)
        run.comm_s += (t1 - t0) + (time.perf_counter() - t2)
        return loss

    return step


def worker_step(run: Run, net: Network, recvbuf: np.ndarray) -> Callable[..., float]:
    """Synchronous worker: gradient of its slice, scaled, ``Send``; new weights ``Recv``."""
    comm, W, w = run.comm, run.size - 1, run.rank - 1
    n = net.num_params
    send = np.empty(n + 1, dtype=net.dtype)

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        t0 = time.perf_counter()
        N = len(yb)
        lo, hi = shard_bounds(N, W, w)
        if hi > lo:
            loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
            np.multiply(net.grads, (hi - lo) / N, out=send[:n])
            send[n] = loss * (hi - lo) / N
        else:
            send[...] = 0
        run.straggle(t0)
        t0 = time.perf_counter()
        comm.Send(send, dest=0, tag=TAG_GRAD)
        comm.Recv(recvbuf, source=0, tag=TAG_WEIGHTS)  # lands in net.params
        run.comm_s += time.perf_counter() - t0
        return float(recvbuf[n])

    return step


def backup_server_step(run: Run, net: Network, opt: Any, sendbuf: np.ndarray,
                       steps_per_epoch: int, total_steps: int) -> Callable[..., float]:
    """Synchronous server with ``--backup-workers B`` (Chen et al. 2016): step t applies the
    sample-weighted mean of the first W-B gradients computed for step t and drops the rest.

    Every worker always has one receive posted. A gradient that arrives for an older step
    (or during the epoch-end drain) is dropped and its worker is answered at once with the
    newest weights and the step to compute next, so a late worker is never left behind: it
    skips the steps it missed. The accepted workers get the new weights and step t+1 once
    step t is applied. At each epoch's end (and the run's) the server waits for the
    gradients still in flight, drops them and answers with the epoch's final weights, so
    every rank holds the same weights for the (collective) evaluation; this costs at most
    one slow step per epoch. ``run.extra["backup"]`` counts, per epoch, the gradients
    received and dropped, and, per worker, those applied.
    """
    comm, W, B = run.comm, run.size - 1, int(run.args.backup_workers)
    need = W - B
    n = net.num_params
    recv = np.empty((W, n + 3), dtype=net.dtype)  # grads, loss, samples, step computed for
    spin = run.args.server_wait == "spin"
    grads = net.grads
    reqs = [comm.Irecv(recv[w], source=w + 1, tag=TAG_GRAD) for w in range(W)]
    assigned = [0] * W  # the step each worker was last told to compute
    tally = run.extra.setdefault("backup", {"received": [], "dropped": [], "applied": [0] * W})
    state = {"t": 0}

    def answer(w: int, nxt: int) -> None:
        sendbuf[n + 1] = nxt
        assigned[w] = nxt
        wait_all([comm.Isend(sendbuf, dest=w + 1, tag=TAG_WEIGHTS)], spin)
        if nxt < total_steps:
            reqs[w] = comm.Irecv(recv[w], source=w + 1, tag=TAG_GRAD)

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        t, t0 = state["t"], time.perf_counter()
        e = t // steps_per_epoch
        while len(tally["received"]) <= e:
            tally["received"].append(0)
            tally["dropped"].append(0)
        accepted: list[int] = []
        while len(accepted) < need:
            w = wait_any(reqs, spin)
            tally["received"][e] += 1
            if int(recv[w, n + 2]) == t:
                accepted.append(w)
            else:  # computed for a step already applied: too late
                tally["dropped"][e] += 1
                answer(w, t)
        t1 = time.perf_counter()
        samples = float(sum(recv[w, n + 1] for w in accepted))
        grads[...] = 0
        loss = 0.0
        for w in accepted:
            if recv[w, n + 1] > 0:
                np.add(grads, recv[w, :n] * (recv[w, n + 1] / samples), out=grads)
                loss += float(recv[w, n]) * float(recv[w, n + 1]) / samples
            tally["applied"][w] += 1
        opt.step(lr=lr)
        sendbuf[n] = loss
        t2 = time.perf_counter()
        for w in accepted:
            answer(w, t + 1)
        if (t + 1) % steps_per_epoch == 0 or t + 1 == total_steps:
            while any(a <= t for a in assigned):  # late gradients still being computed
                w = wait_any(reqs, spin)
                tally["received"][e] += 1
                tally["dropped"][e] += 1
                answer(w, t + 1)
        state["t"] = t + 1
        run.comm_s += (t1 - t0) + (time.perf_counter() - t2)
        return loss

    return step


def backup_worker_step(run: Run, net: Network, recvbuf: np.ndarray) -> Callable[..., float]:
    """Worker of ``--backup-workers``: computes the step the server named (its slice of that
    global batch, unscaled, with its sample count and the step number), then takes the
    newest weights and the next step to compute; steps the server has moved past are
    skipped without computing."""
    comm, W, w = run.comm, run.size - 1, run.rank - 1
    n = net.num_params
    send = np.empty(n + 3, dtype=net.dtype)
    state = {"k": 0, "next": 0, "loss": 0.0}

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        k = state["k"]
        state["k"] = k + 1
        if state["next"] > k:
            return state["loss"]
        t0 = time.perf_counter()
        lo, hi = shard_bounds(len(yb), W, w)
        if hi > lo:
            send[n] = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
            send[:n] = net.grads
            send[n + 1] = hi - lo
        else:
            send[:n + 2] = 0
        send[n + 2] = k
        run.straggle(t0)
        t0 = time.perf_counter()
        comm.Send(send, dest=0, tag=TAG_GRAD)
        comm.Recv(recvbuf, source=0, tag=TAG_WEIGHTS)  # lands in net.params
        run.comm_s += time.perf_counter() - t0
        state["next"], state["loss"] = int(recvbuf[n + 1]), float(recvbuf[n])
        return state["loss"]

    return step


def model_average_step(run: Run, net: Network, opt: Any, pbuf: np.ndarray,
                       steps_per_epoch: int, total_steps: int,
                       losses: list[tuple[int, float, int]]) -> Callable[..., float]:
    """Local SGD on this rank's slice; every ``--sync-every`` steps (and at each epoch's end)
    the weights become the sample-weighted mean over ranks (one Allreduce)."""
    from mpi4py import MPI

    comm, P, r = run.comm, run.size, run.rank
    n = net.num_params
    k = run.args.sync_every
    state = {"step": 0, "since": 0, "mine": 0, "all": 0}
    run.extra["model_average"] = state  # checkpointed per rank

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        t0 = time.perf_counter()
        N = len(yb)
        lo, hi = shard_bounds(N, P, r)
        g = state["step"]
        loss = 0.0
        if hi > lo:
            loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
            opt.step(lr=lr)
        run.straggle(t0)
        run.extra["synced"] = False
        losses.append((g // steps_per_epoch, loss * (hi - lo), hi - lo))
        state["step"] = g + 1
        state["since"] += 1
        state["mine"] += hi - lo
        state["all"] += N
        if (state["since"] >= k or (g + 1) % steps_per_epoch == 0 or g + 1 == total_steps):
            pbuf[:n] *= state["mine"] / state["all"]
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, pbuf, op=MPI.SUM)
            run.comm_s += time.perf_counter() - t0
            state["since"] = state["mine"] = state["all"] = 0
            run.extra["synced"] = True  # every rank holds the same weights now
        return loss

    return step


def _epoch_log(run: Run, strategy: str) -> Callable[[str], None] | None:
    if run.rank != 0:
        return None
    if strategy == "model-average":  # fit sees rank 0's local losses; the frame gets global
        return lambda line: print(line.replace("loss", "rank-0 loss", 1), flush=True)
    return lambda line: print(line, flush=True)


def train_sync(run: Run) -> tuple[pd.DataFrame, Network]:
    """allreduce / param-server / model-average through ``cnn.train.fit``."""
    from mpi4py import MPI

    check_options(run)
    a, comm, P = run.args, run.comm, run.size
    x, y = run.train
    strategy = a.strategy
    backup = int(getattr(a, "backup_workers", 0) or 0)
    trainers = P - 1 if strategy == "param-server" else P
    global_batch = trainers * a.batch_size
    steps_per_epoch = math.ceil(len(y) / global_batch)
    total_steps = steps_per_epoch * a.epochs
    if a.max_steps is not None:
        total_steps = min(total_steps, a.max_steps)
    extra: dict[str, Any] = {}
    losses: list[tuple[int, float, int]] = []

    if strategy == "param-server" and backup:
        if total_steps >= 2 ** 24 and a.dtype == "float32":
            raise CollectiveError("--backup-workers sends step numbers as float32: fewer than "
                                  "2**24 steps please (or --dtype float64)")
        net, buf = run.network_in_buffer(2)  # weights + global loss + next step
        opt, sched = make_training(net, a, steps_per_epoch)
        if run.rank == 0:
            run.training_rank = False
            step = backup_server_step(run, net, opt, buf, steps_per_epoch, total_steps)
        else:
            step = backup_worker_step(run, net, buf)
        comm.Bcast(net.params, root=0)
        strategy = "param-server-backup"
        extra.update(train_ranks=trainers, backup_workers=backup)
    elif strategy == "param-server":
        net, buf = run.network_in_buffer(1)  # weights + global loss
        opt, sched = make_training(net, a, steps_per_epoch)
        if run.rank == 0:
            run.training_rank = False
            step = server_step(run, net, opt, buf)
        else:
            step = worker_step(run, net, buf)
        comm.Bcast(net.params, root=0)
        extra.update(train_ranks=trainers, staleness_mean=0.0, staleness_max=0)
    elif strategy == "model-average":
        net, pbuf = run.network_in_buffer(0)
        comm.Bcast(net.params, root=0)
        opt, sched = make_training(net, a, steps_per_epoch)
        step = model_average_step(run, net, opt, pbuf, steps_per_epoch, total_steps, losses)
        extra.update(train_ranks=trainers, sync_every=a.sync_every)
    else:
        net = run.network()
        comm.Bcast(net.params, root=0)
        opt, sched = make_training(net, a, steps_per_epoch)
        step = overlap_step(run, net, opt) if a.overlap else allreduce_step(run, net, opt)
        if a.overlap:
            strategy = "allreduce-overlap"
            extra.update(bucket_kb=a.bucket_kb, buckets=run.extra["buckets"])
        extra.update(train_ranks=trainers)

    net.evaluate = run.sharded_evaluate(net)  # type: ignore[method-assign]
    if run.rank == 0:
        print(net.summary())
        print(f"{strategy}: {P} ranks, {trainers} training, global batch {global_batch} "
              f"({a.batch_size} per rank), {steps_per_epoch} steps/epoch", flush=True)
    snaps = Snapshots(a.eval_every, steps_per_epoch, total_steps)
    clock = {"wall": 0.0, "samples": 0.0, "step": 0, "due": False}

    def timed_step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        """The strategy's step, with the clock and weight copies of ``--eval-every``."""
        t0 = time.perf_counter()
        loss = run.loss(step(xb, yb, lr))
        clock["wall"] += time.perf_counter() - t0
        clock["samples"] += len(yb)
        clock["step"] += 1
        k = clock["step"]
        # the epoch's end (or the run's) is the epoch row's own point: no copy there
        end = k % steps_per_epoch == 0 or k == total_steps
        clock["due"] = not end and (clock["due"] or snaps.due(k))
        # model-average: copy only weights just averaged (identical on every rank)
        if clock["due"] and run.rank == 0 and run.extra.get("synced", True):
            snaps.take(k, clock["wall"], clock["samples"], net.params)
            clock["due"] = False
        return loss

    comm.Barrier()
    df = fit(net, run.train, run.test, epochs=a.epochs, batch_size=global_batch,
             optimizer=opt, schedule=sched, seed=a.seed, max_steps=a.max_steps,
             progress=False if (a.no_progress or run.rank != 0) else None,
             step_fn=timed_step, comm_time=run.comm_time, log=_epoch_log(run, strategy),
             **(run.ckpt.fit_kwargs(net, opt, losses) if run.ckpt is not None else {}),
             **run.row_fields(strategy, **extra))
    if strategy == "model-average" and len(df):
        # fit averaged this rank's local losses; make train_loss the global mean per epoch
        per = np.zeros((len(df), 2))
        for e, s, c in losses:
            if e < len(df):
                per[e] += s, c
        comm.Allreduce(MPI.IN_PLACE, per, op=MPI.SUM)
        mean = per[:, 0] / np.maximum(per[:, 1], 1)
        df["train_loss"] = mean
        df["final_loss"] = mean
    results = evaluate_copies(run, net, snaps.params) if a.eval_every else []
    summaries = comm.gather(run.delay.summary(), root=0)
    if run.rank == 0 and len(df):
        add_rank_fields(df, summaries)
        if a.eval_every:
            add_curve(df, snaps.points, results, steps_per_epoch)
        tally = run.extra.get("backup")
        if tally is not None:
            for col in ("received", "dropped"):
                got = tally[col] + [0] * (len(df) - len(tally[col]))
                df["gradients" if col == "received" else col] = got[:len(df)]
            applied = [0, *tally["applied"]]  # gradients applied per rank (rank 0 serves)
            object_column(df, "rank_applied", [applied] * len(df))
    return df, net
