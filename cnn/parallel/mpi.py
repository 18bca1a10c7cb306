"""MPI data-parallel training with mpi4py: allreduce, parameter server, model averaging, hybrid.

    mpiexec -n P python -m cnn.parallel.mpi --strategy S [every python -m cnn.train flag]

Strategies (``--strategy``):

``allreduce``
    Weights broadcast from rank 0. Every global batch of ``P * --batch-size`` samples
    (``cnn.data.iterate_batches(n, P*b, seed, epoch)``, so global batch k holds the same
    samples whatever P) is split into P disjoint contiguous slices: rank r takes
    ``np.array_split(idx, P)[r]`` (:func:`shard_bounds`). Each rank scales its local mean
    gradient by ``len(slice) / len(batch)`` and one ``Allreduce`` (SUM) on the flat gradient
    buffer gives the mean over the global batch, also for a short last batch. Every rank
    then takes the same optimiser step, so P ranks x batch b give the weights of one
    process with batch P*b (up to float rounding). ``--overlap`` starts non-blocking
    ``Iallreduce``s of gradient buckets (``--bucket-kb``, layers grouped from the output
    backwards as in PyTorch DDP) while backward is still running.
``param-server``
    Rank 0 holds the weights and the optimiser and does not train; the W = P-1 workers
    split each global batch of ``W * --batch-size`` (worker w takes
    ``np.array_split(idx, W)[w-1]``), ``Send`` their scaled gradients, the server sums
    them in rank order, steps and sends the weights back; workers ``Recv`` them. Same
    weights as one process with batch W*b.
``async-param-server``
    As above, but the server applies each gradient as it arrives (``ANY_SOURCE``) and
    replies to that worker only; workers go on with their last weights. The staleness of
    each update (updates applied since the worker's weights were read) is recorded.
    Each worker gradient is the mean over its own slice; the server runs W updates per
    global batch, with the lr of schedule step ``updates // W``.
``model-average``
    Local SGD: each rank steps its own optimiser on its own slice and the weights are
    averaged with one ``Allreduce`` every ``--sync-every k`` steps (and at the end of each
    epoch), weighted by the samples each rank saw since the last average. Optimiser
    state (momentum) stays local. With k = 1 and plain SGD this is ``allreduce``.

Hybrid MPI x threads: any strategy with ``--threads T --backend numba`` runs T Numba
threads in each rank. Give each rank its own T cores and keep every other pool at 1:

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=T \\
        mpiexec -n P -bind-to core:T python -m cnn.parallel.mpi --backend numba --threads T ...

(``-bind-to core:T`` is MPICH Hydra's; Open MPI spells it ``--map-by slot:PE=T
--bind-to core``). P x T should not exceed the physical cores of the node; on several
nodes put P/nodes ranks on each (``-ppn``), see ``scripts/``.

Measurements: step times are those of ``cnn.train.fit`` (rank 0's clock); ``comm_s`` is the
time spent inside MPI calls averaged over the training ranks (workers, for the parameter
server), which includes waiting for the slowest rank; evaluation runs outside the timed
steps, each rank on its share of the test split, reduced with ``Allreduce``. Rank 0 alone
writes ``--save-metrics`` and ``--save-weights`` (atomically).

Failures: an exception on any rank prints ``rank r failed: ...`` and calls
``MPI.COMM_WORLD.Abort`` (status 2 with the message alone for a ``CnnError`` such as
divergence, whose completed epochs rank 0 first writes to ``--save-metrics``; status 1
with the traceback otherwise), which ends every rank; a rank killed outright is detected
by ``mpiexec`` (MPICH: "BAD TERMINATION ... RANK r"), which ends the job. Flags are
validated as they are parsed, on every rank; rank 0's are then broadcast and compared on
every rank (NaN equals NaN), and so is a digest of the loaded data: a mismatch is an
error naming the flag and the ranks, with exit status 2 and no abort. Rank 0 checks the
output paths before any data loads. MPICH's named shared-memory segment is unlinked
from /dev/shm as soon as every rank has mapped it (:func:`release_shm_names`), so no
abnormal end leaves it behind.

Checkpoints, resume and signals (:mod:`cnn.parallel.mpi_checkpoint`): with
``--checkpoint-dir DIR`` rank 0 writes ``DIR/checkpoint.npz`` atomically at every epoch's end
(and every ``--checkpoint-every N`` steps); ``--resume`` continues it exactly (bit for bit
for the synchronous strategies at the same number of ranks). SIGTERM, SIGINT or SIGUSR1
delivered to the ranks (``mpiexec`` forwards all three; SLURM's ``--signal``, ``scancel
--signal``, a kill of ``srun``) make every rank finish its step; the ranks agree on the
step, rank 0 writes one checkpoint there, prints ``stopped on SIGUSR1 after step k; ...``
and every rank exits with status 75 (``EXIT_REQUEUE``: run the same command with
``--resume``; ``scripts/slurm_mpi.sbatch`` requeues the job). Ctrl-C twice interrupts at
once. A resumed run with another model, dataset, strategy or global batch is refused
before the data loads, naming the flag; a corrupt checkpoint is refused naming the file.
``--backup-workers`` and ``--eval-every`` runs cannot be checkpointed (refused).

Exit status: 0 done; 2 bad flags, data or checkpoint (every rank, or an abort after a
rank's CnnError); 1 an unexpected exception (abort, traceback); 75 stopped on a signal
after checkpointing; a rank killed outright: mpiexec's status for it (e.g. 9).

The strategies themselves live in :mod:`cnn.parallel.mpi_strategies` and
:mod:`cnn.parallel.mpi_async`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn import checkpoint as ckpt_io
from cnn import cli
from cnn.errors import CnnError, DivergenceError
from cnn.metrics import to_frame
from cnn.parallel.delays import add_straggler_args
from cnn.parallel.mpi_async import train_async
from cnn.parallel.mpi_checkpoint import MPICheckpoint
from cnn.parallel.mpi_strategies import (
    Bucket,
    CollectiveError,
    Run,
    make_buckets,
    shard_bounds,
    train_sync,
)
from cnn.train import add_training_args, finish_run, load_data, save_partial_metrics

__all__ = ["STRATEGIES", "Bucket", "CollectiveError", "build_parser", "compare_flags",
           "main", "make_buckets", "parse_failure",
           "release_shm_names", "run_or_abort", "shard_bounds"]

STRATEGIES: tuple[str, ...] = ("allreduce", "param-server", "async-param-server", "model-average")
#: Flags that may differ between ranks (none do today; kept explicit for the check).
PER_RANK_FLAGS: frozenset[str] = frozenset()
#: MPICH's named shared-memory segments (``mpich_shm_<world id>_<node>``, and one per extra
#: VCI): created at MPI_Init, unlinked only by MPI_Finalize, so left in /dev/shm by any
#: job that ends without it (a killed rank, MPI_Abort).
MPICH_SHM_NAME = re.compile(r"^mpich_(shm|vci)_[0-9a-f]+_\d+$")
FAILURE_MODES = ("raise", "kill", "nan", "signal")


class _ArgumentError(Exception):
    pass


class _Parser(cli.ArgumentParser):
    """The CLI's parser, raising instead of printing and exiting on every rank."""

    def error(self, message: str):  # type: ignore[override]
        raise _ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpiexec -n P python -m cnn.parallel.mpi",
                description=__doc__.split("\n\n")[0],
                epilog="Strategies, hybrid placement and failure handling: see the module "
                       "docstring (python -c 'import cnn.parallel.mpi as m; help(m)').",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("parallel")
    g.add_argument("--strategy", default="allreduce", choices=STRATEGIES)
    g.add_argument("--overlap", action="store_true",
                   help="allreduce: reduce gradient buckets with Iallreduce during backward")
    g.add_argument("--bucket-kb", type=cli.int_at_least(1), default=1024,
                   help="--overlap: gradient bucket size in KiB (whole layers per bucket)")
    g.add_argument("--sync-every", type=cli.int_at_least(1), default=4,
                   help="model-average: average the weights every k local steps")
    g.add_argument("--server-wait", default="sleep", choices=["sleep", "spin"],
                   help="parameter server: poll with short sleeps (frees the core for a "
                        "worker when ranks share cores) or spin in MPI_Wait")
    g.add_argument("--backup-workers", type=cli.int_at_least(0), default=0, metavar="B",
                   help="param-server: apply the mean of the first W-B worker gradients of "
                        "each step and drop the late ones (Chen et al. 2016)")
    g.add_argument("--staleness-aware", action="store_true",
                   help="async-param-server: scale each gradient's lr by its staleness s "
                        "(--staleness-rule)")
    g.add_argument("--staleness-rule", default="max1", choices=["max1", "plus1"],
                   help="--staleness-aware: lr / max(1, s) (Zhang et al. 2016) or lr / (1 + s) "
                        "(W updates of one global batch add up to one synchronous step)")
    g.add_argument("--assign", default="static", choices=["static", "dynamic"],
                   help="async-param-server: worker w takes slice w of every global batch "
                        "(static), or the server hands the next slice to whichever worker "
                        "asks (dynamic: a slow worker computes fewer)")
    g.add_argument("--inject-failure", default=None, type=failure_arg,
                   metavar="RANK:STEP:raise|kill|nan|signal",
                   help="testing: make RANK raise an exception, SIGKILL itself, see a NaN "
                        "loss (divergence) or send itself SIGUSR1 (checkpoint and stop, with "
                        "--checkpoint-dir) at its STEP-th training step (1-based)")
    add_straggler_args(p)
    add_training_args(p)
    p.set_defaults(experiment="mpi")
    return p


def parse_failure(spec: str | None) -> tuple[int, int, str] | None:
    """``"RANK:STEP:MODE"`` -> ``(rank, step, mode)``; None for no failure."""
    if not spec:
        return None
    try:
        rank, step, mode = spec.split(":")
        out: tuple[int, int, str] | None = (int(rank), int(step), mode)
    except ValueError:
        out = None
    if out is None or out[2] not in FAILURE_MODES or out[1] < 1 or out[0] < 0:
        raise CollectiveError(f"--inject-failure wants RANK:STEP:{'|'.join(FAILURE_MODES)}, "
                              f"got {spec!r}")
    return out


def failure_arg(text: str) -> str:
    """An argparse type: a valid ``--inject-failure`` spec (kept as text)."""
    try:
        parse_failure(text)
    except CollectiveError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(" wants ", 1)[1]) from None
    return text


def compare_flags(mine: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Names of the flags whose values differ from rank 0's (``ref``); NaN equals NaN."""
    keys = sorted(set(mine) | set(ref))
    return [k for k in keys
            if k not in PER_RANK_FLAGS and not cli.values_equal(mine.get(k), ref.get(k))]


def release_shm_names(comm: Any) -> list[str]:
    """Unlink the MPICH shared-memory segments this process maps, once every rank of
    ``comm`` has mapped them (after a Barrier); returns their paths.

    The memory stays shared for as long as a rank maps it; only the name in /dev/shm
    goes, so a job killed later (a rank SIGKILLed, MPI_Abort) leaves nothing behind.
    MPICH opens the segment by name only during MPI_Init, and MPI_Finalize tolerates
    the missing name. Segments are found in /proc/self/maps: only this job's.
    """
    comm.Barrier()  # every rank is past MPI_Init: all have opened the segment
    mine = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rstrip("\n").split(None, 5)[-1]
                if path.startswith("/dev/shm/") and MPICH_SHM_NAME.match(Path(path).name):
                    mine.add(path)
    except OSError:  # not Linux: nothing to do
        return []
    for path in sorted(mine):
        Path(path).unlink(missing_ok=True)  # another local rank may have been first
    return sorted(mine)


def _check_world(run: Run) -> None:
    a = run.args
    if a.strategy in ("param-server", "async-param-server") and run.size < 2:
        raise CollectiveError(f"{a.strategy} needs at least 2 ranks (1 server + workers), "
                              f"got {run.size}: mpiexec -n 3 ...")
    if a.backend == "cuda":
        raise CollectiveError("the MPI strategies run on host-memory backends: use --backend "
                              "numpy or numba")
    if a.overlap and a.strategy != "allreduce":
        raise CollectiveError("--overlap applies to --strategy allreduce only")


# --- entry points --------------------------------------------------------------------

def data_digest(train, test) -> str:
    """A short hash of the loaded data (shapes, dtypes, a sample of rows), compared
    across ranks: different files on different nodes would train different models."""
    h = hashlib.sha256()
    for arr in (*train, *test):
        a = np.ascontiguousarray(arr)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a[:: max(1, len(a) // 64)].tobytes())  # a sample of rows: cheap, enough
    return h.hexdigest()[:16]


def _parse(comm, argv: list[str] | None) -> argparse.Namespace:
    """Parse on every rank; errors and mismatches become CollectiveErrors on every rank.
    Output paths are checked on rank 0 (the one that writes), before any data loads."""
    argv = sys.argv[1:] if argv is None else list(argv)
    err, args = None, None
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as exc:
        err = str(exc)
    errors = comm.allgather(err)
    if any(errors):
        bad = [r for r, e in enumerate(errors) if e]
        msgs = sorted({e for e in errors if e})
        who = "every rank" if len(bad) == len(errors) else f"rank(s) {bad}"
        raise CollectiveError(f"bad arguments on {who}: {'; '.join(msgs)} (see --help)")
    mine = vars(args)
    ref = comm.bcast(mine if comm.Get_rank() == 0 else None, root=0)
    diffs = comm.allgather({k: mine.get(k) for k in compare_flags(mine, ref)})
    bad = {}
    for r, d in enumerate(diffs):
        for k, v in d.items():
            bad.setdefault(k, []).append(f"{v!r} on rank {r}")
    if bad:
        parts = [f"{cli.flag(k)} is {ref.get(k)!r} on rank 0 but {', '.join(v)}"
                 for k, v in sorted(bad.items())]
        raise CollectiveError("mismatched flags across ranks: " + "; ".join(parts))
    problem = None
    if comm.Get_rank() == 0:
        try:
            cli.check_outputs(args)
        except CnnError as exc:
            problem = str(exc)
    problem = comm.bcast(problem, root=0)
    if problem:
        raise CollectiveError(problem)
    return args


def main(argv: list[str] | None = None, comm: Any = None) -> pd.DataFrame | None:
    """Run one strategy on every rank of ``comm`` (default COMM_WORLD); rank 0 returns the
    per-epoch results frame, the other ranks an empty frame. Collective: call on all ranks."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        if comm.Get_rank() == 0:
            build_parser().print_help()
        return None
    release_shm_names(comm)
    args = _parse(comm, argv)
    failure = parse_failure(args.inject_failure)
    signal_at = None
    if failure is not None and failure[2] == "signal":
        signal_at, failure = (failure[0], failure[1]), None
    # with a checkpoint to write, a signal checkpoints at a step every rank agrees on
    with ckpt_io.StopFlag(ckpt_io.STOP_SIGNALS if args.checkpoint_dir else ()) as flag:
        return _train(comm, args, failure, signal_at, flag)


def _train(comm: Any, args: argparse.Namespace, failure: tuple[int, int, str] | None,
           signal_at: tuple[int, int] | None, flag: ckpt_io.StopFlag) -> pd.DataFrame:
    from mpi4py import MPI

    ckpt = MPICheckpoint(comm, args, flag, signal_at) if args.checkpoint_dir else None
    if ckpt is not None and args.resume:
        ckpt.preflight()  # a checkpoint of another run is refused before the data loads
    train, test = load_data(args)
    digests = comm.allgather(data_digest(train, test))
    if len(set(digests)) > 1:
        raise CollectiveError(f"ranks loaded different data (digest per rank: {digests}): "
                              "check --data-dir / $CNN_DATA_DIR on every node")
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    where = comm.gather((os.getpid(), MPI.Get_processor_name()), root=0)
    if comm.Get_rank() == 0:  # maps the PID in an mpiexec "BAD TERMINATION" note to a rank
        print("ranks: " + ", ".join(f"{r}=pid {p}@{h}" for r, (p, h) in enumerate(where)),
              flush=True)
    run = Run(comm=comm, args=args, train=train, test=test, num_classes=num_classes,
              failure=failure, ckpt=ckpt)
    _check_world(run)
    if ckpt is not None:
        ckpt.run = run
    try:
        if args.strategy == "async-param-server":
            df, net = train_async(run)
        else:
            df, net = train_sync(run)
    except DivergenceError as exc:
        if comm.Get_rank() == 0:
            save_partial_metrics(exc, args.save_metrics)
        raise
    if comm.Get_rank() != 0:
        return to_frame([])
    finish_run(df, net, args)
    return df


def run_or_abort(argv: list[str] | None = None, comm: Any = None) -> int:
    """``main`` with the failure policy: a CollectiveError exits 2 on every rank (rank 0
    prints it); a stop on a signal (every rank, at the same step, after the checkpoint)
    exits :data:`cnn.checkpoint.EXIT_REQUEUE` (75); any other exception prints ``rank r
    failed: ...`` and aborts the job: with status 2 and the message alone for a
    :class:`CnnError` (divergence, missing data), with status 1 and the traceback for
    anything else."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    rank = comm.Get_rank()
    try:
        main(argv, comm)
        return 0
    except CollectiveError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ckpt_io.Stopped as exc:
        if rank == 0:
            sys.stdout.flush()
            print(exc, file=sys.stderr, flush=True)
        return ckpt_io.EXIT_REQUEUE
    except BaseException as exc:  # noqa: BLE001 - any failure must end the whole job
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        sys.stdout.flush()
        if isinstance(exc, CnnError):
            code, detail = 2, ""
        else:
            code, detail = 1, "".join(traceback.format_exception(exc))
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}\n{detail}"
              f"rank {rank}: aborting all {comm.Get_size()} ranks", file=sys.stderr, flush=True)
        # mpiexec forwards a rank's output asynchronously; an immediate Abort can tear the
        # job down before the message naming the failed rank reaches the user
        time.sleep(1.0)
        comm.Abort(code)
        return code  # not reached


if __name__ == "__main__":
    sys.exit(run_or_abort())
