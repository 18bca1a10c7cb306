"""HOGWILD checkpoints, taken by the parent at epoch boundaries.

Between two epochs every worker waits at its start semaphore, so the shared weights are
still and each worker's private optimiser state (momentum, Adam moments) is what it sent
with its epoch report. One checkpoint (:mod:`cnn.checkpoint`: ``.npz`` arrays plus JSON,
written atomically) holds the shared weights, every worker's optimiser state, the
per-epoch weight snapshots and statistics the results rows are built from, and the run's
flags; a resumed run starts the workers at the next epoch with their own optimiser state.
With one worker a resumed run is therefore sequential SGD, bit for bit, as an
uninterrupted one is. Mid-epoch state is never saved: a run stopped inside an epoch
redoes that epoch.

Several runs of one command (``--sequential``, several ``--workers``, ``--also-lock``)
each get their own folder below ``--checkpoint-dir`` (:func:`run_dir`); with ``--resume``
a finished run is read back instead of trained again and an unstarted one starts fresh.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cnn import checkpoint as ckpt_io
from cnn.errors import CheckpointError, UsageError
from cnn.train import CHECKPOINT, KEY_FLAGS, RESUME_FREE_FLAGS, resume_args

__all__ = ["HOGWILD_FREE_FLAGS", "EpochCheckpoint", "fit_checkpoint", "hogwild_args",
           "run_dir"]

#: Flags a resumed HOGWILD command may change: which runs it makes (each run's folder
#: names its worker count and locking) and how long it waits for workers.
HOGWILD_FREE_FLAGS: frozenset[str] = RESUME_FREE_FLAGS | {
    "workers", "lock", "also_lock", "sequential", "start_method", "startup_timeout",
    "epoch_timeout"}


def run_dir(base: str | Path, strategy: str, workers: int) -> Path:
    """The folder of one run below ``--checkpoint-dir``: ``hogwild-2``, ``sequential-1``."""
    return Path(base) / f"{strategy}-{workers}"


def hogwild_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a resumed HOGWILD run must repeat."""
    return {k: v for k, v in resume_args(args).items() if k not in HOGWILD_FREE_FLAGS}


class EpochCheckpoint:
    """``<run_dir>/checkpoint.npz`` of one HOGWILD run (the parent reads and writes it)."""

    def __init__(self, directory: str | Path, args: argparse.Namespace,
                 identity: dict[str, Any]):
        self.dir = Path(directory)
        self.path = self.dir / CHECKPOINT
        self.run_args = ckpt_io.jsonable(hogwild_args(args))
        self.identity = ckpt_io.jsonable(identity)
        self.saved_step = 0

    @classmethod
    def for_run(cls, args: argparse.Namespace, strategy: str, net: Any, train_samples: int,
                steps_per_epoch: int, total_steps: int) -> EpochCheckpoint | None:
        """The checkpoint of one HOGWILD run of ``args`` (None without --checkpoint-dir)."""
        if not getattr(args, "checkpoint_dir", None):
            return None
        if getattr(args, "eval_every", None):
            raise UsageError("--checkpoint-dir: HOGWILD runs with --eval-every cannot be "
                             "checkpointed (the workers' copies are not saved); drop one")
        return cls(run_dir(args.checkpoint_dir, strategy, args.workers), args, {
            "workers": int(args.workers), "lock": bool(args.lock),
            "train_samples": int(train_samples),
            "network": {k: v for k, v in net.config().items() if k != "seed"},
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps})

    def exists(self) -> bool:
        return self.path.exists()

    def stopped(self, signum: int) -> ckpt_io.Stopped:
        """The stop at the last checkpoint this run wrote (or none yet)."""
        return ckpt_io.Stopped(self.saved_step, self.path if self.saved_step else None,
                               signum)

    def save(self, params: np.ndarray, snapshots: list[np.ndarray],
             opt_states: list[dict[str, Any]], stats: list[dict[int, dict[str, Any]]],
             walls: list[float], ready: dict[int, dict[str, Any]], startup_s: float,
             global_step: int) -> None:
        """The state after ``len(stats)`` epochs."""
        arrays: dict[str, np.ndarray] = {"params": np.asarray(params),
                                         "snapshots": np.stack(snapshots)}
        opt_meta = []
        for w, state in enumerate(opt_states):
            meta_w = {}
            for k, v in state.items():
                if isinstance(v, np.ndarray):
                    arrays[f"worker{w}/optimizer/{k}"] = v
                else:
                    meta_w[k] = v
            opt_meta.append(meta_w)
        meta = {"run": self.run_args, "hogwild": self.identity, "epochs_done": len(stats),
                "global_step": global_step, "optimizer": opt_meta,
                "stats": [{str(w): s for w, s in st.items()} for st in stats],
                "walls": list(walls), "ready": {str(w): r for w, r in ready.items()},
                "startup_s": startup_s}
        ckpt_io.save(self.path, arrays, meta)
        self.saved_step = global_step

    def load(self) -> dict[str, Any]:
        """The saved state, after checking it is this run's (the flags and the identity:
        workers, locking, network, data size, batch, seed, steps)."""
        arrays, meta = ckpt_io.load(self.path)
        if "hogwild" not in meta:
            raise CheckpointError(f"--resume: {self.path} is not a HOGWILD checkpoint")
        ckpt_io.refuse_changes(self.path, meta.get("run") or {}, self.run_args, KEY_FLAGS)
        diff = ckpt_io.changed_flags(meta["hogwild"], self.identity)
        if diff:
            parts = [f"{k} was {meta['hogwild'].get(k)!r}, now {self.identity.get(k)!r}"
                     for k in diff]
            raise CheckpointError(f"--resume: the checkpoint {self.path} was written by a "
                                  f"different run: {'; '.join(parts)}")
        try:
            opt_states = []
            for w, m in enumerate(meta["optimizer"]):
                prefix = f"worker{w}/optimizer/"
                opt_states.append({**m, **{k[len(prefix):]: v for k, v in arrays.items()
                                           if k.startswith(prefix)}})
            self.saved_step = int(meta["global_step"])
            return {"params": arrays["params"], "snapshots": list(arrays["snapshots"]),
                    "opt_states": opt_states, "epochs_done": int(meta["epochs_done"]),
                    "stats": [{int(w): s for w, s in st.items()} for st in meta["stats"]],
                    "walls": [float(t) for t in meta["walls"]],
                    "ready": {int(w): r for w, r in meta["ready"].items()},
                    "startup_s": float(meta["startup_s"]),
                    "global_step": int(meta["global_step"])}
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path} is incomplete or inconsistent ({exc}); it "
                                  f"cannot be resumed") from None


def fit_checkpoint(args: argparse.Namespace, flag: ckpt_io.StopFlag) -> dict[str, Any]:
    """:func:`cnn.train.fit`'s checkpoint keywords for the sequential baseline of a HOGWILD
    command (its own folder; resumed only if it has a checkpoint already)."""
    base = getattr(args, "checkpoint_dir", None)
    if not base:
        return {}
    d = run_dir(base, "sequential", 1)
    return dict(checkpoint_dir=d, resume=bool(args.resume) and (d / CHECKPOINT).exists(),
                run_args=hogwild_args(args),
                hooks=ckpt_io.Hooks(stop=lambda step: flag.requested,
                                    signum=lambda: flag.signum))

