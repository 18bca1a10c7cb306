"""ipyparallel on SLURM: MPI engines as a batch job, driven from a notebook on a login node.

    from scripts.ipp_slurm import slurm_cluster      # or copy the function into a cell
    with slurm_cluster(n=16, nodes=4, account="myproject") as cl:
        cl.push_code()                                # checkout on a shared file system
        df = cl.run(["--strategy", "allreduce", "--dataset", "fashion-mnist",
                     "--backend", "numba", "--threads", "4", "--epochs", "5"])

The controller runs where the notebook runs (it must be reachable from the compute nodes:
``controller_ip`` below listens on every interface); the engines are one SLURM job started
with ``srun ... ipengine --mpi``, so ``MPI.COMM_WORLD`` spans them exactly as under
``mpiexec``. Threads per engine: ``cpus_per_task`` (``NUMBA_NUM_THREADS`` follows it).
Run from the command line with ``python scripts/ipp_slurm.py N NODES`` to check that the
engines come up (prints their ranks and hosts).

No engines are left behind: leaving the ``with`` block (normally, on an error or on
Ctrl-C) shuts the engines down and cancels their job; while the cluster is up, SIGTERM and
SIGHUP (``scancel`` of a job running the notebook, a closed terminal) become
``SystemExit``, so they leave the block the same way. Only a SIGKILL of this process
skips that; the engines' job then ends at its ``timelimit``.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn.parallel.cluster import MPICluster  # noqa: E402

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
                  account: str | None = None, start_timeout: float = 900.0) -> SlurmMPICluster:
    """An :class:`MPICluster` whose engines are a SLURM job of ``n`` MPI ranks.

    ``start_timeout`` covers the time the job waits in the queue.
    """
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


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    with slurm_cluster(n, nodes) as cl:
        print(cl.info.to_string(index=False))
