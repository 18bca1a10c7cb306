"""Async K-fold: folds partition the data, engines give the serial numbers, dead engines fail."""

import tempfile
import time

import numpy as np
import pandas as pd
import pytest

from cnn import data
from cnn.parallel.kfold import (
    CpuSampler,
    KFoldEngineError,
    accuracy_table,
    fold_plan,
    fold_seed,
    parse_args,
    run_kfold,
    speedup_table,
)

SMALL = dict(dataset="digits", subset=360, epochs=1, batch_size=32, folds=4)


@pytest.mark.parametrize("stratified", [True, False])
def test_folds_partition_the_data(stratified):
    _, y = data.load("digits", "train")
    plan = fold_plan(y, 5, seed=3, stratified=stratified)
    vals = [va for _, va in plan]
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(y)))  # disjoint, covering
    for tr, va in plan:
        assert np.intersect1d(tr, va).size == 0 and len(tr) + len(va) == len(y)
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1
    if stratified:
        counts = np.array([np.bincount(y[v], minlength=10) for v in vals])
        assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
    again = fold_plan(y, 5, seed=3, stratified=stratified)
    assert all((a[1] == b[1]).all() for a, b in zip(plan, again, strict=True))


def test_every_fold_has_its_own_fixed_seed():
    assert [fold_seed(7, k) for k in range(4)] == [7, 8, 9, 10]


def test_serial_and_engines_give_identical_folds(tmp_path, monkeypatch):
    """Each fold trains to the same weights and accuracy in this process and on an engine;
    the engine run leaves no ipyparallel files behind (before: one engines*.json in
    ~/.ipython/profile_default/log per run)."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    args = parse_args(**SMALL)
    ser = run_kfold(args, serial=True, progress=False, log=None, cpu_interval=0.2)
    par = run_kfold(args, engines=2, progress=False, log=None, cpu_interval=0.2, timeout=120)
    f_ser, f_par = (d[d["kind"] == "fold"].reset_index(drop=True) for d in (ser, par))
    assert f_ser["fold"].tolist() == f_par["fold"].tolist() == [0, 1, 2, 3]
    for col in ("fold_seed", "weights_sha256", "test_acc", "test_loss", "final_loss",
                "acc_history", "samples", "val_size"):
        assert f_ser[col].tolist() == f_par[col].tolist(), col
    assert f_ser["weights_sha256"].nunique() == 4  # four different trainings, not one
    assert f_par["pid"].nunique() == 2 and set(f_par["engine"]) == {0, 1}
    r_ser, r_par = (d[d["kind"] == "run"].iloc[0] for d in (ser, par))
    assert r_ser["strategy"] == "sequential" and r_par["strategy"] == "kfold"
    assert r_par["processes"] == 2 and r_par["threads"] == 1
    assert r_ser["test_acc"] == r_par["test_acc"] == pytest.approx(f_par["test_acc"].mean())
    assert len(r_par["cpu_busy"]) >= 1 and len(r_par["cpu_samples"]) >= 1
    table = accuracy_table(pd.concat([ser, par]))
    assert list(table.columns) == ["serial", "2 engine(s)"]
    assert table.loc["fold 2", "serial"] == f_ser["test_acc"].iloc[2]
    assert table.loc["mean +- std", "serial"] == table.loc["mean +- std", "2 engine(s)"]
    sp = speedup_table(pd.concat([ser, par])).set_index("run")
    assert sp.loc["2 engine(s)", "speedup_vs_serial"] == pytest.approx(
        r_ser["wall_s"] / r_par["wall_s"])
    assert sp.loc["2 engine(s)", "wall_s"] == r_par["wall_s"]
    # IPython's profile skeleton (profile_default/startup/README) is made once by any
    # IPython app; nothing per run (engines*.json, logs, connection files) may remain
    left = [p for d in (tmp_path / "ipython", scratch) for p in d.rglob("*")
            if p.is_file() and p.relative_to(d).parts[-2:] != ("startup", "README")]
    assert not left, left


def test_a_dead_engine_fails_the_run_quickly():
    args = parse_args(**SMALL)
    t0 = time.perf_counter()
    with pytest.raises(KFoldEngineError, match=r"engine.*(died|EngineError)"):
        run_kfold(args, engines=2, progress=False, log=None, timeout=90, _die_on_fold=1)
    assert time.perf_counter() - t0 < 90


def test_cpu_sampler_sees_every_core():
    import psutil

    with CpuSampler(0.05) as s:
        time.sleep(0.3)
    assert len(s.samples) >= 2 and len(s.busy()) == psutil.cpu_count()
    assert len(s.own) == len(s.samples) and all(v >= 0 for v in s.own)


def test_bad_options_are_refused():
    with pytest.raises(TypeError, match="unknown k-fold option"):
        parse_args(fold=3)
    with pytest.raises(ValueError, match="engines"):
        run_kfold(parse_args(**SMALL), engines=0, log=None, progress=False)
