"""Runs that survive a cluster: checkpoint, exact resume and stop-on-signal for every MPI
strategy, HOGWILD and k-fold, with real processes, real signals and real kills.

The synchronous strategies are checked bit for bit: stopped at step k (a real SIGUSR1,
sent by a rank to itself at a chosen step, or by the test to mpiexec), resumed, they end
with the weights and the results frame of the uninterrupted run. The asynchronous server
is checked by what it must keep: every worker's sequence of batches, traced, is the
uninterrupted one with no batch applied twice or skipped; steps, samples and the
schedule per epoch are the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from test_hogwild import default_sigint
from test_mpi import (
    COMMON,
    MPIEXEC,
    PROG,
    mpirun,
    needs_mpi,
    no_leaked_shm_segments,  # noqa: F401 - autouse: nothing left in /dev/shm
)

from cnn import checkpoint, data
from cnn.checkpoint import EXIT_REQUEUE
from cnn.errors import CheckpointError, UsageError
from cnn.optim import make_schedule
from cnn.parallel.mpi_strategies import shard_bounds


def mpi_test(fn):
    """Launches real mpiexec ranks."""
    return needs_mpi(pytest.mark.mpi(fn))


# 193 samples, 2 training ranks x 16: 7 global steps per epoch, the last one short
RUN = [*COMMON, "--epochs", "2", "--batch-size", "16"]
COLS = ["epoch", "step", "samples", "train_loss", "test_loss", "test_acc", "lr",
        "complete_epoch"]


def _ok(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    return proc


def _same_weights(a: Path, b: Path) -> None:
    with np.load(a) as A, np.load(b) as B:
        assert sorted(A.files) == sorted(B.files)
        for k in A.files:
            np.testing.assert_array_equal(A[k], B[k], err_msg=k)


def _reference(tmp: Path, n: int, flags: list[str]) -> tuple[Path, pd.DataFrame]:
    w, m = tmp / "ref.npz", tmp / "ref.pkl"
    _ok(mpirun(n, [*flags, "--save-weights", str(w), "--save-metrics", str(m)], timeout=300))
    return w, pd.read_pickle(m)


SYNC = {
    "allreduce": (2, []),
    "allreduce-stop-at-epoch-end": (2, []),
    "overlap": (2, ["--overlap", "--bucket-kb", "16"]),
    "param-server": (3, ["--strategy", "param-server"]),
    "model-average": (2, ["--strategy", "model-average", "--sync-every", "3"]),
    "hybrid": (2, ["--backend", "numba", "--threads", "1"]),
}


@mpi_test
@pytest.mark.parametrize("name", list(SYNC))
def test_synchronous_resume_is_bit_for_bit(tmp_path, name):
    """Stopped by SIGUSR1 after step 5 (mid-epoch, between two --checkpoint-every 2
    checkpoints; model averaging between two averages) or 7 (an epoch's end), resumed:
    the weights and the frame are the uninterrupted run's."""
    n, extra = SYNC[name]
    flags = [*RUN, *extra]
    ref_w, ref = _reference(tmp_path, n, flags)
    ck, w, m = tmp_path / "ck", tmp_path / "w.npz", tmp_path / "m.pkl"
    at = 7 if name.endswith("epoch-end") else 5
    stopped = mpirun(n, [*flags, "--checkpoint-dir", str(ck), "--checkpoint-every", "2",
                         "--inject-failure", f"{n - 1}:{at}:signal", "--save-weights", str(w)],
                     timeout=300)
    _ok(stopped, EXIT_REQUEUE)
    assert (f"stopped on SIGUSR1 after step {at}; checkpoint {ck / 'checkpoint.npz'}"
            in stopped.stderr)
    assert not w.exists()  # stopped: no final weights
    arrays, meta = checkpoint.load(ck / "checkpoint.npz")
    assert meta["global_step"] == at and meta["epoch"] == at // 7
    assert meta["batch_in_epoch"] == at % 7 and meta["total_steps"] == 14
    assert meta["schedule"]["kind"] == "Cosine" and meta["schedule"]["total_steps"] == 14
    assert meta["lr_next"] == make_schedule("cosine", 0.05, 14)(at)
    assert meta["extra"]["mpi"]["processes"] == n and len(meta["extra"]["ranks"]) == n
    if "model-average" in extra:  # every rank's own weights and momentum
        assert {f"rank{r}/param" for r in range(n)} <= set(arrays)
        assert not np.array_equal(arrays["rank0/param"], arrays["rank1/param"])
    resumed = _ok(mpirun(n, [*flags, "--checkpoint-dir", str(ck), "--resume",
                             "--save-weights", str(w), "--save-metrics", str(m)], timeout=300))
    assert f"resumed from {ck / 'checkpoint.npz'} at step {at}" in resumed.stdout
    _same_weights(w, ref_w)
    pd.testing.assert_frame_equal(pd.read_pickle(m)[COLS], ref[COLS])
    assert not list(ck.glob("*.tmp")), "checkpoint writes must be atomic"


@mpi_test
def test_allreduce_resumes_on_another_number_of_ranks(tmp_path):
    """2 ranks x 16 stopped, 4 ranks x 8 resumed: the same global batch, the same maths
    (up to the order of the float sums)."""
    ref_w, ref = _reference(tmp_path, 2, RUN)
    ck, w, m = tmp_path / "ck", tmp_path / "w.npz", tmp_path / "m.pkl"
    _ok(mpirun(2, [*RUN, "--checkpoint-dir", str(ck), "--inject-failure", "0:4:signal"]),
        EXIT_REQUEUE)
    four = [*RUN[:-1], "8"]
    _ok(mpirun(4, [*four, "--checkpoint-dir", str(ck), "--resume", "--save-weights", str(w),
                   "--save-metrics", str(m)], timeout=300))
    with np.load(w) as A, np.load(ref_w) as B:
        for k in B.files:
            assert np.linalg.norm(A[k] - B[k]) <= 1e-5 * np.linalg.norm(B[k]), k
    got = pd.read_pickle(m)
    assert got["step"].tolist() == ref["step"].tolist()
    assert got["samples"].tolist() == ref["samples"].tolist()
    assert got["lr"].tolist() == ref["lr"].tolist()


REFUSED = {
    "model": (2, ["--model", "lenet5"], "--model was 'seed_cnn', now 'lenet5'"),
    "dataset": (2, ["--dataset", "iris"], "--dataset was 'digits', now 'iris'"),
    "global batch": (2, ["--batch-size", "8"],
                     "the global batch (training ranks x --batch-size) was 2 x 16 = 32, now "
                     "2 x 8 = 16"),
    "strategy": (3, ["--strategy", "param-server"],
                 "--strategy was 'allreduce', now 'param-server'"),
    "other flag": (2, ["--lr", "0.2"], "--lr was 0.05, now 0.2"),
}


@pytest.fixture(scope="module")
def stopped_allreduce(tmp_path_factory) -> Path:
    ck = tmp_path_factory.mktemp("refused") / "ck"
    _ok(mpirun(2, [*RUN, "--checkpoint-dir", str(ck), "--inject-failure", "0:3:signal"]),
        EXIT_REQUEUE)
    return ck


@mpi_test
@pytest.mark.parametrize("what", list(REFUSED))
def test_resume_with_other_flags_is_refused_naming_them(stopped_allreduce, what):
    n, change, message = REFUSED[what]
    ck = stopped_allreduce
    before = (ck / "checkpoint.npz").read_bytes()
    proc = mpirun(n, [*RUN, *change, "--checkpoint-dir", str(ck), "--resume"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith(f"error: --resume: the checkpoint {ck / 'checkpoint.npz'} was "
                          f"written by a different run: {message}"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert (ck / "checkpoint.npz").read_bytes() == before


@mpi_test
def test_per_rank_state_is_refused_on_another_number_of_ranks(tmp_path):
    ck = tmp_path / "ck"
    flags = [*RUN, "--strategy", "model-average"]
    _ok(mpirun(2, [*flags, "--checkpoint-dir", str(ck), "--inject-failure", "0:3:signal"]),
        EXIT_REQUEUE)
    proc = mpirun(4, [*flags[:-3], "8", "--strategy", "model-average", "--checkpoint-dir",
                      str(ck), "--resume"], timeout=60)
    assert proc.returncode == 2
    assert ("model-average keeps state on every rank and the checkpoint holds 2 ranks' state: "
            "resume it on 2 ranks (mpiexec -n 2), not 4") in proc.stderr


@mpi_test
@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(stopped_allreduce, tmp_path, damage):
    ck = tmp_path / "ck"
    ck.mkdir()
    path = ck / "checkpoint.npz"
    good = (stopped_allreduce / "checkpoint.npz").read_bytes()
    if damage != "missing":
        path.write_bytes(good[:len(good) // 2] if damage == "truncated" else b"")
    proc = mpirun(2, [*RUN, "--checkpoint-dir", str(ck), "--resume"], timeout=60)
    assert proc.returncode == 2
    want = {"truncated": f"error: {path} is truncated or corrupt",
            "empty": f"error: {path} is empty",
            "missing": f"error: --resume: no checkpoint in {ck} (looked for {path})"}[damage]
    assert proc.stderr.strip().startswith(want), proc.stderr


# --- in one process: the stop flag, fit's stop hook and --checkpoint-every ---------------

def test_stop_flag_turns_signals_into_a_flag_and_ctrl_c_twice_interrupts():
    before = signal.getsignal(signal.SIGUSR1)
    with checkpoint.StopFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert flag.signum == signal.SIGUSR1  # the process is still here
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert flag.signum == signal.SIGUSR1  # the first signal is the one reported
    assert signal.getsignal(signal.SIGUSR1) is before
    with checkpoint.StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)


def _fit(tmp: Path | None, stop_at: int | None = None, resume: bool = False,
         every: int | None = None):
    from cnn.models import seed_cnn
    from cnn.optim import make_optimizer
    from cnn.train import fit

    x, y = data.load("digits", "train", subset=200)
    test = data.load("digits", "test", subset=50)
    net = seed_cnn((1, 8, 8), padding=1, seed=1)
    opt = make_optimizer("sgd", net, lr=0.05, momentum=0.9)
    hooks = checkpoint.Hooks(stop=lambda step: step == stop_at, signum=lambda: 10)
    df = fit(net, (x, y), test, epochs=3, batch_size=32, optimizer=opt,
             schedule=make_schedule("cosine", 0.05, 21), seed=4, checkpoint_dir=tmp,
             resume=resume, checkpoint_every=every, hooks=hooks, progress=False, log=None)
    return net, df


@pytest.mark.parametrize("stop_at", [5, 7, 14])
def test_fit_stops_after_the_step_asked_and_resumes_exactly(tmp_path, stop_at):
    """7 steps per epoch: 5 is mid-epoch, 7 and 14 are epoch ends (the row comes first)."""
    ref_net, ref = _fit(None)
    with pytest.raises(checkpoint.Stopped, match=f"stopped on SIGUSR1 after step {stop_at}; "
                                                 f"checkpoint {tmp_path / 'checkpoint.npz'}"):
        _fit(tmp_path, stop_at=stop_at)
    _, meta = checkpoint.load(tmp_path / "checkpoint.npz")
    assert meta["global_step"] == stop_at and len(meta["history"]) == stop_at // 7
    net, df = _fit(tmp_path, resume=True)
    np.testing.assert_array_equal(net.params, ref_net.params)
    pd.testing.assert_frame_equal(df[COLS], ref[COLS])


def test_checkpoint_every_saves_between_epochs(tmp_path, monkeypatch):
    """Every 3 steps, and at each epoch's end: the last one before a kill is at most 3
    steps old. Here: a stop at step 11 finds the step-9 checkpoint replaced by step 11's."""
    steps = []
    real = checkpoint.save

    def spy(path, arrays, meta):
        steps.append(meta["global_step"])
        return real(path, arrays, meta)

    monkeypatch.setattr(checkpoint, "save", spy)
    with pytest.raises(checkpoint.Stopped):
        _fit(tmp_path, stop_at=11, every=3)
    assert steps == [3, 6, 7, 9, 11]


# --- the asynchronous parameter server -------------------------------------------------

TRACE = """
import hashlib, sys
from mpi4py import MPI
from cnn.network import Network

out = open(f"{sys.argv[1]}.{MPI.COMM_WORLD.Get_rank()}", "a")
real = Network.loss_and_grad

def traced(self, x, y, *a, **k):  # every gradient a rank computes, by its batch's bytes
    out.write(hashlib.sha1(x.tobytes()).hexdigest() + "\\n")
    out.flush()
    return real(self, x, y, *a, **k)

Network.loss_and_grad = traced
from cnn.parallel.mpi import run_or_abort
sys.exit(run_or_abort(sys.argv[2:]))
"""
ASYNC = ["--dataset", "digits", "--subset", "200", "--test-subset", "100", "--epochs", "3",
         "--batch-size", "16", "--lr", "0.02", "--no-progress", "--seed", "3",
         "--strategy", "async-param-server"]


def _traced(tmp: Path, trace: Path, argv: list[str]) -> subprocess.CompletedProcess:
    script = tmp / "trace_rank.py"
    script.write_text(TRACE)
    cmd = [MPIEXEC, "-n", "3", sys.executable, str(script), str(trace), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _piece_hash(x: np.ndarray, idx: np.ndarray, workers: int, piece: int) -> str:
    lo, hi = shard_bounds(len(idx), workers, piece % workers)
    return hashlib.sha1(x[idx[lo:hi]].tobytes()).hexdigest()


@mpi_test
@pytest.mark.parametrize("who,assign", [(0, "static"), (1, "static"), (0, "dynamic")],
                         ids=["server-signalled", "worker-signalled", "dynamic-assignment"])
def test_async_resume_applies_every_batch_once(tmp_path, who, assign):
    """The server stops (its own SIGUSR1, or a worker's passed on to it), drains the
    in-flight gradients (not applied) and saves the piece each worker computes next; the
    resumed run computes exactly the pieces that were not applied: with static assignment
    each worker goes on with its own sequence, with dynamic assignment the pieces of the
    two runs together are every piece once."""
    flags = [*ASYNC, "--assign", assign]
    ref = tmp_path / "ref.pkl"
    _ok(mpirun(3, [*flags, "--save-metrics", str(ref)], timeout=300))
    ref_df = pd.read_pickle(ref)
    ck, m = tmp_path / "ck", tmp_path / "m.pkl"
    first, second = tmp_path / "first", tmp_path / "second"
    # in epoch 2 (7 global steps per epoch): the server counts messages, a worker its steps
    stop_at = 20 if who == 0 else 9
    _ok(_traced(tmp_path, first, [*flags, "--checkpoint-dir", str(ck), "--checkpoint-every",
                                  "3", "--inject-failure", f"{who}:{stop_at}:signal"]),
        EXIT_REQUEUE)
    arrays, meta = checkpoint.load(ck / "checkpoint.npz")
    nxt = arrays["async/next_piece"].tolist()
    steps, W = 7, 2  # ceil(200 / 32) global steps per epoch, 2 workers
    assert meta["global_step"] == meta["messages"] // W
    assert steps <= meta["global_step"] < 3 * steps
    _ok(_traced(tmp_path, second, [*flags, "--checkpoint-dir", str(ck), "--resume",
                                   "--save-metrics", str(m)]))
    x, y = data.load("digits", "train", subset=200)
    order = [list(data.iterate_batches(len(y), W * 16, 3, e)) for e in range(3)]
    every_piece = [_piece_hash(x, order[g // steps][g % steps], W, p)
                   for p in range(W * 3 * steps) for g in [p // W]]
    before = [_lines(Path(f"{first}.{w + 1}")) for w in range(W)]
    after = [_lines(Path(f"{second}.{w + 1}")) for w in range(W)]
    # the last gradient a worker computed before the stop was drained, not applied
    applied = [b[:-1] if nxt[w] >= 0 else b for w, b in enumerate(before)]
    assert sum(map(len, applied)) == meta["messages"]
    for w in range(W):
        if nxt[w] >= 0:
            assert before[w][-1] == every_piece[nxt[w]]  # redone first after the resume
            assert after[w][0] == every_piece[nxt[w]]
        if assign == "static":  # worker w: pieces w, w + W, ... in order, none twice
            assert applied[w] + after[w] == every_piece[w::W], f"worker {w + 1}"
    assert sorted(sum(applied, []) + sum(after, [])) == sorted(every_piece)
    assert not _lines(Path(f"{first}.0")) and not _lines(Path(f"{second}.0"))  # server
    final, fmeta = checkpoint.load(ck / "checkpoint.npz")
    assert final["async/next_piece"].tolist() == [-1] * W
    assert fmeta["async"]["applied"] == fmeta["messages"] == W * 3 * steps
    got = pd.read_pickle(m)
    for col in ("epoch", "step", "lr", "complete_epoch"):
        assert got[col].tolist() == ref_df[col].tolist(), col
    # which worker's message lands in which epoch's window is up to the race (also
    # uninterrupted); the run as a whole trains on every sample of every epoch
    assert got["samples"].iloc[-1] == ref_df["samples"].iloc[-1] == 3 * 200
    assert np.isfinite(got["train_loss"]).all()
    # epochs the server closed before the stop have no step times; which epoch a stop near
    # the boundary lands in is up to the race, so ask the checkpoint
    closed = len(meta["async"]["epochs"])
    assert closed <= 2
    assert np.isnan(got["step_ms_median"].iloc[:closed]).all()
    assert (got["step_ms_median"].iloc[closed:] > 0).all()
    # resuming a finished run trains nothing and gives the same frame
    again = tmp_path / "again.pkl"
    _ok(mpirun(3, [*flags, "--checkpoint-dir", str(ck), "--resume", "--save-metrics",
                   str(again)]))
    cols = ["epoch", "step", "samples", "train_loss", "test_acc", "staleness_mean"]
    pd.testing.assert_frame_equal(pd.read_pickle(again)[cols], got[cols])


# --- signals from outside, kills ---------------------------------------------------------

def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _gone(procs: list[psutil.Process], timeout: float = 10) -> list[str]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [f"{p.pid} {p.name()}" for p in alive if p.is_running() and
            p.status() != psutil.STATUS_ZOMBIE]


LONG = ["--dataset", "digits", "--test-subset", "64", "--epochs", "6", "--batch-size", "16",
        "--no-progress", "--seed", "2"]


@mpi_test
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_to_mpiexec_checkpoints_every_rank_and_exits_75(tmp_path, sig):
    """mpiexec forwards the signal to every rank; they finish their step, agree on it, rank 0
    writes one checkpoint there and every rank exits 75. Resumed: the uninterrupted run."""
    ck, w = tmp_path / "ck", tmp_path / "w.npz"
    cmd = [MPIEXEC, "-n", "2", *PROG, *LONG, "--checkpoint-dir", str(ck), "--save-weights",
           str(w)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(ck / "checkpoint.npz", proc)  # epoch 1 is done: training is under way
        procs = _tree(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == EXIT_REQUEUE, err
    step = int(err.split(f"stopped on {sig} after step ")[1].split(";")[0])
    _, meta = checkpoint.load(ck / "checkpoint.npz")
    assert meta["global_step"] == step and 0 < step < 6 * 45
    assert took < 30 and not _gone(procs)
    if sig != "SIGUSR1":
        return
    ref_w, _ = _reference(tmp_path, 2, LONG)
    _ok(mpirun(2, [*LONG, "--checkpoint-dir", str(ck), "--resume", "--save-weights", str(w)],
               timeout=300))
    _same_weights(w, ref_w)


@mpi_test
def test_a_killed_rank_ends_the_job_and_leaves_a_loadable_checkpoint(tmp_path):
    """kill -9 of one rank mid-step: the job ends within 30 s naming the rank, nothing is
    left running or in /dev/shm (the autouse fixture), the last checkpoint loads."""
    ck = tmp_path / "ck"
    t0 = time.monotonic()
    cmd = [MPIEXEC, "-n", "2", *PROG, *LONG, "--checkpoint-dir", str(ck),
           "--checkpoint-every", "4", "--inject-failure", "1:23:kill"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    procs = []
    try:
        while proc.poll() is None and not procs[2:]:  # mpiexec, its proxy and the ranks
            procs = _tree(proc.pid)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    took = time.monotonic() - t0
    assert proc.returncode != 0 and took < 30
    pids = dict(re.findall(r"(\d+)=pid (\d+)@", out))  # rank 0's "ranks: 0=pid ..@host"
    assert "BAD TERMINATION" in out + err and f"PID {pids['1']} " in out + err
    assert not _gone(procs)
    _, meta = checkpoint.load(ck / "checkpoint.npz")
    assert meta["global_step"] == 20  # the last multiple of 4 before step 23


KILL_IN_WRITE = """
import os, signal, sys
import numpy as np
from mpi4py import MPI

calls = []
real = np.savez

def savez(fh, **arrays):  # the second checkpoint: half an archive, then SIGKILL
    calls.append(1)
    if len(calls) < 2:
        return real(fh, **arrays)
    fh.write(b"PK\\x03\\x04" + bytes(1 << 16))
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if MPI.COMM_WORLD.Get_rank() == 0:
    np.savez = savez
from cnn.parallel.mpi import run_or_abort
sys.exit(run_or_abort(sys.argv[1:]))
"""


@mpi_test
def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """Rank 0 SIGKILLed halfway through writing the second checkpoint: the first one is
    intact, and the run resumed from it ends as the uninterrupted run."""
    script, ck, w = tmp_path / "kill_in_write.py", tmp_path / "ck", tmp_path / "w.npz"
    script.write_text(KILL_IN_WRITE)
    flags = [*RUN, "--checkpoint-dir", str(ck), "--checkpoint-every", "3"]
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), *flags],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stderr
    _, meta = checkpoint.load(ck / "checkpoint.npz")
    assert meta["global_step"] == 3  # the first checkpoint; the second died half-written
    assert len(list(ck.glob(".checkpoint.npz.*.tmp"))) == 1  # what the killed writer left
    ref_w, _ = _reference(tmp_path, 2, RUN)
    _ok(mpirun(2, [*flags, "--resume", "--save-weights", str(w)]))
    _same_weights(w, ref_w)
    assert [p.name for p in ck.iterdir()] == ["checkpoint.npz"]  # the next save cleared it


# --- cnn.train, HOGWILD and k-fold ---------------------------------------------------------

def _popen(argv: list[str]) -> subprocess.Popen:
    """A CLI in its own session (as a terminal's foreground job: Ctrl-C reaches the group)."""
    return subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _stop_group(proc: subprocess.Popen, sig: int, wait_for: Path) -> tuple[str, str, list]:
    """Signal ``proc``'s process group once ``wait_for`` exists; its output and the processes
    it had started (to check none is left)."""
    try:
        _wait_for(wait_for, proc, timeout=180)
        procs = _tree(proc.pid)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out, err, procs


def _no_processes_left(procs: list[psutil.Process], session: int) -> None:
    left = _gone(procs, timeout=30)  # ipyparallel's engine nannies take a few seconds
    assert not left, f"left running: {left}"
    assert not [p for p in psutil.process_iter(["pid"]) if _sid(p) == session]


def _sid(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def test_cnn_train_checkpoints_on_sigterm_and_resumes_exactly(tmp_path):
    flags = ["cnn.train", "--dataset", "digits", "--epochs", "12", "--batch-size", "32",
             "--no-progress", "--seed", "3"]
    ref, w, ck = tmp_path / "ref.npz", tmp_path / "w.npz", tmp_path / "ck"
    _ok(subprocess.run([sys.executable, "-m", *flags, "--save-weights", str(ref)],
                       capture_output=True, text=True, timeout=300))
    proc = _popen([*flags, "--checkpoint-dir", str(ck), "--save-weights", str(w)])
    _, err, _ = _stop_group(proc, signal.SIGTERM, ck / "checkpoint.npz")
    assert proc.returncode == EXIT_REQUEUE, err
    assert "stopped on SIGTERM after step " in err and not w.exists()
    _ok(subprocess.run([sys.executable, "-m", *flags, "--checkpoint-dir", str(ck), "--resume",
                        "--save-weights", str(w)], capture_output=True, text=True, timeout=300))
    _same_weights(w, ref)


HOG = ["--dataset", "digits", "--epochs", "6", "--batch-size", "32", "--seed", "4",
       "--no-progress"]


def test_hogwild_resume_with_one_worker_is_bit_for_bit(tmp_path):
    """SIGTERM to the parent: the epoch finishes, the checkpoint is written, exit 75. With
    one worker HOGWILD is sequential SGD, so the resumed run must be the uninterrupted one
    exactly: weights, and every epoch's row."""
    from cnn.parallel.hogwild import parse_args, run_hogwild

    ck = tmp_path / "ck"
    proc = _popen(["cnn.parallel.hogwild", "--workers", "1", *HOG, "--checkpoint-dir",
                   str(ck)])
    saved = ck / "hogwild-1" / "checkpoint.npz"
    try:
        _wait_for(saved, proc, timeout=180)
        proc.send_signal(signal.SIGTERM)  # the parent only: workers finish the epoch
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_REQUEUE, err
    _, meta = checkpoint.load(saved)
    assert f"stopped on SIGTERM after step {meta['global_step']}; checkpoint {saved}" in err
    assert 1 <= meta["epochs_done"] < 6 and meta["global_step"] == 45 * meta["epochs_done"]
    args = parse_args(HOG, workers=1)
    ref, ref_params = run_hogwild(args, log=None, return_params=True)
    resumed = parse_args(HOG, workers=1, checkpoint_dir=str(ck), resume=True)
    got, params = run_hogwild(resumed, log=None, return_params=True)
    np.testing.assert_array_equal(params, ref_params)
    cols = ["epoch", "step", "samples", "train_loss", "test_loss", "test_acc", "updates"]
    pd.testing.assert_frame_equal(got[cols], ref[cols])
    again, params = run_hogwild(resumed, log=None, return_params=True)  # finished: no workers
    pd.testing.assert_frame_equal(again.drop(columns="timestamp"), got.drop(columns="timestamp"))
    np.testing.assert_array_equal(params, ref_params)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"cnn_hogwild_{proc.pid}_")]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_hogwild_stopped_by_a_group_signal_leaves_nothing_and_resumes(tmp_path, sig):
    """Ctrl-C (SIGINT to the whole group: status 130) or a batch system's SIGTERM to every
    process (the workers die of it: status 75): no process or segment is left, the completed
    epochs' checkpoint is kept and the resumed run trains the rest."""
    ck = tmp_path / "ck"
    argv = ["cnn.parallel.hogwild", "--workers", "2", *HOG, "--epochs", "10",
            "--checkpoint-dir", str(ck)]
    proc = _popen(argv)
    saved = ck / "hogwild-2" / "checkpoint.npz"
    _, err, procs = _stop_group(proc, getattr(signal, sig), saved)
    assert proc.returncode == (130 if sig == "SIGINT" else EXIT_REQUEUE), err
    _no_processes_left(procs, proc.pid)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"cnn_hogwild_{proc.pid}_")]
    _, meta = checkpoint.load(saved)
    done = meta["epochs_done"]
    assert 1 <= done < 10
    m = tmp_path / "m.pkl"
    _ok(subprocess.run([sys.executable, "-m", *argv, "--resume", "--save-metrics", str(m)],
                       capture_output=True, text=True, timeout=600))
    df = pd.read_pickle(m)
    assert df["epoch"].tolist() == list(range(1, 11))
    assert (df["updates"] == 45).all() and df["samples"].iloc[-1] == 10 * 1438
    assert checkpoint.load(saved)[1]["epochs_done"] == 10


KF = ["cnn.parallel.kfold", "--dataset", "digits", "--subset", "600", "--folds", "4",
      "--epochs", "15", "--no-progress", "--seed", "1"]


def test_kfold_ctrl_c_keeps_finished_folds_and_resume_skips_them(tmp_path):
    """Ctrl-C of a k-fold run on 2 engines: engines and controller stop, the finished folds'
    files stay; the resumed run trains only the others, and every fold is the fold a serial
    run computes (same weights)."""
    ck = tmp_path / "ck"
    proc = _popen([*KF, "--engines", "2", "--checkpoint-dir", str(ck)])
    folder = ck / "engines-2"
    _, err, procs = _stop_group(proc, signal.SIGINT, folder / "fold-0.json")
    if proc.returncode == 0:  # every fold finished before the signal: nothing to test
        pytest.fail(f"the run finished before Ctrl-C; make it longer\n{err}")
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    _no_processes_left(procs, proc.pid)
    kept = sorted(int(p.stem.split("-")[1]) for p in folder.glob("fold-*.json"))
    assert 1 <= len(kept) < 4 and not list(folder.glob("*.tmp"))
    m, ref = tmp_path / "m.pkl", tmp_path / "ref.pkl"
    _ok(subprocess.run([sys.executable, "-m", *KF, "--engines", "2", "--checkpoint-dir",
                        str(ck), "--resume", "--save-metrics", str(m)], capture_output=True,
                       text=True, timeout=600))
    _ok(subprocess.run([sys.executable, "-m", "study.kfold_serial", *KF[1:],
                        "--save-metrics", str(ref)], capture_output=True, text=True,
                       timeout=600))
    got, want = (pd.read_pickle(p) for p in (m, ref))
    got, want = (d[d["kind"] == "fold"].set_index("fold") for d in (got, want))
    assert got["weights_sha256"].to_dict() == want["weights_sha256"].to_dict()
    assert sorted(got.index[got["kept"]].astype(int)) == kept


def test_kfold_fold_files_are_never_mixed_into_another_run(tmp_path):
    from cnn.parallel.kfold import main

    ck = tmp_path / "ck"
    flags = ["--dataset", "digits", "--subset", "200", "--folds", "3", "--epochs", "1",
             "--engines", "1", "--serial", "--no-progress", "--checkpoint-dir", str(ck)]
    first = main(flags)
    for run in ("serial", "engines-1"):
        assert sorted(p.name for p in (ck / run).iterdir()) == [
            "fold-0.json", "fold-1.json", "fold-2.json"]
    with pytest.raises(UsageError, match="holds finished folds of an earlier run"):
        main(flags)
    with pytest.raises(CheckpointError, match="--lr was 0.05, now 0.1"):
        main([*flags, "--resume", "--lr", "0.1"])
    with pytest.raises(CheckpointError, match="--no-stratify was False, now True"):
        main([*flags, "--resume", "--no-stratify"])
    df = main([*flags, "--resume"])  # everything kept: no fold is trained again
    folds = df[df["kind"] == "fold"]
    assert folds["kept"].all()
    assert folds["weights_sha256"].tolist() == first[first["kind"] == "fold"][
        "weights_sha256"].tolist()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        main([*flags[:-1], str(tmp_path / "elsewhere"), "--resume"])
