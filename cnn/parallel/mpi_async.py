"""The asynchronous parameter server (``--strategy async-param-server``): rank 0 applies
each worker's gradient as it arrives and answers that worker alone, with the newest
weights and the next piece of work; the staleness of every update is recorded.

``--staleness-aware`` scales each gradient's lr by its staleness (:func:`staleness_lr`);
``--assign dynamic`` hands the next piece to whichever worker asks first, so a slow
worker (``--straggler``) computes fewer pieces instead of holding the run up.
Collective: every rank of ``Run.comm`` calls :func:`train_async`.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd

from cnn import data as cdata
from cnn.errors import DivergenceError
from cnn.metrics import make_row, step_stats, to_frame
from cnn.network import Network
from cnn.parallel.delays import Snapshots, add_curve, add_rank_fields
from cnn.parallel.mpi_strategies import (
    TAG_GRAD,
    TAG_WEIGHTS,
    CollectiveError,
    Run,
    check_options,
    evaluate_copies,
    shard_bounds,
    wait_all,
)
from cnn.train import make_training

__all__ = ["async_strategy_name", "staleness_lr", "train_async"]


def staleness_lr(lr: float, staleness: int, rule: str) -> float:
    """``--staleness-aware``: the lr of a gradient ``staleness`` updates old. ``max1``:
    lr / max(1, s) (Zhang et al. 2016); ``plus1``: lr / (1 + s), so that in steady state
    (s = W - 1 with W workers) the W updates of one global batch add up to one
    synchronous step's lr."""
    s = max(int(staleness), 0)
    return lr / (1 + s) if rule == "plus1" else lr / max(1, s)


def async_strategy_name(args: argparse.Namespace) -> str:
    """``async-param-server``, ``-stale`` (lr / max(1, s)) or ``-stale1`` (lr / (1 + s))."""
    if not getattr(args, "staleness_aware", False):
        return "async-param-server"
    return "async-param-server-stale1" if args.staleness_rule == "plus1" else \
        "async-param-server-stale"


def train_async(run: Run) -> tuple[pd.DataFrame, Network]:
    """Rank 0 applies gradients as they arrive; workers compute the pieces it hands out.

    A piece is one worker slice of one global batch: piece ``p`` is slice ``p % W`` of
    global batch ``p // W`` (in the data order of ``cnn.train.fit``). Worker w starts with
    piece w - 1; each reply carries the weights, their version and the worker's next piece
    (-1: done). ``--assign static`` gives worker w slice w of every global batch;
    ``--assign dynamic`` gives the next unassigned piece to whichever worker asks, so a slow
    worker computes fewer pieces instead of holding the run up. Every piece is computed
    exactly once either way. An epoch row covers W x steps-per-epoch applied updates (with
    dynamic assignment a fast worker may deliver a piece of the next epoch before a slow
    worker's last one; the run's total is exact).
    """
    from mpi4py import MPI

    check_options(run)
    a, comm, P = run.args, run.comm, run.size
    W = P - 1
    x, y = run.train
    global_batch = W * a.batch_size
    steps_per_epoch = math.ceil(len(y) / global_batch)
    total_steps = steps_per_epoch * a.epochs
    if a.max_steps is not None:
        total_steps = min(total_steps, a.max_steps)
    pieces = W * total_steps
    net, wbuf = run.network_in_buffer(2)  # weights, version, next piece (server: send)
    n, dtype = net.num_params, net.dtype
    if pieces + W >= 2 ** 24 and dtype == np.float32:
        raise CollectiveError("async-param-server sends versions as float32: fewer than 2**24 "
                              "updates please (or --dtype float64)")
    comm.Bcast(net.params, root=0)
    opt, sched = make_training(net, a, steps_per_epoch)
    ck = run.ckpt.async_resume(net, opt, wbuf) if run.ckpt is not None else None
    spin = a.server_wait == "spin"
    dynamic = getattr(a, "assign", "static") == "dynamic"
    aware = bool(getattr(a, "staleness_aware", False))
    strategy = async_strategy_name(a)
    if run.rank == 0:
        print(net.summary())
        print(f"{strategy}: 1 server + {W} workers, {a.batch_size} per worker, "
              f"{steps_per_epoch} global steps/epoch, {a.assign} assignment", flush=True)
    comm.Barrier()

    per_epoch_msgs = W * steps_per_epoch
    snapshots: list[np.ndarray] = []
    snaps = Snapshots(a.eval_every, steps_per_epoch, total_steps)
    if run.rank == 0:
        run.training_rank = False
        rbuf = np.empty(n + 4, dtype=dtype)  # grads, loss, samples, version, piece
        status = MPI.Status()
        applied, stale, ep_stats, handed, copying = 0, [], [], W, 0.0
        loss_sum = count = seen = 0.0
        t_start = time.perf_counter()
        u0 = 0
        if ck is not None:  # a resumed run continues the server's counters and statistics
            u0, applied, stale, ep_stats, handed = ck.u, ck.applied, ck.stale, ck.ep_stats, \
                ck.handed
            loss_sum, count, seen, snapshots = ck.loss_sum, ck.count, ck.seen, ck.snapshots
            t_start -= ck.wall
        for u in range(u0, pieces):
            run.tick()
            wait_all([comm.Irecv(rbuf, source=MPI.ANY_SOURCE, tag=TAG_GRAD)], spin, status)
            src = status.Get_source()
            n_r = float(rbuf[n + 1])
            if n_r > 0:
                s = applied - int(rbuf[n + 2])
                stale.append(s)
                net.grads[...] = rbuf[:n]
                lr = sched(min(u // W, total_steps - 1))
                opt.step(lr=staleness_lr(lr, s, a.staleness_rule) if aware else lr)
                applied += 1
                loss_sum += float(rbuf[n]) * n_r
                count += n_r
                seen += n_r
            if dynamic:
                nxt, handed = (handed, handed + 1) if handed < pieces else (-1, handed)
            else:
                nxt = int(rbuf[n + 3]) + W
                nxt = nxt if nxt < pieces else -1
            wbuf[n], wbuf[n + 1] = applied, nxt
            comm.Send(wbuf, dest=src, tag=TAG_WEIGHTS)
            if (u + 1) % W == 0 and snaps.due((u + 1) // W):
                copying += snaps.take((u + 1) // W, time.perf_counter() - t_start - copying,
                                      seen, wbuf[:n])
            if (u + 1) % per_epoch_msgs == 0 or u + 1 == pieces:
                snapshots.append(np.array(wbuf[:n], copy=True))
                ep_stats.append(dict(wall=time.perf_counter() - t_start, loss=loss_sum / max(
                    count, 1), samples=count, stale=list(stale), step=(u + 1) // W,
                    complete=(u + 1) % per_epoch_msgs == 0))
                loss_sum = count = 0.0
                stale = []
            if ck is not None and ck.server_after(
                    u + 1, src, nxt, pieces, per_epoch_msgs, rbuf, dict(
                        applied=applied, stale=stale, ep_stats=ep_stats, loss_sum=loss_sum,
                        count=count, seen=seen, handed=handed, snapshots=snapshots,
                        wall=time.perf_counter() - t_start)):
                break  # stopped on a signal: checkpointed, workers drained
        worker_log: list[list[tuple[int, float, float]]] = []
    else:
        send = np.empty(n + 4, dtype=dtype)
        log: list[tuple[int, float, float]] = []  # (epoch, step seconds, comm seconds so far)
        piece = ck.first_piece if ck is not None else run.rank - 1  # resumed: as saved
        order: tuple[int, list] = (-1, [])
        while piece >= 0:
            g, j = divmod(piece, W)
            epoch, k = divmod(g, steps_per_epoch)
            if order[0] != epoch:
                order = (epoch, list(cdata.iterate_batches(len(y), global_batch, a.seed, epoch)))
            idx = order[1][k]
            t0 = time.perf_counter()
            run.tick()
            lo, hi = shard_bounds(len(idx), W, j)
            if hi > lo:
                part = idx[lo:hi]
                loss = run.loss(net.loss_and_grad(x[part], y[part]))
                if not math.isfinite(loss):
                    raise DivergenceError(f"loss became {loss} on worker {run.rank} at "
                                          f"global step {g + 1}: lower --lr")
                send[:n] = net.grads
                send[n], send[n + 1] = loss, hi - lo
            else:
                send[:n + 2] = 0
            send[n + 2], send[n + 3] = wbuf[n], piece
            run.straggle(t0)
            t1 = time.perf_counter()
            comm.Send(send, dest=0, tag=TAG_GRAD)
            comm.Recv(wbuf, source=0, tag=TAG_WEIGHTS)
            t2 = time.perf_counter()
            run.comm_s += t2 - t1
            log.append((epoch, t2 - t0, run.comm_s))
            piece = int(wbuf[n + 1])  # -1: done; -2: stopped (the stop protocol)
            if ck is not None and piece >= 0:
                ck.worker_after()  # passes this rank's own stop signal to the server
        worker_log = [log]
    if ck is not None:
        run.ckpt.agree_stopped(ck)  # raises Stopped on every rank after a stop
    logs = comm.gather(worker_log, root=0)  # once, after training: pickle is fine here
    summaries = comm.gather(run.delay.summary(), root=0)

    # evaluation of each epoch's snapshot and of the --eval-every copies, outside the timed
    # loop, sharded over all ranks
    copies = snapshots + snaps.params if run.rank == 0 else []
    results = evaluate_copies(run, net, copies)
    ends, mids = results[:len(snapshots)], results[len(snapshots):]
    # every rank now holds the server's final weights

    rows = []
    if run.rank == 0:
        flat = [entry for ranks in logs for wl in ranks for entry in wl]
        fields = run.row_fields(strategy, train_ranks=W, assign=a.assign)
        seen_rows = 0
        for e, (st, (tl, ta)) in enumerate(zip(ep_stats, ends, strict=True)):
            # none for an epoch trained before a resume (the workers' logs are not saved)
            times = [t for (ep, t, _) in flat if ep == e]
            comm_per_worker = [max([c for (ep, _, c) in wl if ep <= e], default=0.0)
                               for ranks in logs for wl in ranks]
            stale = st["stale"] or [0]
            prev_wall = ep_stats[e - 1]["wall"] if e else 0.0
            seen_rows += int(st["samples"])
            rows.append(make_row(
                epoch=e + 1, step=st["step"], batch_size=global_batch, epochs=e + 1,
                samples=seen_rows, wall_s=st["wall"],
                **(step_stats(times, warmup=min(1, len(times) - 1)) if times else {}),
                samples_per_s=st["samples"] / max(st["wall"] - prev_wall, 1e-12),
                comm_s=float(np.mean(comm_per_worker)) if comm_per_worker else 0.0,
                train_loss=st["loss"], final_loss=st["loss"], test_loss=tl, test_acc=ta,
                lr=sched(max(st["step"] - 1, 0)), backend=net.backend.NAME,
                threads=net.threads, device=net.backend.device_name(),
                complete_epoch=st["complete"], staleness_mean=float(np.mean(stale)),
                staleness_max=int(np.max(stale)), staleness_p95=float(np.percentile(stale, 95)),
                staleness_hist=np.bincount(np.asarray(stale, dtype=np.int64)).tolist(),
                **fields))
            print(f"epoch {e + 1:>3}  loss {st['loss']:.4f}  test acc {ta:.4f}  staleness "
                  f"mean {np.mean(stale):.2f} max {np.max(stale)}  ({st['wall']:.1f}s)",
                  flush=True)
    df = to_frame(rows)
    if run.rank == 0 and len(df):
        add_rank_fields(df, summaries)
        if a.eval_every:
            add_curve(df, snaps.points, mids, steps_per_epoch)
    return df, net
