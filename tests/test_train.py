"""The training loop: it learns, it stops on NaN with a message, it resumes exactly."""

import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from cnn import checkpoint, cli, data
from cnn.errors import CheckpointError, DivergenceError
from cnn.metrics import COLUMNS, MACHINE_COLUMNS
from cnn.models import seed_cnn
from cnn.optim import make_optimizer, make_schedule
from cnn.train import CHECKPOINT, fit, main

#: Columns that measure time, or describe the process (the order threadpoolctl lists BLAS
#: libraries in varies): they differ between any two runs; every other one must match.
TIMING = {"wall_s", "compile_s", "step_ms_median", "step_ms_iqr", "samples_per_s",
          *MACHINE_COLUMNS}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


def _train(digits, epochs=2, max_steps=None, ckpt=None, resume=False, lr=0.05, subset=400):
    (x, y), test = digits
    net = seed_cnn((1, 8, 8), padding=1, seed=3)
    opt = make_optimizer("sgd", net, lr=lr, momentum=0.9)
    steps = -(-subset // 32) * epochs
    sched = make_schedule("cosine", lr, steps)
    df = fit(net, (x[:subset], y[:subset]), test, epochs=epochs, batch_size=32, optimizer=opt,
             schedule=sched, seed=7, max_steps=max_steps, checkpoint_dir=ckpt, resume=resume,
             progress=False, log=None, experiment="test")
    return net, df


def test_seed_cnn_learns_digits(digits):
    (x, y), (xt, yt) = digits
    net = seed_cnn((1, 8, 8), padding=1)
    opt = make_optimizer("sgd", net, lr=0.05, momentum=0.9)
    df = fit(net, (x, y), (xt, yt), epochs=8, batch_size=32, optimizer=opt,
             schedule=make_schedule("cosine", 0.05, 8 * -(-len(y) // 32)), progress=False,
             log=None)
    assert df["test_acc"].iloc[-1] >= 0.95
    assert df["train_loss"].iloc[-1] < df["train_loss"].iloc[0]
    assert list(df.columns[:len(COLUMNS)]) == COLUMNS
    assert (df["epoch"] == np.arange(1, 9)).all()
    assert (df["samples"] == len(y) * df["epoch"]).all()
    assert (df["step_ms_median"] > 0).all() and (df["compile_s"] >= 0).all()


def test_nan_loss_stops_with_a_clear_message(digits, tmp_path):
    (x, y), test = digits
    x = x[:256].copy()
    x[40] = np.nan  # one poisoned sample, in the second batch of epoch 1 or later
    net = seed_cnn((1, 8, 8), padding=1)
    opt = make_optimizer("sgd", net, lr=0.01)
    with pytest.raises(DivergenceError, match=r"loss became nan .*diverged.*--lr"):
        fit(net, (x, y[:256]), None, epochs=2, batch_size=32, optimizer=opt, progress=False,
            log=None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_keeps_last_good_checkpoint(digits, tmp_path):
    (x, y), test = digits
    net, first = _train(digits, epochs=1, ckpt=tmp_path)
    good, _ = checkpoint.load(tmp_path / CHECKPOINT)
    with pytest.raises(DivergenceError, match=str(tmp_path / CHECKPOINT)) as err:
        _train(digits, epochs=3, ckpt=tmp_path, resume=True, lr=1e30)
    after, _ = checkpoint.load(tmp_path / CHECKPOINT)
    assert good.keys() == after.keys()
    for k, v in good.items():
        np.testing.assert_array_equal(after[k], v)
    # the completed epoch travels with the error, for --save-metrics
    pd.testing.assert_frame_equal(err.value.frame, first)


def assert_same_run(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Every column but the clocks: losses, accuracies, steps, samples, lr, labels."""
    assert list(got.columns) == list(want.columns)
    cols = [c for c in want.columns if c not in TIMING]
    pd.testing.assert_frame_equal(got[cols], want[cols], check_exact=True)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(digits, tmp_path):
    full, df_full = _train(digits, epochs=3)
    # stop mid-epoch 2 (13 steps per epoch), then resume to the end
    _, df_stop = _train(digits, epochs=3, max_steps=20, ckpt=tmp_path)
    assert list(df_stop["step"]) == [13, 20]
    resumed, df_res = _train(digits, epochs=3, ckpt=tmp_path, resume=True)
    np.testing.assert_array_equal(resumed.params, full.params)
    assert list(df_res["epoch"]) == [1, 2, 3]
    # the whole frame: epoch 2's train_loss averages all 13 of its batches, not the 6
    # after the resume
    assert_same_run(df_res, df_full)
    assert not list(tmp_path.glob("*.tmp")), "checkpoint writes must be atomic"


def test_resume_without_a_checkpoint_is_an_error(digits, tmp_path):
    with pytest.raises(CheckpointError, match=rf"no checkpoint in {tmp_path}.*looked for"):
        _train(digits, epochs=1, ckpt=tmp_path, resume=True)


def test_resume_refuses_another_network(digits, tmp_path):
    """Before: a bare KeyError from load_state_dict."""
    (x, y), test = digits
    _train(digits, epochs=1, ckpt=tmp_path)
    net = seed_cnn((1, 8, 8), padding=1, seed=3, filters=(4, 8))
    with pytest.raises(CheckpointError, match="different run: network was"):
        fit(net, (x[:400], y[:400]), test, epochs=2, batch_size=32, checkpoint_dir=tmp_path,
            resume=True, progress=False, log=None)


def _cli(tmp_path, *extra):
    return ["--dataset", "digits", "--subset", "96", "--test-subset", "50", "--epochs", "2",
            "--batch-size", "32", "--no-progress", "--checkpoint-dir", str(tmp_path), *extra]


@pytest.mark.parametrize("flag,value,shown", [
    ("--batch-size", "16", "--batch-size was 32, now 16"),
    ("--model", "mlp", "--model was 'seed_cnn', now 'mlp'"),
    ("--seed", "4", "--seed was 0, now 4"),
    ("--epochs", "3", "--epochs was 2, now 3"),
])
def test_cli_resume_refuses_a_different_run(tmp_path, capsys, flag, value, shown):
    """Before: --batch-size 8 --resume exited 0 with a frame of mixed batch sizes."""
    main(_cli(tmp_path, "--max-steps", "3"))
    before = checkpoint.load(tmp_path / CHECKPOINT)[1]
    capsys.readouterr()
    assert cli.run(main, _cli(tmp_path, "--max-steps", "3", "--resume", flag, value)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint ") and shown in err, err
    assert len(err.strip().splitlines()) == 1
    assert checkpoint.load(tmp_path / CHECKPOINT)[1] == before  # untouched


def test_cli_resume_after_kill_continues_the_same_run(tmp_path):
    """kill -9 mid-run leaves a loadable checkpoint; --resume then gives the frame and the
    weights of an uninterrupted run."""
    argv = ["--dataset", "digits", "--test-subset", "50", "--epochs", "12", "--batch-size",
            "32", "--no-progress", "--save-weights"]
    full = main([*argv, str(tmp_path / "full.npz")])
    d = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "cnn.train", *argv, str(tmp_path / "r.npz"),
                             "--checkpoint-dir", str(d)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (d / CHECKPOINT).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    step = checkpoint.load(d / CHECKPOINT)[1]["global_step"]
    per_epoch = -(-len(data.load("digits", "train")[1]) // 32)
    assert 0 < step < 12 * per_epoch, step  # killed mid-run
    resumed = main([*argv, str(tmp_path / "r.npz"), "--checkpoint-dir", str(d), "--resume"])
    assert_same_run(resumed, full)
    with np.load(tmp_path / "full.npz") as a, np.load(tmp_path / "r.npz") as b:
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    again = main([*argv, str(tmp_path / "r.npz"), "--checkpoint-dir", str(d), "--resume"])
    assert_same_run(again, full)  # resuming a finished run trains nothing, same frame


def test_cli_resume_errors_name_the_file(tmp_path, capsys):
    assert cli.run(main, _cli(tmp_path, "--resume")) == 2
    assert f"no checkpoint in {tmp_path}" in capsys.readouterr().err
    (tmp_path / CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    assert cli.run(main, _cli(tmp_path, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / CHECKPOINT} is truncated or corrupt" in err
    (tmp_path / CHECKPOINT).unlink()
    (tmp_path / "checkpoint.pkl").write_bytes(b"\x80\x04old")
    assert cli.run(main, _cli(tmp_path, "--resume")) == 2
    assert "checkpoint.pkl is a pickle checkpoint of an older version" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cli_divergence_saves_the_completed_epochs(tmp_path, capsys, monkeypatch):
    """Before: nothing was written to --save-metrics when a later epoch diverged."""
    from cnn import train

    m = tmp_path / "m.pkl"
    argv = ["--dataset", "digits", "--subset", "96", "--test-subset", "50", "--batch-size",
            "32", "--no-progress", "--schedule", "constant", "--lr", "0.05"]
    ref = main([*argv, "--epochs", "1"])  # epoch 1 alone: what must be saved
    # 3 steps per epoch; from step 4 (epoch 2) on the lr is absurd and the loss diverges
    monkeypatch.setattr(train, "make_schedule",
                        lambda name, lr, total: (lambda t: 0.05 if t < 3 else 1e30))
    assert cli.run(main, [*argv, "--epochs", "3", "--save-metrics", str(m)]) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and f"are in {m}" in err
    assert len(err.strip().splitlines()) == 1, err
    assert_same_run(pd.read_pickle(m), ref)
