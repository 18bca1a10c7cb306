"""HOGWILD's variants for the "when does asynchrony pay" study: the momentum options, the
checks of the study's flags, and what the rows record about them.

``--hogwild-momentum``: ``local`` keeps each worker's velocity private (PyTorch's
mnist_hogwild, this module's default); ``shared`` keeps one velocity in the shared segment,
updated without a lock like the weights; ``scaled`` keeps them private but lowers the
momentum for W workers (:func:`scaled_momentum`). ``--assign dynamic``:
:func:`claim_batches`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from cnn.errors import UsageError
from cnn.parallel.delays import straggler_label, stragglers
from cnn.train import make_training

__all__ = ["MOMENTUM_MODES", "check_options", "claim_batches", "epoch_fields", "scaled_momentum",
           "snapshot_points", "stragglers_within", "worker_optimizer",
           "worker_summaries"]

MOMENTUM_MODES = ("local", "shared", "scaled")


def scaled_momentum(momentum: float, workers: int) -> float:
    """``--hogwild-momentum scaled``: the explicit momentum of each of W workers,
    ``mu_W = max(0, 1 - W (1 - mu))``.

    Mitliagkas et al. (2016, "Asynchrony begets momentum") show that W asynchronous workers
    add an implicit momentum of about ``1 - 1/W``. Momentum ``m`` multiplies the long-run
    step by ``1/(1 - m)``; two momenta in series multiply it by ``1/((1 - m_e)(1 - m_i))``.
    Keeping sequential SGD's ``1/(1 - mu)`` with ``m_i = 1 - 1/W`` gives
    ``1 - m_e = W (1 - mu)``: 0.9 stays 0.9 at W = 1, becomes 0.8 at W = 2, and reaches 0 at
    W = 10, where asynchrony alone supplies all the momentum.
    """
    return max(0.0, round(1.0 - int(workers) * (1.0 - float(momentum)), 12))


def worker_optimizer(net: Any, args: argparse.Namespace, views: dict[str, np.ndarray],
                     workers: int, steps_per_epoch: int):
    """A worker's optimiser and schedule for ``--hogwild-momentum``: ``local`` (its own
    velocity, as PyTorch's mnist_hogwild), ``scaled`` (its own, with the momentum of
    :func:`scaled_momentum`) or ``shared`` (the one velocity in the segment, updated
    without a lock like the weights)."""
    mode = getattr(args, "hogwild_momentum", "local")
    if mode == "scaled":
        args = argparse.Namespace(**{**vars(args),
                                     "momentum": scaled_momentum(args.momentum, workers)})
    opt, sched = make_training(net, args, steps_per_epoch)
    if mode == "shared":
        opt.velocity = views["velocity"]
        # a "first step" would overwrite the shared velocity with this worker's gradient;
        # with a zero velocity the ordinary step gives the same first update
        opt.steps = max(opt.steps, 1)
    return opt, sched


def claim_batches(counter: np.ndarray, claim: Any, stop: int) -> Iterator[int]:
    """``--assign dynamic``: global batch indices claimed one at a time from the shared
    ``counter`` (a one-element view of the segment) under the lock ``claim``, until
    ``stop``. Every worker draws from the same counter, so each batch goes to exactly one
    worker and a slow worker simply claims fewer."""
    while True:
        with claim:
            g = int(counter[0])
            if g >= stop:
                return
            counter[0] = g + 1
        yield g


def check_options(args: argparse.Namespace, workers: int) -> None:
    """Refuse ``--straggler`` ranks that are not workers and momentum options that need SGD."""
    try:
        slow = stragglers(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for r, f in sorted(slow.items()):
        if r >= workers:
            raise UsageError(f"--straggler {r}:{f:g}: there is no worker {r} (HOGWILD workers "
                             f"are numbered 0..{workers - 1})")
    mode = getattr(args, "hogwild_momentum", "local")
    if mode != "local" and args.optimizer != "sgd":
        raise UsageError(f"--hogwild-momentum {mode} changes SGD's momentum; it needs "
                         f"--optimizer sgd, not {args.optimizer}")
    if mode == "shared" and args.backend == "cuda":
        raise UsageError("--hogwild-momentum shared keeps the velocity in host shared memory: "
                         "use --backend numpy or numba")


def stragglers_within(args: argparse.Namespace, workers: int) -> list[str] | None:
    """``--straggler`` specs of the workers a run of ``workers`` has (``--workers 1 2
    --straggler 1:4`` slows worker 1 in the 2-worker run; the 1-worker run has none)."""
    keep = [f"{r}:{f:g}" for r, f in sorted(stragglers(args).items()) if r < workers]
    return keep or None


def snapshot_points(inbox: list[tuple[str, int, Any]], starts: list[float],
                    walls: list[float], steps_per_epoch: int, batch_size: int, samples: int
                    ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """The workers' ``--eval-every`` copies, in step order, with their training seconds:
    the epochs before plus the time since this epoch's release (``perf_counter`` is one
    system-wide clock on Linux, so a worker's stamp and the parent's agree), and the
    samples of the global batches up to the copy (``samples`` per epoch)."""
    snaps = sorted((m[2] for m in inbox if m[0] == "snap"), key=lambda p: p["step"])
    points, copies = [], []
    for p in snaps:
        e = (p["step"] - 1) // steps_per_epoch
        if e >= len(walls):  # an epoch that did not complete (divergence): no row for it
            continue
        k = int(p["step"]) - e * steps_per_epoch
        points.append({"step": int(p["step"]),
                       "samples": float(e * samples + min(k * batch_size, samples)),
                       "wall_s": float(sum(walls[:e]) + p["t"] - starts[e])})
        copies.append(p["params"])
    return points, copies


def epoch_fields(args: argparse.Namespace, workers: int, stale: np.ndarray) -> dict[str, Any]:
    """What an epoch row records about the experiment's knobs: momentum option and the
    momentum each worker used, batch assignment, stragglers, the staleness histogram."""
    mode = getattr(args, "hogwild_momentum", "local")
    mu = scaled_momentum(args.momentum, workers) if mode == "scaled" else args.momentum
    return {"momentum_mode": mode, "worker_momentum": mu,
            "assign": getattr(args, "assign", "static"), "straggler": straggler_label(args),
            "staleness_hist": np.bincount(stale).tolist() if len(stale) else []}


def worker_summaries(epochs_stats: list[dict[int, Any]], workers: int
                     ) -> list[tuple[int, float, float]]:
    """Per worker over the run: steps, median compute ms, mean injected sleep ms per step."""
    out = []
    for w in range(workers):
        comp = [c for st in epochs_stats for c in st.get(w, {}).get("compute", [])]
        slept = [c for st in epochs_stats for c in st.get(w, {}).get("slept", [])]
        out.append((len(comp), 1e3 * float(np.median(comp)) if comp else math.nan,
                    1e3 * float(np.mean(slept)) if slept else math.nan))
    return out
