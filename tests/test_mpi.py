"""MPI strategies with real mpiexec and real ranks: same math as one process, failures end
the job, mismatched flags are caught. Tiny data (digits subsets) and few steps throughout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn import data
from cnn.models import seed_cnn
from cnn.parallel.mpi import (
    Bucket,
    build_parser,
    compare_flags,
    make_buckets,
    shard_bounds,
)
from cnn.train import main as train_main


def _mpich_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("mpich_*")} if shm.is_dir() else set()


def _mapped_segments() -> set[str]:
    """Names of /dev/shm files some live process maps (another job's, still running)."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        names.update(m.group(1) for m in re.finditer(r"/dev/shm/(mpich_\S+)", text))
    return names


@pytest.fixture(autouse=True)
def no_leaked_shm_segments():
    """Nothing a test's MPI job creates may stay in /dev/shm, however it ended (before: a
    killed or aborted rank left mpich_shm_* behind). A new segment that a live process
    still maps belongs to another job running meanwhile, not to this test."""
    before = _mpich_segments()
    yield
    leaked = _mpich_segments() - before - _mapped_segments()
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
PROG = [sys.executable, "-m", "cnn.parallel.mpi"]
# 193 = 6 x 32 + 1: the last global batch has one sample, so one rank's slice is empty
COMMON = ["--dataset", "digits", "--subset", "193", "--test-subset", "64", "--epochs", "1",
          "--no-progress", "--seed", "5"]


def mpirun(n: int, args: list[str], timeout: float = 120, cwd: Path | None = None,
           mpmd: list[list[str]] | None = None) -> subprocess.CompletedProcess:
    """``mpiexec -n n python -m cnn.parallel.mpi args`` (or MPMD blocks ``-n 1 ... : ...``)."""
    if mpmd is None:
        cmd = [MPIEXEC, "-n", str(n), *PROG, *args]
    else:
        cmd = [MPIEXEC]
        for i, block in enumerate(mpmd):
            cmd += ([":"] if i else []) + ["-n", "1", *PROG, *block]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    return proc


def rel_err(a: Path, b: Path) -> float:
    with np.load(a) as A, np.load(b) as B:
        assert sorted(A.files) == sorted(B.files)
        return max(float(np.linalg.norm(A[k] - B[k]) / np.linalg.norm(B[k])) for k in B.files)


# --- pure helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 31, 32, 193])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_shard_bounds_is_array_split(n, parts):
    expect = np.array_split(np.arange(n), parts)
    for k in range(parts):
        lo, hi = shard_bounds(n, parts, k)
        np.testing.assert_array_equal(np.arange(lo, hi), expect[k])


def test_buckets_cover_the_gradient_buffer_backwards():
    net = seed_cnn((1, 28, 28))
    for kb in (1, 64, 1024, 1 << 20):
        buckets = make_buckets(net, kb * 1024)
        assert buckets[0].hi == net.num_params and buckets[-1].lo == 0
        for a, b in zip(buckets, buckets[1:], strict=False):
            assert a.lo == b.hi and a.ready_after > b.ready_after
    assert len(make_buckets(net, 1 << 40)) == 1
    assert make_buckets(net, 1)[0] == Bucket(9, net.slot("9.weight").offset, net.num_params)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_hooked_backward_is_loss_and_grad(backend):
    (x, y) = data.load("digits", "train", subset=24)
    a = seed_cnn((1, 8, 8), padding=1, seed=1, backend=backend)
    b = seed_cnn((1, 8, 8), padding=1, seed=1, backend=backend)
    seen = []
    la = a.loss_and_grad(x, y)
    lb = b.loss_and_grad(x, y, on_layer=seen.append)
    assert la == lb
    np.testing.assert_array_equal(a.grads, b.grads)
    assert seen == list(range(9, -1, -1))


def test_flag_comparison_and_parser():
    p = build_parser()
    a = vars(p.parse_args(["--lr", "0.1"]))
    b = vars(p.parse_args(["--lr", "0.2", "--seed", "1"]))
    assert compare_flags(a, b) == ["lr", "seed"]
    assert p.parse_args([]).experiment == "mpi"
    # before: "--lr is nan on rank 0 but nan on rank 1" (NaN never equals itself)
    nan = float("nan")
    assert compare_flags({**a, "lr": nan}, {**a, "lr": nan}) == []
    assert compare_flags({**a, "lr": nan}, {**a, "lr": 0.1}) == ["lr"]


# --- real ranks --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> dict[str, Path]:
    """One process, batch 32: the reference (with and without momentum)."""
    out = tmp_path_factory.mktemp("seq")
    refs = {}
    for name, extra in {"momentum": [], "plain": ["--momentum", "0"]}.items():
        refs[name] = out / f"{name}.npz"
        train_main([*COMMON, "--batch-size", "32", *extra, "--save-weights", str(refs[name])])
    return refs


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("n,strategy", [
    (2, ["--strategy", "allreduce"]),
    (2, ["--strategy", "allreduce", "--overlap", "--bucket-kb", "16"]),
    (3, ["--strategy", "param-server"]),
])
def test_synchronous_strategies_equal_one_process(sequential, tmp_path, n, strategy):
    w, m = tmp_path / "w.npz", tmp_path / "m.pkl"
    proc = _ok(mpirun(n, [*COMMON, "--batch-size", "16", *strategy, "--save-weights", str(w),
                          "--save-metrics", str(m)], cwd=tmp_path))
    assert rel_err(w, sequential["momentum"]) < 1e-4
    df = pd.read_pickle(m)  # rank 0's frame only, written once
    assert len(df) == 1 and df["processes"].iloc[0] == n
    assert df["batch_size"].iloc[0] == 32 and df["batch_per_rank"].iloc[0] == 16
    assert df["samples"].iloc[0] == 193 and 0 <= df["test_acc"].iloc[0] <= 1
    assert 0 < df["comm_s"].iloc[0] < df["wall_s"].iloc[0] * 1.01
    assert df["strategy"].iloc[0] == ("allreduce-overlap" if "--overlap" in strategy
                                      else strategy[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pkl", "w.npz"]  # no temp files
    assert proc.stdout.count("test accuracy:") == 1


@needs_mpi
@pytest.mark.mpi
def test_model_average_every_step_is_allreduce(sequential, tmp_path):
    w, m = tmp_path / "w.npz", tmp_path / "m.pkl"
    _ok(mpirun(2, [*COMMON, "--batch-size", "16", "--momentum", "0", "--strategy",
                   "model-average", "--sync-every", "1", "--save-weights", str(w),
                   "--save-metrics", str(m)]))
    assert rel_err(w, sequential["plain"]) < 1e-4
    df = pd.read_pickle(m)
    assert df["sync_every"].iloc[0] == 1
    assert np.isfinite(df["train_loss"].iloc[0])


@needs_mpi
@pytest.mark.mpi
def test_async_strategies_train_and_record_staleness(tmp_path):
    m = tmp_path / "m.pkl"
    common = ["--dataset", "digits", "--subset", "640", "--test-subset", "200", "--epochs", "2",
              "--batch-size", "16", "--lr", "0.02", "--no-progress"]
    _ok(mpirun(3, [*common, "--strategy", "async-param-server", "--save-metrics", str(m)]))
    df = pd.read_pickle(m)
    assert list(df["epoch"]) == [1, 2]
    assert df["test_acc"].iloc[-1] > 0.5  # chance is 0.1
    assert (df["staleness_max"] >= 1).all() and (df["staleness_mean"] > 0).all()
    assert (df["samples"] == [640, 1280]).all()
    # local SGD with k=4 also learns
    _ok(mpirun(2, [*common, "--strategy", "model-average", "--sync-every", "4",
                   "--save-metrics", str(m)]))
    df = pd.read_pickle(m)
    assert df["test_acc"].iloc[-1] > 0.5


@needs_mpi
@pytest.mark.mpi
def test_rank_exception_aborts_the_whole_job(tmp_path):
    t0 = time.monotonic()
    proc = mpirun(3, [*COMMON, "--batch-size", "16", "--strategy", "param-server",
                      "--epochs", "50", "--inject-failure", "1:3:raise"], timeout=90)
    assert proc.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure at step 3" in proc.stderr
    assert time.monotonic() - t0 < 60


@needs_mpi
@pytest.mark.mpi
def test_killed_rank_ends_the_job_and_is_named(tmp_path):
    t0 = time.monotonic()
    proc = mpirun(2, [*COMMON, "--batch-size", "16", "--epochs", "50",
                      "--inject-failure", "1:3:kill"], timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert time.monotonic() - t0 < 60
    pids = dict(re.findall(r"(\d+)=pid (\d+)@", out))  # rank 0's "ranks: 0=pid ..@host" line
    assert "BAD TERMINATION" in out and f"PID {pids['1']} " in out


@needs_mpi
@pytest.mark.mpi
def test_mismatched_flags_and_bad_arguments_are_reported():
    base = [*COMMON, "--batch-size", "16", "--max-steps", "2"]
    proc = mpirun(2, [], mpmd=[base, [*base, "--lr", "0.2"]], timeout=60)
    assert proc.returncode == 2
    assert "mismatched flags across ranks: --lr is 0.05 on rank 0 but 0.2 on rank 1" in (
        proc.stderr)
    proc = mpirun(2, [], mpmd=[base, [*base, "--bogus"]], timeout=60)
    assert proc.returncode == 2 and "bad arguments on rank(s) [1]" in proc.stderr
    proc = mpirun(1, [*base, "--strategy", "param-server"], timeout=60)
    assert proc.returncode == 2 and "needs at least 2 ranks" in proc.stderr
    proc = _ok(mpirun(2, ["--help"], timeout=60))
    assert proc.stdout.count("usage:") == 1 and "--sync-every" in proc.stdout
    # flags are validated as they are parsed: one line, status 2, before any data loads
    proc = mpirun(2, [*base, "--lr", "nan"], timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: bad arguments on every rank: argument --lr: must be a finite number > 0, "
        "got nan (see --help)")
    proc = mpirun(2, [*base, "--save-metrics", "/proc/m.pkl"], timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "error: --save-metrics /proc/m.pkl: cannot create files in /proc")
    assert "ranks:" not in proc.stdout  # refused before the data was loaded


@needs_mpi
@pytest.mark.mpi
def test_ranks_with_different_data_are_refused(tmp_path):
    """One node reading other files than the rest: the data digests differ."""
    skew = tmp_path / "skewed_rank.py"
    skew.write_text(
        "import sys\n"
        "import cnn.data as d\n"
        "real = d.load\n"
        "d.load = lambda *a, **k: (lambda xy: (xy[0] * 0.5, xy[1]))(real(*a, **k))\n"
        "from cnn.parallel.mpi import run_or_abort\n"
        "sys.exit(run_or_abort(sys.argv[1:]))\n")
    base = [*COMMON, "--batch-size", "16", "--max-steps", "2"]
    cmd = [MPIEXEC, "-n", "1", *PROG, *base, ":", "-n", "1", sys.executable, str(skew), *base]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    digests = re.search(r"ranks loaded different data \(digest per rank: \['(\w+)', '(\w+)'\]\)",
                        proc.stderr)
    assert digests and digests[1] != digests[2], proc.stderr


@needs_mpi
@pytest.mark.mpi
def test_hybrid_ranks_times_threads_equal_one_process(sequential, tmp_path):
    """2 ranks x 1 Numba thread each (the hybrid layout at its smallest) = one process."""
    w = tmp_path / "w.npz"
    proc = _ok(mpirun(2, [*COMMON, "--batch-size", "16", "--backend", "numba", "--threads",
                          "1", "--save-weights", str(w)], timeout=300))
    assert rel_err(w, sequential["momentum"]) < 1e-4
    assert "backend numba" in proc.stdout


@needs_mpi
@pytest.mark.mpi
def test_divergence_ends_the_job_and_keeps_the_completed_epochs(tmp_path):
    """Before: the completed epochs were lost. 193 samples / 32 = 7 steps per epoch."""
    m, ref = tmp_path / "m.pkl", tmp_path / "ref.pkl"
    args = [*COMMON, "--batch-size", "16", "--schedule", "constant"]
    _ok(mpirun(2, [*args, "--save-metrics", str(ref)]))
    proc = mpirun(2, [*args, "--epochs", "3", "--save-metrics", str(m),
                      "--inject-failure", "0:10:nan"], timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert ("rank 0 failed: DivergenceError: loss became nan at epoch 2, step 10" in
            proc.stderr and f"The 1 row(s) completed before it are in {m}" in proc.stderr)
    assert "Traceback" not in proc.stderr
    got, want = pd.read_pickle(m), pd.read_pickle(ref)
    for col in ("epoch", "step", "samples", "train_loss", "test_loss", "test_acc", "lr"):
        assert got[col].tolist() == want[col].tolist(), col
