"""Asynchronous K-fold cross-validation: folds farmed to ipyparallel engines.

    python -m cnn.parallel.kfold --folds 4 --engines 2 --dataset digits --epochs 5
    python -m cnn.parallel.kfold --folds 4 --engines 1 2 --serial ...   # compare all three

The training set is split into ``K`` stratified folds by
:func:`cnn.data.kfold_indices` (seeded by ``--seed``); fold ``k`` trains a fresh
network on the other ``K-1`` parts and is scored on its own part (its held-out
accuracy is the ``test_acc`` of the fold's row). Every fold has its own fixed seed
``seed + k`` for the initial weights and the data order, so a fold gives the same
numbers wherever it runs: in this process (``serial``) or on any engine.

Parallel runs start ``E`` local engines with ``ipp.Cluster(n=E)`` (stopped in a
``finally``) in a throwaway IPython profile directory, removed afterwards: ipyparallel
writes connection files, logs and an ``engines<id>.json`` state file per cluster into
its profile, which in ``~/.ipython`` piled up run after run. The engines are warmed up
(imports, dataset load: outside the timed region, as the serial run has them
already), then every fold is submitted at once through a *load-balanced* view: a free
engine takes the next fold. Results are handled as each fold finishes (progress bar,
one line per fold) rather than in submission order. Every wait has a timeout; an
engine that dies (it unregisters, or its task comes back as an ``EngineError``) stops
the run at once with :class:`KFoldEngineError` naming the fold and the engine.

While the folds run, a background thread samples the utilisation of every core
with ``psutil.cpu_percent(percpu=True, interval=...)``, for the serial and the
parallel runs alike, as the seed study did.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cnn import cli
from cnn import data as cdata
from cnn.errors import CnnError
from cnn.metrics import make_row, save_metrics, to_frame
from cnn.train import add_training_args

_POLL_S = 0.1


class KFoldEngineError(CnnError, RuntimeError):
    """An engine died, a fold failed or the run timed out; the message says which."""


# --- folds and the task every engine runs ---------------------------------------------

def fold_seed(seed: int, fold: int) -> int:
    """The fixed seed of fold ``fold`` (initial weights and data order)."""
    return int(seed) + int(fold)


def fold_plan(labels: np.ndarray, folds: int, seed: int = 0,
              stratified: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, val_idx)`` per fold: val parts disjoint and covering, stratified."""
    return cdata.kfold_indices(np.asarray(labels), folds, seed=seed, stratified=stratified)


_DATA: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}


def _train_data(cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The training split the args name, loaded once per process."""
    key = (cfg["dataset"], cfg["data_dir"], cfg["subset"])
    if key not in _DATA:
        _DATA[key] = cdata.load(cfg["dataset"], "train", data_dir=cfg["data_dir"],
                                subset=cfg["subset"])
    return _DATA[key]


def warm_up(cfg: dict[str, Any]) -> int:
    """Import the training code, load the data and take one scratch step (untimed): the
    dataset load, JIT compilation (Numba) and first-call costs are paid here."""
    from cnn.train import build_network, make_training

    x, y = _train_data(cfg)
    ns = argparse.Namespace(**cfg)
    net = build_network(ns, x.shape[1:], cfg["_num_classes"])
    opt, _ = make_training(net, ns, 1)
    b = min(ns.batch_size, len(y))
    net.loss_and_grad(x[:b], y[:b])
    opt.step(lr=0.0)
    net.evaluate(x[:b], y[:b])
    return os.getpid()


def train_fold(cfg: dict[str, Any], fold: int, train_idx: np.ndarray,
               val_idx: np.ndarray) -> dict[str, Any]:
    """Train fold ``fold`` from scratch and score it on its held-out part.

    Runs unchanged on an engine or in this process; a plain function of its
    arguments, so both give identical numbers.
    """
    import socket

    from cnn.train import build_network, fit, make_training

    t_start = time.time()
    if cfg.get("_die_on_fold") == fold and os.getpid() != cfg.get("_parent_pid"):
        os._exit(3)  # test hook: this engine dies mid-task
    x, y = _train_data(cfg)
    if len(y) != cfg["_n"]:
        raise ValueError(f"this process loaded {len(y)} training samples, the plan was made "
                         f"for {cfg['_n']}: different data on the engines?")
    ns = argparse.Namespace(**{**cfg, "seed": fold_seed(cfg["seed"], fold)})
    net = build_network(ns, x.shape[1:], cfg["_num_classes"])
    spe = math.ceil(len(train_idx) / ns.batch_size)
    opt, sched = make_training(net, ns, spe)
    hist = fit(net, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), epochs=ns.epochs,
               batch_size=ns.batch_size, optimizer=opt, schedule=sched, seed=ns.seed,
               max_steps=ns.max_steps, progress=False, log=None)
    last = hist.iloc[-1]
    return {"fold": fold, "fold_seed": ns.seed, "test_acc": float(last["test_acc"]),
            "test_loss": float(last["test_loss"]), "final_loss": float(last["final_loss"]),
            "train_wall_s": float(last["wall_s"]), "samples": int(last["samples"]),
            "step_ms_median": float(last["step_ms_median"]),
            "step_ms_iqr": float(last["step_ms_iqr"]), "compile_s": float(hist["compile_s"].sum()),
            "threads": int(net.threads), "device": net.backend.device_name(),
            "backend": net.backend.NAME, "train_size": len(train_idx), "val_size": len(val_idx),
            "acc_history": hist["test_acc"].tolist(), "pid": os.getpid(),
            # the trained weights, compared between serial and engine runs
            "weights_sha256": hashlib.sha256(
                np.ascontiguousarray(net.backend.to_host(net.params)).tobytes()).hexdigest(),
            "worker_host": socket.gethostname(), "t_start": t_start, "t_end": time.time()}


# --- CPU utilisation -------------------------------------------------------------------

class CpuSampler:
    """Per-core utilisation sampled in a background thread (``with CpuSampler() as s:``).

    ``samples`` are psutil's per-core percentages (the whole machine, whoever runs);
    ``own`` is the CPU used by this process and its children (the engines, the
    controller) over the same intervals, in % of one core, so a run on a shared
    machine can be told apart from the other load.
    """

    def __init__(self, interval: float = 0.5):
        self.interval = float(interval)
        self.times: list[float] = []
        self.samples: list[list[float]] = []
        self.own: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    @staticmethod
    def _tree_cpu(me) -> dict[int, float]:
        import psutil

        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        t0 = time.perf_counter()
        psutil.cpu_percent(percpu=True)  # prime
        before, t_prev = self._tree_cpu(me), time.perf_counter()
        while not self._stop.is_set():
            pcts = psutil.cpu_percent(percpu=True, interval=self.interval)
            after, now = self._tree_cpu(me), time.perf_counter()
            used = sum(v - before.get(pid, 0.0) for pid, v in after.items())
            self.times.append(now - t0)
            self.samples.append([float(p) for p in pcts])
            self.own.append(round(100.0 * used / max(now - t_prev, 1e-9), 2))
            before, t_prev = after, now

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def busy(self) -> list[float]:
        """Mean % busy of each core over the samples (empty without samples)."""
        if not self.samples:
            return []
        return np.asarray(self.samples, dtype=np.float64).mean(axis=0).round(2).tolist()

    def own_mean(self) -> float:
        """Mean CPU of this process tree, in % of one core (200 = two cores fully used)."""
        return float(np.mean(self.own)) if self.own else math.nan


# --- the run ---------------------------------------------------------------------------

def _config(args: argparse.Namespace, n: int, num_classes: int) -> dict[str, Any]:
    cfg = dict(vars(args))
    if cfg.get("threads") is None:
        cfg["threads"] = 1  # one thread per engine: the engines are the parallelism
    cfg.update(_n=n, _num_classes=num_classes, _parent_pid=os.getpid())
    for k in ("save_metrics", "save_weights", "checkpoint_dir", "resume", "engines"):
        cfg.pop(k, None)
    return cfg


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def _run_serial(cfg, plan, bar, log) -> list[dict[str, Any]]:
    out = []
    for k, (tr, va) in enumerate(plan):
        r = train_fold(cfg, k, tr, va)
        out.append(r)
        bar.update(1)
        if log:
            log(f"fold {k}: held-out acc {r['test_acc']:.4f} ({r['t_end'] - r['t_start']:.1f} s)")
    return out


def _run_engines(cfg, plan, engines: int, bar, log, timeout, start_timeout, sampler_box,
                 interval) -> tuple[list[dict[str, Any]], float, float]:
    import ipyparallel as ipp

    # by reference to the importable module, even when this file runs as __main__
    from cnn.parallel.kfold import train_fold, warm_up

    profile = tempfile.TemporaryDirectory(prefix="cnn-kfold-ipython-",
                                          ignore_cleanup_errors=True)
    cluster = rc = None
    try:
        cluster = ipp.Cluster(n=engines, log_level=40, engine_timeout=start_timeout,
                              profile_dir=profile.name)
        cluster.start_cluster_sync()
        rc = cluster.connect_client_sync()
        rc.wait_for_engines(engines, timeout=start_timeout, interactive=False)
        ids = set(rc.ids)
        dv = rc[:]
        ar = dv.apply_async(warm_up, cfg)
        ar.get(timeout=start_timeout)  # imports + data load on every engine, untimed
        lview = rc.load_balanced_view()
        sampler = CpuSampler(interval)
        sampler_box.append(sampler)
        with sampler:
            t0, t_wall0 = time.perf_counter(), time.time()
            pending = {lview.apply_async(train_fold, cfg, k, tr, va): k
                       for k, (tr, va) in enumerate(plan)}
            results = []
            while pending:
                done = [a for a in pending if a.ready()]
                for a in done:
                    k = pending.pop(a)
                    try:
                        r = a.get(timeout=0)
                    except Exception as exc:  # noqa: BLE001 - re-raised with its context
                        raise KFoldEngineError(
                            f"fold {k} failed on engine {a.engine_id}: "
                            f"{type(exc).__name__}: {exc}") from exc
                    r["engine"] = a.engine_id
                    results.append(r)
                    bar.update(1)
                    if log:
                        log(f"fold {k}: held-out acc {r['test_acc']:.4f} on engine "
                            f"{a.engine_id} ({r['t_end'] - r['t_start']:.1f} s)")
                gone = ids - set(rc.ids)
                if gone and pending:
                    raise KFoldEngineError(
                        f"engine(s) {sorted(gone)} died (unregistered from the controller) "
                        f"with fold(s) {sorted(pending.values())} unfinished; run stopped")
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    raise KFoldEngineError(
                        f"fold(s) {sorted(pending.values())} not finished after {timeout:.0f} s;"
                        f" run stopped")
                if pending and not done:
                    time.sleep(_POLL_S)
            wall = time.perf_counter() - t0  # first submit to last result handled
        return results, wall, t_wall0
    finally:
        if rc is not None:
            with contextlib.suppress(Exception):  # best effort while tearing down
                rc.abort()  # drop whatever is still queued
                # engines first: stop_cluster alone leaves ipyparallel's engine nannies behind
                rc.shutdown(targets="all", hub=False, block=True)
            rc.close()
        try:
            if cluster is not None:
                cluster.stop_cluster_sync()
        except Exception as exc:  # noqa: BLE001 - never mask the run's own error
            if log:
                log(f"warning: stopping the ipyparallel cluster: {exc}")
        profile.cleanup()


def run_kfold(args: argparse.Namespace, *, folds: int | None = None, engines: int | None = None,
              serial: bool = False, progress: bool = True, log: Any = print,
              cpu_interval: float = 0.5, timeout: float | None = None,
              start_timeout: float = 120.0, **hooks: Any) -> pd.DataFrame:
    """One K-fold run: ``serial`` in this process, or on ``engines`` ipyparallel engines.

    Returns one row per fold (``kind == "fold"``, ``test_acc`` = held-out accuracy) and
    one summary row (``kind == "run"``: wall time, mean and std accuracy, per-core
    CPU samples). ``hooks`` are test hooks (``_die_on_fold=k``).
    """
    folds = int(folds if folds is not None else args.folds)
    engines = 1 if serial else int(engines if engines is not None else args.engines[0])
    if engines < 1:
        raise ValueError(f"--engines must be >= 1, got {engines}")
    _, y = cdata.load(args.dataset, "train", data_dir=args.data_dir, subset=args.subset)
    plan = fold_plan(y, folds, seed=args.seed, stratified=not args.no_stratify)
    cfg = {**_config(args, len(y), int(y.max()) + 1), **hooks}
    # "sequential" is the baseline name every speedup in the study is computed against
    strategy = "sequential" if serial else "kfold"
    desc = "serial" if serial else f"{engines} engine(s)"
    bar = _bar(folds, f"{folds} folds, {desc}", progress)
    sampler_box: list[CpuSampler] = []
    try:
        if serial:
            warm_up(cfg)
            sampler = CpuSampler(cpu_interval)
            sampler_box.append(sampler)
            with sampler:
                t0, t_wall0 = time.perf_counter(), time.time()
                results = _run_serial(cfg, plan, bar, log)
                wall = time.perf_counter() - t0
        else:
            results, wall, t_wall0 = _run_engines(cfg, plan, engines, bar, log, timeout,
                                                  start_timeout, sampler_box, cpu_interval)
    finally:
        bar.close()
    sampler = sampler_box[-1]
    results.sort(key=lambda r: r["fold"])
    common = dict(experiment=args.experiment, strategy=strategy, processes=engines,
                  model=args.model, dataset=args.dataset, batch_size=args.batch_size,
                  epochs=args.epochs, folds=folds, engines=0 if serial else engines,
                  mode="serial" if serial else "parallel", seed=args.seed)
    rows = []
    for r in results:
        extra = {k: v for k, v in r.items() if k not in ("t_start", "t_end", "train_wall_s")}
        extra.setdefault("engine", -1)
        rows.append(make_row(kind="fold", **common, **extra, wall_s=r["t_end"] - r["t_start"],
                             train_wall_s=r["train_wall_s"], start_s=r["t_start"] - t_wall0,
                             end_s=r["t_end"] - t_wall0,
                             samples_per_s=r["samples"] / max(r["train_wall_s"], 1e-12),
                             comm_s=0.0))
    accs = np.array([r["test_acc"] for r in results])
    samples = sum(r["samples"] for r in results)
    busy = sampler.busy()
    rows.append(make_row(
        kind="run", **common, backend=results[0]["backend"], threads=results[0]["threads"],
        device=results[0]["device"], samples=samples, wall_s=wall,
        compile_s=sum(r["compile_s"] for r in results), samples_per_s=samples / wall,
        comm_s=0.0, test_acc=float(accs.mean()), test_acc_std=float(accs.std(ddof=1)),
        final_loss=float(np.mean([r["final_loss"] for r in results])),
        cpu_busy=busy, cpu_busy_min=min(busy) if busy else math.nan,
        cpu_times=list(sampler.times), cpu_samples=list(sampler.samples),
        cpu_own=list(sampler.own), cpu_own_mean=sampler.own_mean(),
        cpu_interval=cpu_interval))
    if log:
        log(f"{folds}-fold {desc}: accuracy {accs.mean():.4f} +- {accs.std(ddof=1):.4f}, "
            f"{wall:.1f} s, per-core busy {busy} % (this run's processes: "
            f"{sampler.own_mean():.0f} % of one core)")
    return to_frame(rows)


# --- analysis --------------------------------------------------------------------------

def accuracy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-fold held-out accuracy, one column per run (serial, E engines), plus mean +- std."""
    folds = df[df["kind"] == "fold"].copy()
    folds["run"] = np.where(folds["mode"] == "serial", "serial",
                            folds["engines"].astype(int).astype(str) + " engine(s)")
    table = folds.pivot_table(index="fold", columns="run", values="test_acc", aggfunc="first")
    order = sorted(table.columns, key=lambda c: (c != "serial", len(c), c))
    table = table[order]
    table.index = [f"fold {int(k)}" for k in table.index]
    table.columns.name = None
    mean, std = table.mean(), table.std(ddof=1)
    out = pd.concat([table, pd.DataFrame([mean, std], index=["mean", "std"])]).astype(object)
    out.loc["mean +- std"] = [f"{m:.4f} +- {s:.4f}" for m, s in zip(mean, std, strict=True)]
    return out


def speedup_table(df: pd.DataFrame) -> pd.DataFrame:
    """Run rows with wall time, speedup vs 1 engine (and vs serial) and per-core busy %."""
    runs = df[df["kind"] == "run"].copy()
    runs["run"] = np.where(runs["mode"] == "serial", "serial",
                           runs["engines"].astype(int).astype(str) + " engine(s)")
    one = runs.loc[runs["engines"] == 1, "wall_s"]
    ser = runs.loc[runs["mode"] == "serial", "wall_s"]
    runs["speedup_vs_1_engine"] = one.iloc[0] / runs["wall_s"] if len(one) else math.nan
    runs["speedup_vs_serial"] = ser.iloc[0] / runs["wall_s"] if len(ser) else math.nan
    cols = ["run", "folds", "wall_s", "speedup_vs_1_engine", "speedup_vs_serial", "test_acc",
            "test_acc_std", "cpu_busy", "cpu_busy_min", "cpu_own_mean"]
    return runs[cols].reset_index(drop=True)


# --- CLI -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m cnn.parallel.kfold",
        description="Asynchronous K-fold cross-validation on ipyparallel engines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(p, weights=False, checkpoints=False)
    seconds = cli.number(0, lo_open=True)
    g = p.add_argument_group("k-fold")
    g.add_argument("--folds", type=cli.int_at_least(2), default=4)
    g.add_argument("--engines", type=cli.int_at_least(1), nargs="+", default=[2],
                   help="engines per parallel run; several values run one after another")
    g.add_argument("--serial", action="store_true",
                   help="also run the folds one after another in this process, first")
    g.add_argument("--no-stratify", action="store_true", help="plain, not stratified, folds")
    g.add_argument("--cpu-interval", type=seconds, default=0.5,
                   help="CPU sampling period (s)")
    g.add_argument("--timeout", type=seconds, default=None,
                   help="fail a parallel run whose folds take longer than this (s)")
    p.set_defaults(experiment="kfold", epochs=5)
    return p


def parse_args(argv: Sequence[str] | None = None, **overrides: Any) -> argparse.Namespace:
    """The CLI's namespace; keywords override (``parse_args(folds=4, engines=[2])``)."""
    args = cli.parse(build_parser(), [] if argv is None and overrides else argv)
    for k, val in overrides.items():
        if not hasattr(args, k):
            raise TypeError(f"unknown k-fold option {k!r}")
        setattr(args, k, val)
    return args


def compare(args: argparse.Namespace, *, serial: bool = True,
            engines: Sequence[int] = (1, 2), **kw: Any) -> pd.DataFrame:
    """Serial run (optional), then one parallel run per engine count; all rows together."""
    frames = []
    if serial:
        frames.append(run_kfold(args, serial=True, **kw))
    for e in engines:
        frames.append(run_kfold(args, engines=e, **kw))
    return to_frame(pd.concat(frames, ignore_index=True))


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    log = None if args.no_progress else print
    df = compare(args, serial=args.serial, engines=args.engines, progress=not args.no_progress,
                 log=log, cpu_interval=args.cpu_interval, timeout=args.timeout)
    if args.save_metrics:
        save_metrics(df, args.save_metrics)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(accuracy_table(df).to_string())
        print(speedup_table(df).to_string(index=False))
    return df


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
