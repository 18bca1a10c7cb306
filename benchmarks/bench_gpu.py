"""The cuda backend against torch+cuDNN on the same GPU and the NumPy reference on 1 thread.

    python3 benchmarks/bench_gpu.py --grid gpu-quick --out $OUT/bench_gpu.pkl   # < 5 min
    python3 benchmarks/bench_gpu.py --batch-sizes 128,256 --repeats 10
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_gpu.py --grid sim-tiny   # wiring check

Self-contained on the library (``cnn.models``, ``cnn.backends``, ``cnn.twin``,
``cnn.metrics``), so it runs from a source tree with ``PYTHONPATH=.`` and nothing
installed but numpy, pandas, numba-cuda and (for the cuDNN column) a CUDA torch.

What is timed, per batch size: one SGD-momentum training step (forward, loss,
backward, update) of the same network, fed a batch gathered from a host dataset
into pinned memory every step and copied to the GPU:

- ``cuda``: the backend's own path (``host_buffer`` + ``prefetch``: the next batch is
  gathered and uploaded on the copy stream while this step computes);
- ``torch-cudnn``: the torch twin (``cnn.twin.torch_twin``) with TF32 OFF for both
  matmuls and cuDNN convolutions (``allow_tf32 = False``), so both sides compute in
  plain float32: the headline comparison;
- ``torch-cudnn-tf32``: the same with TF32 ON (PyTorch's default for cuDNN): an extra,
  labelled column, not the headline. Every torch row records both flags and
  ``cudnn.benchmark`` (on);
- ``sequential``: the NumPy reference on 1 BLAS thread, only at the grid's
  ``numpy_batches`` (it takes seconds per step);
- ``transfer``: the batch's host-to-device copy alone.

GPU rows are timed in blocks of steps with one synchronize per block (as training
runs), the median over blocks; the first step (compile, cuDNN autotune) is
``compile_s``. Peak memory is reset before each configuration (torch's allocator
statistics; the cuda backend's pool is emptied and its peak restarted). Rows are
``cnn.metrics`` rows, written atomically to ``--out`` (default
``results/<experiment>.pkl``); a table of the ratios against the targets is printed.
Where the tree has no ``.git`` (a copy sent to a GPU machine), ``CNN_COMMIT=<hash>``
names the commit the rows record.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnn.metrics import make_row, save_metrics  # noqa: E402
from cnn.models import build  # noqa: E402

#: The targets of issue 17 (seed CNN 3x32x32, float32, TF32 off, batch 256).
TARGET_VS_TORCH = 0.5
TARGET_VS_NUMPY = 50.0
TARGET_BATCH = 256
NUM_CLASSES = 10
MB = 2 ** 20

GRIDS: dict[str, dict[str, Any]] = {
    # about 2-3 minutes on an H200 (most of it compiling the kernels and the NumPy steps)
    "gpu-quick": dict(batch_sizes=(32, 64, 128, 256, 512, 1024), numpy_batches=(128,),
                      input_shape=(3, 32, 32), filters=(32, 64), hidden=256, padding=0,
                      blocks=5, steps_per_block=10, warmup=3, numpy_repeats=3),
    "standard": dict(batch_sizes=(32, 64, 128, 256, 512, 1024, 2048, 4096),
                     numpy_batches=(128,), input_shape=(3, 32, 32), filters=(32, 64),
                     hidden=256, padding=0, blocks=7, steps_per_block=20, warmup=5,
                     numpy_repeats=5),
    # the simulator: every row's wiring at tiny sizes, seconds per step; not a timing
    "sim-tiny": dict(batch_sizes=(4,), numpy_batches=(4,), input_shape=(3, 8, 8),
                     filters=(4, 5), hidden=6, padding=1, blocks=2, steps_per_block=1,
                     warmup=1, numpy_repeats=2),
}


# --- helpers ------------------------------------------------------------------------------

def parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 32,128 got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def dataset(batch: int, shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic host dataset of four batches (random data: never zeros)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * batch, *shape), dtype=np.float32)
    return x, rng.integers(0, NUM_CLASSES, size=4 * batch).astype(np.int64)


def batch_index(step: int, batch: int, n: int) -> np.ndarray:
    return (np.arange(batch) + step * batch) % n


def time_blocks(step: Callable[[], Any], sync: Callable[[], None], blocks: int,
                steps: int, warmup: int,
                probe: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
    """The first step (compile, autotune) alone, ``warmup`` more, then ``blocks`` blocks
    of ``steps`` steps with one ``sync`` each: per-step seconds of every block. With
    ``probe`` (the cuda backend's ``memory_stats``), its counters over the timed steps."""
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    before = probe() if probe else {}
    per_step = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(steps):
            last = step()
        sync()
        per_step.append((time.perf_counter() - t0) / steps)
    times = np.asarray(per_step)
    q25, q75 = np.percentile(times, [25, 75])
    after = probe() if probe else {}
    return {"first_s": first, "median_s": float(np.median(times)), "iqr_s": float(q75 - q25),
            "wall_s": float(times.sum() * steps), "last": last, "steps": blocks * steps,
            "counted": {k: after[k] - before[k] for k in after}}


def _row(cfg: dict[str, Any], batch: int, strategy: str, backend: str, device: str,
         t: dict[str, Any], flops: int, **extra: Any) -> dict[str, Any]:
    median = t["median_s"]
    # a GPU machine may run a copy of the tree without .git: the caller names the commit
    commit = os.environ.get("CNN_COMMIT")
    if commit:
        extra["commit"] = commit
    return make_row(
        experiment=cfg["experiment"], strategy=strategy, backend=backend, processes=1,
        threads=1, device=device, model="seed_cnn", dataset="synthetic", batch_size=batch,
        epochs=float("nan"), samples=batch * t["steps"], wall_s=t["wall_s"],
        compile_s=max(0.0, t["first_s"] - median), step_ms_median=median * 1e3,
        step_ms_iqr=t["iqr_s"] * 1e3, samples_per_s=batch / median,
        final_loss=float(t["last"]) if t["last"] is not None else float("nan"),
        input_shape="x".join(map(str, cfg["input_shape"])),
        filters=",".join(map(str, cfg["filters"])), grid=cfg["grid"],
        gflops=flops * batch / median / 1e9, first_call_s=t["first_s"],
        repeats=t["steps"], warmup=cfg["warmup"], **extra)


def _net(cfg: dict[str, Any], backend: str, seed: int):
    return build("seed_cnn", cfg["input_shape"], NUM_CLASSES, backend=backend, seed=seed,
                 filters=tuple(cfg["filters"]), hidden=cfg["hidden"], padding=cfg["padding"])


# --- the three contenders -------------------------------------------------------------------

def numpy_row(cfg: dict[str, Any], batch: int) -> dict[str, Any]:
    """The NumPy reference on 1 BLAS thread (the sequential baseline)."""
    from threadpoolctl import threadpool_limits

    from cnn.optim import SGD

    net = _net(cfg, "numpy", cfg["seed"])
    opt = SGD(net, lr=cfg["lr"], momentum=cfg["momentum"])
    x, y = dataset(batch, cfg["input_shape"], cfg["seed"])
    k = [0]

    def step() -> float:
        idx = batch_index(k[0], batch, len(y))
        k[0] += 1
        loss = net.loss_and_grad(x[idx], y[idx])
        opt.step()
        return loss

    with threadpool_limits(1):
        t = time_blocks(step, lambda: None, cfg["numpy_repeats"], 1, 0)
    return _row(cfg, batch, "sequential", "numpy", "cpu", t, net.flops(train=True))


def cuda_row(cfg: dict[str, Any], batch: int) -> dict[str, Any]:
    """The cuda backend, batches gathered into pinned buffers and prefetched."""
    from cnn.optim import SGD

    net = _net(cfg, "cuda", cfg["seed"])
    B = net.backend
    B.release_memory()
    opt = SGD(net, lr=cfg["lr"], momentum=cfg["momentum"])
    x, y = dataset(batch, cfg["input_shape"], cfg["seed"])
    k = [0]

    def load(step: int) -> np.ndarray:
        buf = B.host_buffer((batch, *cfg["input_shape"]), np.float32)
        np.take(x, batch_index(step, batch, len(y)), axis=0, out=buf)
        B.prefetch(buf)
        return buf

    pending = [load(0)]

    def step() -> float:
        buf = pending.pop()
        loss = net.loss_and_grad(buf, y[batch_index(k[0], batch, len(y))])
        opt.step()
        k[0] += 1
        pending.append(load(k[0]))  # the next batch travels while this step computes
        return loss

    t = time_blocks(step, B.synchronize, cfg["blocks"], cfg["steps_per_block"], cfg["warmup"],
                    probe=B.memory_stats)
    counted = t["counted"]
    return _row(cfg, batch, "cuda", "cuda", B.device_name(), t, net.flops(train=True),
                peak_mem_mb=B.memory_stats()["peak_held_bytes"] / MB,
                launches_per_step=counted["launches"] / t["steps"],
                allocations_per_step=counted["allocations"] / t["steps"],
                optimizer="cnn.optim.SGD")


def transfer_row(cfg: dict[str, Any], batch: int) -> dict[str, Any]:
    """The batch's host-to-device copy on its own, from a pinned buffer."""
    from cnn.backends import get_backend

    B = get_backend("cuda")
    x, _ = dataset(batch, cfg["input_shape"], cfg["seed"])
    buf = B.host_buffer(x[:batch].shape, np.float32)
    np.copyto(buf, x[:batch])
    t = time_blocks(lambda: B.from_host(buf), B.synchronize, cfg["blocks"],
                    cfg["steps_per_block"], 1)
    t["last"] = None
    row = _row(cfg, batch, "transfer", "cuda", B.device_name(), t, 0, kernel="h2d batch",
               direction="h2d", mbytes=buf.nbytes / MB,
               gbytes_per_s=buf.nbytes / t["median_s"] / 1e9)
    row["samples_per_s"] = row["gflops"] = float("nan")
    return row


def torch_status() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} has no usable CUDA (a CPU build, or no GPU): "
                "install a CUDA build of torch to compare with cuDNN")
    return "ok"


def torch_row(cfg: dict[str, Any], batch: int, tf32: bool) -> dict[str, Any]:
    """The torch twin on the GPU with TF32 set explicitly (both flags) and cudnn.benchmark."""
    import torch

    from cnn.twin import torch_twin

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    net = _net(cfg, "numpy", cfg["seed"])
    model = torch_twin(net, device="cuda").train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    x, y = dataset(batch, cfg["input_shape"], cfg["seed"])
    xh = torch.empty((batch, *cfg["input_shape"]), dtype=torch.float32).pin_memory()
    yh = torch.empty(batch, dtype=torch.int64).pin_memory()
    xv, yv = xh.numpy(), yh.numpy()
    k = [0]

    def step():
        idx = batch_index(k[0], batch, len(y))
        k[0] += 1
        np.take(x, idx, axis=0, out=xv)  # pinned, as the cuda backend's batches
        np.take(y, idx, axis=0, out=yv)
        xb, yb = xh.to("cuda", non_blocking=True), yh.to("cuda", non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.detach()

    t = time_blocks(step, torch.cuda.synchronize, cfg["blocks"], cfg["steps_per_block"],
                    cfg["warmup"])
    t["last"] = float(t["last"])
    strategy = "torch-cudnn-tf32" if tf32 else "torch-cudnn"
    return _row(cfg, batch, strategy, "torch", torch.cuda.get_device_name(), t,
                net.flops(train=True), tf32=tf32,
                allow_tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
                allow_tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
                cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                peak_mem_mb=torch.cuda.max_memory_allocated() / MB,
                optimizer="torch.optim.SGD")


# --- the table ---------------------------------------------------------------------------

def _verdict(ratio: float, target: float) -> str:
    if not math.isfinite(ratio):
        return f"{'-':>11}"
    return f"{ratio:6.2f}x {'ok' if ratio >= target else 'MISS':>4}"


def ratio_table(rows: Sequence[dict[str, Any]]) -> str:
    """samples/s per batch and the ratios against the targets (NumPy at its own batch)."""
    rate = {(r["strategy"], r["batch_size"]): r["samples_per_s"] for r in rows}
    numpy_rates = {b: v for (s, b), v in rate.items() if s == "sequential"}
    numpy_ref = numpy_rates.get(128, next(iter(numpy_rates.values()), float("nan")))
    nan = float("nan")
    if any(r["device"] == "cuda-simulator" for r in rows):  # a wiring check: no verdicts
        numpy_ref = nan
    lines = [f"{'batch':>6} {'numpy':>9} {'cuda':>10} {'torch':>10} {'torch tf32':>10} "
             f"{'cuda/numpy':>11} {'cuda/torch':>11}"]
    for batch in sorted({r["batch_size"] for r in rows}):
        cuda, torch_ = rate.get(("cuda", batch), nan), rate.get(("torch-cudnn", batch), nan)
        lines.append(f"{batch:>6} {numpy_rates.get(batch, nan):>9.1f} {cuda:>10.1f} "
                     f"{torch_:>10.1f} {rate.get(('torch-cudnn-tf32', batch), nan):>10.1f} "
                     f"{_verdict(cuda / numpy_ref, TARGET_VS_NUMPY)} "
                     f"{_verdict(cuda / torch_, TARGET_VS_TORCH)}")
    lines.append(f"samples/s. cuda/numpy uses NumPy (1 thread) at batch "
                 f"{128 if 128 in numpy_rates else 'shown'}; cuda/torch is against TF32 OFF. "
                 f"Targets at batch {TARGET_BATCH}: >= {TARGET_VS_NUMPY:g}x numpy, "
                 f">= {TARGET_VS_TORCH:g}x torch+cuDNN.")
    if not math.isfinite(numpy_ref):
        lines.append("cuda ran in Numba's CUDA simulator: a wiring check, not a timing.")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="gpu-quick")
    p.add_argument("--batch-sizes", type=parse_ints, default=None)
    p.add_argument("--numpy-batches", type=parse_ints, default=None,
                   help="batch sizes at which the NumPy baseline runs (slow)")
    p.add_argument("--input-shape", type=parse_ints, default=None)
    p.add_argument("--filters", type=parse_ints, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed blocks of GPU steps")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--numpy-repeats", type=int, default=None)
    p.add_argument("--no-torch", action="store_true", help="skip the torch+cuDNN columns")
    p.add_argument("--require-cuda", action="store_true",
                   help="exit with status 1 (before timing anything) when the cuda backend "
                        "cannot run here")
    p.add_argument("--experiment", default="bench_gpu")
    p.add_argument("--out", default=None, help="default results/<experiment>.pkl")
    p.add_argument("--seed", type=int, default=0)
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(GRIDS[args.grid], grid=args.grid, experiment=args.experiment, seed=args.seed,
               lr=0.01, momentum=0.9)
    for key, value in (("batch_sizes", args.batch_sizes), ("numpy_batches", args.numpy_batches),
                       ("input_shape", args.input_shape), ("filters", args.filters),
                       ("blocks", args.repeats), ("warmup", args.warmup),
                       ("numpy_repeats", args.numpy_repeats)):
        if value is not None:
            cfg[key] = value
    if args.batch_sizes is not None and args.numpy_batches is None:
        cfg["numpy_batches"] = tuple(b for b in cfg["numpy_batches"] if b in args.batch_sizes) \
            or cfg["batch_sizes"][:1]
    return cfg


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    cfg = config(args)
    from cnn.backends import available_backends

    cuda_status = available_backends()["cuda"]
    t_status = "skipped (--no-torch)" if args.no_torch else torch_status()
    for name, why in (("cuda", cuda_status), ("torch on the GPU", t_status)):
        if why != "ok":
            print(f"skip {name}: {why}", flush=True)
    if args.require_cuda and cuda_status != "ok":
        raise SystemExit(f"bench_gpu: --require-cuda, and the cuda backend cannot run: "
                         f"{cuda_status}")
    rows: list[dict[str, Any]] = []
    for batch in cfg["batch_sizes"]:
        t0 = time.perf_counter()
        if batch in cfg["numpy_batches"]:
            rows.append(numpy_row(cfg, batch))
        if cuda_status == "ok":
            rows += [cuda_row(cfg, batch), transfer_row(cfg, batch)]
        if t_status == "ok":
            rows += [torch_row(cfg, batch, tf32=False), torch_row(cfg, batch, tf32=True)]
        print(f"batch {batch}: {time.perf_counter() - t0:.1f}s", flush=True)
    out = Path(args.out) if args.out else Path("results") / f"{args.experiment}.pkl"
    save_metrics(rows, out)
    print(ratio_table(rows))
    print(f"wrote {len(rows)} rows to {out}", flush=True)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
