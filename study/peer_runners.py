"""What users would run instead of the project's strategies, as CLIs the study can time.

    python -m study.peer_runners ddp --workers 2 [python -m cnn.train flags]
    python -m study.peer_runners hogwild --workers 2 [python -m cnn.train flags]
    python -m study.peer_runners joblib-kfold --jobs 2 [python -m cnn.parallel.kfold flags]

Each writes ``--save-metrics`` rows like the library's CLIs (`cnn.metrics.make_row`), so
`study.measure.run_cli` times them in fresh processes with their start-up apart (issue 12;
docs/DESIGN.md, "How a number flows from a run to the report"). All three start from what
the project's runs start from: the same data (`cnn.data`), the seed CNN's initial weights
from ``--seed`` (the torch runners load them into its twin, `cnn.twin.torch_twin`), the same
batch order (`cnn.data.iterate_batches`), the same lr schedule (`cnn.train.make_training`)
and momentum.

``ddp``
    ``torch.nn.parallel.DistributedDataParallel``, gloo backend, ``--workers`` P processes
    from ``torch.multiprocessing.spawn``, ``--threads`` (1) torch threads each. The training
    loop is the library's own `cnn.train.fit` (same batch order and step timing as the
    ``allreduce`` strategy); the step is DDP's. Rank r takes its slice of each global batch
    of ``P * --batch-size`` exactly as ``cnn.parallel.mpi`` does (`shard_bounds`); its loss
    is scaled by ``P * len(slice) / len(batch)`` so DDP's mean over ranks is the mean over
    the global batch, also for a short last batch (the factor is 1 for equal slices).
    Evaluation is sharded and summed with one ``all_reduce``. ``comm_s`` is not measured
    (DDP overlaps its allreduce with backward) and is NaN. Rank 0's ``train_loss`` is its
    own slice's mean (what a DDP user logs).
``hogwild``
    PyTorch's ``mnist_hogwild`` scheme (pytorch/examples): ``model.share_memory()``,
    ``--workers`` processes from ``torch.multiprocessing`` (spawn), one ``torch.optim.SGD``
    per process over the shared parameters, no lock, ``OMP_NUM_THREADS=1``. One change to
    make epochs comparable: in the example every process runs over the whole data set per
    epoch (W epochs of work per epoch); here worker w takes global batches w, w+W, ...
    of each epoch, as ``cnn.parallel.hogwild`` does, with the lr of the schedule at that
    global batch. Workers warm up untimed on a private copy, then start together; the
    timed region ends when the last worker is done.
``joblib-kfold``
    ``joblib.Parallel(n_jobs=--jobs)`` (loky) over the folds of ``cnn.parallel.kfold``
    (`fold_plan`), each fold the project's own `train_fold`, so the per-fold accuracies are
    those of ``python -m cnn.parallel.kfold`` bit for bit. The pool starts and warms up
    (`warm_up`: imports, data, JIT) in one untimed ``Parallel`` call first, as the engines
    do; the folds are then timed from the first dispatch to the last result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import queue as queue_mod
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn import cli
from cnn import data as cdata
from cnn.errors import CnnError, DivergenceError
from cnn.metrics import make_row, save_metrics, step_stats, to_frame
from cnn.network import Network
from cnn.parallel import kfold
from cnn.parallel.mpi import shard_bounds
from cnn.train import add_training_args, build_network, fit, load_data, make_training

TORCH_HINT = "pip install -e '.[compare]' (the optional torch extra)"
POLL_S = 0.2


class PeerRunError(CnnError, RuntimeError):
    """A peer run failed (a worker raised or died, or it timed out); names the worker."""


class TorchMissing(CnnError, RuntimeError):
    """torch is not installed; the message says how to install it."""


def require_torch() -> Any:
    """The torch module, or TorchMissing naming the extra that provides it."""
    try:
        import torch
    except ImportError:
        raise TorchMissing(f"torch is not installed: {TORCH_HINT}") from None
    return torch


def pin_torch_threads(n: int | None) -> int:
    """torch's intra-op pool at ``n`` (default 1) threads and its inter-op pool at 1 (as
    OMP_NUM_THREADS=1 does for the other pools); returns ``torch.get_num_threads()``."""
    torch = require_torch()
    torch.set_num_threads(int(n or 1))
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)
    return int(torch.get_num_threads())


def torch_fields(threads: int) -> dict[str, Any]:
    """The columns every torch row carries: torch's version and thread settings."""
    torch = require_torch()
    return {"torch_version": str(torch.__version__), "torch_threads": float(threads)}


def exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process when its parent is gone (a killed runner
    must not leave workers behind)."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def initial_network(args: argparse.Namespace, input_shape: Sequence[int],
                    num_classes: int) -> Network:
    """The seed CNN with the project's initial weights for ``--seed`` (NumPy backend: the
    weights are drawn on the host, the same for every backend)."""
    ns = argparse.Namespace(**{**vars(args), "backend": "numpy", "threads": 1})
    return build_network(ns, tuple(input_shape), num_classes)


def torch_sgd(model: Any, args: argparse.Namespace) -> Any:
    """``torch.optim.SGD`` with the run's hyperparameters (the project's SGD is its twin)."""
    torch = require_torch()
    if args.optimizer != "sgd":
        raise ValueError(f"the torch peers run SGD only (the seed study's optimiser), got "
                         f"--optimizer {args.optimizer}")
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov, weight_decay=args.weight_decay)


def as_tensors(x: np.ndarray, y: np.ndarray, dtype: Any) -> tuple[Any, Any]:
    torch = require_torch()
    return (torch.from_numpy(np.ascontiguousarray(x)).to(dtype),
            torch.from_numpy(np.asarray(y, dtype=np.int64)))


def torch_scores(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 1000
                 ) -> np.ndarray:
    """``[loss sum, correct, count]`` of ``model`` on ``(x, y)`` (no gradients)."""
    torch = require_torch()
    dtype = next(model.parameters()).dtype
    out = np.zeros(3)
    with torch.no_grad():
        for lo in range(0, len(y), batch_size):
            xb, yb = as_tensors(x[lo:lo + batch_size], y[lo:lo + batch_size], dtype)
            logits = model(xb)
            out[0] += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            out[1] += int((logits.argmax(1) == yb).sum())
    out[2] = len(y)
    return out


def save_torch_weights(model: Any, net: Network, path: str | os.PathLike) -> None:
    """The torch model's weights through the project's Network (same ``.npz`` format)."""
    net.load_state_dict({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    net.save(path)


# --- ddp -------------------------------------------------------------------------------

class TorchBackend:
    """The part of a backend `cnn.train.fit` uses, for a torch model on the CPU."""

    NAME = "torch"

    @staticmethod
    def synchronize() -> None:
        return None

    @staticmethod
    def device_name() -> str:
        return "cpu"


class TorchNet:
    """What `cnn.train.fit` needs of a network (backend, threads, evaluate, config), for a
    torch model: the library's loop then drives torch's step unchanged. ``config`` is the
    project network's the twin was made from (fit records it with a run's identity)."""

    def __init__(self, model: Any, evaluate: Callable[..., tuple[float, float]],
                 threads: int, net: Network):
        self.model = model
        self.backend = TorchBackend()
        self.threads = threads
        self.evaluate = evaluate
        self.config = net.config


def ddp_step(ddp: Any, opt: Any, rank: int, size: int) -> Callable[..., float]:
    """One DDP step on this rank's slice of the global batch (weighting: module doc)."""
    torch = require_torch()
    dtype = next(ddp.parameters()).dtype
    cross_entropy = torch.nn.functional.cross_entropy

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        n = len(yb)
        lo, hi = shard_bounds(n, size, rank)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        xt, yt = as_tensors(xb[lo:hi], yb[lo:hi], dtype)
        out = ddp(xt)
        if hi > lo:
            loss = cross_entropy(out, yt)
            (loss * (size * (hi - lo) / n)).backward()
            value = loss.item()
        else:  # an empty slice still joins the allreduce, with zero gradients
            (out.sum() * 0.0).backward()
            value = 0.0
        opt.step()
        return value

    return step


def sharded_evaluate(model: Any, rank: int, size: int) -> Callable[..., tuple[float, float]]:
    """Each rank scores its part of the split; one ``all_reduce`` sums them."""
    torch = require_torch()
    dist = torch.distributed

    def evaluate(x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        lo, hi = shard_bounds(len(y), size, rank)
        sums = torch.from_numpy(torch_scores(model, x[lo:hi], y[lo:hi], batch_size))
        dist.all_reduce(sums)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])

    return evaluate


def ddp_rank(rank: int, size: int, args: argparse.Namespace, init_method: str,
             parent_pid: int) -> None:
    """One DDP rank (``torch.multiprocessing.spawn`` target); rank 0 writes the results."""
    torch = require_torch()
    dist = torch.distributed
    from torch.nn.parallel import DistributedDataParallel

    from cnn.twin import torch_twin

    exit_with_parent(parent_pid)
    threads = pin_torch_threads(args.threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=args.timeout))
    try:
        train, test = load_data(args)
        x, y = train
        net = initial_network(args, x.shape[1:], int(max(y.max(), test[1].max())) + 1)
        model = torch_twin(net).train()
        ddp = DistributedDataParallel(model)
        opt = torch_sgd(ddp, args)
        global_batch = size * args.batch_size
        # the project's twin optimiser: fit records its kind; torch's SGD takes the steps
        described, sched = make_training(net, args, math.ceil(len(y) / global_batch))
        tnet = TorchNet(ddp, sharded_evaluate(model, rank, size), threads, net)
        log = print if rank == 0 and not args.no_progress else None
        if log:
            log(f"torch-ddp: {size} rank(s), gloo, global batch {global_batch} "
                f"({args.batch_size} per rank), torch {torch.__version__}, {threads} thread(s)")
        dist.barrier()
        df = fit(tnet, train, test, epochs=args.epochs, batch_size=global_batch,
                 optimizer=described, schedule=sched, seed=args.seed,
                 max_steps=args.max_steps, progress=False,
                 step_fn=ddp_step(ddp, opt, rank, size), log=log,
                 experiment=args.experiment, strategy="torch-ddp", processes=size,
                 model=args.model, dataset=args.dataset, batch_per_rank=args.batch_size,
                 **torch_fields(threads))
        if rank == 0:
            df["comm_s"] = math.nan  # DDP overlaps its allreduce with backward: not measured
            if args.save_metrics:
                save_metrics(df, args.save_metrics)
            if args.save_weights:
                save_torch_weights(model, net, args.save_weights)
    finally:
        dist.destroy_process_group()


def ddp_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.peer_runners ddp",
                                description="PyTorch DistributedDataParallel (gloo) on the "
                                            "seed CNN's twin: the peer of allreduce.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(p, checkpoints=False)
    p.add_argument("--workers", type=cli.int_at_least(1), default=2,
                   help="DDP processes (ranks)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="gloo collective timeout, seconds (a stuck rank fails the run)")
    p.set_defaults(experiment="peers_ddp", threads=1)
    return p


def ddp_main(argv: Sequence[str]) -> pd.DataFrame | None:
    args = cli.parse(ddp_parser(), argv)
    torch = require_torch()
    with tempfile.TemporaryDirectory(prefix="peers_ddp_") as d:
        init = (Path(d) / "rendezvous").as_uri()
        torch.multiprocessing.spawn(ddp_rank, args=(args.workers, args, init, os.getpid()),
                                    nprocs=args.workers, join=True)
    return pd.read_pickle(args.save_metrics) if args.save_metrics else None


# --- hogwild ---------------------------------------------------------------------------

def hogwild_worker(w: int, workers: int, args: argparse.Namespace, model: Any, xt: Any, yt: Any,
                   sched: Any, steps_per_epoch: int, total: int, go: Any, results: Any,
                   parent_pid: int) -> None:
    """One mnist_hogwild process: its own SGD over the shared parameters, batches
    w, w+W, ... of every epoch, lr of the schedule at the global batch."""
    try:
        torch = require_torch()
        exit_with_parent(parent_pid)
        threads = pin_torch_threads(args.threads)
        cross_entropy = torch.nn.functional.cross_entropy
        n = len(yt)
        t0 = time.perf_counter()  # untimed warm-up on a private copy: first-call costs
        scratch = copy.deepcopy(model)
        first = torch.arange(min(args.batch_size, n))
        cross_entropy(scratch(xt[first]), yt[first]).backward()
        warm_s = time.perf_counter() - t0
        del scratch
        opt = torch_sgd(model, args)
        results.put(("ready", w, {"pid": os.getpid(), "threads": threads, "warm_s": warm_s}))
        while not go.wait(1.0):
            pass
        times, losses, cpu0 = [], [], time.process_time()
        for epoch in range(args.epochs):
            batches = list(cdata.iterate_batches(n, args.batch_size, args.seed, epoch))
            losses = []
            for k in range(w, steps_per_epoch, workers):
                g = epoch * steps_per_epoch + k
                if g >= total:
                    break
                idx = torch.from_numpy(batches[k])
                t = time.perf_counter()
                for group in opt.param_groups:
                    group["lr"] = sched(g)
                opt.zero_grad()
                loss = cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise DivergenceError(f"loss became {losses[-1]} in worker {w} at global "
                                          f"step {g + 1}: lower --lr or use fewer workers")
        results.put(("done", w, {"times": times, "losses": losses,
                                 "cpu_s": time.process_time() - cpu0}))
    except BaseException:  # noqa: BLE001 - the parent reports it, naming the worker
        results.put(("error", w, traceback.format_exc()))
        raise SystemExit(1) from None


def collect(results: Any, procs: Sequence[Any], kind: str, timeout: float | None
            ) -> dict[int, Any]:
    """One ``kind`` message from every worker; a worker's error, a dead worker or the
    timeout raise PeerRunError naming the worker."""
    got: dict[int, Any] = {}
    t0 = time.perf_counter()
    while len(got) < len(procs):
        try:
            what, w, payload = results.get(timeout=POLL_S)
        except queue_mod.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(procs)
                    if i not in got and p.exitcode not in (None, 0)]
            if dead:
                raise PeerRunError(f"worker {dead[0][0]} died (exit code {dead[0][1]}) "
                                   f"waiting for '{kind}'") from None
            if timeout is not None and time.perf_counter() - t0 > timeout:
                missing = sorted(set(range(len(procs))) - set(got))
                raise PeerRunError(f"worker(s) {missing} sent no '{kind}' within "
                                   f"{timeout:.0f} s") from None
            continue
        if what == "error":
            print(payload, file=sys.stderr, flush=True)  # the worker's traceback, then one line
            last = payload.strip().splitlines()[-1] if payload.strip() else "no traceback"
            raise PeerRunError(f"worker {w} failed: {last}")
        if what == kind:
            got[w] = payload
    return got


def epoch_samples(n: int, batch_size: int, seed: int, epochs: int, total: int) -> list[int]:
    """Samples of each epoch the run trained (``total`` global batches in all)."""
    out, spe = [], math.ceil(n / batch_size)
    for e in range(epochs):
        steps = max(0, min(spe, total - e * spe))
        if steps:
            out.append(sum(len(b) for b in list(cdata.iterate_batches(n, batch_size, seed,
                                                                      e))[:steps]))
    return out


def hogwild_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.peer_runners hogwild",
                                description="PyTorch's mnist_hogwild scheme on the seed CNN's "
                                            "twin: the peer of cnn.parallel.hogwild.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(p, checkpoints=False)
    p.add_argument("--workers", type=cli.int_at_least(1), default=2, help="worker processes")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds the workers may take to start (imports, warm-up)")
    p.add_argument("--timeout", type=float, default=None,
                   help="fail if training takes longer than this (seconds)")
    p.set_defaults(experiment="peers_hogwild", threads=1)
    return p


def hogwild_main(argv: Sequence[str]) -> pd.DataFrame:
    args = cli.parse(hogwild_parser(), argv)
    W = int(args.workers)
    torch = require_torch()
    from cnn.twin import torch_twin

    threads = pin_torch_threads(args.threads)
    (x, y), test = load_data(args)
    net = initial_network(args, x.shape[1:], int(max(y.max(), test[1].max())) + 1)
    model = torch_twin(net).train()
    model.share_memory()
    spe = math.ceil(len(y) / args.batch_size)
    _, sched = make_training(net, args, spe)
    total = spe * args.epochs if args.max_steps is None else min(args.max_steps,
                                                                 spe * args.epochs)
    xt, yt = as_tensors(x, y, next(model.parameters()).dtype)
    xt.share_memory_()
    yt.share_memory_()
    ctx = torch.multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=hogwild_worker, daemon=True,
                         args=(w, W, args, model, xt, yt, sched, spe, total, go, results,
                               os.getpid())) for w in range(W)]
    t0 = time.perf_counter()
    try:
        for p in procs:
            p.start()
        ready = collect(results, procs, "ready", args.startup_timeout)
        startup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        go.set()
        done = collect(results, procs, "done", args.timeout)
        wall = time.perf_counter() - t1
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    per_epoch = epoch_samples(len(y), args.batch_size, args.seed, args.epochs, total)
    times = [t for d in done.values() for t in d["times"]]
    last = [v for d in done.values() for v in d["losses"]]
    loss_sum, correct, count = torch_scores(model, *test)
    samples = float(sum(per_epoch))
    steps = {k: v for k, v in step_stats(times, 0).items() if k != "compile_s"}
    row = make_row(
        experiment=args.experiment, strategy="torch-hogwild", backend="torch", processes=W,
        threads=ready[0]["threads"], device="cpu", model=args.model, dataset=args.dataset,
        batch_size=args.batch_size, epochs=len(per_epoch), samples=samples, wall_s=wall,
        compile_s=max(r["warm_s"] for r in ready.values()), **steps,
        samples_per_s=samples / max(wall, 1e-12), comm_s=0.0, test_acc=correct / count,
        test_loss=loss_sum / count, final_loss=float(np.mean(last)),
        train_loss=float(np.mean(last)), epoch=len(per_epoch), step=total, workers=W,
        step_cpu_ms=1e3 * sum(d["cpu_s"] for d in done.values()) / max(len(times), 1),
        updates=len(times), start_method="spawn", pool_startup_s=startup_s, seed=args.seed,
        lr=args.lr, momentum=args.momentum, complete_epoch=total % spe == 0,
        **torch_fields(ready[0]["threads"]))
    df = to_frame([row])
    if not args.no_progress:
        print(f"torch-hogwild: {W} worker(s), {samples / wall:.0f} samples/s, test acc "
              f"{correct / count:.4f} (torch {torch.__version__}, {threads} thread(s))")
    if args.save_metrics:
        save_metrics(df, args.save_metrics)
    if args.save_weights:
        save_torch_weights(model, net, args.save_weights)
    return df


# --- joblib k-fold ---------------------------------------------------------------------

def fold_config(args: argparse.Namespace, n: int, num_classes: int) -> dict[str, Any]:
    """The config `cnn.parallel.kfold.train_fold` takes: the CLI's flags, one thread per
    worker, the plan's size and class count (as ``run_kfold`` builds it)."""
    cfg = dict(vars(args))
    if cfg.get("threads") is None:
        cfg["threads"] = 1
    cfg.update(_n=n, _num_classes=num_classes, _parent_pid=os.getpid())
    for k in ("save_metrics", "save_weights", "checkpoint_dir", "resume", "engines", "jobs"):
        cfg.pop(k, None)
    return cfg


def joblib_parser() -> argparse.ArgumentParser:
    p = kfold.build_parser()
    p.prog = "python -m study.peer_runners joblib-kfold"
    p.description = ("joblib.Parallel (loky) over the folds, each fold cnn.parallel.kfold's "
                     "own train_fold: the peer of k-fold on ipyparallel engines.")
    p.add_argument("--jobs", type=cli.int_at_least(1), default=2,
                   help="joblib n_jobs (loky worker processes)")
    p.set_defaults(experiment="peers_kfold")
    return p


def joblib_main(argv: Sequence[str]) -> pd.DataFrame:
    from joblib import Parallel, __version__, delayed, parallel_config

    args = cli.parse(joblib_parser(), argv)
    E = int(args.jobs)
    _, y = cdata.load(args.dataset, "train", data_dir=args.data_dir, subset=args.subset)
    plan = kfold.fold_plan(y, args.folds, seed=args.seed, stratified=not args.no_stratify)
    cfg = fold_config(args, len(y), int(y.max()) + 1)
    # loky would give each worker cpu_count // n_jobs BLAS/OpenMP threads: one, as the engines
    with parallel_config(backend="loky", inner_max_num_threads=1), \
            Parallel(n_jobs=E, timeout=args.timeout) as par:
        pids = par(delayed(kfold.warm_up)(cfg) for _ in range(E))  # untimed: start + JIT
        sampler = kfold.CpuSampler(args.cpu_interval)
        with sampler:
            t0, t_wall0 = time.perf_counter(), time.time()
            results = par(delayed(kfold.train_fold)(cfg, k, tr, va)
                          for k, (tr, va) in enumerate(plan))
            wall = time.perf_counter() - t0
    common = dict(experiment=args.experiment, strategy="joblib-kfold", processes=E,
                  model=args.model, dataset=args.dataset, batch_size=args.batch_size,
                  epochs=args.epochs, folds=args.folds, engines=float(E), mode="parallel",
                  seed=args.seed, joblib_version=__version__)
    rows = []
    for r in results:
        rows.append(make_row(kind="fold", **common, fold=r["fold"], test_acc=r["test_acc"],
                             test_loss=r["test_loss"], final_loss=r["final_loss"],
                             samples=r["samples"], wall_s=r["t_end"] - r["t_start"],
                             train_wall_s=r["train_wall_s"], start_s=r["t_start"] - t_wall0,
                             end_s=r["t_end"] - t_wall0, pid=r["pid"], engine=-1,
                             compile_s=r["compile_s"], step_ms_median=r["step_ms_median"],
                             step_ms_iqr=r["step_ms_iqr"], backend=r["backend"],
                             threads=r["threads"], device=r["device"], comm_s=0.0,
                             samples_per_s=r["samples"] / max(r["train_wall_s"], 1e-12)))
    accs = np.array([r["test_acc"] for r in results])
    samples = float(sum(r["samples"] for r in results))
    busy = sampler.busy()
    rows.append(make_row(
        kind="run", **common, backend=results[0]["backend"], threads=results[0]["threads"],
        device=results[0]["device"], samples=samples, wall_s=wall,
        compile_s=sum(r["compile_s"] for r in results), samples_per_s=samples / wall,
        comm_s=0.0, test_acc=float(accs.mean()),
        test_acc_std=float(accs.std(ddof=1)) if len(accs) > 1 else math.nan,
        final_loss=float(np.mean([r["final_loss"] for r in results])),
        warm_workers=float(len(set(pids))), cpu_busy=busy,
        cpu_busy_min=min(busy) if busy else math.nan, cpu_times=list(sampler.times),
        cpu_samples=list(sampler.samples), cpu_own_mean=sampler.own_mean()))
    df = to_frame(rows)
    if not args.no_progress:
        print(f"joblib-kfold: {args.folds} folds on {E} job(s), {wall:.1f} s, accuracy "
              f"{accs.mean():.4f}; per fold {[round(a, 4) for a in accs]}")
    if args.save_metrics:
        save_metrics(df, args.save_metrics)
    return df


# --- CLI ---------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Sequence[str]], Any]] = {
    "ddp": ddp_main, "hogwild": hogwild_main, "joblib-kfold": joblib_main}
USAGE = ("usage: python -m study.peer_runners {ddp,hogwild,joblib-kfold} [flags]\n"
         "       python -m study.peer_runners RUNNER --help   (the runner's flags)\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n" + (__doc__ or ""))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in RUNNERS:
        print(f"error: unknown runner {name!r}; choose one of {', '.join(RUNNERS)}",
              file=sys.stderr)
        return 2
    return cli.run(RUNNERS[name], rest)  # a CnnError: "error: ..." and status 2


if __name__ == "__main__":
    from study import peer_runners  # workers pickle by this module's name, not __main__

    raise SystemExit(peer_runners.main())
