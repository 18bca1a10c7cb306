"""The cuda backend against cuDNN (the torch twin on the same GPU) and the sequential baseline.

    python benchmarks/bench_gpu.py                    # seed CNN 3x32x32, batches 32,128,256
    python benchmarks/bench_gpu.py --batch-sizes 128 --repeats 50 --kernels

Issue 4's targets: the cuda backend's training throughput >= 0.5x torch+cuDNN's on
the same GPU and >= 50x the sequential NumPy backend's. For each batch size this
times one training step (forward, loss, backward, SGD-momentum update):

- ``numpy`` and ``cuda`` with :func:`cnn.bench.bench_step` (the study's one timing
  function: first call (JIT compile) and warm-up excluded, ``synchronize()`` before
  each timer stops). Each cuda step uploads its batch from pinned host memory.
- ``torch`` on the GPU (``strategy="torch-cudnn"``): the torch twin
  (``cnn.twin.torch_twin``) with ``cudnn.benchmark`` on, timed by
  :func:`cnn.bench.time_calls` with ``torch.cuda.synchronize()``; each step copies
  its batch from pinned host memory too (``non_blocking``), so both pay the same
  host-to-device transfer. Needs a CUDA build of torch (the ``compare`` extra pins
  the CPU wheel): skipped with the reason otherwise.
- the batch's host-to-device copy alone (``strategy="transfer"``), so the share of
  the step it takes can be read off.

Rows are cnn.bench rows, merged into ``results/bench_gpu.pkl``; a table of the
ratios against the targets is printed. Without a GPU everything but NumPy is
skipped with the reason (``NUMBA_ENABLE_CUDASIM=1`` runs the cuda rows in the
simulator: a wiring check on tiny shapes, not a timing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnn import bench  # noqa: E402
from cnn.results import save_results, to_frame  # noqa: E402

TARGET_VS_TORCH = 0.5
TARGET_VS_NUMPY = 50.0


def torch_gpu_status() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} has no usable CUDA (a CPU build, or no GPU): "
                "install a CUDA build of torch to compare with cuDNN")
    return "ok"


def torch_gpu_row(template: dict[str, Any], batch: int, shape, filters, repeats: int,
                  warmup: int, seed: int, lr: float, momentum: float) -> dict[str, Any]:
    """One training step of the torch twin on the GPU, timed like every other row."""
    import torch

    from cnn.models import build
    from cnn.twin import torch_twin

    torch.backends.cudnn.benchmark = True
    kw = {"filters": tuple(filters)} if filters is not None else {}
    net = build(template["model"], shape, bench.NUM_CLASSES, backend="numpy", seed=seed, **kw)
    model = torch_twin(net, device="cuda").train()
    x, y = bench._synthetic(batch, shape, seed)
    xh, yh = torch.from_numpy(x).pin_memory(), torch.from_numpy(y).pin_memory()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def step() -> float:
        xb, yb = xh.to("cuda", non_blocking=True), yh.to("cuda", non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.detach()

    with bench.pinned_threads(1):
        t = bench.time_calls(step, repeats, warmup, torch.cuda.synchronize)
    median_s = t["step_ms_median"] / 1e3
    gflops = net.flops(train=True) * batch / median_s / 1e9
    return {**template, "backend": "torch", "strategy": "torch-cudnn",
            "device": torch.cuda.get_device_name(), "wall_s": t["wall_s"],
            "compile_s": t["compile_s"], "step_ms_median": t["step_ms_median"],
            "step_ms_iqr": t["step_ms_iqr"], "samples_per_s": batch / median_s,
            "final_loss": float(t["result"]), "gflops": gflops, "first_call_s": t["first_call_s"],
            "repeats": repeats, "warmup": warmup, "optimizer": "torch.optim.SGD",
            "peak_mem_mb": torch.cuda.max_memory_allocated() / bench.MB,
            "traced_mem_mb": float("nan"), "rss_mem_mb": float("nan"), "rss_method": None}


def transfer_row(template: dict[str, Any], batch: int, shape, repeats: int,
                 seed: int) -> dict[str, Any]:
    """The batch's host-to-device copy on its own, through the cuda backend's pinned path."""
    from cnn.backends import get_backend

    B = get_backend("cuda")
    x, _ = bench._synthetic(batch, shape, seed)
    t = bench.time_calls(lambda: B.from_host(x), repeats, 2, B.synchronize)
    median_s = t["step_ms_median"] / 1e3
    return {**template, "strategy": "transfer", "kernel": "h2d batch", "direction": "h2d",
            "wall_s": t["wall_s"], "compile_s": t["compile_s"],
            "step_ms_median": t["step_ms_median"], "step_ms_iqr": t["step_ms_iqr"],
            "samples_per_s": float("nan"), "final_loss": float("nan"), "gflops": float("nan"),
            "mbytes": x.nbytes / bench.MB, "gbytes_per_s": x.nbytes / median_s / 1e9,
            "first_call_s": t["first_call_s"], "peak_mem_mb": float("nan")}


def _verdict(ratio: float, target: float) -> str:
    if not np.isfinite(ratio):
        return f"{'-':>12}"
    return f"{ratio:7.2f}x {'ok' if ratio >= target else 'MISS':>4}"


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """samples/s per batch and the two ratios against their targets."""
    lines = [f"{'batch':>6} {'numpy':>10} {'cuda':>10} {'torch-gpu':>10} {'h2d ms':>8} "
             f"{'cuda/numpy':>12} {'cuda/torch':>12}"]
    for batch in sorted({r["batch_size"] for r in rows}):
        got = {r["strategy"]: r for r in rows if r["batch_size"] == batch}
        rate = {s: got[s]["samples_per_s"] if s in got else float("nan")
                for s in ("sequential", "cuda", "torch-cudnn")}
        h2d = got["transfer"]["step_ms_median"] if "transfer" in got else float("nan")
        cuda = rate["cuda"]
        lines.append(f"{batch:>6} {rate['sequential']:>10.1f} {cuda:>10.1f} "
                     f"{rate['torch-cudnn']:>10.1f} {h2d:>8.3f} "
                     f"{_verdict(cuda / rate['sequential'], TARGET_VS_NUMPY)} "
                     f"{_verdict(cuda / rate['torch-cudnn'], TARGET_VS_TORCH)}")
    lines.append(f"targets: cuda >= {TARGET_VS_NUMPY:g}x numpy (sequential), "
                 f">= {TARGET_VS_TORCH:g}x torch+cuDNN on the same GPU (samples/s)")
    return "\n".join(lines)


def main(argv=None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=bench.parse_ints, default=(32, 128, 256))
    p.add_argument("--input-shape", type=bench.parse_shape, default=(3, 32, 32))
    p.add_argument("--filters", type=bench.parse_filters, default=(32, 64))
    p.add_argument("--model", default="seed_cnn")
    p.add_argument("--repeats", type=int, default=30, help="timed GPU steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--numpy-repeats", type=int, default=3,
                   help="timed steps of the (slow) sequential baseline")
    p.add_argument("--kernels", action="store_true", help="also per-kernel rows for cuda")
    p.add_argument("--experiment", default="bench_gpu")
    p.add_argument("--out", default=None, help="default results/<experiment>.pkl")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    filters = args.filters if args.model == "seed_cnn" else None
    common = dict(model=args.model, experiment=args.experiment, seed=args.seed, memory=False)
    status = bench.backend_status(["cuda"])["cuda"]
    torch_status = torch_gpu_status()
    for name, why in (("cuda", status), ("torch on the GPU", torch_status)):
        if why != "ok":
            print(f"skip {name}: {why}")
    rows: list[dict[str, Any]] = []
    for batch in args.batch_sizes:
        shape = args.input_shape
        rows.append(bench.bench_step("numpy", 1, batch, shape, filters, args.numpy_repeats, 1,
                                     **common))
        if status == "ok":
            cuda_row = bench.bench_step("cuda", 1, batch, shape, filters, args.repeats,
                                        args.warmup, **common)
            rows += [cuda_row, transfer_row(cuda_row, batch, shape, args.repeats, args.seed)]
            if args.kernels:
                rows += bench.bench_kernels("cuda", 1, batch, shape, filters, args.repeats,
                                            args.warmup, model=args.model,
                                            experiment=args.experiment, seed=args.seed)
            if torch_status == "ok":
                rows.append(torch_gpu_row(cuda_row, batch, shape, filters, args.repeats,
                                          args.warmup, args.seed, bench.DEFAULTS["lr"],
                                          bench.DEFAULTS["momentum"]))
        print(ratio_table(rows), flush=True)
    out = Path(args.out) if args.out else Path("results") / f"{args.experiment}.pkl"
    save_results(to_frame(rows), out, merge_on=bench.MERGE_ON)
    print(f"wrote {len(rows)} rows to {out}")
    print(bench.format_tables(to_frame(rows)))
    return rows


if __name__ == "__main__":
    main()
