"""Uneven workers on purpose, and accuracy against time: what the "when does asynchrony pay"
experiment needs from every parallel strategy (the MPI ones and HOGWILD alike).

``--straggler RANK:FACTOR`` (repeatable)
    That rank's (HOGWILD: that worker's) every step takes FACTOR times its compute time: after
    computing, before it communicates or applies its update, it sleeps ``(FACTOR - 1) x`` the
    seconds it just computed. Sleeping, not spinning: its core is free meanwhile, so on a
    machine with fewer cores than processes another process may use it (on a cluster with
    one rank per node the core would simply idle, and a slow node would not lend its core to
    anyone: the straggler costs more there).
``--straggler-dist exp:MEAN_MS``
    Every rank also sleeps an exponentially distributed delay (mean MEAN_MS) per step, drawn
    from a generator seeded by ``(--seed, rank)``: a rerun sleeps the same delays.
``--eval-every N``
    Keep a copy of the weights every N global steps (and at each epoch's end); the copies
    are evaluated after training, outside the timed region, and every epoch row carries its
    points as ``evals``: ``[{"step", "samples", "wall_s", "test_acc", "test_loss"}, ...]``
    with ``wall_s`` the training seconds up to the copy (copying excluded). Time to a target
    accuracy is read off these points.

A rank's per-step compute and sleep are recorded (:class:`Delay`) and reported per rank
(:func:`rank_fields`), so a run shows which rank was slow and what the others did meanwhile.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Delay", "Snapshots", "add_curve", "add_rank_fields", "add_straggler_args",
           "curve_points", "object_column", "parse_dist", "parse_straggler", "rank_fields",
           "straggler_label", "stragglers"]

DIST_KINDS = ("exp",)


def parse_straggler(text: str) -> tuple[int, float]:
    """``"RANK:FACTOR"`` -> ``(rank, factor)``; ValueError naming what is wrong."""
    try:
        rank_s, factor_s = str(text).split(":")
        rank, factor = int(rank_s), float(factor_s)
    except ValueError:
        raise ValueError(f"--straggler wants RANK:FACTOR (e.g. 1:4), got {text!r}") from None
    if rank < 0 or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"--straggler wants a rank >= 0 and a factor >= 1 (e.g. 1:4), "
                         f"got {text!r}")
    return rank, factor


def parse_dist(text: str | None) -> tuple[str, float] | None:
    """``"exp:MEAN_MS"`` -> ``("exp", mean seconds)``; None for no random delay."""
    if not text:
        return None
    try:
        kind, mean_s = str(text).split(":")
        mean = float(mean_s)
    except ValueError:
        raise ValueError(f"--straggler-dist wants exp:MEAN_MS (e.g. exp:10), got "
                         f"{text!r}") from None
    if kind not in DIST_KINDS or not math.isfinite(mean) or mean <= 0:
        raise ValueError(f"--straggler-dist wants exp:MEAN_MS with a mean > 0 ms (e.g. "
                         f"exp:10), got {text!r}")
    return kind, mean / 1e3


def _argtype(parse):
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            why = str(exc).split(" wants ", 1)[-1]
            raise argparse.ArgumentTypeError(f"must be {why}") from None
        return str(text)

    check.__name__ = parse.__name__.replace("parse_", "")
    return check


def add_straggler_args(p: argparse.ArgumentParser) -> None:
    """``--straggler``, ``--straggler-dist`` and ``--eval-every``: the same flags for every
    MPI strategy and for HOGWILD."""
    from cnn.cli import int_at_least

    g = p.add_argument_group("stragglers and time to accuracy")
    g.add_argument("--straggler", action="append", default=None, type=_argtype(parse_straggler),
                   metavar="RANK:FACTOR",
                   help="make RANK's (HOGWILD: worker's) every step take FACTOR x its compute "
                        "time, sleeping the difference (repeatable)")
    g.add_argument("--straggler-dist", default=None, type=_argtype(parse_dist),
                   metavar="exp:MEAN_MS",
                   help="every rank also sleeps a random delay per step (exponential, this "
                        "mean in ms, seeded by --seed and the rank)")
    g.add_argument("--eval-every", type=int_at_least(1), default=None, metavar="N",
                   help="also evaluate a copy of the weights every N global steps, after "
                        "training and outside the timed region (the rows' evals column)")


def stragglers(args: argparse.Namespace) -> dict[int, float]:
    """``{rank: factor}`` of ``--straggler``; a rank given twice is an error."""
    out: dict[int, float] = {}
    for spec in getattr(args, "straggler", None) or ():
        rank, factor = parse_straggler(spec)
        if rank in out:
            raise ValueError(f"--straggler gives rank {rank} twice ({out[rank]:g} and "
                             f"{factor:g}); give each rank once")
        out[rank] = factor
    return out


def straggler_label(args: argparse.Namespace) -> str:
    """What the ``straggler`` column records: ``"1:4"``, ``"exp:10"``, ``"1:4,exp:10"`` or ''."""
    parts = [f"{r}:{f:g}" for r, f in sorted(stragglers(args).items())]
    dist = getattr(args, "straggler_dist", None)
    if dist:
        parts.append(str(dist))
    return ",".join(parts)


@dataclass
class Delay:
    """One rank's injected slowness, and the record of every step's compute and sleep.

    Call :meth:`after` once per step with the seconds the step computed; it sleeps what
    the flags ask for and returns the seconds actually slept (measured).
    """

    factor: float = 1.0
    mean_s: float = 0.0
    seed: Any = None
    compute_s: list[float] = field(default_factory=list)
    slept_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed) if self.mean_s > 0 else None
        self.owed = 0.0  # seconds slept beyond what was asked, taken off the next sleeps

    @classmethod
    def for_rank(cls, args: argparse.Namespace, rank: int) -> Delay:
        dist = parse_dist(getattr(args, "straggler_dist", None))
        return cls(factor=stragglers(args).get(rank, 1.0), mean_s=dist[1] if dist else 0.0,
                   seed=[int(getattr(args, "seed", 0)), int(rank), 0x57A6])

    @property
    def active(self) -> bool:
        return self.factor > 1 or self.mean_s > 0

    def wanted(self, compute_s: float) -> float:
        """The sleep this step asks for (draws the random delay: call once per step)."""
        extra = (self.factor - 1.0) * max(compute_s, 0.0)
        if self.rng is not None:
            extra += float(self.rng.exponential(self.mean_s))
        return extra

    def after(self, compute_s: float) -> float:
        """Record a step that computed ``compute_s`` seconds; sleep the injected delay.

        ``time.sleep`` overshoots (timer slack, a busy scheduler): the excess is carried
        over and taken off the next sleeps, so the delay is right on average over a run."""
        slept = 0.0
        if self.active:
            want = self.wanted(compute_s)
            t0 = time.perf_counter()
            if want - self.owed > 0:
                time.sleep(want - self.owed)
            slept = time.perf_counter() - t0
            self.owed = max(0.0, self.owed + slept - want)
        self.compute_s.append(float(compute_s))
        self.slept_s.append(slept)
        return slept

    def summary(self) -> tuple[int, float, float]:
        """(steps, median compute ms, mean sleep ms per step) of this rank (the mean: an
        overshooting sleep is made up by shorter ones after it)."""
        if not self.compute_s:
            return 0, math.nan, math.nan
        return (len(self.compute_s), 1e3 * float(np.median(self.compute_s)),
                1e3 * float(np.mean(self.slept_s)))


def rank_fields(summaries: Sequence[tuple[int, float, float]]) -> dict[str, list]:
    """Row fields from every rank's :meth:`Delay.summary` (rank order): steps computed,
    median compute ms and mean injected sleep ms per step (NaN for a rank that does not
    compute, such as a parameter server)."""
    return {"rank_steps": [int(s[0]) for s in summaries],
            "rank_compute_ms": [float(s[1]) for s in summaries],
            "rank_delay_ms": [float(s[2]) for s in summaries]}


@dataclass
class Snapshots:
    """Copies of the weights inside epochs, for accuracy against time (``--eval-every``).

    ``due(step)``: after global step ``step`` (1-based), every ``every`` steps except at an
    epoch's end or the run's last step (the epoch rows are evaluated there anyway);
    ``take`` keeps a copy with the training seconds and samples so far.
    """

    every: int | None
    steps_per_epoch: int
    total_steps: int
    points: list[dict[str, Any]] = field(default_factory=list)
    params: list[np.ndarray] = field(default_factory=list)

    def due(self, step: int) -> bool:
        if not self.every or step <= 0 or step % self.every:
            return False
        return step % self.steps_per_epoch != 0 and step != self.total_steps

    def take(self, step: int, wall_s: float, samples: float, params: np.ndarray) -> float:
        """Keep a copy; returns the seconds the copy took (to keep out of the clock)."""
        t0 = time.perf_counter()
        self.params.append(np.array(params, copy=True))
        copy_s = time.perf_counter() - t0
        self.points.append({"step": int(step), "samples": float(samples),
                            "wall_s": float(wall_s), "copy_s": copy_s})
        return copy_s


def curve_points(points: Sequence[dict[str, Any]], results: Sequence[tuple[float, float]],
                 steps_per_epoch: int, epochs: int) -> list[list[dict[str, Any]]]:
    """The evaluated copies grouped by the epoch they fall in (one list per epoch row):
    ``points[i]`` gets ``test_loss, test_acc = results[i]``."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(epochs)]
    for pt, (loss, acc) in zip(points, results, strict=True):
        e = min(max(math.ceil(pt["step"] / steps_per_epoch) - 1, 0), epochs - 1)
        out[e].append({**pt, "test_loss": float(loss), "test_acc": float(acc)})
    return out


def object_column(df: pd.DataFrame, name: str, values: Sequence[Any]) -> None:
    """Set a column whose cells are lists (one per row), whatever their lengths."""
    df[name] = pd.Series(list(values), index=df.index, dtype=object)


def add_curve(df: pd.DataFrame, points: Sequence[dict[str, Any]],
              results: Sequence[tuple[float, float]], steps_per_epoch: int) -> None:
    """The ``evals`` column: each epoch row's mid-epoch copies (``points``, evaluated as
    ``results``) plus its own epoch-end point, whose wall loses the seconds spent copying
    (``copy_s`` of the copies before it), which the copies' own clock excludes too."""
    per_epoch = curve_points(points, results, steps_per_epoch, len(df))
    curves = []
    for (_, row), mid in zip(df.iterrows(), per_epoch, strict=True):
        step = int(row["step"])
        copying = sum(p.get("copy_s", 0.0) for p in points if p["step"] <= step)
        end = {"step": step, "samples": float(row["samples"]),
               "wall_s": float(row["wall_s"]) - copying, "test_loss": float(row["test_loss"]),
               "test_acc": float(row["test_acc"])}
        curves.append([{k: v for k, v in p.items() if k != "copy_s"} for p in mid] + [end])
    object_column(df, "evals", curves)


def add_rank_fields(df: pd.DataFrame, summaries: Sequence[tuple[int, float, float]]) -> None:
    """Per-rank steps, compute and injected sleep (run totals, on every row)."""
    for name, values in rank_fields(summaries).items():
        object_column(df, name, [values] * len(df))
