"""The training loop: it learns, it stops on NaN with a message, it resumes exactly."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cnn import data
from cnn.errors import DivergenceError
from cnn.metrics import COLUMNS
from cnn.models import seed_cnn
from cnn.optim import make_optimizer, make_schedule
from cnn.train import CHECKPOINT, fit, main


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
    net, _ = _train(digits, epochs=1, ckpt=tmp_path)
    good = pd.read_pickle(tmp_path / CHECKPOINT)
    with pytest.raises(DivergenceError, match=str(tmp_path / CHECKPOINT)):
        _train(digits, epochs=3, ckpt=tmp_path, resume=True, lr=1e30)
    after = pd.read_pickle(tmp_path / CHECKPOINT)
    for k, v in good["params"].items():
        np.testing.assert_array_equal(after["params"][k], v)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(digits, tmp_path):
    full, df_full = _train(digits, epochs=3)
    # stop mid-epoch 2 (13 steps per epoch), then resume to the end
    _train(digits, epochs=3, max_steps=20, ckpt=tmp_path)
    resumed, df_res = _train(digits, epochs=3, ckpt=tmp_path, resume=True)
    np.testing.assert_array_equal(resumed.params, full.params)
    assert list(df_res["epoch"]) == [1, 2, 3]
    np.testing.assert_allclose(df_res["test_acc"], df_full["test_acc"])
    assert not list(tmp_path.glob("*.tmp")), "checkpoint writes must be atomic"


def test_data_order_is_fixed_by_seed_and_epoch():
    a = list(data.iterate_batches(100, 10, seed=1, epoch=2))
    b = list(data.iterate_batches(100, 10, seed=1, epoch=2))
    assert all((u == v).all() for u, v in zip(a, b, strict=True))


def test_cli_trains_and_saves(tmp_path, capsys):
    df = main(["--dataset", "digits", "--epochs", "1", "--subset", "300", "--no-progress",
               "--save-metrics", str(tmp_path / "m.pkl"), "--save-weights",
               str(tmp_path / "w.npz")])
    assert "test accuracy:" in capsys.readouterr().out
    saved = pd.read_pickle(tmp_path / "m.pkl")
    assert saved["strategy"].iloc[0] == "sequential" and saved["dataset"].iloc[0] == "digits"
    assert saved["test_acc"].iloc[0] == df["test_acc"].iloc[0]
    with np.load(tmp_path / "w.npz") as w:
        assert set(w.files) == {"0.weight", "0.bias", "3.weight", "3.bias", "7.weight",
                                "7.bias", "9.weight", "9.bias"}


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "cnn.train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--backend", "--model", "--dataset", "--data-dir", "--subset", "--epochs",
                 "--max-steps", "--batch-size", "--lr", "--momentum", "--nesterov",
                 "--optimizer", "--schedule", "--weight-decay", "--threads", "--seed",
                 "--save-metrics", "--save-weights", "--checkpoint-dir", "--resume"):
        assert flag in out
