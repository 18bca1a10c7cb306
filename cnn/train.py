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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn import data as cdata
from cnn.errors import DivergenceError
from cnn.io import save_pickle
from cnn.metrics import make_row, save_metrics, step_stats, to_frame
from cnn.models import build
from cnn.network import Network
from cnn.optim import make_optimizer, make_schedule

# Defaults a researcher can read at a glance (the CLI shows them in --help).
DEFAULTS = dict(backend="numpy", model="seed_cnn", dataset="digits", epochs=10, batch_size=64,
                lr=0.05, momentum=0.9, optimizer="sgd", schedule="cosine", weight_decay=0.0,
                seed=0)

StepFn = Callable[[np.ndarray, np.ndarray, float], float]
CHECKPOINT = "checkpoint.pkl"


def sequential_step(net: Network, opt: Any) -> StepFn:
    """One process: gradients of the whole batch, then one optimiser step."""

    def step(xb: np.ndarray, yb: np.ndarray, lr: float) -> float:
        loss = net.loss_and_grad(xb, yb)
        opt.step(lr=lr)
        return loss

    return step


def fit(net: Network, train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray] | None = None, *, epochs: int = 1,
        batch_size: int = 64, optimizer: Any = None, schedule: Any = None, seed: int = 0,
        max_steps: int | None = None, checkpoint_dir: str | Path | None = None,
        resume: bool = False, progress: bool | None = None, step_fn: StepFn | None = None,
        comm_time: Callable[[], float] | None = None, log: Callable[[str], None] | None = print,
        **row_fields: Any) -> pd.DataFrame:
    """Train for ``epochs`` and return one row per epoch (the DESIGN.md results columns).

    ``step_fn`` replaces the sequential step (MPI strategies pass theirs); ``comm_time``
    reports the communication seconds spent so far; extra keywords (experiment,
    strategy, dataset, model, processes, ...) are copied into every row.
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
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None

    global_step, seen, history, times = 0, 0, [], []
    if resume and ckpt is not None and ckpt.exists():
        state = pd.read_pickle(ckpt)
        net.load_state_dict(state["params"])
        opt.load_state_dict(state["optimizer"])
        global_step, seen = state["global_step"], state["samples"]
        history, times = state["history"], state["times"]
        if log:
            log(f"resumed from {ckpt} at step {global_step} "
                f"(epoch {global_step // steps_per_epoch + 1})")

    def save_checkpoint() -> None:
        if ckpt is not None:
            save_pickle({"params": net.state_dict(), "optimizer": opt.state_dict(),
                         "global_step": global_step, "samples": seen, "history": history,
                         "times": times}, ckpt)

    wall0, seen0 = sum(times), seen
    while global_step < total_steps:
        epoch, skip = divmod(global_step, steps_per_epoch)
        batches = list(cdata.iterate_batches(n, batch_size, seed, epoch))[skip:]
        batches = batches[:total_steps - global_step]
        losses = []
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
                saved = ckpt is not None and ckpt.exists()
                where = f" (last good weights: {ckpt})" if saved else ""
                raise DivergenceError(
                    f"loss became {loss} at epoch {epoch + 1}, step {global_step + 1} "
                    f"(lr={lr:g}): training diverged. Lower --lr, add a warmup schedule or "
                    f"check the input data{where}.")
            losses.append(loss)
            global_step += 1
            seen += len(idx)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
        bar.close()
        complete = global_step % steps_per_epoch == 0
        test_loss, test_acc = net.evaluate(*test) if test is not None else (math.nan, math.nan)
        wall = sum(times)
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
        if not complete:  # stopped by max_steps: report it, but resume redoes the epoch's row
            save_checkpoint()
            return to_frame(history + [row])
        history.append(row)
        wall0, seen0 = wall, seen
        save_checkpoint()
    save_checkpoint()
    return to_frame(history)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cnn.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(p)
    return p


def add_training_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training flags; MPI and HOGWILD CLIs add theirs on top of these."""
    d = DEFAULTS
    p.add_argument("--backend", default=d["backend"], help="numpy | numba | cuda")
    p.add_argument("--model", default=d["model"], help="seed_cnn | lenet5 | mlp")
    p.add_argument("--dataset", default=d["dataset"],
                   help="digits | iris | fashion-mnist | mnist | cifar10 | synthetic")
    p.add_argument("--data-dir", default=None, help="where IDX/CIFAR files are looked up")
    p.add_argument("--subset", type=int, default=None, help="use the first N training samples")
    p.add_argument("--test-subset", type=int, default=None, help="use the first N test samples")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--momentum", type=float, default=d["momentum"])
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--optimizer", default=d["optimizer"], choices=["sgd", "adam"])
    p.add_argument("--schedule", default=d["schedule"],
                   help="constant | step | cosine | restarts | warmup-cosine")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--padding", type=int, default=None,
                   help="conv padding (default: 1 for inputs smaller than 16 px, else 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None, help="threads for the backend")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--save-metrics", default=None, metavar="PATH.pkl",
                   help="write the per-epoch results frame here (atomically)")
    p.add_argument("--save-weights", default=None, metavar="PATH.npz")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint every epoch here")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
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


def finish_run(df: pd.DataFrame, net: Network, args: argparse.Namespace) -> None:
    """What every training CLI does last: save metrics and weights atomically, print."""
    if args.save_metrics:
        save_metrics(df, args.save_metrics)
    if args.save_weights:
        net.save(args.save_weights)
    if len(df):
        last = df.iloc[-1]
        comm = last.get("comm_s") or 0.0
        comm_note = f", comm {comm:.2f}s of {last['wall_s']:.2f}s" if comm > 0 else ""
        print(f"test accuracy: {last['test_acc']:.4f}  (loss {last['test_loss']:.4f}, "
              f"{last['samples_per_s']:.0f} samples/s, step {last['step_ms_median']:.1f} ms"
              f"{comm_note})", flush=True)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = build_parser().parse_args(argv)
    (x, y), test = load_data(args)
    net = build_network(args, x.shape[1:], int(max(y.max(), test[1].max())) + 1)
    opt, sched = make_training(net, args, math.ceil(len(y) / args.batch_size))
    print(net.summary())
    df = fit(net, (x, y), test, epochs=args.epochs, batch_size=args.batch_size, optimizer=opt,
             schedule=sched, seed=args.seed, max_steps=args.max_steps,
             checkpoint_dir=args.checkpoint_dir, resume=args.resume,
             progress=False if args.no_progress else None, experiment=args.experiment,
             strategy="sequential", processes=1, model=args.model,
             dataset=args.dataset)
    finish_run(df, net, args)
    return df


if __name__ == "__main__":
    main()
