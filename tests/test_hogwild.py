"""HOGWILD: one worker is sequential SGD; two learn as well; nothing left in /dev/shm."""

import math
import multiprocessing as mp
import os

import numpy as np
import pytest

from cnn import data
from cnn.parallel.hogwild import SHM_PREFIX, HogwildWorkerError, parse_args, run_hogwild
from cnn.train import build_network, fit, make_training


def _segments() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(SHM_PREFIX)}


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
    from cnn.parallel.hogwild import main

    out = tmp_path / "h.pkl"
    df = main(["--workers", "2", "--epochs", "1", "--subset", "256", "--batch-size", "32",
               "--no-progress", "--save-metrics", str(out)])
    assert out.exists() and len(df) == 1 and df["experiment"].iloc[0] == "hogwild"
