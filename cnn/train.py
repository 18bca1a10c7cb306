"""Single-process training loop and CLI.

    python -m cnn.train --dataset digits --epochs 10
    python -m cnn.train --dataset fashion-mnist --epochs 15 --schedule cosine \
        --save-metrics results/baseline_fashion_mnist.pkl

The data order is a function of (seed, epoch) only: global batch k of an epoch
holds the same samples whatever the backend, thread count or number of MPI
ranks. Parallel strategies reuse ``fit`` and replace only the step.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn import checkpoint as ckpt_io
from cnn import cli
from cnn import data as cdata
from cnn.backends import BACKENDS
from cnn.errors import CheckpointError, DivergenceError, UsageError
from cnn.metrics import make_row, save_metrics, step_stats, to_frame
from cnn.models import MODELS, build
from cnn.network import Network
from cnn.optim import SCHEDULES, make_optimizer, make_schedule

# Defaults a researcher can read at a glance (the CLI shows them in --help).
DEFAULTS = dict(backend="numpy", model="seed_cnn", dataset="digits", epochs=10, batch_size=64,
                lr=0.05, momentum=0.9, optimizer="sgd", schedule="cosine", weight_decay=0.0,
                seed=0)

StepFn = Callable[[np.ndarray, np.ndarray, float], float]
CHECKPOINT = "checkpoint.npz"
#: The pickle checkpoints of earlier versions: recognised and refused (unpickling runs code).
LEGACY_CHECKPOINT = "checkpoint.pkl"
#: Flags that may change between a run and its resumption: where it reads and writes, not
#: what it computes. Every other training flag must be the same (see :func:`resume_args`).
RESUME_FREE_FLAGS: frozenset[str] = frozenset(
    {"data_dir", "save_metrics", "save_weights", "checkpoint_dir", "resume", "no_progress"})


def sequential_step(net: Network, opt: Any) -> StepFn:
    """One process: gradients of the whole batch, then one optimiser step."""

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        loss = net.loss_and_grad(xb, yb)
        opt.step(lr=lr)
        return loss

    return step


def resume_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define a run (all but :data:`RESUME_FREE_FLAGS`): a checkpoint stores
    them and ``--resume`` refuses to continue it with different ones."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE_FLAGS}


def _changed(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    now = ckpt_io.jsonable(dict(now))
    return [k for k in sorted(set(saved) | set(now))
            if k not in saved or k not in now or not cli.values_equal(saved[k], now[k])]


class _Checkpoint:
    """The training state of :func:`fit` in one :mod:`cnn.checkpoint` file."""

    def __init__(self, directory: str | Path, net: Network, opt: Any, identity: dict[str, Any],
                 run_args: Mapping[str, Any] | None):
        self.dir = Path(directory)
        self.path = self.dir / CHECKPOINT
        self.net, self.opt = net, opt
        self.identity = ckpt_io.jsonable(identity)
        self.run_args = None if run_args is None else ckpt_io.jsonable(dict(run_args))

    def save(self, state: dict[str, Any]) -> None:
        arrays = {f"param/{k}": v for k, v in self.net.state_dict().items()}
        opt_meta = {}
        for k, v in self.opt.state_dict().items():
            if isinstance(v, np.ndarray):
                arrays[f"optimizer/{k}"] = v
            else:
                opt_meta[k] = v
        arrays["step_times"] = np.asarray(state["times"], dtype=np.float64)
        arrays["epoch_losses"] = np.asarray(state["losses"], dtype=np.float64)
        meta = {k: v for k, v in state.items() if k not in ("times", "losses")}
        meta.update(run=self.run_args, fit=self.identity, optimizer=opt_meta)
        ckpt_io.save(self.path, arrays, meta)

    def load(self) -> dict[str, Any]:
        """The saved state, after checking it belongs to this run; loads weights and
        optimiser state into the network and optimiser."""
        if not self.path.exists():
            legacy = self.dir / LEGACY_CHECKPOINT
            if legacy.exists():
                raise CheckpointError(
                    f"--resume: {legacy} is a pickle checkpoint of an older version of cnn, "
                    f"which is never loaded (unpickling can run code); start a new run "
                    f"(drop --resume) or finish it with the version that wrote it")
            raise CheckpointError(f"--resume: no checkpoint in {self.dir} (looked for "
                                  f"{self.path}); drop --resume to start a new run there")
        arrays, meta = ckpt_io.load(self.path)
        where = f"--resume: the checkpoint {self.path} was written by a different run"
        if self.run_args is not None and meta.get("run") is not None:
            saved = meta["run"]
            diff = _changed(saved, self.run_args)
            if diff:
                parts = [f"{cli.flag(k)} was {saved.get(k, 'not set')!r}, now "
                         f"{self.run_args.get(k, 'not set')!r}" for k in diff]
                raise CheckpointError(f"{where}: {'; '.join(parts)}. Resume with the same "
                                      f"flags, or start a new run in another --checkpoint-dir")
        diff = _changed(meta.get("fit", {}), self.identity)
        if diff:
            saved = meta.get("fit", {})
            parts = [f"{k} was {saved.get(k)!r}, now {self.identity.get(k)!r}" for k in diff]
            raise CheckpointError(f"{where}: {'; '.join(parts)}")
        try:
            self.net.load_state_dict({k[len("param/"):]: v for k, v in arrays.items()
                                      if k.startswith("param/")})
            self.opt.load_state_dict({**meta["optimizer"],
                                      **{k[len("optimizer/"):]: v for k, v in arrays.items()
                                         if k.startswith("optimizer/")}})
            state = {k: meta[k] for k in ("global_step", "samples", "history", "last_row",
                                          "epoch_start")}
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path} is incomplete or inconsistent ({exc}); it "
                                  f"cannot be resumed") from None
        state["times"] = arrays.get("step_times", np.zeros(0)).tolist()
        state["losses"] = arrays.get("epoch_losses", np.zeros(0)).tolist()
        return state


def fit(net: Network, train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray] | None = None, *, epochs: int = 1,
        batch_size: int = 64, optimizer: Any = None, schedule: Any = None, seed: int = 0,
        max_steps: int | None = None, checkpoint_dir: str | Path | None = None,
        resume: bool = False, run_args: Mapping[str, Any] | None = None,
        progress: bool | None = None, step_fn: StepFn | None = None,
        comm_time: Callable[[], float] | None = None, log: Callable[[str], None] | None = print,
        **row_fields: Any) -> pd.DataFrame:
    """Train for ``epochs`` and return one row per epoch (the DESIGN.md results columns).

    ``step_fn`` replaces the sequential step (MPI strategies pass theirs); ``comm_time``
    reports the communication seconds spent so far; extra keywords (experiment,
    strategy, dataset, model, processes, ...) are copied into every row.

    With ``checkpoint_dir`` the state is saved (:mod:`cnn.checkpoint`, atomically) after
    every epoch and when ``max_steps`` stops a run; ``resume`` continues from it exactly
    (same weights, optimiser state, data order, and the epoch's losses so far). The
    checkpoint records ``run_args`` (the CLI's :func:`resume_args`) and the network,
    batch size, seed and training-set size; resuming with different ones raises
    :class:`~cnn.errors.CheckpointError`, as does ``resume`` without a checkpoint.
    On divergence the :class:`~cnn.errors.DivergenceError` carries the completed epochs'
    rows as ``frame``.
    """
    from tqdm.auto import tqdm

    x, y = train
    n = len(y)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(
        max_steps, steps_per_epoch * epochs)
    opt = optimizer if optimizer is not None else make_optimizer("sgd", net, lr=0.01)
    sched = schedule if schedule is not None else make_schedule("constant", opt.lr, total_steps)
    step_fn = step_fn or sequential_step(net, opt)
    if resume and checkpoint_dir is None:
        raise UsageError("resume needs checkpoint_dir (--checkpoint-dir): where the checkpoint is")
    identity = {"batch_size": batch_size, "seed": seed, "train_samples": n,
                "network": {k: v for k, v in net.config().items() if k != "seed"},
                "optimizer": opt.kind}
    ckpt = (_Checkpoint(checkpoint_dir, net, opt, identity, run_args)
            if checkpoint_dir is not None else None)

    global_step, seen, history, times, losses = 0, 0, [], [], []
    last_row, epoch_start = None, {"wall_s": 0.0, "samples": 0}
    if resume:
        state = ckpt.load()
        global_step, seen, history = state["global_step"], state["samples"], state["history"]
        times, losses, last_row = state["times"], state["losses"], state["last_row"]
        epoch_start = state["epoch_start"]
        if log:
            log(f"resumed from {ckpt.path} at step {global_step} "
                f"(epoch {global_step // steps_per_epoch + 1})")

    def save_checkpoint() -> None:
        if ckpt is not None:
            ckpt.save({"global_step": global_step, "samples": seen, "history": history,
                       "last_row": last_row, "epoch_start": epoch_start, "times": times,
                       "losses": losses, "epoch": global_step // steps_per_epoch,
                       "batch_in_epoch": global_step % steps_per_epoch})

    if global_step >= total_steps:
        if log:
            log(f"nothing left to train: the checkpoint is at step {global_step} of "
                f"{total_steps}")
        return to_frame(history + ([last_row] if last_row is not None else []))
    while global_step < total_steps:
        epoch, skip = divmod(global_step, steps_per_epoch)
        if skip == 0:
            losses = []
        batches = list(cdata.iterate_batches(n, batch_size, seed, epoch))[skip:]
        batches = batches[:total_steps - global_step]
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=(None if progress is None else not progress))
        for idx in bar:
            lr = sched(global_step)
            t0 = time.perf_counter()
            loss = step_fn(x[idx], y[idx], lr)
            net.backend.synchronize()
            times.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                bar.close()
                saved = ckpt is not None and ckpt.path.exists()
                where = f" (last good weights: {ckpt.path})" if saved else ""
                exc = DivergenceError(
                    f"loss became {loss} at epoch {epoch + 1}, step {global_step + 1} "
                    f"(lr={lr:g}): training diverged. Lower --lr, add a warmup schedule or "
                    f"check the input data{where}.")
                exc.frame = to_frame(history)
                raise exc
            losses.append(loss)
            global_step += 1
            seen += len(idx)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
        bar.close()
        complete = global_step % steps_per_epoch == 0
        test_loss, test_acc = net.evaluate(*test) if test is not None else (math.nan, math.nan)
        wall = sum(times)
        wall0, seen0 = epoch_start["wall_s"], epoch_start["samples"]
        row = make_row(
            epoch=epoch + 1, step=global_step, batch_size=batch_size, epochs=epoch + 1,
            samples=seen, wall_s=wall, **step_stats(times, warmup=min(1, len(times) - 1)),
            samples_per_s=(seen - seen0) / max(wall - wall0, 1e-12),
            comm_s=comm_time() if comm_time else 0.0, train_loss=float(np.mean(losses)),
            final_loss=float(np.mean(losses)), test_loss=test_loss, test_acc=test_acc,
            lr=sched(global_step - 1), backend=net.backend.NAME, threads=net.threads,
            device=net.backend.device_name(), complete_epoch=complete, **row_fields)
        if log:
            log(f"epoch {epoch + 1:>3}  loss {np.mean(losses):.4f}  test acc {test_acc:.4f}  "
                f"({wall:.1f}s training)")
        if not complete:  # stopped by max_steps: report it; a resume finishes the epoch's row
            last_row = row
            save_checkpoint()
            return to_frame(history + [row])
        history.append(row)
        last_row, losses = None, []
        epoch_start = {"wall_s": wall, "samples": seen}
        save_checkpoint()
    return to_frame(history)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m cnn.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(p)
    return p


def dataset_arg(text: str) -> str:
    """An argparse type: a dataset name, canonicalised (``Fashion_MNIST`` -> fashion-mnist)."""
    try:
        return cdata.canonical_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_training_args(p: argparse.ArgumentParser, *, weights: bool = True,
                      checkpoints: bool = True) -> argparse.ArgumentParser:
    """The training flags, each validated as it is parsed; MPI, HOGWILD and k-fold CLIs add
    theirs on top. ``weights``/``checkpoints``: offer ``--save-weights`` and
    ``--checkpoint-dir``/``--resume`` (only where the CLI honours them)."""
    d = DEFAULTS
    pos, nonneg = cli.int_at_least(1), cli.int_at_least(0)
    p.add_argument("--backend", default=d["backend"], choices=list(BACKENDS))
    p.add_argument("--model", default=d["model"], choices=list(MODELS))
    p.add_argument("--dataset", default=d["dataset"], type=dataset_arg,
                   help=" | ".join(cdata.DATASETS))
    p.add_argument("--data-dir", default=None, help="where IDX/CIFAR files are looked up")
    p.add_argument("--subset", type=pos, default=None, help="use the first N training samples")
    p.add_argument("--test-subset", type=pos, default=None, help="use the first N test samples")
    p.add_argument("--epochs", type=pos, default=d["epochs"])
    p.add_argument("--max-steps", type=pos, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=pos, default=d["batch_size"])
    p.add_argument("--lr", type=cli.number(0, lo_open=True), default=d["lr"])
    p.add_argument("--momentum", type=cli.number(0, 1, hi_open=True), default=d["momentum"],
                   help="SGD momentum, in [0, 1)")
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--optimizer", default=d["optimizer"], choices=["sgd", "adam"])
    p.add_argument("--schedule", default=d["schedule"], choices=list(SCHEDULES))
    p.add_argument("--weight-decay", type=cli.number(0), default=d["weight_decay"])
    p.add_argument("--padding", type=nonneg, default=None,
                   help="conv padding (default: 1 for inputs smaller than 16 px, else 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=pos, default=None, help="threads for the backend")
    p.add_argument("--seed", type=nonneg, default=d["seed"])
    p.add_argument("--save-metrics", default=None, metavar="PATH.pkl",
                   help="write the per-epoch results frame here (atomically)")
    if weights:
        p.add_argument("--save-weights", default=None, metavar="PATH.npz",
                       help="write the final weights here (atomically; an existing file is "
                            "replaced only if it is a weights .npz)")
    if checkpoints:
        p.add_argument("--checkpoint-dir", default=None,
                       help="checkpoint every epoch here (checkpoint.npz)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --checkpoint-dir (same flags required)")
    p.add_argument("--experiment", default="train", help="experiment name in the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_data(args: argparse.Namespace):
    train = cdata.load(args.dataset, "train", data_dir=args.data_dir, subset=args.subset)
    test = cdata.load(args.dataset, "test", data_dir=args.data_dir, subset=args.test_subset)
    return train, test


def build_network(args: argparse.Namespace, input_shape, num_classes: int,
                  params: np.ndarray | None = None) -> Network:
    kw: dict[str, Any] = {}
    if args.model != "mlp":
        small = len(input_shape) == 3 and min(input_shape[1:]) < 16
        kw["padding"] = args.padding if args.padding is not None else int(small)
    return build(args.model, input_shape, num_classes, backend=args.backend,
                 dtype=args.dtype, seed=args.seed, threads=args.threads, params=params, **kw)


def make_training(net: Network, args: argparse.Namespace, steps_per_epoch: int):
    opt_kw: dict[str, Any] = {"lr": args.lr, "weight_decay": args.weight_decay}
    if args.optimizer == "sgd":
        opt_kw.update(momentum=args.momentum, nesterov=args.nesterov)
    opt = make_optimizer(args.optimizer, net, **opt_kw)
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    return opt, make_schedule(args.schedule, args.lr, total)


def save_partial_metrics(exc: DivergenceError, path: str | None,
                         earlier: pd.DataFrame | None = None) -> None:
    """On divergence, write the epochs that completed (``exc.frame``, after ``earlier``
    runs' rows) to ``--save-metrics`` and say so in the error's message."""
    frames = [f for f in (earlier, exc.frame) if f is not None and len(f)]
    if not path or not frames:
        return
    df = to_frame(pd.concat(frames, ignore_index=True))
    save_metrics(df, path)
    exc.args = (f"{exc.args[0] if exc.args else exc} The {len(df)} row(s) completed "
                f"before it are in {path}.",)


def finish_run(df: pd.DataFrame, net: Network, args: argparse.Namespace) -> None:
    """What every training CLI does last: save metrics and weights atomically, print."""
    if args.save_metrics:
        save_metrics(df, args.save_metrics)
    if getattr(args, "save_weights", None):
        net.save(args.save_weights)
    if len(df):
        last = df.iloc[-1]
        comm = last.get("comm_s") or 0.0
        comm_note = f", comm {comm:.2f}s of {last['wall_s']:.2f}s" if comm > 0 else ""
        print(f"test accuracy: {last['test_acc']:.4f}  (loss {last['test_loss']:.4f}, "
              f"{last['samples_per_s']:.0f} samples/s, step {last['step_ms_median']:.1f} ms"
              f"{comm_note})", flush=True)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """``python -m cnn.train``: flags and output paths are checked before the data loads."""
    args = cli.parse(build_parser(), argv)
    (x, y), test = load_data(args)
    net = build_network(args, x.shape[1:], int(max(y.max(), test[1].max())) + 1)
    opt, sched = make_training(net, args, math.ceil(len(y) / args.batch_size))
    print(net.summary())
    try:
        df = fit(net, (x, y), test, epochs=args.epochs, batch_size=args.batch_size,
                 optimizer=opt, schedule=sched, seed=args.seed, max_steps=args.max_steps,
                 checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                 run_args=resume_args(args), progress=False if args.no_progress else None,
                 experiment=args.experiment, strategy="sequential", processes=1,
                 model=args.model, dataset=args.dataset)
    except DivergenceError as exc:
        save_partial_metrics(exc, args.save_metrics)
        raise
    finish_run(df, net, args)
    return df


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
