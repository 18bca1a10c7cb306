"""MPI data parallelism (notebook 04): scaling, hybrid ranks x threads, accuracy, cost model.

    python -m study.experiments.mpi --scale quick            # smoke run, build/quick
    python -m study.experiments.mpi --scale standard --parts scaling,accuracy

Every run is a fresh job of the library's CLIs, ``mpiexec -n P python -m
cnn.parallel.mpi ...`` or ``python -m cnn.train ...`` (`study.measure.run_cli`), so the
start-up of a run (interpreter, imports, data, MPI, JIT cache) is measured apart as
``startup_s``; the first step (JIT) is ``first_step_s``/``compile_s``; ``wall_s`` and
``samples_per_s`` are the steady state after it. The trials of every configuration of a
part are interleaved (`study.measure.run_interleaved`) with the sequential baseline of
the same ``config``, which differs only in the worker count:

- scaling: weak (``batch_per_rank`` per worker) and strong (``global_batch`` in all)
  scaling of allreduce, allreduce --overlap, param-server, async-param-server and
  model-average for P = 1 .. physical cores (a P > cores only with ``oversubscribe``:
  flagged), and ``python -m cnn.train`` with the same per-worker (weak) or global
  (strong) batch;
- hybrid: allreduce with P ranks x T Numba threads for every P x T = cores, each worker
  with ``batch_per_rank`` samples, against the one-worker runs;
- accuracy: each strategy against sequential at equal epochs and equal global batch,
  one seed per trial (paired by seed);
- costmodel: MPI ping-pong and Allreduce times (``python -m cnn.parallel.costmodel``)
  and one process's step time against the batch, for `cnn.parallel.costmodel`'s model.

Speedup and efficiency are against the best one-process one-worker run of the same
configuration and session (`study.experiments.mpi_analysis`, which also says how the
parameter server's rank 0 is counted). Sizes: ``study/config.py`` ("mpi").
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.data import dataset_info
from cnn.metrics import make_row
from study import paths, schema
from study.checks import compare
from study.cluster import MPICluster
from study.config import DEFAULT_SCALE, preset
from study.experiments import cli, load_saved
from study.experiments.mpi_analysis import (
    ACCURACY,
    ACCURACY_STRATEGIES,
    COSTMODEL,
    HYBRID,
    RESULTS,
    SCALING,
    SERVERS,
    STRATEGIES,
    flag,
    headlines,
    scaling_points,
    trainers,
)
from study.measure import (
    Plan,
    RunDiverged,
    mpiexec_module,
    new_session,
    physical_cores,
    pinned_env,
    pinned_threads,
    python_module,
    run_cli,
    run_interleaved,
)

PARTS: tuple[str, ...] = ("scaling", "hybrid", "accuracy", "costmodel")
FILE = dict(zip(PARTS, RESULTS, strict=True))

#: The flags that make each timing strategy (``cnn.parallel.mpi``).
FLAGS: dict[str, tuple[str, ...]] = {
    "allreduce": ("--strategy", "allreduce"),
    "allreduce-overlap": ("--strategy", "allreduce", "--overlap"),
    "param-server": ("--strategy", "param-server"),
    "async-param-server": ("--strategy", "async-param-server"),
    "model-average": ("--strategy", "model-average", "--sync-every", "4"),
}
MODEL = "seed_cnn"
SEED = 0
TIMING_LR = 0.01  # constant: timing runs only need well-behaved numbers
RUN_TIMEOUT = 1800.0
__all__ = ["FILE", "PARTS", "RESULTS", "Job", "accuracy_plan", "costmodel_plan", "equivalence",
           "get", "headlines", "hybrid_plan", "job_rows", "load", "main", "measure_accuracy",
           "measure_costmodel", "measure_jobs", "run", "scaling_plan"]


# --- one run of a plan -----------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One configuration: a fresh ``python -m cnn.train`` (``processes`` 1, ``mpi`` False)
    or ``mpiexec -n processes python -m cnn.parallel.mpi`` run with ``args``."""

    mode: str
    strategy: str
    processes: int
    threads: int
    batch_size: int  # per worker: a rank of T threads takes T x this
    config: str
    args: tuple[str, ...]
    mpi: bool = True
    seed: int = SEED

    @property
    def workers(self) -> int:
        return trainers(self.strategy, self.processes) * self.threads

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size

    @property
    def label(self) -> str:
        where = f"P={self.processes}x{self.threads}T" if self.mpi else f"1 process x{self.threads}T"
        return f"{self.mode:<8} {self.strategy:<19} {where} b={self.batch_size}"

    def command(self) -> list[str]:
        if self.mpi:
            return mpiexec_module(self.processes, "cnn.parallel.mpi", *self.args)
        return python_module("cnn.train", *self.args)

    def env(self) -> dict[str, str]:
        """BLAS and OpenMP at one thread in every rank; Numba at the job's threads."""
        env = pinned_env(1, NUMBA_NUM_THREADS=str(self.threads))
        env.setdefault("NUMBA_CACHE_DIR", str(paths.project_root() / ".numba_cache"))
        return env


def train_args(cfg: Mapping[str, Any], *, backend: str, threads: int, batch: int,
               global_batch: int, experiment: str, strategy: str | None, steps: int | None,
               epochs: int | None = None, lr: float = TIMING_LR, schedule: str = "constant",
               seed: int = SEED, subset: int | None = None) -> tuple[str, ...]:
    """The training flags of a job. With ``steps``, enough epochs for that many steps of
    ``global_batch`` and ``--max-steps``; otherwise ``epochs``."""
    subset = cfg["subset"] if subset is None else subset
    n = subset or dataset_info(cfg["dataset"])["n_train"]
    if steps is not None:
        epochs = max(1, math.ceil(steps * global_batch / n))
    args = ["--dataset", cfg["dataset"], "--backend", backend, "--model", MODEL,
            "--epochs", str(epochs), "--batch-size", str(batch), "--threads", str(threads),
            "--seed", str(seed), "--lr", str(lr), "--schedule", schedule,
            "--experiment", experiment]
    if steps is not None:
        args += ["--max-steps", str(steps)]
    if subset:
        args += ["--subset", str(subset)]
    if cfg["test_subset"]:
        args += ["--test-subset", str(cfg["test_subset"])]
    if strategy is not None:
        args += list(FLAGS.get(strategy, ("--strategy", strategy)))
    return tuple(args)


def rank_counts(cfg: Mapping[str, Any], cores: int, ranks: Sequence[int] | None,
                oversubscribe: bool | None) -> list[int]:
    """P values: ``ranks`` (or the preset's) as given, else 1 .. cores, plus cores + 1
    when oversubscribing (measured only at ``full`` or when asked)."""
    chosen = ranks if ranks is not None else cfg["ranks"]
    if chosen is not None:
        return sorted({int(p) for p in chosen})
    over = cfg["oversubscribe"] if oversubscribe is None else oversubscribe
    return list(range(1, cores + 1 + int(bool(over))))


# --- plans ----------------------------------------------------------------------------------

def scaling_plan(scale: str = DEFAULT_SCALE, *, cores: int | None = None,
                 ranks: Sequence[int] | None = None, strategies: Sequence[str] | None = None,
                 oversubscribe: bool | None = None, backend: str | None = None) -> list[Job]:
    """Weak and strong scaling: per mode the sequential baseline, then every strategy at
    every P. The servers start at P = 2 (rank 0 does not train); strong scaling skips a P
    whose training ranks do not divide the global batch."""
    cfg = preset("mpi", scale)
    cores = cores or physical_cores()
    backend = backend or cfg["backend"]
    b, big, steps = cfg["batch_per_rank"], cfg["global_batch"], cfg["steps"]
    jobs = []
    for mode in ("weak", "strong"):
        what = f"{b} per worker" if mode == "weak" else f"global batch {big}"
        config = (f"{mode}: {MODEL} {cfg['dataset']} {backend}, {what}, {steps} steps, "
                  "1 thread per process")
        seq_batch = b if mode == "weak" else big
        jobs.append(Job(mode, "sequential", 1, 1, seq_batch, config, train_args(
            cfg, backend=backend, threads=1, batch=seq_batch, global_batch=seq_batch,
            experiment=f"mpi_{mode}", strategy=None, steps=steps), mpi=False))
        for strategy in strategies or STRATEGIES:
            for p in rank_counts(cfg, cores, ranks, oversubscribe):
                t = trainers(strategy, p)
                if t < 1 or (mode == "strong" and big % t):
                    continue
                batch = b if mode == "weak" else big // t
                jobs.append(Job(mode, strategy, p, 1, batch, config, train_args(
                    cfg, backend=backend, threads=1, batch=batch, global_batch=batch * t,
                    experiment=f"mpi_{mode}", strategy=strategy, steps=steps)))
    return jobs


def hybrid_plan(scale: str = DEFAULT_SCALE, *, cores: int | None = None,
                backend: str = "numba") -> list[Job]:
    """Allreduce with P ranks x T Numba threads for every P x T = cores, each worker
    (thread) with ``batch_per_rank`` samples (a rank takes T x that), against the
    sequential and the one-rank one-thread run."""
    cfg = preset("mpi", scale)
    cores = cores or physical_cores()
    b, steps = cfg["batch_per_rank"], cfg["steps"]
    config = (f"hybrid: {MODEL} {cfg['dataset']} {backend}, {b} per worker, {steps} steps, "
              f"ranks x threads up to {cores}")

    def args(threads: int, batch: int, ranks: int, strategy: str | None) -> tuple[str, ...]:
        return train_args(cfg, backend=backend, threads=threads, batch=batch,
                          global_batch=batch * ranks, experiment="mpi_hybrid",
                          strategy=strategy, steps=steps)

    jobs = [Job("hybrid", "sequential", 1, 1, b, config, args(1, b, 1, None), mpi=False),
            Job("hybrid", "allreduce", 1, 1, b, config, args(1, b, 1, "allreduce"))]
    for p in range(1, cores + 1):
        t = cores // p
        if cores % p or p * t == 1:
            continue
        jobs.append(Job("hybrid", "allreduce", p, t, b, config, args(t, b * t, p, "allreduce")))
    return jobs


def accuracy_plan(scale: str = DEFAULT_SCALE, *, seeds: int | None = None,
                  backend: str | None = None) -> list[Job]:
    """Per seed: sequential with the global batch, then allreduce and model-average on
    ``acc_workers`` ranks and the servers on ``acc_workers + 1`` (same global batch, seed,
    learning rate, cosine schedule and epochs). Seed-major order interleaves them."""
    cfg = preset("mpi", scale)
    backend = backend or cfg["backend"]
    w, b = cfg["acc_workers"], cfg["acc_batch_per_rank"]
    epochs, lr = cfg["acc_epochs"], cfg["acc_lr"]
    config = (f"accuracy: {MODEL} {cfg['dataset']} {cfg['acc_subset'] or 'all'} samples, "
              f"{epochs} epochs, global batch {w * b}, lr {lr} cosine")
    jobs = []
    for seed in range(seeds or cfg["acc_seeds"]):
        def args(batch: int, strategy: str | None, seed: int = seed) -> tuple[str, ...]:
            return train_args(cfg, backend=backend, threads=1, batch=batch, global_batch=w * b,
                              experiment="mpi_accuracy", strategy=strategy, steps=None,
                              epochs=epochs, lr=lr, schedule="cosine", seed=seed,
                              subset=cfg["acc_subset"] or 0)

        jobs.append(Job("accuracy", "sequential", 1, 1, w * b, config, args(w * b, None),
                        mpi=False, seed=seed))
        for strategy in ACCURACY_STRATEGIES:
            p = w + 1 if strategy in SERVERS else w
            jobs.append(Job("accuracy", strategy, p, 1, b, config, args(b, strategy),
                            seed=seed))
    return jobs


def costmodel_plan(scale: str = DEFAULT_SCALE, *, cores: int | None = None
                   ) -> list[dict[str, Any]]:
    """The cost model's measurements: ping-pong and Allreduce on ``comm_ranks`` ranks (by
    default 2, 4, 8, ... and the physical cores: a few sizes of P, at most six up to 64
    cores), and one process's step time against the batch."""
    cfg = preset("mpi", scale)
    cores = max(cores or physical_cores(), 2)
    comm = cfg["comm_ranks"] or sorted({*(2**k for k in range(1, cores.bit_length())
                                          if 2**k <= cores), cores})
    return [*({"kind": "comm", "processes": int(p)} for p in comm), {"kind": "compute"}]


# --- rows ------------------------------------------------------------------------------------

def job_rows(job: Job, raw: pd.DataFrame, every_epoch: bool = False) -> pd.DataFrame:
    """A CLI run's frame (from `run_cli`) as study rows: the last row (or every epoch
    row), the first step split off (``first_step_s`` = ``compile_s`` + a median step),
    ``wall_s`` and ``samples_per_s`` the steady state after it, batches per worker, the
    job's mode, config, processes, threads and workers. Columns outside the schema go."""
    df = (raw if every_epoch else raw.tail(1)).copy().reset_index(drop=True)
    if len(df) and set(df["strategy"].astype(str)) != {job.strategy}:
        raise ValueError(f"{job.label}: the CLI reported strategy "
                         f"{sorted(set(df['strategy'].astype(str)))}, expected {job.strategy}")
    step = pd.to_numeric(df["step"]).astype(float)
    first = df["compile_s"].astype(float) + df["step_ms_median"].astype(float) / 1e3
    steady = df["wall_s"].astype(float) - first
    df["first_step_s"] = first
    df["wall_s"] = steady
    df["samples_per_s"] = np.where((step > 1) & (steady > 0),
                                   job.global_batch * (step - 1) / steady.where(steady > 0),
                                   np.nan)
    df["experiment"] = f"mpi_{job.mode}"
    fields = dict(mode=job.mode, config=job.config, processes=job.processes,
                  threads=job.threads, workers=job.workers, batch_size=job.batch_size,
                  global_batch=job.global_batch)
    for k, v in fields.items():
        df[k] = v
    return df[[c for c in df.columns if c in schema.COLUMNS]]


def diverged_row(job: Job, why: str) -> pd.DataFrame:
    """A run that diverged is a result (at this learning rate), not a crash: one row with
    no throughput or accuracy and the reason in ``anomaly``."""
    from cnn.metrics import make_row

    return pd.DataFrame([make_row(
        experiment=f"mpi_{job.mode}", strategy=job.strategy, backend="mpi" if job.mpi else
        "numba", device="cpu", model=MODEL, dataset=preset_dataset(job), mode=job.mode,
        config=job.config, processes=job.processes, threads=job.threads, workers=job.workers,
        batch_size=job.batch_size, global_batch=job.global_batch, anomaly=why,
        test_acc=float("nan"), samples_per_s=float("nan"))])


def preset_dataset(job: Job) -> str:
    args = list(job.args)
    return args[args.index("--dataset") + 1] if "--dataset" in args else "unknown"


def measure_jobs(jobs: Sequence[Job], trials: int, *, scale: str, session: str,
                 log: Callable[[str], None] | None = print, every_epoch: bool = False,
                 timeout: float = RUN_TIMEOUT) -> pd.DataFrame:
    """Run every job ``trials`` times, interleaved, as fresh processes; validated rows."""
    plan = Plan([{"job": j} for j in jobs], [j.label for j in jobs])

    def one(c: Mapping[str, Any]) -> pd.DataFrame:
        job: Job = c["job"]
        try:
            raw = run_cli(job.command(), env=job.env(), timeout=timeout, what=job.label)
        except RunDiverged as exc:
            if log:
                log(f"  {job.label}: {exc.why} (recorded, not fatal)")
            return diverged_row(job, exc.why)
        return job_rows(job, raw, every_epoch)

    df = run_interleaved(plan, one, trials, quiet=scale != "quick", log=log)
    return schema.rows(df, scale=scale, session=session)


def measure_costmodel(scale: str, session: str, *, cores: int | None = None,
                      backend: str | None = None,
                      log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Ping-pong/Allreduce (fresh mpiexec jobs) interleaved with one process's step times
    (`cnn.parallel.costmodel.measure_compute`, here, one thread), ``trials`` times."""
    from cnn.parallel import costmodel as cm

    cfg = preset("mpi", scale)
    backend = backend or cfg["backend"]
    sizes = cfg["comm_sizes"] or cm.DEFAULT_SIZES
    shape = tuple(dataset_info(cfg["dataset"])["input_shape"])
    items = costmodel_plan(scale, cores=cores)

    def one(c: Mapping[str, Any]) -> pd.DataFrame:
        if c["kind"] == "comm":
            cmd = mpiexec_module(c["processes"], "cnn.parallel.costmodel", "--sizes",
                                 ",".join(map(str, sizes)), "--repeats",
                                 str(cfg["comm_repeats"]))
            raw = run_cli(cmd, metrics_flag="--save", progress_flag=None, env=pinned_env(1),
                          timeout=RUN_TIMEOUT, what=f"costmodel P={c['processes']}")
            raw = raw.assign(experiment="mpi_comm", model="message", dataset="none",
                             batch_size=0, workers=raw["processes"], kind=raw["strategy"])
        else:
            with pinned_threads(1):
                comp = cm.measure_compute(MODEL, shape, cfg["compute_batches"],
                                          cfg["compute_repeats"], backend, threads=1)
            raw = pd.DataFrame([make_row(
                experiment="mpi_compute", strategy="sequential", backend=backend,
                processes=1, threads=1, workers=1, device="cpu", model=MODEL,
                dataset=cfg["dataset"], batch_size=int(r.batch_size), time_s=r.time_s,
                time_min_s=r.time_min_s, bytes=float(r.param_bytes), kind="compute")
                for r in comp.itertuples(index=False)])
        raw["mode"] = "costmodel"
        raw["config"] = f"costmodel: {MODEL} {cfg['dataset']} {backend}"
        return raw[[c for c in raw.columns if c in schema.COLUMNS]]

    labels = [f"{c['kind']} P={c.get('processes', 1)}" for c in items]
    df = run_interleaved(Plan(items, labels), one, cfg["trials"], quiet=scale != "quick",
                         log=log)
    return schema.rows(df, scale=scale, session=session)


# --- the family contract ------------------------------------------------------------------

def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print, ranks: Sequence[int] | None = None,
        oversubscribe: bool | None = None, backend: str | None = None
        ) -> dict[str, pd.DataFrame]:
    """Measure the chosen parts (all by default), flag anomalies, save; their frames.

    ``ranks``, ``oversubscribe`` and ``backend`` override the preset (scripts/mpi_scaling.py).
    """
    parts = list(parts or PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown MPI part(s) {unknown}; parts are {', '.join(PARTS)}")
    cfg = preset("mpi", scale)
    session = new_session()
    out: dict[str, pd.DataFrame] = {}
    say = log or (lambda _msg: None)
    if "scaling" in parts:
        jobs = scaling_plan(scale, ranks=ranks, oversubscribe=oversubscribe, backend=backend)
        say(f"scaling: {len(jobs)} configurations x {cfg['trials']} trial(s), interleaved")
        df = measure_jobs(jobs, cfg["trials"], scale=scale, session=session, log=log)
        out[SCALING] = keep(flag(df, scaling_points(df)), SCALING, scale, say)
    if "hybrid" in parts:
        from cnn import available_backends

        status = available_backends().get("numba")
        if status != "ok":
            say(f"hybrid: skipped, the numba backend is unavailable ({status})")
        else:
            jobs = hybrid_plan(scale)
            say(f"hybrid: {len(jobs)} configurations x {cfg['trials']} trial(s), interleaved")
            df = measure_jobs(jobs, cfg["trials"], scale=scale, session=session, log=log)
            series = ("strategy", "processes", "threads")
            out[HYBRID] = keep(flag(df, scaling_points(df, series), series), HYBRID, scale,
                               say)
    if "accuracy" in parts:
        jobs = accuracy_plan(scale, backend=backend)
        say(f"accuracy: {len(jobs)} runs (one seed per trial), interleaved")
        out[ACCURACY] = keep(measure_accuracy(jobs, scale, session, log), ACCURACY, scale,
                             say)
    if "costmodel" in parts:
        say("costmodel: ping-pong/Allreduce jobs and step times, interleaved")
        out[COSTMODEL] = keep(measure_costmodel(scale, session, backend=backend, log=log),
                              COSTMODEL, scale, say)
    return out


def keep(df: pd.DataFrame, name: str, scale: str, say: Callable[[str], None]
         ) -> pd.DataFrame:
    """Save a part as soon as it is measured: a later part's failure loses nothing."""
    path = schema.save(df, name, scale)
    say(f"{name}: {len(df)} rows -> {paths.shown(path)}")
    return df


def measure_accuracy(jobs: Sequence[Job], scale: str, session: str,
                     log: Callable[[str], None] | None) -> pd.DataFrame:
    """The accuracy jobs once each (their seeds are the trials), every epoch's row."""
    frames = []
    for seed in sorted({j.seed for j in jobs}):
        mine = [j for j in jobs if j.seed == seed]
        df = measure_jobs(mine, 1, scale=scale, session=session, log=log, every_epoch=True)
        df["trial"] = seed
        frames.append(df)
    return schema.validate(pd.concat(frames, ignore_index=True), where=f"{ACCURACY} rows")


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    """The saved frames (those that exist), to redraw without measuring."""
    return load_saved(RESULTS, scale)


def get(scale: str, part: str, measure: bool = True, **overrides: Any
        ) -> dict[str, pd.DataFrame]:
    """One notebook section: measure ``part`` (when ``measure``), then every saved frame."""
    if measure:
        run(scale, parts=[part], **overrides)
    return load(scale)


# --- the live equivalence demo on ipyparallel engines ----------------------------------------

def equivalence(engines: int = 2, batch: int = 16, timeout: float = 300.0) -> pd.DataFrame:
    """Allreduce on ``engines`` ipyparallel MPI engines against one fresh process with
    batch ``engines x batch``: per tensor, `study.checks.compare` of the final weights."""
    args = ["--dataset", "digits", "--subset", "193", "--test-subset", "64", "--epochs", "2",
            "--seed", "5", "--backend", "numpy", "--threads", "1"]
    with tempfile.TemporaryDirectory() as d:
        par, seq = Path(d) / "engines.npz", Path(d) / "sequential.npz"
        with MPICluster(engines, start_timeout=timeout) as cl:
            cl.run([*args, "--batch-size", str(batch), "--no-progress", "--save-weights",
                    str(par)], timeout=timeout)
        run_cli(python_module("cnn.train", *args, "--batch-size", str(engines * batch),
                              "--save-weights", str(seq)), env=pinned_env(1), timeout=timeout,
                what="python -m cnn.train")
        with np.load(par) as got, np.load(seq) as want:
            checks = [compare(got[k], want[k], k) for k in want.files]
    return pd.DataFrame([{"tensor": c.name, "rel_err": c.rel_err, "max_abs_err": c.max_abs_err,
                          "tol": c.tol, "ok": c.ok} for c in checks])


def main(argv: Sequence[str] | None = None) -> int:
    return cli("mpi", __doc__, run, parts=PARTS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
