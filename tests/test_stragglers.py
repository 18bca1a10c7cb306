"""Uneven workers and the remedies, with real processes at tiny sizes: a straggler slows only
its rank, backup workers apply the first W-B gradients and drop the rest, staleness-aware
async at staleness 0 is plain async, HOGWILD's momentum options run and `shared` shares.
The pure parts (flag parsing, delays, the momentum rule, weight copies) are checked alone."""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn import data
from cnn.parallel import delays
from cnn.parallel.hogwild import parse_args as hogwild_args
from cnn.parallel.hogwild import run_hogwild
from cnn.parallel.hogwild_variants import (
    claim_batches,
    scaled_momentum,
    stragglers_within,
    worker_optimizer,
)
from cnn.parallel.mpi import build_parser
from cnn.parallel.mpi_async import async_strategy_name, staleness_lr
from cnn.parallel.mpi_strategies import shard_bounds
from cnn.train import build_network, fit, make_training


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
# 193 = 6 x 32 + 1: seven global batches of 32 per epoch, the last one of a single sample
TINY = ["--dataset", "digits", "--subset", "193", "--test-subset", "64", "--batch-size", "16",
        "--no-progress", "--seed", "3"]


def mpirun(n: int, args: list[str], tmp: Path, name: str = "m") -> tuple[pd.DataFrame, Path]:
    """``mpiexec -n n python -m cnn.parallel.mpi args``: rank 0's rows and the weights file."""
    m, w = tmp / f"{name}.pkl", tmp / f"{name}.npz"
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "cnn.parallel.mpi", *args,
           "--save-metrics", str(m), "--save-weights", str(w)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    return pd.read_pickle(m), w


def weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return sorted(wa) == sorted(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


# --- flags -----------------------------------------------------------------------------

def test_straggler_flags_parse_and_refuse_nonsense():
    p = build_parser()
    a = p.parse_args(["--straggler", "1:4", "--straggler", "2:1.5", "--straggler-dist",
                      "exp:10", "--eval-every", "3"])
    assert delays.stragglers(a) == {1: 4.0, 2: 1.5}
    assert delays.straggler_label(a) == "1:4,2:1.5,exp:10"
    assert delays.parse_dist(a.straggler_dist) == ("exp", 0.01)
    assert delays.straggler_label(p.parse_args([])) == ""
    for bad in ("1", "x:2", "1:0.5", "-1:2", "1:nan"):
        with pytest.raises(ValueError, match="--straggler wants"):
            delays.parse_straggler(bad)
    for bad in ("exp", "gauss:10", "exp:0", "exp:inf"):
        with pytest.raises(ValueError, match="--straggler-dist wants"):
            delays.parse_dist(bad)
    with pytest.raises(ValueError, match="gives rank 1 twice"):
        delays.stragglers(argparse.Namespace(straggler=["1:2", "1:3"]))


def test_several_worker_counts_slow_the_workers_each_run_has():
    a = argparse.Namespace(straggler=["1:4", "0:2.5"])
    assert stragglers_within(a, 1) == ["0:2.5"] and stragglers_within(a, 2) == ["0:2.5", "1:4"]
    assert stragglers_within(argparse.Namespace(straggler=["1:4"]), 1) is None


def test_hogwild_refuses_a_straggler_that_is_not_a_worker(tmp_path):
    cmd = [sys.executable, "-m", "cnn.parallel.hogwild", "--workers", "2", "--dataset",
           "digits", "--straggler", "2:3", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--straggler 2:3: there is no worker 2 (HOGWILD workers are numbered 0..1)" in (
        proc.stderr)
    proc = subprocess.run([*cmd[:-3], "--straggler", "two", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "argument --straggler: must be RANK:FACTOR" in proc.stderr


@needs_mpi
@pytest.mark.mpi
def test_mpi_refuses_impossible_combinations():
    base = [*TINY, "--max-steps", "2"]
    cases = [
        (2, ["--straggler", "5:2"], "--straggler 5:2: there is no rank 5 in a 2-rank job"),
        (3, ["--strategy", "param-server", "--straggler", "0:2"], "rank 0 is the parameter "
         "server"),
        (3, ["--strategy", "param-server", "--backup-workers", "2"],
         "--backup-workers 2 leaves no gradient to apply"),
        (2, ["--backup-workers", "1"], "--backup-workers applies to --strategy param-server"),
        (2, ["--staleness-aware"], "--staleness-aware applies to --strategy async-param"),
    ]
    for n, extra, message in cases:
        proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "cnn.parallel.mpi",
                               *base, *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)


# --- delays and copies (pure) ----------------------------------------------------------

def test_random_delays_are_seeded_per_rank_and_have_the_asked_mean():
    args = argparse.Namespace(straggler=None, straggler_dist="exp:10", seed=4)
    a, b, c = (delays.Delay.for_rank(args, r) for r in (1, 1, 2))
    da = [a.wanted(0.0) for _ in range(4000)]
    assert da[:50] == [b.wanted(0.0) for _ in range(50)]  # same seed and rank: same delays
    assert da[:50] != [c.wanted(0.0) for _ in range(50)]
    assert np.mean(da) == pytest.approx(0.010, rel=0.06)
    slow = delays.Delay.for_rank(argparse.Namespace(straggler=["1:4"], straggler_dist=None,
                                                    seed=0), 1)
    assert slow.wanted(0.002) == pytest.approx(0.006) and not delays.Delay().active


def test_a_straggler_sleeps_factor_minus_one_times_its_compute_on_average():
    d = delays.Delay(factor=3.0)
    for _ in range(40):
        d.after(0.001)  # asks for 2 ms each time
    assert sum(d.slept_s) == pytest.approx(0.080, rel=0.15, abs=0.004)
    assert d.summary()[0] == 40 and d.summary()[1] == pytest.approx(1.0)
    assert d.summary()[2] == pytest.approx(2.0, rel=0.15, abs=0.1)  # mean sleep, ms


def test_weight_copies_are_due_inside_epochs_and_grouped_by_epoch():
    s = delays.Snapshots(every=3, steps_per_epoch=7, total_steps=12)
    assert [k for k in range(1, 13) if s.due(k)] == [3, 6, 9]  # 7 and 12 are epoch rows
    assert not delays.Snapshots(None, 7, 12).due(3)
    params = np.arange(4.0)
    for k in (3, 6, 9):
        s.take(k, wall_s=k / 10, samples=32.0 * k, params=params)
        params += 1
    assert [p[0] for p in s.params] == [0.0, 1.0, 2.0]  # copies, not views
    df = pd.DataFrame({"step": [7, 12], "samples": [193.0, 353.0], "wall_s": [1.0, 2.0],
                       "test_loss": [0.5, 0.4], "test_acc": [0.7, 0.8]})
    delays.add_curve(df, s.points, [(1.0, 0.3), (0.9, 0.5), (0.6, 0.75)], 7)
    got = [[(p["step"], p["test_acc"]) for p in c] for c in df["evals"]]
    assert got == [[(3, 0.3), (6, 0.5), (7, 0.7)], [(9, 0.75), (12, 0.8)]]
    copying = sum(p["copy_s"] for p in s.points[:2])
    assert df["evals"].iloc[0][-1]["wall_s"] == pytest.approx(1.0 - copying)
    assert "copy_s" not in df["evals"].iloc[0][0]


def test_staleness_aware_learning_rates():
    assert staleness_lr(0.1, 0, "max1") == 0.1 and staleness_lr(0.1, 1, "max1") == 0.1
    assert staleness_lr(0.1, 4, "max1") == pytest.approx(0.025)
    assert staleness_lr(0.1, 0, "plus1") == 0.1 and staleness_lr(0.1, 1, "plus1") == 0.05
    a = build_parser().parse_args(["--strategy", "async-param-server", "--staleness-aware"])
    assert async_strategy_name(a) == "async-param-server-stale"
    a.staleness_rule = "plus1"
    assert async_strategy_name(a) == "async-param-server-stale1"


# --- HOGWILD: momentum options and batch claims ----------------------------------------

def test_scaled_momentum_keeps_the_sequential_step_amplification():
    assert scaled_momentum(0.9, 1) == pytest.approx(0.9)
    assert scaled_momentum(0.9, 2) == pytest.approx(0.8)
    assert scaled_momentum(0.9, 10) == 0.0 and scaled_momentum(0.9, 32) == 0.0
    for w in (1, 2, 4):  # (1 - m_e)(1 - m_i) with m_i = 1 - 1/W equals 1 - mu
        assert (1 - scaled_momentum(0.9, w)) * (1 / w) == pytest.approx(0.1)


def _segment(n: int):
    """A shared segment holding weights and a velocity of ``n`` float32 each."""
    shm = shared_memory.SharedMemory(create=True, size=8 * n)
    return shm, _views(shm, n)


def _views(shm, n: int) -> dict[str, np.ndarray]:
    return {"params": np.ndarray((n,), np.float32, buffer=shm.buf),
            "velocity": np.ndarray((n,), np.float32, buffer=shm.buf, offset=4 * n)}


def _args(mode: str) -> argparse.Namespace:
    return hogwild_args([], workers=2, batch_size=16, momentum=0.9, lr=0.1, dataset="digits",
                        hogwild_momentum=mode)


def _shared_step(name: str, n: int, w: int, go, done) -> None:
    """One HOGWILD worker's optimiser over the segment: a step with gradient w + 1."""
    shm = shared_memory.SharedMemory(name=name)
    v = _views(shm, n)
    net = build_network(_args("shared"), (1, 8, 8), 10, params=v["params"])
    opt, _ = worker_optimizer(net, _args("shared"), v, 2, 4)
    go.wait()
    net.grads[...] = w + 1.0
    opt.step(lr=0.1)
    done.set()
    del net, opt, v
    shm.close()


def test_shared_momentum_is_one_velocity_across_worker_processes():
    """Worker 0 steps with gradient 1, then worker 1 with gradient 2, each in its own
    process: with one shared velocity, v = 0.9 * 1 + 2 and the weights moved by
    0.1 * (1 + 2.9); private velocities would give v = 2 and a move of 0.1 * (1 + 2)."""
    net = build_network(_args("shared"), (1, 8, 8), 10)
    n = net.num_params
    shm, v = _segment(n)
    v["params"][...], v["velocity"][...] = net.params, 0
    ctx = mp.get_context("spawn")
    go0, done0, go1, done1 = (ctx.Event() for _ in range(4))
    procs = [ctx.Process(target=_shared_step, args=(shm.name, n, w, go, done))
             for w, go, done in ((0, go0, done0), (1, go1, done1))]
    try:
        for p in procs:
            p.start()
        go0.set()
        assert done0.wait(120)
        go1.set()
        assert done1.wait(120)
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0]
        np.testing.assert_allclose(v["velocity"], 0.9 * 1.0 + 2.0, rtol=1e-6)
        np.testing.assert_allclose(v["params"], net.params - 0.1 * (1.0 + 2.9), rtol=1e-5,
                                   atol=1e-6)
    finally:
        del v
        shm.close()
        shm.unlink()


def test_local_and_scaled_momentum_keep_private_velocities():
    net = build_network(_args("local"), (1, 8, 8), 10)
    shm, v = _segment(net.num_params)
    try:
        for mode, mu in (("local", 0.9), ("scaled", 0.8)):
            opt, _ = worker_optimizer(net, _args(mode), v, 2, 4)
            assert opt.momentum == pytest.approx(mu)
            assert not np.shares_memory(opt.velocity, v["velocity"])
        del opt
    finally:
        del v
        shm.close()
        shm.unlink()


def test_dynamic_claims_cover_each_epoch_once():
    counter = np.zeros(1, np.int64)
    lock = mp.get_context("spawn").Lock()
    for stop, want in ((5, [0, 1, 2, 3, 4]), (8, [5, 6, 7])):  # two epochs of the run
        a, b = claim_batches(counter, lock, stop), claim_batches(counter, lock, stop)
        got = [next(a), next(b), next(b), *list(a), *list(b)]
        assert sorted(got) == want and len(got) == len(want)
    assert counter[0] == 8 and list(claim_batches(counter, lock, 8)) == []


# --- real runs -------------------------------------------------------------------------

@needs_mpi
@pytest.mark.mpi
def test_a_straggler_slows_only_its_rank_and_not_the_math(tmp_path):
    """allreduce, rank 1 four times slower: only rank 1 sleeps, about 3x its compute, and
    the weights are those of the run without a straggler (synchronous: same math)."""
    args = [*TINY, "--epochs", "2"]
    plain, w_plain = mpirun(2, args, tmp_path, "plain")
    slow, w_slow = mpirun(2, [*args, "--straggler", "1:4", "--eval-every", "3"], tmp_path)
    assert same_weights(w_plain, w_slow)
    assert set(slow["straggler"]) == {"1:4"} and set(plain["straggler"]) == {""}
    steps, compute, slept = (slow[c].iloc[0] for c in ("rank_steps", "rank_compute_ms",
                                                        "rank_delay_ms"))
    assert steps == [14, 14] and slept[0] == 0.0
    assert 2.0 < slept[1] / compute[1] < 4.5, (compute, slept)
    curve = [p for c in slow["evals"] for p in c]
    assert [p["step"] for p in curve] == [3, 6, 7, 9, 12, 14]
    assert np.all(np.diff([p["wall_s"] for p in curve]) > 0)
    assert curve[2]["test_acc"] == slow["test_acc"].iloc[0]


@needs_mpi
@pytest.mark.mpi
def test_async_dynamic_assignment_gives_the_straggler_fewer_pieces(tmp_path):
    args = [*TINY, "--epochs", "3", "--strategy", "async-param-server", "--assign",
            "dynamic", "--straggler", "2:6", "--eval-every", "4"]
    df, _ = mpirun(3, args, tmp_path)
    steps = df["rank_steps"].iloc[0]
    assert steps[0] == 0 and sum(steps) == 2 * 7 * 3  # every piece computed exactly once
    assert steps[1] > 2 * steps[2], steps
    # an epoch row covers W x 7 updates; with dynamic assignment a fast worker may deliver
    # a piece of the next epoch before the slow one's last: only the total is exact
    assert df["samples"].iloc[-1] == 579 and df["samples"].is_monotonic_increasing
    assert sum(sum(h) for h in df["staleness_hist"]) == sum(steps) - 3  # the 1-sample slices
    assert df["rank_delay_ms"].iloc[0][1] == 0.0 and df["rank_delay_ms"].iloc[0][2] > 0


@needs_mpi
@pytest.mark.mpi
def test_staleness_aware_at_staleness_zero_is_plain_async(tmp_path):
    """One worker: every gradient is fresh (staleness 0), so lr / max(1, s) and lr / (1 + s)
    leave the lr alone and the runs are identical, bit for bit."""
    args = [*TINY, "--epochs", "2", "--strategy", "async-param-server"]
    plain, w0 = mpirun(2, args, tmp_path, "plain")
    assert (plain["staleness_max"] == 0).all()
    for rule in ("max1", "plus1"):
        aware, w1 = mpirun(2, [*args, "--staleness-aware", "--staleness-rule", rule],
                           tmp_path, rule)
        assert same_weights(w0, w1), rule
        assert aware["test_acc"].tolist() == plain["test_acc"].tolist()
    # with two workers the staleness is mostly 1: lr / (1 + s) halves it, and it shows
    _, w2 = mpirun(3, args, tmp_path, "two")
    _, w3 = mpirun(3, [*args, "--staleness-aware", "--staleness-rule", "plus1"], tmp_path,
                   "two_aware")
    assert not same_weights(w2, w3)


@needs_mpi
@pytest.mark.mpi
def test_backup_worker_drops_the_straggler_and_applies_the_first_gradient(tmp_path):
    """2 workers, B = 1, worker 2 two hundred times slower: every step applies worker 1's
    gradient alone, so the weights are sequential SGD on worker 1's slices; every gradient
    of worker 2 arrives late and is dropped, and it still ends with the final weights."""
    args = [*TINY, "--epochs", "2", "--strategy", "param-server", "--backup-workers", "1"]
    df, w = mpirun(3, [*args, "--straggler", "2:200"], tmp_path)
    assert set(df["strategy"]) == {"param-server-backup"}
    steps = df["rank_steps"].iloc[0]
    assert df["rank_applied"].iloc[0] == [0, 14, 0]
    assert (df["gradients"] - df["dropped"]).tolist() == [7, 7]  # W - B = 1 per step
    assert df["dropped"].sum() == steps[2] >= 2  # all of the straggler's, none lost
    ref, ref_acc = _first_worker_sgd(build_parser().parse_args(args))
    got = weights(w)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7)
    # the test split is evaluated in slices, one per rank, each with that rank's weights:
    # the same accuracy means the dropped worker holds the final weights too
    assert df["test_acc"].iloc[-1] == ref_acc


def _first_worker_sgd(a: argparse.Namespace) -> tuple[dict[str, np.ndarray], float]:
    """Sequential SGD on worker 1's slice of every global batch of 2 x 16: the weights and
    their test accuracy."""
    train, test = data.load("digits", "train", subset=193), data.load("digits", "test",
                                                                        subset=64)
    net = build_network(a, train[0].shape[1:], 10)
    opt, sched = make_training(net, a, math.ceil(193 / 32))

    def step(xb, yb, lr):
        lo, hi = shard_bounds(len(yb), 2, 0)
        loss = net.loss_and_grad(xb[lo:hi], yb[lo:hi])
        opt.step(lr=lr)
        return loss

    fit(net, train, test, epochs=2, batch_size=32, optimizer=opt, schedule=sched, seed=3,
        step_fn=step, progress=False, log=None)
    return net.state_dict(), net.evaluate(*test)[1]


@needs_mpi
@pytest.mark.mpi
def test_backup_workers_apply_w_minus_b_per_step_and_drop_every_other_gradient(tmp_path):
    """3 equal workers, B = 1: each step applies exactly 2 gradients; every other gradient
    computed is received and dropped, none is lost. How many are dropped depends on the
    scheduler (4 ranks on 2 cores: a late worker may skip steps without computing them),
    but each epoch's last step leaves one worker unaccepted, so its epoch-end drain drops
    at least one."""
    args = [*TINY, "--epochs", "2", "--strategy", "param-server", "--backup-workers", "1"]
    df, _ = mpirun(4, args, tmp_path)
    spe = math.ceil(193 / 48)
    assert (df["gradients"] - df["dropped"]).tolist() == [2 * spe, 2 * spe]
    assert sum(df["rank_applied"].iloc[0]) == 2 * 2 * spe
    assert df["gradients"].sum() == sum(df["rank_steps"].iloc[0])
    assert (df["dropped"] >= 1).all()


def test_hogwild_straggler_and_dynamic_claims(tmp_path):
    train, test = data.load("digits", "train", subset=320), data.load("digits", "test",
                                                                        subset=100)
    args = hogwild_args([], workers=2, epochs=2, batch_size=16, straggler=["1:6"],
                        assign="static", eval_every=7)
    df = run_hogwild(args, train, test, log=None)
    steps, compute, slept = (df[c].iloc[0] for c in ("rank_steps", "rank_compute_ms",
                                                      "rank_delay_ms"))
    assert steps == [20, 20] and slept[0] == 0.0 and slept[1] > 3 * compute[1]
    assert set(df["straggler"]) == {"1:6"} and set(df["assign"]) == {"static"}
    assert [p["step"] for c in df["evals"] for p in c] == [7, 14, 20, 21, 28, 35, 40]
    dyn = run_hogwild(hogwild_args([], workers=2, epochs=2, batch_size=16, straggler=["1:6"],
                                   assign="dynamic"), train, test, log=None)
    steps = dyn["rank_steps"].iloc[0]
    assert sum(steps) == 40 and steps[0] > 2 * steps[1], steps
    assert dyn["updates"].tolist() == [20, 20]


@pytest.mark.parametrize("mode", ["local", "shared", "scaled"])
def test_each_hogwild_momentum_option_learns(mode):
    train, test = data.load("digits", "train"), data.load("digits", "test")
    args = hogwild_args([], workers=2, epochs=3, batch_size=32, hogwild_momentum=mode)
    df = run_hogwild(args, train, test, log=None)
    assert set(df["momentum_mode"]) == {mode}
    assert df["worker_momentum"].iloc[0] == pytest.approx(0.8 if mode == "scaled" else 0.9)
    assert df["test_acc"].iloc[-1] > 0.85
    assert sum(sum(h) for h in df["staleness_hist"]) == df["updates"].sum()


@pytest.mark.parametrize("mode", ["shared", "scaled"])
def test_one_worker_with_any_momentum_option_is_sequential_sgd(mode):
    train = data.load("digits", "train", subset=300)
    test = data.load("digits", "test")
    args = hogwild_args([], workers=1, epochs=2, batch_size=32, seed=5, hogwild_momentum=mode)
    _, params = run_hogwild(args, train, test, log=None, return_params=True)
    net = build_network(args, train[0].shape[1:], 10)
    opt, sched = make_training(net, args, math.ceil(300 / 32))
    fit(net, train, test, epochs=2, batch_size=32, optimizer=opt, schedule=sched, seed=5,
        progress=False, log=None)
    np.testing.assert_array_equal(params, net.params)


def test_delays_cost_wall_time_only_where_injected():
    """A worker slowed 4x: its sleeps are real seconds (a clock check, generous bounds)."""
    d = delays.Delay(factor=4.0)
    t0 = time.perf_counter()
    for _ in range(10):
        d.after(0.002)
    assert time.perf_counter() - t0 >= 0.055
