"""The MPI strategies themselves: the per-rank run context, the step functions and the
training loops (``train_sync`` through ``cnn.train.fit``, ``train_async`` for the
asynchronous parameter server).

What each strategy computes, and why the synchronous ones equal one process, is in
:mod:`cnn.parallel.mpi` (the CLI and driver, ``python -m cnn.parallel.mpi``).
Everything here is collective: every rank of ``Run.comm`` calls the same functions.
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

from cnn import data as cdata
from cnn.errors import CnnError, DivergenceError
from cnn.metrics import make_row, step_stats, to_frame
from cnn.network import Network
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
                    mpi=MPI.Get_library_version().splitlines()[0].strip(), **extra)


def _wait(reqs: Sequence[Any], spin: bool, status: Any = None) -> None:
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


# --- synchronous strategies: fit() with a replaced step ------------------------------

def allreduce_step(run: Run, net: Network, opt: Any) -> Callable[..., float]:
    """The data-parallel step: local gradients of this rank's slice, one Allreduce."""
    from mpi4py import MPI

    comm, P, r = run.comm, run.size, run.rank
    grads = net.grads
    stats = np.zeros(1)

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        N = len(yb)
        lo, hi = shard_bounds(N, P, r)
        if hi > lo:
            loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
            np.multiply(grads, (hi - lo) / N, out=grads)
            stats[0] = loss * (hi - lo) / N
        else:
            grads[...] = 0
            stats[0] = 0.0
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
        _wait([comm.Irecv(recv[w], source=w + 1, tag=TAG_GRAD) for w in range(W)], spin)
        t1 = time.perf_counter()
        grads[...] = recv[0, :n]
        for w in range(1, W):
            np.add(grads, recv[w, :n], out=grads)
        loss = float(recv[:, n].astype(np.float64).sum())
        opt.step(lr=lr)
        sendbuf[n] = loss
        t2 = time.perf_counter()
        _wait([comm.Isend(sendbuf, dest=w + 1, tag=TAG_WEIGHTS) for w in range(W)], spin)
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
        N = len(yb)
        lo, hi = shard_bounds(N, W, w)
        if hi > lo:
            loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
            np.multiply(net.grads, (hi - lo) / N, out=send[:n])
            send[n] = loss * (hi - lo) / N
        else:
            send[...] = 0
        t0 = time.perf_counter()
        comm.Send(send, dest=0, tag=TAG_GRAD)
        comm.Recv(recvbuf, source=0, tag=TAG_WEIGHTS)  # lands in net.params
        run.comm_s += time.perf_counter() - t0
        return float(recvbuf[n])

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

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        run.tick()
        N = len(yb)
        lo, hi = shard_bounds(N, P, r)
        g = state["step"]
        loss = 0.0
        if hi > lo:
            loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
            opt.step(lr=lr)
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

    a, comm, P = run.args, run.comm, run.size
    x, y = run.train
    strategy = a.strategy
    trainers = P - 1 if strategy == "param-server" else P
    global_batch = trainers * a.batch_size
    steps_per_epoch = math.ceil(len(y) / global_batch)
    total_steps = steps_per_epoch * a.epochs
    if a.max_steps is not None:
        total_steps = min(total_steps, a.max_steps)
    extra: dict[str, Any] = {}
    losses: list[tuple[int, float, int]] = []

    if strategy == "param-server":
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
    comm.Barrier()
    df = fit(net, run.train, run.test, epochs=a.epochs, batch_size=global_batch,
             optimizer=opt, schedule=sched, seed=a.seed, max_steps=a.max_steps,
             progress=False if (a.no_progress or run.rank != 0) else None,
             step_fn=lambda xb, yb, lr: run.loss(step(xb, yb, lr)),
             comm_time=run.comm_time, log=_epoch_log(run, strategy),
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
    return df, net


# --- the asynchronous parameter server -----------------------------------------------

def train_async(run: Run) -> tuple[pd.DataFrame, Network]:
    """Rank 0 applies gradients as they arrive; workers loop over their slices."""
    from mpi4py import MPI

    a, comm, P = run.args, run.comm, run.size
    W = P - 1
    x, y = run.train
    global_batch = W * a.batch_size
    steps_per_epoch = math.ceil(len(y) / global_batch)
    total_steps = steps_per_epoch * a.epochs
    if a.max_steps is not None:
        total_steps = min(total_steps, a.max_steps)
    net, wbuf = run.network_in_buffer(1)  # weights + version (server: send; worker: recv)
    n, dtype = net.num_params, net.dtype
    if W * total_steps >= 2 ** 24 and dtype == np.float32:
        raise CollectiveError("async-param-server sends versions as float32: fewer than 2**24 "
                              "updates please (or --dtype float64)")
    comm.Bcast(net.params, root=0)
    opt, sched = make_training(net, a, steps_per_epoch)
    spin = a.server_wait == "spin"
    if run.rank == 0:
        print(net.summary())
        print(f"async-param-server: 1 server + {W} workers, {a.batch_size} per worker, "
              f"{steps_per_epoch} global steps/epoch", flush=True)
    comm.Barrier()

    per_epoch_msgs = W * steps_per_epoch
    snapshots: list[np.ndarray] = []
    if run.rank == 0:
        run.training_rank = False
        rbuf = np.empty(n + 3, dtype=dtype)  # grads, loss, samples, version
        status = MPI.Status()
        applied, stale, ep_stats = 0, [], []
        loss_sum = count = 0.0
        t_start = time.perf_counter()
        for u in range(W * total_steps):
            run.tick()
            _wait([comm.Irecv(rbuf, source=MPI.ANY_SOURCE, tag=TAG_GRAD)], spin, status)
            src = status.Get_source()
            n_r = float(rbuf[n + 1])
            if n_r > 0:
                stale.append(applied - int(rbuf[n + 2]))
                net.grads[...] = rbuf[:n]
                opt.step(lr=sched(min(u // W, total_steps - 1)))
                applied += 1
                loss_sum += float(rbuf[n]) * n_r
                count += n_r
            wbuf[n] = applied
            comm.Send(wbuf, dest=src, tag=TAG_WEIGHTS)
            if (u + 1) % per_epoch_msgs == 0 or u + 1 == W * total_steps:
                snapshots.append(np.array(wbuf[:n], copy=True))
                ep_stats.append(dict(wall=time.perf_counter() - t_start, loss=loss_sum / max(
                    count, 1), samples=count, stale=list(stale), step=(u + 1) // W,
                    complete=(u + 1) % per_epoch_msgs == 0))
                loss_sum = count = 0.0
                stale = []
        worker_log: list[list[tuple[int, float, float]]] = []
    else:
        w = run.rank - 1
        send = np.empty(n + 3, dtype=dtype)
        log: list[tuple[int, float, float]] = []  # (epoch, step seconds, comm seconds so far)
        done = 0
        for epoch in range(a.epochs):
            for idx in cdata.iterate_batches(len(y), global_batch, a.seed, epoch):
                if done >= total_steps:
                    break
                t0 = time.perf_counter()
                run.tick()
                lo, hi = shard_bounds(len(idx), W, w)
                if hi > lo:
                    part = idx[lo:hi]
                    loss = run.loss(net.loss_and_grad(x[part], y[part]))
                    if not math.isfinite(loss):
                        raise DivergenceError(f"loss became {loss} on worker {run.rank} at "
                                              f"step {done + 1}: lower --lr")
                    send[:n] = net.grads
                    send[n], send[n + 1] = loss, hi - lo
                else:
                    send[:n + 2] = 0
                send[n + 2] = wbuf[n]
                t1 = time.perf_counter()
                comm.Send(send, dest=0, tag=TAG_GRAD)
                comm.Recv(wbuf, source=0, tag=TAG_WEIGHTS)
                t2 = time.perf_counter()
                run.comm_s += t2 - t1
                log.append((epoch, t2 - t0, run.comm_s))
                done += 1
        worker_log = [log]
    logs = comm.gather(worker_log, root=0)  # once, after training: pickle is fine here

    # evaluation of each epoch's snapshot, outside the timed loop, sharded over all ranks
    n_eval = comm.bcast(len(snapshots) if run.rank == 0 else None, root=0)
    evaluate = run.sharded_evaluate(net)
    final = np.array(net.params, copy=True) if run.rank == 0 else None
    results = []
    for e in range(n_eval):
        if run.rank == 0:
            net.params[...] = snapshots[e]
        comm.Bcast(net.params, root=0)
        results.append(evaluate(*run.test))
    if run.rank == 0:
        net.params[...] = final
    comm.Bcast(net.params, root=0)

    rows = []
    if run.rank == 0:
        flat = [entry for ranks in logs for wl in ranks for entry in wl]
        fields = run.row_fields("async-param-server", train_ranks=W)
        seen = 0
        for e, (st, (tl, ta)) in enumerate(zip(ep_stats, results, strict=True)):
            times = [t for (ep, t, _) in flat if ep == e] or [math.nan, math.nan]
            comm_per_worker = [max([c for (ep, _, c) in wl if ep <= e], default=0.0)
                               for ranks in logs for wl in ranks]
            stale = st["stale"] or [0]
            prev_wall = ep_stats[e - 1]["wall"] if e else 0.0
            seen += int(st["samples"])
            rows.append(make_row(
                epoch=e + 1, step=st["step"], batch_size=global_batch, epochs=e + 1,
                samples=seen, wall_s=st["wall"],
                **step_stats(times, warmup=min(1, len(times) - 1)),
                samples_per_s=st["samples"] / max(st["wall"] - prev_wall, 1e-12),
                comm_s=float(np.mean(comm_per_worker)) if comm_per_worker else 0.0,
                train_loss=st["loss"], final_loss=st["loss"], test_loss=tl, test_acc=ta,
                lr=sched(max(st["step"] - 1, 0)), backend=net.backend.NAME,
                threads=net.threads, device=net.backend.device_name(),
                complete_epoch=st["complete"], staleness_mean=float(np.mean(stale)),
                staleness_max=int(np.max(stale)), staleness_p95=float(np.percentile(stale, 95)),
                **fields))
            print(f"epoch {e + 1:>3}  loss {st['loss']:.4f}  test acc {ta:.4f}  staleness "
                  f"mean {np.mean(stale):.2f} max {np.max(stale)}  ({st['wall']:.1f}s)",
                  flush=True)
    return to_frame(rows), net
