"""Scratch micro-benchmark for the numba backend (issue 3): full training steps, side by side.

    python benchmarks/kernels_numba.py [--batch 128] [--rounds 5] [--reps 10] [--quiet 0.9]
                                       [--only numba1,numba2,torch1,torch2,numpy,fused1,fused2]

Runs numba (1 and 2 threads), torch (1 and 2 threads, same net via cnn.twin.torch_twin)
and the numpy reference on the seed CNN, CIFAR shape, one training step = loss_and_grad
+ SGD-momentum update. ``fused1/2``: the numba step hand-wired through the fused
Conv+ReLU forward and ReLU+MaxPool backward kernels (not what ``Network`` does today).

Variants are interleaved round-robin in one process (the machine is shared, so timings
drift); each round times ``reps`` steps per variant after warm-up (JIT compile excluded);
``--quiet f`` waits before each round until a fraction f of the CPUs is idle. Reports
the median over all steps of wall time and of process CPU time (CPU time is immune to
being descheduled; at 1 thread it is the kernel cost).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _idle_fraction(dt: float = 0.3) -> float:
    """Fraction of all CPUs idle over ``dt`` seconds (Linux /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = snap()
    time.sleep(dt)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(threshold: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until the machine is at least ``threshold`` idle."""
    end = time.time() + timeout
    f = _idle_fraction()
    while f < threshold and time.time() < end:
        f = _idle_fraction()
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", default="")
    ap.add_argument("--shape", default="3,32,32")
    ap.add_argument("--quiet", type=float, default=0.0,
                    help="before each round, wait until this fraction of the CPUs is idle")
    args = ap.parse_args()

    import numba
    import torch

    from cnn.models import seed_cnn
    from cnn.twin import torch_twin

    shape = tuple(int(s) for s in args.shape.split(","))
    n = args.batch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, 10, n)

    nb = seed_cnn(shape, backend="numba")
    vel = np.zeros_like(nb.params)
    npn = seed_cnn(shape, backend="numpy")
    npvel = np.zeros_like(npn.params)
    model = torch_twin(nb)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def numba_step(t):
        def f():
            numba.set_num_threads(t)
            nb.loss_and_grad(x, y)
            nb.backend.sgd_update(nb.params, nb.grads, vel, 0.01, 0.9, 0.0, 0.0, False, False)
        return f

    def fused_grads():
        """loss_and_grad of the seed CNN hand-wired through the fused kernels
        (conv2d_relu_forward, maxpool2d_relu_backward): what the Network would do with the
        proposed change (benchmarks/NOTES.md)."""
        B, P, G = nb.backend, nb._pviews, nb._gviews
        r1, c0 = B.conv2d_relu_forward(x, P[0]["weight"], P[0]["bias"], 1, 0)
        p1, c2 = B.maxpool2d_forward(r1, 2, 2)
        r2, c3 = B.conv2d_relu_forward(p1, P[3]["weight"], P[3]["bias"], 1, 0)
        p2, c5 = B.maxpool2d_forward(r2, 2, 2)
        h, c7 = B.dense_forward(p2.reshape(n, -1), P[7]["weight"], P[7]["bias"])
        hr, c8 = B.relu_forward(h)
        z, c9 = B.dense_forward(hr, P[9]["weight"], P[9]["bias"])
        loss, d = B.softmax_cross_entropy(z, y)
        d = B.dense_backward(d, c9, P[9]["weight"], G[9]["weight"], G[9]["bias"], True)
        d = B.relu_backward(d, c8)
        d = B.dense_backward(d, c7, P[7]["weight"], G[7]["weight"], G[7]["bias"], True)
        d = B.maxpool2d_relu_backward(d.reshape(p2.shape), c5)
        d = B.conv2d_backward(d, c3, P[3]["weight"], G[3]["weight"], G[3]["bias"], True)
        d = B.maxpool2d_relu_backward(d, c2)
        B.conv2d_backward(d, c0, P[0]["weight"], G[0]["weight"], G[0]["bias"], False)
        return loss

    def fused_step(t):
        def f():
            numba.set_num_threads(t)
            fused_grads()
            nb.backend.sgd_update(nb.params, nb.grads, vel, 0.01, 0.9, 0.0, 0.0, False, False)
        return f

    if shape == (3, 32, 32):  # the fused path is wired for the seed CNN without padding
        loss = nb.loss_and_grad(x, y)
        g = nb.grads.copy()
        assert fused_grads() == loss and np.array_equal(nb.grads, g), "fused != Network"

    def torch_step(t):
        def f():
            torch.set_num_threads(t)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt), yt)
            loss.backward()
            opt.step()
        return f

    def numpy_step():
        npn.loss_and_grad(x, y)
        npn.backend.sgd_update(npn.params, npn.grads, npvel, 0.01, 0.9, 0.0, 0.0, False, False)

    variants = {"numba1": numba_step(1), "numba2": numba_step(2), "torch1": torch_step(1),
                "torch2": torch_step(2), "numpy": numpy_step}
    if shape == (3, 32, 32):
        variants.update(fused1=fused_step(1), fused2=fused_step(2))
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for f in variants.values():  # warm-up: JIT compile, caches, allocator
        for _ in range(3):
            f()
    idle = []
    for _ in range(args.rounds):
        for k, f in variants.items():
            if args.quiet:
                idle.append(wait_quiet(args.quiet, 60))
            f()
            for _ in range(args.reps):
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    print(f"batch {n}, shape {shape}, {args.rounds}x{args.reps} steps per variant"
          + (f", idle before rounds: median {np.median(idle):.2f}" if idle else ""))
    for k in variants:
        w = np.median(wall[k]) * 1e3
        print(f"  {k:7s} wall {w:7.1f} ms ({n / w * 1e3:6.0f} img/s)  min {min(wall[k]) * 1e3:6.1f}"
              f"  cpu {np.median(cpu[k]) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
