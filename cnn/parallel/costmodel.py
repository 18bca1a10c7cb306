"""A calibrated cost model of data-parallel training: measure, fit, check, extrapolate.

Measure (collective, under ``mpiexec``; rank 0 saves the rows)::

    mpiexec -n 2 python -m cnn.parallel.costmodel --save results/mpi_costmodel_raw.pkl

gives ping-pong (rank 0 <-> rank 1) and ``Allreduce`` times over message sizes, and
:func:`measure_compute` times one training step (forward, backward, update) against the
batch size in one process.

Model (Hockney's alpha-beta model; every time in seconds, sizes in bytes):

- point to point: ``T(n) = alpha + n / beta`` (latency ``alpha``, bandwidth ``beta`` B/s);
- ring allreduce of ``n`` bytes over ``P`` ranks (reduce-scatter then allgather, 2(P-1)
  steps of ``n/P`` bytes): ``T_ar(n, P) = 2 (P-1) alpha + 2 (P-1)/P * n / beta``
  (the reduction arithmetic, ``(P-1)/P n gamma``, is optional and off by default);
- compute of one step at per-rank batch ``b``: ``C(b) = c0 + c1 b`` (fitted);
- allreduce strategy, no overlap: ``T_step(b, P) = C(b) + T_ar(n_params * 4, P)``;
- synchronous parameter server, ``W`` workers: the server's link carries ``W`` gradients in
  and ``W`` weight copies out one after another:
  ``T_step = C(b) + 2 W (alpha + n / beta) + U`` (``U``: the server's update).
- strong scaling at global batch ``B``: ``S(P) = C(B) / T_step(B/P, P)``, ``E = S / P``;
  weak scaling at per-rank batch ``b``: ``E(P) = C(b) / T_step(b, P)``.

:func:`fit_hockney` calibrates ``alpha, beta`` from the ping-pong points; :func:`check`
predicts the measured ``Allreduce`` points (and step times) from them and reports the
relative error; :func:`extrapolate` gives speedup and efficiency for 16..1024 ranks on
the :data:`NETWORKS` below, whose figures are stated, not measured here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Network:
    """An interconnect in the alpha-beta model: latency (s), bandwidth (bytes/s)."""

    name: str
    alpha: float
    beta: float
    note: str = ""


#: Stated interconnects for extrapolation (per-message latency, achievable bandwidth).
NETWORKS: dict[str, Network] = {
    "10GbE": Network("10 GbE (TCP)", alpha=30e-6, beta=1.1e9,
                     note="10 Gb/s Ethernet, TCP: ~30 us latency, ~1.1 GB/s of 1.25 line rate"),
    "IB-100G": Network("100 Gb/s InfiniBand (EDR)", alpha=1.5e-6, beta=11.5e9,
                       note="EDR InfiniBand, RDMA: ~1.5 us latency, ~11.5 GB/s of 12.5"),
}


# --- the model (pure arithmetic) ------------------------------------------------------

def p2p_time(nbytes: float, alpha: float, beta: float) -> float:
    """Hockney point-to-point time ``alpha + n / beta``."""
    return alpha + nbytes / beta


def ring_allreduce_time(nbytes: float, P: int, alpha: float, beta: float,
                        gamma: float = 0.0) -> float:
    """Ring allreduce: ``2(P-1) alpha + 2(P-1)/P n / beta + (P-1)/P n gamma``; 0 for P=1."""
    if P < 1:
        raise ValueError(f"P must be >= 1, got {P}")
    if P == 1:
        return 0.0
    return 2 * (P - 1) * alpha + 2 * (P - 1) / P * nbytes / beta + (P - 1) / P * nbytes * gamma


def param_server_time(nbytes: float, workers: int, alpha: float, beta: float,
                      update_s: float = 0.0) -> float:
    """Communication of one synchronous parameter-server round: the server receives W
    gradients and sends W weight copies over its one link, one after another."""
    return 2 * workers * p2p_time(nbytes, alpha, beta) + update_s


def fit_linear(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``; returns ``(a, b)``."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("need at least two distinct x values to fit a line")
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def fit_hockney(nbytes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """``(alpha, beta)`` from point-to-point times: least squares with relative weights
    (every size counts, not only the largest), alpha clamped at >= 0."""
    n, t = np.asarray(nbytes, dtype=float), np.asarray(times, dtype=float)
    A = np.stack([np.ones_like(n), n], axis=1) / t[:, None]  # minimise relative residuals
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    if inv_beta <= 0:
        raise ValueError("times do not grow with size: cannot fit a bandwidth")
    return max(float(alpha), 0.0), float(1.0 / inv_beta)


def calibrate(pingpong_rows: pd.DataFrame, small: int = 1024,
              large: int = 65536) -> tuple[float, float]:
    """``(alpha, beta)`` from measured ping-pong rows (``bytes``, ``time_s``): alpha is the
    median time of messages up to ``small`` bytes (less their n/beta), beta the inverse
    slope of a line through the messages of ``large`` bytes and more (the sizes a gradient
    has). Shared-memory
    bandwidth changes with size (caches), so one line over every size fits neither end."""
    df = pingpong_rows
    big = df[df["bytes"] >= large]
    _, slope = fit_linear(big["bytes"], big["time_s"])
    if slope <= 0:
        raise ValueError("large-message times do not grow with size: cannot fit a bandwidth")
    few = df[df["bytes"] <= small]
    alpha = float(np.median(few["time_s"] - few["bytes"] * slope))
    return max(alpha, 0.0), 1.0 / slope


@dataclass(frozen=True)
class Compute:
    """One training step's compute time ``c0 + c1 * batch`` (seconds)."""

    c0: float
    c1: float

    def __call__(self, batch: float) -> float:
        return self.c0 + self.c1 * batch

    @classmethod
    def fit(cls, batches: Sequence[float], times: Sequence[float]) -> Compute:
        """Least squares; a negative intercept (noise) is refitted through the origin."""
        c0, c1 = fit_linear(batches, times)
        if c0 < 0:
            x, y = np.asarray(batches, dtype=float), np.asarray(times, dtype=float)
            c0, c1 = 0.0, float(x @ y / (x @ x))
        return cls(c0, c1)


def step_time(compute: Compute, batch_per_rank: float, P: int, nbytes: float, alpha: float,
              beta: float, strategy: str = "allreduce", update_s: float = 0.0) -> float:
    """Modelled time of one step for a strategy (no overlap of compute and communication)."""
    if strategy == "allreduce":
        return compute(batch_per_rank) + ring_allreduce_time(nbytes, P, alpha, beta)
    if strategy == "param-server":
        return compute(batch_per_rank) + param_server_time(nbytes, P - 1, alpha, beta,
                                                           update_s)
    raise ValueError(f"no model for strategy {strategy!r}")


def strong_scaling(compute: Compute, global_batch: float, P: int, nbytes: float, alpha: float,
                   beta: float) -> tuple[float, float]:
    """``(speedup, efficiency)`` of allreduce at fixed global batch against one process."""
    t = step_time(compute, global_batch / P, P, nbytes, alpha, beta)
    s = compute(global_batch) / t
    return s, s / P


def weak_scaling(compute: Compute, batch_per_rank: float, P: int, nbytes: float, alpha: float,
                 beta: float) -> tuple[float, float]:
    """``(speedup, efficiency)`` of allreduce at fixed per-rank batch: P times the samples
    in ``T_step`` against one process doing ``batch_per_rank`` in ``C(b)``."""
    e = compute(batch_per_rank) / step_time(compute, batch_per_rank, P, nbytes, alpha, beta)
    return e * P, e


def extrapolate(compute: Compute, nbytes: float, networks: Mapping[str, Network] | None = None,
                ranks: Iterable[int] = (16, 32, 64, 128, 256, 512, 1024),
                batch_per_rank: float = 64, global_batch: float | None = None) -> pd.DataFrame:
    """Modelled speedup and efficiency for each network and rank count, weak scaling at
    ``batch_per_rank`` and (with ``global_batch``) strong scaling at that global batch."""
    rows = []
    for key, net in (networks or NETWORKS).items():
        for P in ranks:
            ws, we = weak_scaling(compute, batch_per_rank, P, nbytes, net.alpha, net.beta)
            row = dict(network=key, network_name=net.name, processes=P, alpha_s=net.alpha,
                       beta_Bps=net.beta, allreduce_s=ring_allreduce_time(
                           nbytes, P, net.alpha, net.beta), compute_s=compute(batch_per_rank),
                       weak_speedup=ws, weak_efficiency=we, batch_per_rank=batch_per_rank)
            if global_batch is not None:
                ss, se = strong_scaling(compute, global_batch, P, nbytes, net.alpha, net.beta)
                row.update(strong_speedup=ss, strong_efficiency=se, global_batch=global_batch,
                           strong_batch_per_rank=global_batch / P)
            rows.append(row)
    return pd.DataFrame(rows)


def check(measured: pd.DataFrame, alpha: float, beta: float) -> pd.DataFrame:
    """Measured ``Allreduce`` rows (columns ``bytes``, ``processes``, ``time_s``) with the
    ring model's prediction and its relative error added."""
    out = measured.copy()
    out["predicted_s"] = [ring_allreduce_time(n, int(p), alpha, beta)
                          for n, p in zip(out["bytes"], out["processes"], strict=True)]
    out["rel_error"] = (out["predicted_s"] - out["time_s"]) / out["time_s"]
    return out


# --- measurements ---------------------------------------------------------------------

DEFAULT_SIZES: tuple[int, ...] = tuple(4 ** k for k in range(1, 13))  # 4 B .. 16 MiB


def _reps(nbytes: int, repeats: int) -> int:
    return max(3, min(repeats, int(repeats * 65536 / max(nbytes, 65536))))


def pingpong(comm: Any, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 50,
             warmup: int = 5) -> list[dict[str, Any]]:
    """One-way time (half the round trip) between ranks 0 and 1, per size; collective:
    the other ranks wait at a barrier. Returns rows on rank 0, [] elsewhere."""
    rank = comm.Get_rank()
    rows = []
    for n in sizes:
        buf = np.zeros(max(int(n), 1), dtype=np.uint8)
        times = []
        reps = _reps(n, repeats)
        comm.Barrier()
        for i in range(warmup + reps):
            if rank == 0:
                t0 = time.perf_counter()
                comm.Send(buf, dest=1, tag=1)
                comm.Recv(buf, source=1, tag=2)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) / 2)
            elif rank == 1:
                comm.Recv(buf, source=0, tag=1)
                comm.Send(buf, dest=0, tag=2)
        if rank == 0:
            t = np.asarray(times)
            rows.append(dict(kind="pingpong", bytes=int(n), processes=2, repeats=reps,
                             time_s=float(np.median(t)),
                             time_iqr_s=float(np.subtract(*np.percentile(t, [75, 25]))),
                             bandwidth_Bps=n / float(np.median(t))))
    comm.Barrier()
    return rows


def allreduce(comm: Any, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 50,
              warmup: int = 5) -> list[dict[str, Any]]:
    """Time of one in-place float32 SUM ``Allreduce`` per size: each repeat starts after a
    barrier and counts the slowest rank. Rows on rank 0."""
    from mpi4py import MPI

    P, rank = comm.Get_size(), comm.Get_rank()
    rows = []
    for n in sizes:
        buf = np.ones(max(int(n) // 4, 1), dtype=np.float32)
        reps = _reps(n, repeats)
        times = np.zeros(reps)
        for i in range(warmup + reps):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if i >= warmup:
                times[i - warmup] = time.perf_counter() - t0
        comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
        if rank == 0:
            rows.append(dict(kind="allreduce", bytes=int(buf.nbytes), processes=P,
                             repeats=reps, time_s=float(np.median(times)),
                             time_iqr_s=float(np.subtract(*np.percentile(times, [75, 25]))),
                             bandwidth_Bps=buf.nbytes / float(np.median(times))))
    return rows


def measure_compute(model: str = "seed_cnn", input_shape: tuple[int, ...] = (1, 28, 28),
                    batches: Sequence[int] = (4, 8, 16, 32, 64, 128), repeats: int = 7,
                    backend: str = "numpy", threads: int | None = None,
                    num_classes: int = 10) -> pd.DataFrame:
    """Time of one sequential step (loss_and_grad + SGD update) per batch size, on random
    data, after one warm-up step: the median (``time_s``) and the fastest (``time_min_s``,
    the steadier one on a shared machine). Runs in this process (no MPI)."""
    from cnn.models import build
    from cnn.optim import make_optimizer

    kw: dict[str, Any] = {}
    if model != "mlp":
        kw["padding"] = int(len(input_shape) == 3 and min(input_shape[1:]) < 16)
    net = build(model, input_shape, num_classes, backend=backend, threads=threads, **kw)
    opt = make_optimizer("sgd", net, lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        x = rng.standard_normal((b, *input_shape)).astype(net.dtype)
        y = rng.integers(0, num_classes, b)
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            net.loss_and_grad(x, y)
            opt.step()
            net.backend.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        rows.append(dict(kind="compute", model=model, batch_size=int(b), backend=backend,
                         threads=net.threads, time_s=float(np.median(times)),
                         time_min_s=float(np.min(times)),
                         num_params=net.num_params,
                         param_bytes=net.num_params * net.dtype.itemsize))
    return pd.DataFrame(rows)


def measure(comm: Any = None, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 50,
            experiment: str = "mpi_comm") -> pd.DataFrame:
    """Ping-pong (if P >= 2) and Allreduce over ``sizes`` as result rows (rank 0)."""
    from mpi4py import MPI

    from cnn.metrics import make_row, to_frame

    comm = MPI.COMM_WORLD if comm is None else comm
    rows = pingpong(comm, sizes, repeats) if comm.Get_size() >= 2 else []
    rows += allreduce(comm, sizes, repeats)
    if comm.Get_rank() != 0:
        return to_frame([])
    lib = MPI.Get_library_version().splitlines()[0].strip()
    return to_frame([make_row(experiment=experiment, strategy=r["kind"], backend="mpi",
                              threads=1, device="cpu", mpi=lib, **r) for r in rows])


def sizes_arg(text: str) -> list[int]:
    """An argparse type: comma-separated message sizes in bytes, each >= 1."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"want sizes >= 1 byte, got {text!r}")
    return sizes


def build_parser(quiet: bool = False) -> argparse.ArgumentParser:
    """The CLI's flags; ``quiet``: print no error or help (MPI ranks other than 0)."""
    from cnn import cli

    p = cli.ArgumentParser(prog="mpiexec -n P python -m cnn.parallel.costmodel",
                           description="Measure MPI ping-pong and Allreduce times.", quiet=quiet)
    p.add_argument("--sizes", type=sizes_arg, default=list(DEFAULT_SIZES),
                   help="message sizes in bytes, comma separated")
    p.add_argument("--repeats", type=cli.int_at_least(1), default=50)
    p.add_argument("--save", default=None, metavar="PATH.pkl",
                   help="write the rows here (rank 0, atomically)")
    p.add_argument("--experiment", default="mpi_comm")
    return p


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """The CLI, on every rank: flags and the --save path are checked before measuring; a
    problem is one line from rank 0 and exit status 2 on every rank."""
    from mpi4py import MPI

    from cnn import cli
    from cnn.errors import UsageError
    from cnn.metrics import save_metrics
    from cnn.parallel.mpi import release_shm_names

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    release_shm_names(comm)
    p = build_parser(quiet=rank != 0)  # one copy of --help or of an error, not one per rank
    args = p.parse_args(argv)
    problem = None
    if rank == 0 and args.save:
        try:
            cli.check_output_file(args.save, "--save")
        except UsageError as exc:
            problem = str(exc)
    problem = comm.bcast(problem, root=0)
    if problem:
        p.error(problem)
    df = measure(comm, args.sizes, args.repeats, args.experiment)
    if rank == 0:
        if args.save:
            save_metrics(df, args.save)
        with pd.option_context("display.width", 120):
            print(df[["strategy", "processes", "bytes", "time_s", "bandwidth_Bps"]]
                  .to_string(index=False))
    return df


if __name__ == "__main__":
    main()
    sys.exit(0)
