"""HOGWILD!: lock-free asynchronous SGD on one shared-memory weight buffer.

    python -m cnn.parallel.hogwild --workers 2 --dataset fashion-mnist --epochs 3
    python -m cnn.parallel.hogwild --workers 2 --lock ...      # control: updates serialised

The scheme of Niu, Recht, Re and Wright (2011): ``W`` worker *processes* map the
same flat parameter buffer (``multiprocessing.shared_memory``) and each one, with
no lock, repeatedly reads the weights, computes a mini-batch gradient and writes
its update straight into the shared buffer. Updates from different workers may
interleave element by element; sparse or small conflicts cost little accuracy and
no worker ever waits for another.

How it is built here:

* **One segment.** The parent creates one ``SharedMemory`` segment holding a small
  per-worker counter table, the flat ``Network.params`` buffer (initialised by the
  parent from ``--seed``, so it starts as ``cnn.train`` does) and the training set
  (mapped, not copied, by every worker). Each worker builds its ``Network`` with
  ``params=`` a NumPy view of the segment, so the layers' weight views *are* the
  shared memory. The segment is unlinked in a ``finally`` in the parent: nothing is
  left in ``/dev/shm`` after a normal run, an error, a crashed worker or Ctrl-C.
* **Processes, started with ``spawn``.** Not threads: Numba's default threading layer
  aborts on concurrent parallel calls from several threads, and NumPy would serialise
  on the GIL anyway. ``spawn`` rather than ``fork``: a forked child inherits the
  parent's OpenMP/TBB/BLAS thread pools and locks in whatever state they were,
  which can deadlock Numba and OpenBLAS; ``spawn`` starts clean interpreters and
  behaves the same on Linux, macOS and Windows (``forkserver`` is accepted too).
  Start-up (imports, JIT) is outside the timed region.
* **Shards.** Each epoch has one deterministic order of global batches (the one
  ``cnn.train.fit`` uses, a function of ``(seed, epoch)``); worker ``w`` takes global
  batches ``w, w+W, w+2W, ...``. So the workers' shards are disjoint and cover the
  epoch, every worker sees a different random subset every epoch, and with ``W=1``
  the run *is* sequential SGD, bit for bit. The lr of a step is the schedule at its
  global batch index, so the schedule spans the whole run whatever ``W``.
* **Optimiser state is per worker** by default (``--hogwild-momentum local``, as PyTorch's
  mnist_hogwild): momentum (or Adam) buffers live in each worker's private memory and only
  accumulate its own gradients. ``shared`` puts one velocity in the segment, updated
  without a lock like the weights; ``scaled`` keeps it private with a momentum lowered for
  W workers (:mod:`cnn.parallel.hogwild_variants`).
* **Uneven workers.** ``--assign dynamic`` replaces the static shards: each worker claims
  the next unclaimed global batch of the epoch (a counter in the segment, under a lock),
  so a slow worker takes fewer batches. ``--straggler W:F`` / ``--straggler-dist`` slow a
  worker's gradient down (:mod:`cnn.parallel.delays`; it sleeps before its update);
  ``--eval-every N`` has the worker that applied global step N, 2N, ... send a copy of
  the weights, evaluated after training.
* **Epoch ends.** Workers meet the parent at the end of each epoch, so it can snapshot the
  weights for the per-epoch test accuracy; snapshots are evaluated after training,
  outside the timed region. Each worker has its own start semaphore, released once per
  epoch by the parent: with one shared counting semaphore a fast worker (or one whose
  shard of the last, ``--max-steps``-cut epoch is empty) could take a second permit and
  leave another worker waiting forever. Workers run only the epochs ``--max-steps``
  reaches. Every wait of the parent has a timeout (``--epoch-timeout``, default 30
  minutes); the error names the worker that has not finished and how far it got.
* **Staleness and collisions.** Each worker owns one cache line of the counter table:
  its number of applied updates and an "updating now" flag (one writer each, so no
  counts are lost). A step's *staleness* is the number of other workers' updates
  applied between the moment it started reading the weights and the moment it
  applies its own; a step *overlaps* when another worker's update was in progress
  at its start or end, or completed during it (a write-write collision; always 0
  with ``--lock``).
* **Checkpoints** (``--checkpoint-dir``, :mod:`cnn.parallel.hogwild_checkpoint`): after
  every epoch the parent saves the shared weights and every worker's optimiser state
  (sent with its epoch report); ``--resume`` starts the workers at the next epoch. SIGTERM
  or SIGUSR1 to the parent finish the epoch, checkpoint and stop (exit status 75); if the
  signal also killed the workers (sent to the whole process group), the last epoch's
  checkpoint stands and the exit status is 75 as well. Ctrl-C stops at once (status 130),
  keeping the completed epochs' checkpoint. (``--eval-every`` runs are not checkpointed.)
* **Failure.** A worker that raises sends its traceback and exits; one that dies
  without a word (segfault, ``os._exit``, OOM kill) is seen by polling exit codes
  every 0.2 s. Either way the parent terminates the others, unlinks the segment and
  raises :class:`HogwildWorkerError` with the worker's error text (a diverging loss
  raises :class:`~cnn.errors.DivergenceError` carrying the completed epochs' rows).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue as queue_mod
import secrets
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import pandas as pd

from cnn import checkpoint as ckpt_io
from cnn import cli
from cnn import data as cdata
from cnn.errors import CnnError, DivergenceError
from cnn.metrics import make_row, save_metrics, step_stats, to_frame
from cnn.parallel.delays import Delay, Snapshots, add_curve, add_rank_fields, add_straggler_args
from cnn.parallel.hogwild_checkpoint import EpochCheckpoint, fit_checkpoint
from cnn.parallel.hogwild_variants import (
    MOMENTUM_MODES,
    check_options,
    claim_batches,
    epoch_fields,
    snapshot_points,
    stragglers_within,
    worker_optimizer,
    worker_summaries,
)
from cnn.train import (
    CHECKPOINT,
    add_training_args,
    build_network,
    load_data,
    make_training,
    save_partial_metrics,
)

SHM_PREFIX = "cnn_hogwild_"
_LINE = 8  # int64 slots per worker in the counter table: one 64-byte cache line
_COUNT, _BUSY = 0, 1
_NEXT = 2  # line 0 only: the next global batch to claim (--assign dynamic, under its lock)
_POLL_S = 0.2
#: Seconds an epoch may take before the run is declared stalled (``--epoch-timeout``).
EPOCH_TIMEOUT_S = 1800.0


class HogwildWorkerError(CnnError, RuntimeError):
    """A HOGWILD worker raised or died; the message carries its error text."""


# --- the shared segment ----------------------------------------------------------------

def _align(n: int, a: int = 64) -> int:
    return -(-n // a) * a


def _layout(workers: int, num_params: int, dtype: np.dtype, x: np.ndarray,
            y: np.ndarray, velocity: bool = False) -> dict[str, Any]:
    """Offsets of the counter table, the weights (and the shared velocity of
    ``--hogwild-momentum shared``) and the training set in the segment."""
    lay: dict[str, Any] = {"workers": workers, "counters": 0}
    off = _align(workers * _LINE * 8)
    for key in ("params", "velocity") if velocity else ("params",):
        lay[key] = (off, (num_params,), np.dtype(dtype).str)
        off = _align(off + num_params * np.dtype(dtype).itemsize)
    lay["x"] = (off, x.shape, x.dtype.str)
    off = _align(off + x.nbytes)
    lay["y"] = (off, y.shape, y.dtype.str)
    lay["size"] = max(1, _align(off + y.nbytes))
    return lay


def _views(buf, lay: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {"counters": np.ndarray((lay["workers"], _LINE), np.int64, buffer=buf, offset=0)}
    for key in ("params", "velocity", "x", "y"):
        if key not in lay:
            continue
        off, shape, dt = lay[key]
        out[key] = np.ndarray(shape, np.dtype(dt), buffer=buf, offset=off)
    return out


# --- the worker ------------------------------------------------------------------------

@dataclass
class _Spec:
    """Everything a worker needs, picklable (sent once at spawn)."""

    shm_name: str
    layout: dict[str, Any]
    args: argparse.Namespace
    input_shape: tuple[int, ...]
    num_classes: int
    workers: int
    steps_per_epoch: int
    total_steps: int
    parent_pid: int
    fault: dict[str, Any] | None = None
    #: resumed runs start here, each worker with its saved optimiser state
    first_epoch: int = 0
    opt_states: list[dict[str, Any]] | None = None
    #: workers send their optimiser state with each epoch report (for the checkpoint)
    checkpoint: bool = False

    @property
    def epochs_run(self) -> int:
        """The epochs that have steps: all of them, or those ``--max-steps`` reaches."""
        return math.ceil(self.total_steps / self.steps_per_epoch) if self.total_steps else 0


def shard(w: int, workers: int, steps_per_epoch: int, total_steps: int, epoch: int) -> range:
    """Global batch indices (within ``epoch``) that worker ``w`` trains on: ``w, w+W, ...``,
    cut where the run's ``total_steps`` end."""
    stop = min(steps_per_epoch, max(0, total_steps - epoch * steps_per_epoch))
    return range(w, stop, workers)


def _others(counters: np.ndarray, w: int, col: int) -> int:
    return int(counters[:, col].sum() - counters[w, col])


def _wait_release(sem, parent_pid: int) -> None:
    while not sem.acquire(timeout=1.0):
        if os.getppid() != parent_pid:  # the parent is gone: nobody will release us
            os._exit(3)


def _warm_up(args: argparse.Namespace, spec: _Spec, x: np.ndarray, y: np.ndarray) -> float:
    """One step of a private scratch network: JIT compilation (Numba) and first-call costs
    happen here, before the clock starts, and never touch the shared weights."""
    t0 = time.perf_counter()
    scratch = build_network(args, spec.input_shape, spec.num_classes)
    opt, _ = make_training(scratch, args, spec.steps_per_epoch)
    b = min(args.batch_size, len(y))
    scratch.loss_and_grad(x[:b], y[:b])
    opt.step(lr=0.0)
    scratch.backend.synchronize()
    return time.perf_counter() - t0


def _my_batches(w: int, spec: _Spec, epoch: int, ctr: np.ndarray, claim):
    """The batch indices (within ``epoch``) this worker trains on: its static shard, or
    with ``--assign dynamic`` the next unclaimed batch each time it asks, so a slow worker
    takes fewer of them."""
    if claim is None:
        return iter(shard(w, spec.workers, spec.steps_per_epoch, spec.total_steps, epoch))
    base = epoch * spec.steps_per_epoch
    stop = base + min(spec.steps_per_epoch, max(0, spec.total_steps - base))
    return (g - base for g in claim_batches(ctr[0, _NEXT:_NEXT + 1], claim, stop))


def _worker(w: int, spec: _Spec, results, sem, lock, claim=None) -> None:
    """One HOGWILD worker: its batches of every epoch, updates straight into shared memory."""
    shm = None
    try:
        shm = shared_memory.SharedMemory(name=spec.shm_name)
        v = _views(shm.buf, spec.layout)
        ctr, x, y = v["counters"], v["x"], v["y"]
        args, W = spec.args, spec.workers
        net = build_network(args, spec.input_shape, spec.num_classes, params=v["params"])
        opt, sched = worker_optimizer(net, args, v, W, spec.steps_per_epoch)
        if spec.opt_states:  # resumed: this worker's momentum (Adam moments) as saved
            opt.load_state_dict(spec.opt_states[w])
        fault = spec.fault if spec.fault and spec.fault.get("worker") == w else None
        delay = Delay.for_rank(args, w)
        snaps = Snapshots(getattr(args, "eval_every", None), spec.steps_per_epoch,
                          spec.total_steps)
        warm_s = _warm_up(args, spec, x, y)
        results.put(("ready", w, {"pid": os.getpid(), "threads": net.threads,
                                  "device": net.backend.device_name(), "warm_s": warm_s}))
        n, spe = len(y), spec.steps_per_epoch
        for epoch in range(spec.first_epoch, spec.epochs_run):
            _wait_release(sem, spec.parent_pid)
            batches = list(cdata.iterate_batches(n, args.batch_size, args.seed, epoch))
            times, losses, stale, overlaps, lock_wait = [], [], [], 0, 0.0
            first = len(delay.compute_s)
            cpu0 = time.process_time()
            for k in _my_batches(w, spec, epoch, ctr, claim):
                g = epoch * spe + k
                hook = fault.get("kind", "raise") if fault and g >= fault.get("step", 0) else None
                if hook == "exit":
                    os._exit(int(fault.get("code", 7)))
                if hook == "stall":
                    time.sleep(3600)
                if hook == "raise":
                    raise RuntimeError(f"injected fault in worker {w} at step {g}")
                idx = batches[k]
                t0 = time.perf_counter()
                seen_before = _others(ctr, w, _COUNT)
                loss = math.nan if hook == "nan" else net.loss_and_grad(x[idx], y[idx])
                if not math.isfinite(loss):
                    raise DivergenceError(
                        f"loss became {loss} in worker {w} at epoch {epoch + 1}, global step "
                        f"{g + 1} (lr={sched(g):g}): training diverged. Lower --lr or use "
                        f"fewer workers.")
                delay.after(time.perf_counter() - t0)  # --straggler: a slow gradient
                if lock is not None:
                    tl = time.perf_counter()
                    lock.acquire()
                    lock_wait += time.perf_counter() - tl
                try:
                    busy_start = _others(ctr, w, _BUSY) > 0
                    ctr[w, _BUSY] = 1
                    seen_apply = _others(ctr, w, _COUNT)
                    opt.step(lr=sched(g))
                    net.backend.synchronize()
                    seen_end = _others(ctr, w, _COUNT)
                    busy_end = _others(ctr, w, _BUSY) > 0
                    ctr[w, _COUNT] += 1
                    ctr[w, _BUSY] = 0
                finally:
                    if lock is not None:
                        lock.release()
                times.append(time.perf_counter() - t0)
                losses.append(loss)
                stale.append(seen_apply - seen_before)
                overlaps += busy_start or busy_end or seen_end != seen_apply
                if snaps.due(g + 1):  # --eval-every: a copy for accuracy against time
                    results.put(("snap", w, {"step": g + 1, "t": time.perf_counter(),
                                             "params": np.array(v["params"], copy=True)}))
            results.put(("epoch", w, {"epoch": epoch, "times": times, "losses": losses,
                                      "stale": stale, "overlaps": overlaps,
                                      "lock_wait": lock_wait,
                                      "cpu_s": time.process_time() - cpu0,
                                      "compute": delay.compute_s[first:],
                                      "slept": delay.slept_s[first:],
                                      **({"opt": opt.state_dict()} if spec.checkpoint else {})}))
        del net, opt, v, ctr, x, y
        results.put(("done", w, None))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        results.put(("error", w, {"type": type(exc).__name__, "message": str(exc),
                                  "traceback": traceback.format_exc()}))
        raise SystemExit(1) from None
    finally:
        if shm is not None:
            # views still alive in a traceback: the OS unmaps at exit
            with contextlib.suppress(BufferError):
                shm.close()


# --- the parent ------------------------------------------------------------------------

def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Pool:
    """The worker processes, their message queue, and prompt crash detection."""

    def __init__(self, ctx, spec: _Spec, lock: bool, counters: np.ndarray):
        self.spec = spec
        self.counters = counters
        self.results = ctx.Queue()
        # one start semaphore per worker: a shared counting one let a worker take two
        # permits (two epochs) and leave another waiting forever
        self.sems = [ctx.Semaphore(0) for _ in range(spec.workers)]
        self.lock = ctx.Lock() if lock else None
        dynamic = getattr(spec.args, "assign", "static") == "dynamic"
        self.claim = ctx.Lock() if dynamic else None  # guards the next-batch counter
        self.procs = [ctx.Process(target=_worker, name=f"hogwild-{w}", daemon=True,
                                  args=(w, spec, self.results, self.sems[w], self.lock,
                                        self.claim))
                      for w in range(spec.workers)]
        self.inbox: list[tuple[str, int, Any]] = []
        self.finished: set[int] = set()

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def _pull(self, timeout: float) -> None:
        """Move one message to the inbox (raises ``queue.Empty``); a worker error raises."""
        msg, w, payload = self.results.get(timeout=timeout)
        if msg == "error":
            if payload["type"] == "DivergenceError":
                raise DivergenceError(payload["message"])
            raise HogwildWorkerError(f"HOGWILD worker {w} failed: {payload['type']}: "
                                     f"{payload['message']}\n{payload['traceback']}")
        if msg == "done":
            self.finished.add(w)
        self.inbox.append((msg, w, payload))

    def collect(self, kind: str, timeout: float, epoch: int | None = None) -> dict[int, Any]:
        """Wait for one ``kind`` message (of ``epoch``) from every worker; raise on any worker
        failure, or naming the late workers after ``timeout`` seconds."""
        got: dict[int, Any] = {}
        t0 = time.monotonic()
        while True:
            for m in [m for m in self.inbox if m[0] == kind and m[1] not in got
                      and (epoch is None or m[2]["epoch"] == epoch)]:
                got[m[1]] = m[2]
                self.inbox.remove(m)
            if len(got) == len(self.procs):
                return got
            try:
                self._pull(_POLL_S)
            except queue_mod.Empty:
                self._check_alive(kind)
                if time.monotonic() - t0 > timeout:
                    raise self._late(kind, epoch, sorted(set(range(len(self.procs))) - set(got)),
                                     timeout) from None

    def _late(self, kind: str, epoch: int | None, late: list[int],
              timeout: float) -> HogwildWorkerError:
        """The error naming the workers that have not reported, with how far each got."""
        spec, parts = self.spec, []
        for w in late:
            p = self.procs[w]
            if kind == "epoch" and epoch is not None:
                before = sum(len(shard(w, spec.workers, spec.steps_per_epoch, spec.total_steps,
                                       e)) for e in range(spec.first_epoch, epoch))
                mine = len(shard(w, spec.workers, spec.steps_per_epoch, spec.total_steps,
                                 epoch))
                done = int(self.counters[w, _COUNT]) - before
                parts.append(f"worker {w} (pid {p.pid}) has not finished epoch {epoch + 1}: "
                             f"{done} of its {mine} updates applied")
            else:
                parts.append(f"worker {w} (pid {p.pid}) sent no {kind!r} message")
        return HogwildWorkerError(
            f"HOGWILD stalled: {'; '.join(parts)} after {timeout:.0f} s; the run was stopped. "
            f"If epochs are legitimately this slow, raise --epoch-timeout (or "
            f"--startup-timeout)")

    def _check_alive(self, waiting_for: str) -> None:
        dead = [w for w, p in enumerate(self.procs)
                if p.exitcode is not None and w not in self.finished]
        if not dead:
            return
        try:  # its last words may still be in flight: drain them first
            while True:
                self._pull(1.0)
        except queue_mod.Empty:
            pass
        for w in dead:
            if w not in self.finished:
                p = self.procs[w]
                raise HogwildWorkerError(
                    f"HOGWILD worker {w} (pid {p.pid}) {_describe_exit(p.exitcode)} while the "
                    f"parent waited for {waiting_for!r}, without reporting an error (crash, "
                    f"os._exit or out of memory?); the other workers were stopped")

    def release(self) -> None:
        """Let every worker start its next epoch: one permit on each worker's semaphore."""
        for sem in self.sems:
            sem.release()

    def shutdown(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.results.close()
        self.results.join_thread()


def run_hogwild(args: argparse.Namespace, train: tuple[np.ndarray, np.ndarray] | None = None,
                test: tuple[np.ndarray, np.ndarray] | None = None, *,
                log: Any = print, fault: dict[str, Any] | None = None,
                return_params: bool = False):
    """Train with ``args.workers`` HOGWILD workers; one results row per epoch.

    ``args`` is the CLI's namespace (:func:`parse_args` builds one from keywords).
    ``train``/``test`` default to the dataset the args name. ``fault`` is a test hook
    (``{"worker": w, "step": s, "kind": "raise" | "exit" | "stall" | "nan"}``). With
    ``return_params`` the final shared weights are returned too, as ``(frame, params)``.
    A diverging loss raises :class:`~cnn.errors.DivergenceError` whose ``frame`` holds
    the rows of the epochs completed before it. With ``args.checkpoint_dir`` every epoch
    is checkpointed (:class:`~cnn.parallel.hogwild_checkpoint.EpochCheckpoint`),
    ``args.resume`` continues from it, and SIGTERM/SIGUSR1 stop the run after
    checkpointing, raising :class:`cnn.checkpoint.Stopped`.
    """
    signals = (signal.SIGTERM, signal.SIGUSR1) if getattr(args, "checkpoint_dir", None) else ()
    with ckpt_io.StopFlag(signals) as flag:
        return _run_hogwild(args, train, test, log=log, fault=fault,
                            return_params=return_params, flag=flag)


def _run_hogwild(args: argparse.Namespace, train, test, *, log: Any, fault: Any,
                 return_params: bool, flag: ckpt_io.StopFlag):
    if train is None:
        train, test0 = load_data(args)
        test = test if test is not None else test0
    x, y = train
    x = np.ascontiguousarray(x)
    y = np.ascontiguousarray(y)
    W = args.workers
    if isinstance(W, list | tuple):
        if len(W) != 1:
            raise ValueError(f"run_hogwild takes one worker count, got {W}; use compare()")
        W = W[0]
    W = int(W)
    args = argparse.Namespace(**{**vars(args), "workers": W})
    if W < 1:
        raise ValueError(f"--workers must be >= 1, got {W}")
    if args.threads is None:
        args = argparse.Namespace(**{**vars(args), "threads": 1})
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    check_options(args, W)
    epoch_timeout = EPOCH_TIMEOUT_S if args.epoch_timeout is None else args.epoch_timeout
    ncls = int(max(y.max(), test[1].max() if test is not None else 0)) + 1
    spe = math.ceil(len(y) / args.batch_size)
    total = spe * args.epochs if args.max_steps is None else min(args.max_steps, spe * args.epochs)
    net = build_network(args, x.shape[1:], ncls)  # initial weights, and evaluation later
    shared_v = getattr(args, "hogwild_momentum", "local") == "shared"
    lay = _layout(W, net.num_params, net.dtype, x, y, velocity=shared_v)
    strategy = "hogwild-locked" if args.lock else "hogwild"
    ck = EpochCheckpoint.for_run(args, strategy, net, len(y), spe, total)
    saved = ck.load() if ck is not None and args.resume and ck.exists() else None

    import multiprocessing as mp
    ctx = mp.get_context(args.start_method)
    shm = shared_memory.SharedMemory(create=True, size=lay["size"],
                                     name=f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}")
    pool, failure, stopped = None, None, None
    snapshots, epochs_stats, walls, starts = [], [], [], []
    first, ready, startup_s = 0, {}, math.nan
    if saved is not None:  # resumed: the finished epochs' weights and statistics
        snapshots, epochs_stats, walls = saved["snapshots"], saved["stats"], saved["walls"]
        first, ready, startup_s = saved["epochs_done"], saved["ready"], saved["startup_s"]
        starts = [math.nan] * first
    try:
        v = _views(shm.buf, lay)
        v["counters"][...] = 0
        v["counters"][0, _NEXT] = first * spe  # --assign dynamic claims from here
        v["params"][...] = net.params if saved is None else saved["params"]
        if shared_v:
            v["velocity"][...] = 0  # a resumed worker loads the saved one (its opt state)
        v["x"][...] = x
        v["y"][...] = y
        spec = _Spec(shm.name, lay, args, tuple(x.shape[1:]), ncls, W, spe, total, os.getpid(),
                     fault, first_epoch=first, checkpoint=ck is not None,
                     opt_states=saved["opt_states"] if saved is not None else None)
        try:
            if first < spec.epochs_run:
                pool = _Pool(ctx, spec, lock=args.lock, counters=v["counters"])
                t_start = time.perf_counter()
                pool.start()
                ready_now = pool.collect("ready", timeout=args.startup_timeout)
                started = time.perf_counter() - t_start
                if saved is None:  # the first start's JIT and start-up are the run's
                    ready, startup_s = ready_now, started
                if log:
                    log(f"HOGWILD: {W} worker process(es) ({args.start_method}), "
                        f"{'locked updates' if args.lock else 'lock-free'}, segment "
                        f"{shm.name} ({lay['size'] / 2**20:.1f} MiB), started in {started:.1f} s")
            for epoch in range(first, spec.epochs_run):
                t0 = time.perf_counter()
                starts.append(t0)
                pool.release()
                stats = pool.collect("epoch", timeout=epoch_timeout, epoch=epoch)
                walls.append(time.perf_counter() - t0)
                snapshots.append(v["params"].copy())
                opt_states = [stats[w].pop("opt", None) for w in range(W)]
                epochs_stats.append(stats)
                if ck is not None:
                    ck.save(v["params"], snapshots, opt_states, epochs_stats, walls, ready,
                            startup_s, min(total, (epoch + 1) * spe))
                if flag.requested and epoch + 1 < spec.epochs_run:
                    stopped = ck.stopped(flag.signum)
                    break
            else:
                if pool is not None:
                    pool.collect("done", timeout=epoch_timeout)
        except DivergenceError as exc:
            failure = exc
        except HogwildWorkerError:
            if not flag.requested:
                raise
            # the signal reached the workers too (sent to the process group): the last
            # epoch's checkpoint is where the run stopped
            stopped = ck.stopped(flag.signum)
        final = v["params"].copy()
        del v
    finally:
        if pool is not None:
            pool.shutdown()
        shm.unlink()
        with contextlib.suppress(BufferError):
            shm.close()

    if stopped is not None:
        raise stopped
    rows, seen, wall = [], 0, 0.0
    info = ready[0]
    points, copies = snapshot_points(pool.inbox if pool is not None else [], starts, walls,
                                     spe, args.batch_size, len(y))
    for e, (params, stats) in enumerate(zip(snapshots, epochs_stats, strict=True)):
        net.params[...] = params
        test_loss, test_acc = net.evaluate(*test) if test is not None else (math.nan, math.nan)
        times = [t for s in stats.values() for t in s["times"]]
        losses = [v for s in stats.values() for v in s["losses"]]
        stale = np.array([v for s in stats.values() for v in s["stale"]], dtype=np.int64)
        steps = len(times)
        batches = list(cdata.iterate_batches(len(y), args.batch_size, args.seed, e))
        samples = sum(len(b) for b in batches[:steps])
        seen += samples
        wall += walls[e]
        st = step_stats(times, 0)
        rows.append(make_row(
            experiment=args.experiment, strategy=strategy,
            backend=net.backend.NAME, processes=W, threads=info["threads"],
            device=info["device"], model=args.model, dataset=args.dataset,
            batch_size=args.batch_size, epochs=e + 1, samples=seen, wall_s=wall,
            # JIT and first-call costs, paid in each worker's untimed warm-up step
            compile_s=max(r["warm_s"] for r in ready.values()) if e == 0 else 0.0,
            step_ms_median=st["step_ms_median"], step_ms_iqr=st["step_ms_iqr"],
            samples_per_s=samples / max(walls[e], 1e-12), comm_s=0.0, test_acc=test_acc,
            final_loss=float(np.mean(losses)), epoch=e + 1, step=min(total, (e + 1) * spe),
            train_loss=float(np.mean(losses)), test_loss=test_loss, workers=W, lock=args.lock,
            staleness_mean=float(stale.mean()) if steps else math.nan,
            staleness_max=int(stale.max()) if steps else 0,
            stale_frac=float((stale > 0).mean()) if steps else math.nan,
            overlap_frac=sum(s["overlaps"] for s in stats.values()) / max(steps, 1),
            lock_wait_s=sum(s["lock_wait"] for s in stats.values()) / W,
            # CPU seconds per step: equal for 1 and W workers means no contention, whatever
            # else the machine is running (a wall-clock-free check of the speedup)
            step_cpu_ms=1e3 * sum(s["cpu_s"] for s in stats.values()) / max(steps, 1),
            updates=steps, start_method=args.start_method, startup_s=startup_s, seed=args.seed,
            lr=args.lr, momentum=args.momentum, complete_epoch=steps == spe,
            **epoch_fields(args, W, stale)))
        if log:
            r = rows[-1]
            log(f"epoch {e + 1:>3}  loss {r['train_loss']:.4f}  test acc {test_acc:.4f}  "
                f"{r['samples_per_s']:.0f} samples/s  staleness {r['staleness_mean']:.2f} "
                f"(max {r['staleness_max']})  overlaps {r['overlap_frac']:.1%}")
    df = to_frame(rows)
    if len(df):
        add_rank_fields(df, worker_summaries(epochs_stats, W))
        if getattr(args, "eval_every", None):
            results = []
            for params in copies:  # after training: outside the timed region
                net.params[...] = params
                results.append(net.evaluate(*test) if test is not None else (math.nan,) * 2)
            add_curve(df, points, results, spe)
    if failure is not None:
        failure.frame = df
        raise failure
    return (df, final) if return_params else df


# --- CLI -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m cnn.parallel.hogwild",
        description="HOGWILD! lock-free SGD: worker processes updating one shared-memory "
                    "weight buffer without locks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(p, weights=False, checkpoint_every=False)  # epoch boundaries only
    seconds = cli.number(0, lo_open=True)
    g = p.add_argument_group("HOGWILD")
    g.add_argument("--workers", type=cli.int_at_least(1), nargs="+", default=[2],
                   help="worker processes; several values run one after another")
    g.add_argument("--lock", action="store_true",
                   help="control variant: serialise the updates with one lock")
    g.add_argument("--also-lock", action="store_true",
                   help="run the locked variant too, for every worker count above 1")
    g.add_argument("--sequential", action="store_true",
                   help="also train sequentially in this process (cnn.train.fit), first")
    g.add_argument("--start-method", default="spawn", choices=["spawn", "forkserver"],
                   help="how workers start (fork is refused: unsafe with Numba/BLAS pools)")
    g.add_argument("--startup-timeout", type=seconds, default=300.0,
                   help="seconds the workers may take to start (imports, JIT)")
    g.add_argument("--epoch-timeout", type=seconds, default=EPOCH_TIMEOUT_S,
                   help="fail, naming the late worker, if an epoch takes longer (seconds)")
    g.add_argument("--hogwild-momentum", default="local", choices=MOMENTUM_MODES,
                   help="local: each worker's own velocity; shared: one velocity in the "
                        "shared segment, updated without a lock like the weights; scaled: "
                        "each worker's own, with momentum max(0, 1 - W (1 - mu)) (Mitliagkas "
                        "et al. 2016)")
    g.add_argument("--assign", default="static", choices=["static", "dynamic"],
                   help="worker w takes global batches w, w+W, ... (static), or each worker "
                        "claims the next unclaimed batch (dynamic: a slow worker takes fewer)")
    add_straggler_args(p)
    p.set_defaults(experiment="hogwild")
    return p


def parse_args(argv: list[str] | None = None, **overrides: Any) -> argparse.Namespace:
    """The CLI's namespace; keywords override (``parse_args([], workers=2, epochs=3)``)."""
    args = cli.parse(build_parser(), [] if argv is None and overrides else argv)
    for k, val in overrides.items():
        if not hasattr(args, k):
            raise TypeError(f"unknown HOGWILD option {k!r}")
        setattr(args, k, val)
    return args


def sequential_baseline(args: argparse.Namespace, train, test, *,
                        log: Any = None) -> pd.DataFrame:
    """``cnn.train.fit`` with the same args: the accuracy and speed HOGWILD is judged by."""
    from cnn.train import fit

    x, y = train
    if args.threads is None:
        args = argparse.Namespace(**{**vars(args), "threads": 1})
    ncls = int(max(y.max(), test[1].max() if test is not None else 0)) + 1
    spe = math.ceil(len(y) / args.batch_size)
    net = build_network(args, x.shape[1:], ncls)
    opt, sched = make_training(net, args, spe)
    # the same untimed scratch step the workers take (JIT, first calls)
    _warm_up(args, _Spec("", {}, args, tuple(x.shape[1:]), ncls, 1, spe, 0, 0), x, y)
    signals = (signal.SIGTERM, signal.SIGUSR1) if getattr(args, "checkpoint_dir", None) else ()
    with ckpt_io.StopFlag(signals) as flag:
        return fit(net, train, test, epochs=args.epochs, batch_size=args.batch_size,
                   optimizer=opt, schedule=sched, seed=args.seed, max_steps=args.max_steps,
                   progress=False, log=log, experiment=args.experiment, strategy="sequential",
                   processes=1, model=args.model, dataset=args.dataset, workers=1, lock=False,
                   momentum=args.momentum, **fit_checkpoint(args, flag))


def compare(args: argparse.Namespace, train=None, test=None, *, workers=(1, 2),
            also_lock: bool = False, sequential: bool = True, log: Any = print) -> pd.DataFrame:
    """Sequential (optional), then HOGWILD with each worker count (and locked, if asked)."""
    if train is None:
        train, test0 = load_data(args)
        test = test if test is not None else test0
    frames: list[pd.DataFrame] = []
    try:
        if sequential:
            if log:
                log("sequential (cnn.train.fit, this process)")
            frames.append(sequential_baseline(args, train, test, log=log))
        for w in workers:
            for lock in ([args.lock, True] if also_lock and not args.lock and w > 1
                         else [args.lock]):
                a = argparse.Namespace(**{**vars(args), "workers": int(w), "lock": lock,
                                          "straggler": stragglers_within(args, int(w))})
                frames.append(run_hogwild(a, train, test, log=log))
    except DivergenceError as exc:  # keep every row measured so far with the error
        done = [f for f in (*frames, exc.frame) if f is not None and len(f)]
        exc.frame = to_frame(pd.concat(done, ignore_index=True)) if done else None
        raise
    return to_frame(pd.concat(frames, ignore_index=True))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One line per run: throughput, speedup vs 1 lock-free worker, final accuracy and its gap
    to sequential training at equal epochs, staleness and collisions."""
    rows = []
    for (strategy, workers), g in df.groupby(["strategy", "processes"], sort=False):
        last = g.iloc[-1]
        rows.append({"strategy": strategy, "workers": int(workers),
                     "epochs": int(last["epochs"]), "wall_s": float(last["wall_s"]),
                     "samples_per_s": float(last["samples"] / last["wall_s"]),
                     "test_acc": float(last["test_acc"]),
                     "staleness_mean": float(g.get("staleness_mean", pd.Series([0.0])).mean()),
                     "overlap_frac": float(g.get("overlap_frac", pd.Series([0.0])).mean()),
                     "lock_wait_s": float(g.get("lock_wait_s", pd.Series([0.0])).sum())})
    out = pd.DataFrame(rows)
    one = out.loc[(out["strategy"] == "hogwild") & (out["workers"] == 1), "samples_per_s"]
    out["speedup_vs_1_worker"] = out["samples_per_s"] / one.iloc[0] if len(one) else math.nan
    seq = out.loc[out["strategy"] == "sequential", "test_acc"]
    out["acc_minus_sequential"] = out["test_acc"] - seq.iloc[0] if len(seq) else math.nan
    for col in ("staleness_mean", "overlap_frac", "lock_wait_s"):
        out.loc[out["strategy"] == "sequential", col] = math.nan
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    check_options(args, max(args.workers))  # before anything starts
    log = None if args.no_progress else print
    if args.resume:
        ckpt_io.require_resumable(args.checkpoint_dir, f"*/{CHECKPOINT}")
    try:
        df = compare(args, workers=args.workers, also_lock=args.also_lock,
                     sequential=args.sequential, log=log)
    except DivergenceError as exc:
        save_partial_metrics(exc, args.save_metrics)
        raise
    except ckpt_io.Stopped as exc:
        ckpt_io.exit_stopped(exc)
    if args.save_metrics:
        save_metrics(df, args.save_metrics)
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(summary(df).to_string(index=False))
    return df


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
