"""study.cluster on real ipyparallel MPI engines at tiny sizes: they start as one MPI job,
a strategy run on them gives the weights of the same mpiexec job, a failing rank raises
RankFailure naming it in bounded time, and stop leaves no engine process behind."""

from __future__ import annotations

import subprocess
import sys
import time

import ipyparallel as ipp
import numpy as np
import psutil
import pytest

import cnn
from study.checks import compare
from study.cluster import EngineStartError, MPICluster, RankFailure, run_coroutine
from study.measure import find_mpiexec

pytestmark = pytest.mark.mpi

ARGS = ["--dataset", "digits", "--subset", "193", "--test-subset", "64", "--epochs", "1",
        "--no-progress", "--seed", "5", "--batch-size", "16"]


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE:
                out.append(int(pid))
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(scope="module")
def cluster():
    cl = MPICluster(n=2, start_timeout=120, stop_timeout=30).start()
    yield cl
    cl.stop()


def test_engines_are_one_mpi_job_in_rank_order_importing_this_checkout(cluster):
    assert list(cluster.info["rank"]) == [0, 1] and set(cluster.info["size"]) == {2}
    assert set(cluster.info["cnn"]) == {cnn.__file__}
    assert set(cluster.push_code()["cnn"]) == {cnn.__file__}
    # what a %%px cell does, then rank 0's variable back
    cluster.view.execute("from mpi4py import MPI; r = MPI.COMM_WORLD.Get_rank()", block=True)
    assert cluster.pull_rank0("r") == 0


def test_ipyparallel_run_gives_the_mpiexec_weights(cluster, tmp_path):
    via_ipp, via_mpiexec = tmp_path / "ipp.npz", tmp_path / "mpiexec.npz"
    df = cluster.run([*ARGS, "--save-weights", str(via_ipp)], timeout=120)
    assert df["strategy"].iloc[0] == "allreduce" and df["processes"].iloc[0] == 2
    proc = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, "-m", "cnn.parallel.mpi",
                           *ARGS, "--save-weights", str(via_mpiexec)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(via_ipp) as got, np.load(via_mpiexec) as want:
        assert sorted(got.files) == sorted(want.files)
        for k in want.files:
            check = compare(got[k], want[k], k, tol=1e-6)
            assert check.ok, check.line()


def test_bad_flags_are_an_error_and_leave_the_engines_running(cluster):
    with pytest.raises(ipp.error.CompositeError, match="--sync-every"):
        cluster.run([*ARGS, "--strategy", "model-average", "--sync-every", "0"], timeout=60)
    assert len(cluster.client.ids) == 2


def test_a_failing_rank_raises_rank_failure_naming_it_in_bounded_time():
    cl = MPICluster(n=2, start_timeout=120, stop_timeout=30).start()
    pids = list(cl.info["pid"])
    t0 = time.monotonic()
    try:
        with pytest.raises(RankFailure, match=r"rank 1 failed: RuntimeError: injected failure"):
            cl.run([*ARGS, "--epochs", "50", "--inject-failure", "1:2:raise"], timeout=90)
    finally:
        cl.stop()
    assert time.monotonic() - t0 < 90
    assert cl.view is None  # stopped: a broken MPI job is not reused
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(pids) == []


def test_stop_leaves_no_engine_processes():
    cl = MPICluster(n=2, start_timeout=120, stop_timeout=30).start()
    pids = list(cl.info["pid"])
    assert len(alive(pids)) == 2
    cl.stop()
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(pids) == []
    assert cl.cluster is None and cl.client is None and cl.ranks == {}


def test_engines_that_cannot_start_show_their_output():
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match="unrecognized argument"):
        MPICluster(n=2, mpi_args=["-no-such-hydra-flag"], start_timeout=60).start()
    assert time.monotonic() - t0 < 60


def test_run_coroutine_is_bounded():
    import asyncio

    async def slow():
        await asyncio.sleep(5)

    async def quick():
        return 7

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="sleeping took longer than 0s"):
        run_coroutine(slow, 0.2, "sleeping")
    assert time.monotonic() - t0 < 3
    assert run_coroutine(quick, 5, "adding") == 7


def test_slurm_cluster_is_one_job_of_n_mpi_engines():
    import importlib.util

    from study import paths

    spec = importlib.util.spec_from_file_location(
        "ipp_slurm", paths.project_root() / "scripts" / "ipp_slurm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cl = mod.slurm_cluster(8, nodes=2, cpus_per_task=4, account="proj")
    assert (cl.n, cl.engines, cl.env["NUMBA_NUM_THREADS"]) == (8, "slurm", "4")
    script = cl.extra_config["SlurmEngineSetLauncher"]["batch_template"]
    for line in ("#SBATCH --ntasks=8", "#SBATCH --nodes=2", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --account=proj", "NUMBA_NUM_THREADS=4", "{program_and_args}"):
        assert line in script
    assert cl.extra_config["EngineLauncher"]["engine_args"] == ["--mpi"]
    assert cl.cluster is None  # nothing started
    with pytest.raises(ValueError, match="must be >= 1"):
        mod.slurm_cluster(0)
