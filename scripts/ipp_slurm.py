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
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def slurm_cluster(n: int, nodes: int = 1, cpus_per_task: int = 1, timelimit: str = "01:00:00",
                  account: str | None = None, start_timeout: float = 900.0) -> MPICluster:
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
    return MPICluster(n, engines="slurm", start_timeout=start_timeout, config=config,
                      threads=cpus_per_task)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    with slurm_cluster(n, nodes) as cl:
        print(cl.info.to_string(index=False))
