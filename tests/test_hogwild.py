"""HOGWILD: one worker is sequential SGD; two learn as well; nothing left in /dev/shm."""

import math
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cnn import data
from cnn.errors import DivergenceError
from cnn.metrics import MACHINE_COLUMNS
from cnn.parallel.hogwild import SHM_PREFIX, HogwildWorkerError, parse_args, run_hogwild
from cnn.train import build_network, fit, make_training

TIMING = {"wall_s", "compile_s", "step_ms_median", "step_ms_iqr", "samples_per_s", "startup_s",
          "rank_compute_ms", "rank_delay_ms",
          "step_cpu_ms", "lock_wait_s", *MACHINE_COLUMNS}


def _segments(pid: int | None = None) -> set[str]:
    """This process's HOGWILD segments (the parent's pid is in the name), so tests running
    in parallel do not see each other's."""
    mine = f"{SHM_PREFIX}{os.getpid() if pid is None else pid}_"
    return {f for f in os.listdir("/dev/shm") if f.startswith(mine)}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


@pytest.fixture(autouse=True)
def no_leftovers():
    before = _segments()
    yield
    assert _segments() - before == set(), "a shared-memory segment survived the run"
    assert not [p for p in mp.active_children() if p.name.startswith("hogwild-")]


def _sequential(args, train, test):
    x, y = train
    net = build_network(args, x.shape[1:], 10)
    spe = math.ceil(len(y) / args.batch_size)
    opt, sched = make_training(net, args, spe)
    df = fit(net, train, test, epochs=args.epochs, batch_size=args.batch_size, optimizer=opt,
             schedule=sched, seed=args.seed, progress=False, log=None)
    return net, df


def test_one_worker_is_sequential_sgd(digits):
    (x, y), test = digits
    train = (x[:300], y[:300])
    args = parse_args(workers=1, epochs=2, batch_size=32, lr=0.05, momentum=0.9,
                      schedule="cosine", seed=5)
    df, params = run_hogwild(args, train, test, log=None, return_params=True)
    net, ref = _sequential(args, train, test)
    np.testing.assert_array_equal(params, net.params)  # bit-identical
    assert df["test_acc"].tolist() == ref["test_acc"].tolist()
    np.testing.assert_allclose(df["train_loss"], ref["train_loss"], rtol=1e-6)
    assert (df["staleness_max"] == 0).all() and (df["overlap_frac"] == 0).all()
    assert df["samples"].tolist() == [300, 600] and df["updates"].tolist() == [10, 10]


@pytest.mark.parametrize("lock", [False, True])
def test_two_workers_learn_digits_like_sequential(digits, lock):
    train, test = digits
    args = parse_args(workers=2, lock=lock, epochs=6, batch_size=32, lr=0.05, momentum=0.9,
                      schedule="cosine", seed=0)
    df = run_hogwild(args, train, test, log=None)
    _, ref = _sequential(args, train, test)
    acc, ref_acc = df["test_acc"].iloc[-1], ref["test_acc"].iloc[-1]
    assert ref_acc > 0.9
    assert acc >= ref_acc - 0.04, (acc, ref_acc)
    assert df["strategy"].iloc[0] == ("hogwild-locked" if lock else "hogwild")
    assert (df["processes"] == 2).all() and (df["threads"] == 1).all()
    assert df["samples"].iloc[-1] == 6 * len(train[1])
    assert (df["updates"] == math.ceil(len(train[1]) / 32)).all()
    assert df["staleness_mean"].between(0, 2).all() and (df["samples_per_s"] > 0).all()
    if lock:
        assert (df["overlap_frac"] == 0).all()


@pytest.mark.parametrize("max_steps", [5, 30])
def test_max_steps_below_an_epoch_on_one_core_does_not_hang(tmp_path, max_steps):
    """Before: both workers waited forever on the shared semaphore (a worker with an empty
    shard took a second permit). One core makes the race deterministic. 22 steps/epoch:
    5 ends inside epoch 1, 30 (the issue's command) inside epoch 2."""
    m = tmp_path / "m.pkl"
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "cnn.parallel.hogwild", "--workers", "2",
           "--dataset", "digits", "--max-steps", str(max_steps), "--batch-size", "64",
           "--no-progress", "--save-metrics", str(m)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()  # taskset execs python: this is the HOGWILD parent; no-op once it ended
    assert proc.returncode == 0, err
    df = pd.read_pickle(m)
    spe = math.ceil(len(data.load("digits", "train")[1]) / 64)
    full, rest = divmod(max_steps, spe)
    assert df["updates"].tolist() == [spe] * full + [rest]
    assert df["step"].tolist() == [spe * (e + 1) for e in range(full)] + [max_steps]
    assert df["complete_epoch"].tolist() == [True] * full + [False]
    assert not _segments(proc.pid)


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, as in a terminal's foreground
    job. A suite started in the background (``cmd &`` in a script) inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt: Ctrl-C could not be tested."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_everything_and_cleans_up():
    """Ctrl-C in a terminal interrupts the whole process group: parent and workers."""
    import signal
    import time

    cmd = [sys.executable, "-m", "cnn.parallel.hogwild", "--workers", "2", "--dataset",
           "digits", "--epochs", "500", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not _segments(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "never started"
            time.sleep(0.05)
        time.sleep(1.0)  # workers started and training
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert not _segments(proc.pid)
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker exits after it
    while (left := subprocess.run(["pgrep", "-a", "-s", str(proc.pid)], capture_output=True,
                                  text=True).stdout) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == "", f"processes left in the session: {left}"


def test_a_stalled_worker_is_named_by_the_epoch_timeout(digits):
    """Before: no default timeout, and the message could blame the wrong worker."""
    train, test = digits
    args = parse_args(workers=2, epochs=2, batch_size=32, epoch_timeout=3)
    with pytest.raises(HogwildWorkerError) as err:
        run_hogwild(args, train, test, log=None, fault={"worker": 1, "step": 5, "kind": "stall"})
    msg = str(err.value)
    assert "worker 1 (pid" in msg and "has not finished epoch 1: 2 of its 22 updates" in msg
    assert "worker 0" not in msg and "--epoch-timeout" in msg
    assert parse_args([]).epoch_timeout == 1800.0


def test_divergence_keeps_the_completed_epochs(digits):
    (x, y), test = digits
    train = (x[:320], y[:320])
    args = parse_args(workers=1, epochs=3, batch_size=32, lr=0.05, seed=2, schedule="constant")
    ref = run_hogwild(argparse_replace(args, epochs=1), train, test, log=None)
    with pytest.raises(DivergenceError, match="loss became nan in worker 0 at epoch 2") as err:
        run_hogwild(args, train, test, log=None, fault={"worker": 0, "step": 12, "kind": "nan"})
    cols = [c for c in ref.columns if c not in TIMING]
    pd.testing.assert_frame_equal(err.value.frame[cols], ref[cols])


def argparse_replace(args, **kw):
    import argparse

    return argparse.Namespace(**{**vars(args), **kw})


@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_a_crashing_worker_ends_the_run_with_its_error(digits, kind):
    train, test = digits
    args = parse_args(workers=2, epochs=3, batch_size=32, epoch_timeout=60)
    match = "injected fault in worker 1" if kind == "raise" else "worker 1 .*exited with code 7"
    with pytest.raises(HogwildWorkerError, match=match):
        run_hogwild(args, train, test, log=None,
                    fault={"worker": 1, "step": 20, "kind": kind, "code": 7})


def test_bad_arguments_are_refused_before_anything_starts(digits):
    train, test = digits
    with pytest.raises(ValueError, match="workers"):
        run_hogwild(parse_args(workers=0), train, test, log=None)
    with pytest.raises(TypeError, match="unknown HOGWILD option"):
        parse_args(wrokers=2)


def test_cli_writes_metrics(tmp_path):
    """The saved frame is the run's: one lock-free worker against sequential training, which
    it equals bit for bit (losses, accuracies), epoch by epoch."""
    from cnn.parallel.hogwild import main

    out = tmp_path / "h.pkl"
    df = main(["--workers", "1", "--sequential", "--epochs", "2", "--subset", "256",
               "--test-subset", "100", "--batch-size", "32", "--no-progress",
               "--save-metrics", str(out)])
    pd.testing.assert_frame_equal(pd.read_pickle(out), df)
    seq, hog = (df[df["strategy"] == s].reset_index(drop=True) for s in ("sequential", "hogwild"))
    assert len(seq) == len(hog) == 2 and (df["experiment"] == "hogwild").all()
    for col in ("epoch", "samples", "train_loss", "test_loss", "test_acc"):
        assert seq[col].tolist() == hog[col].tolist(), col
    assert hog["samples"].tolist() == [256, 512] and hog["updates"].tolist() == [8, 8]
