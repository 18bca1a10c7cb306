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

needs_engines = [pytest.mark.mpi,
                 pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")]


def engines(f):
    for mark in needs_engines:
        f = mark(f)
    return f

ARGS = ["--dataset", "digits", "--subset", "193", "--test-subset", "64", "--epochs", "1",
        "--no-progress", "--seed", "5", "--batch-size", "16"]


def _rel(a, b) -> float:
    import numpy as np

    with np.load(a) as A, np.load(b) as B:
        return max(float(np.linalg.norm(A[k] - B[k]) / np.linalg.norm(B[k])) for k in B.files)


@pytest.fixture(scope="module")
def cluster():
    if MPIEXEC is None:
        pytest.skip("no mpiexec")
    cl = MPICluster(n=2, start_timeout=120, stop_timeout=30).start()
    yield cl
    cl.stop()


@engines
def test_engines_are_one_mpi_job_in_rank_order(cluster):
    assert list(cluster.info["rank"]) == [0, 1] and set(cluster.info["size"]) == {2}
    paths = cluster.push_code()
    import cnn

    assert set(paths["cnn"]) == {cnn.__file__}
    # what a %%px cell does, then rank 0's variable back
    cluster.view.execute("from mpi4py import MPI; r = MPI.COMM_WORLD.Get_rank()", block=True)
    assert cluster.pull_rank0("r") == 0


@engines
def test_ipyparallel_run_gives_the_mpiexec_weights(cluster, tmp_path):
    via_ipp, via_mpiexec = tmp_path / "ipp.npz", tmp_path / "mpiexec.npz"
    df = cluster.run([*ARGS, "--save-weights", str(via_ipp)], timeout=120)
    assert df["strategy"].iloc[0] == "allreduce" and df["processes"].iloc[0] == 2
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "cnn.parallel.mpi", *ARGS,
                           "--save-weights", str(via_mpiexec)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _rel(via_ipp, via_mpiexec) < 1e-6


@engines
def test_bad_flags_are_an_error_and_leave_the_engines_running(cluster):
    import ipyparallel as ipp

    with pytest.raises(ipp.error.CompositeError, match="needs at least 2 ranks|--sync-every"):
        cluster.run([*ARGS, "--strategy", "model-average", "--sync-every", "0"], timeout=60)
    assert len(cluster.client.ids) == 2


@engines
def test_a_failing_rank_raises_with_its_message_in_bounded_time(cluster):
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 failed: RuntimeError: injected failure"):
        cluster.run([*ARGS, "--epochs", "50", "--inject-failure", "1:2:raise"], timeout=90)
    assert time.monotonic() - t0 < 90
    assert cluster.view is None  # stopped: a broken MPI job is not reused


@engines
def test_engines_that_cannot_start_show_their_output():
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match="unrecognized argument"):
        MPICluster(n=2, mpi_args=["-no-such-hydra-flag"], start_timeout=60).start()
    assert time.monotonic() - t0 < 60


# --- experiment drivers (pure) -------------------------------------------------------------

def test_scaling_plan_pairs_each_mode_with_its_baseline():
    from cnn.parallel import cluster as C

    plan = C.scaling_plan("quick", "numba", ranks=[1, 2, 3])
    seq = [p for p in plan if p["strategy"] == "sequential"]
    assert [(p["mode"], p["argv"][p["argv"].index("--batch-size") + 1]) for p in seq] == [
        ("weak", "64"), ("strong", "128")]
    ar = {(p["mode"], p["processes"]): p for p in plan if p["strategy"] == "allreduce"}
    assert ar[("weak", 3)]["argv"][-3:] == ["64", "--experiment", "mpi_weak"]
    assert ("strong", 3) not in ar  # 128 is not divisible by 3
    ps = {(p["mode"], p["processes"]) for p in plan if p["strategy"] == "param-server"}
    assert ps == {("weak", 2), ("weak", 3), ("strong", 2), ("strong", 3)}  # 1 or 2 workers
    assert all("--backend" in p["argv"] and "numba" in p["argv"] for p in plan)
    hyb = C.hybrid_plan("quick", cores=4)
    assert [(p["processes"], p["threads"]) for p in hyb] == [(0, 1), (1, 4), (2, 2), (4, 1)]
    acc = C.accuracy_plan("quick")
    assert {p["strategy"]: p["processes"] for p in acc} == {
        "sequential": 0, "allreduce": 2, "param-server": 3, "async-param-server": 3,
        "model-average": 2}


def test_summary_efficiency_and_targets_by_hand():
    import pandas as pd

    from cnn.parallel import cluster as C

    def row(mode, strategy, P, batch, step_s, steps=11):
        # every step (the first too) takes step_s: wall = steps x step_s, compile_s = 0
        return dict(mode=mode, strategy=strategy, processes=P, threads=1, host="h",
                    batch_size=batch, step=steps, wall_s=steps * step_s, compile_s=0.0,
                    step_ms_median=step_s * 1e3, comm_s=0.1 * steps * step_s)

    df = pd.DataFrame([
        row("weak", "sequential", 1, 64, 0.1), row("weak", "allreduce", 2, 128, 0.105),
        row("weak", "param-server", 2, 64, 0.12),
        row("strong", "sequential", 1, 128, 0.2), row("strong", "allreduce", 2, 128, 0.11)])
    s = C.summarize_scaling(df).set_index(["mode", "strategy"])
    assert s.loc[("weak", "allreduce"), "step_s"] == pytest.approx(0.105)
    assert s.loc[("weak", "allreduce"), "efficiency"] == pytest.approx(0.1 / 0.105)
    assert s.loc[("strong", "allreduce"), "efficiency"] == pytest.approx(0.2 / 0.11 / 2)
    assert s.loc[("weak", "param-server"), "efficiency"] == pytest.approx(0.1 / 0.12 / 2)
    assert s.loc[("weak", "allreduce"), "comm_share"] == pytest.approx(0.1)
    assert s.loc[("weak", "allreduce"), "epoch_s"] == pytest.approx(60000 * 0.105 / 128)
    t = C.check_targets(s.reset_index())
    assert list(t["ok"]) == [True, True, True]
