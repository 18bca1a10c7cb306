#!/usr/bin/env python
"""ipyparallel MPI engines as a SLURM job, driven from a notebook on a login node.

    .venv/bin/python scripts/ipp_slurm.py 16 --nodes 4 --account myproject   # check they start

From a notebook (the checkout and its venv on a shared file system)::

    import sys; sys.path.insert(0, "scripts")
    from ipp_slurm import slurm_cluster
    with slurm_cluster(16, nodes=4, cpus_per_task=4, account="myproject") as cl:
        df = cl.run(["--strategy", "allreduce", "--dataset", "fashion-mnist",
                     "--backend", "numba", "--threads", "4", "--epochs", "5"])

The controller runs where the notebook runs (it must be reachable from the compute
nodes: it listens on every interface); the engines are one SLURM job started with
``srun ... ipengine --mpi``, so ``MPI.COMM_WORLD`` spans them exactly as under
``mpiexec``. Threads per engine: ``--cpus-per-task`` (``NUMBA_NUM_THREADS`` follows it).
`study.cluster.MPICluster` does the rest: timeouts (``--start-timeout`` covers the time
the job waits in the queue), the engines' output on failure, rank order.

No engines are left behind: leaving the ``with`` block (normally, on an error or on
Ctrl-C) shuts the engines down and ends their job; while the cluster is up, SIGTERM and
SIGHUP (``scancel`` of a job running the notebook, a closed terminal) become
``SystemExit``, so they leave the block the same way. Only a SIGKILL of this process
skips that; the engines' job then ends at its ``--time`` limit.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study.cluster import MPICluster  # noqa: E402

TEMPLATE = """#!/bin/bash
#SBATCH --job-name=ipengine-{cluster_id}
#SBATCH --ntasks={n}
#SBATCH --nodes={nodes}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={timelimit}
#SBATCH --output=ipengine-%j.out
{account_line}
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS={cpus_per_task}
srun --mpi=pmi2 --cpu-bind=cores {program_and_args}
"""


class SlurmMPICluster(MPICluster):
    """An MPICluster that a SIGTERM or SIGHUP of this process still stops (see above)."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def start(self) -> SlurmMPICluster:
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers live there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._exit)
        try:
            return super().start()
        except BaseException:
            self._restore()
            raise

    @staticmethod
    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def _restore(self) -> None:
        for s, handler in getattr(self, "_previous", {}).items():
            signal.signal(s, handler)
        self._previous = {}

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._restore()


def slurm_cluster(n: int, nodes: int = 1, cpus_per_task: int = 1, timelimit: str = "01:00:00",
                  account: str | None = None, start_timeout: float = 900.0
                  ) -> SlurmMPICluster:
    """An (unstarted) `MPICluster` whose engines are a SLURM job of ``n`` MPI ranks, stopped
    by SIGTERM/SIGHUP too (:class:`SlurmMPICluster`)."""
    if n < 1 or nodes < 1 or cpus_per_task < 1:
        raise ValueError(f"n, nodes and cpus_per_task must be >= 1, got {n}, {nodes}, "
                         f"{cpus_per_task}")
    template = TEMPLATE.format(
        cluster_id="{cluster_id}", n=n, nodes=nodes, cpus_per_task=cpus_per_task,
        timelimit=timelimit, account_line=f"#SBATCH --account={account}" if account else "",
        program_and_args="{program_and_args}")
    config = {
        "SlurmEngineSetLauncher": {"batch_template": template},
        # engines initialise mpi4py (like MPIEngineSetLauncher's --mpi)
        "EngineLauncher": {"engine_args": ["--mpi"]},
        "Cluster": {"controller_ip": "*"},
    }
    return SlurmMPICluster(n, engines="slurm", start_timeout=start_timeout, config=config,
                           threads=cpus_per_task)


def main(argv: list[str] | None = None) -> int:
    head, _, rest = (__doc__ or "").partition("\n\n")
    p = argparse.ArgumentParser(prog="scripts/ipp_slurm.py", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, nargs="?", default=4, help="MPI ranks (engines), default 4")
    p.add_argument("--nodes", type=int, default=1, help="nodes to spread them over")
    p.add_argument("--cpus-per-task", type=int, default=1, help="cores (threads) per rank")
    p.add_argument("--time", default="01:00:00", help="SLURM time limit of the engines' job")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds to wait for the engines, queueing included")
    args = p.parse_args(argv)
    with slurm_cluster(args.n, args.nodes, args.cpus_per_task, args.time, args.account,
                       args.start_timeout) as cl:
        print(cl.info.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
