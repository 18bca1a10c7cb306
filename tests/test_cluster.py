"""ipyparallel MPI engines: same weights as mpiexec, errors that show output, bounded waits."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytest.importorskip("ipyparallel")

from cnn.parallel.cluster import EngineStartError, MPICluster, RankFailure, find_mpiexec  # noqa: E402

try:
    MPIEXEC = find_mpiexec()
except EngineStartError:
    MPIEXEC = None

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")]

ARGS = ["--dataset", "digits", "--subset", "193", "--test-subset", "64", "--epochs", "1",
        "--no-progress", "--seed", "5", "--batch-size", "16"]


def _rel(a, b) -> float:
    import numpy as np

    with np.load(a) as A, np.load(b) as B:
        return max(float(np.linalg.norm(A[k] - B[k]) / np.linalg.norm(B[k])) for k in B.files)


@pytest.fixture(scope="module")
def cluster():
    cl = MPICluster(n=2, start_timeout=120, stop_timeout=30).start()
    yield cl
    cl.stop()


def test_engines_are_one_mpi_job_in_rank_order(cluster):
    assert list(cluster.info["rank"]) == [0, 1] and set(cluster.info["size"]) == {2}
    paths = cluster.push_code()
    import cnn

    assert set(paths["cnn"]) == {cnn.__file__}
    # what a %%px cell does, then rank 0's variable back
    cluster.view.execute("from mpi4py import MPI; r = MPI.COMM_WORLD.Get_rank()", block=True)
    assert cluster.pull_rank0("r") == 0


def test_ipyparallel_run_gives_the_mpiexec_weights(cluster, tmp_path):
    via_ipp, via_mpiexec = tmp_path / "ipp.npz", tmp_path / "mpiexec.npz"
    df = cluster.run([*ARGS, "--save-weights", str(via_ipp)], timeout=120)
    assert df["strategy"].iloc[0] == "allreduce" and df["processes"].iloc[0] == 2
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "cnn.parallel.mpi", *ARGS,
                           "--save-weights", str(via_mpiexec)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _rel(via_ipp, via_mpiexec) < 1e-6


def test_bad_flags_are_an_error_and_leave_the_engines_running(cluster):
    import ipyparallel as ipp

    with pytest.raises(ipp.error.CompositeError, match="needs at least 2 ranks|--sync-every"):
        cluster.run([*ARGS, "--strategy", "model-average", "--sync-every", "0"], timeout=60)
    assert len(cluster.client.ids) == 2


def test_a_failing_rank_raises_with_its_message_in_bounded_time(cluster):
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 failed: RuntimeError: injected failure"):
        cluster.run([*ARGS, "--epochs", "50", "--inject-failure", "1:2:raise"], timeout=90)
    assert time.monotonic() - t0 < 90
    assert cluster.view is None  # stopped: a broken MPI job is not reused


def test_engines_that_cannot_start_show_their_output():
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match="unrecognized argument"):
        MPICluster(n=2, mpi_args=["-no-such-hydra-flag"], start_timeout=60).start()
    assert time.monotonic() - t0 < 60
