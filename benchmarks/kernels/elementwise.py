"""Elementwise kernels (ReLU forward and backward) and the optimiser updates on the flat
parameter buffer (SGD with momentum, Adam): memory-bound passes, so their roof is the copy
bandwidth, not the GEMM.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .common import NB, REF, Case, K, Op, f64, jit, versions

# --- ReLU ------------------------------------------------------------------------------------

_SIZES = [1, 7, 1000, 16385, 70001]


def _case(size, label=""):
    return Case(label or f"{size} elements", 1, dict(size=size))


def relu_checks(quick: bool) -> list[Case]:
    return [_case(s) for s in (_SIZES[:4] if quick else _SIZES + [3 * 32 * 30 * 30])]


def relu_timings(quick: bool) -> list[Case]:
    if quick:
        return [_case(4096, "tiny 4096")]
    return [Case("cifar conv1 act b128", 128, dict(size=128 * 32 * 30 * 30)),
            Case("mnist dense1 act b64", 64, dict(size=64 * 256))]


def relu_make(case: Case, rng: np.random.Generator) -> dict:
    n = case.p["size"]
    x = rng.standard_normal(n, np.float32)
    return dict(x=x, y=np.maximum(x, 0), dy=rng.standard_normal(n, np.float32))


def relu_bytes(case: Case) -> float:
    return 8.0 * case.p["size"]


def relu_bwd_bytes(case: Case) -> float:
    return 12.0 * case.p["size"]


@jit()
def _relu_serial(x, y):
    zero = x.dtype.type(0)
    for i in range(x.size):
        v = x[i]
        y[i] = v if not v <= zero else zero


#: Elements per block of the blocked loop (NOTES item 4).
BLOCK = 1 << 14


@jit()
def _relu_block(x, y, lo, hi):
    zero = x.dtype.type(0)
    for i in range(lo, hi):
        v = x[i]
        y[i] = v if not v <= zero else zero


@jit(parallel=True)
def _relu_blocked(x, y):
    for bi in prange((x.size + BLOCK - 1) // BLOCK):
        _relu_block(x, y, bi * BLOCK, min(x.size, (bi + 1) * BLOCK))


def _unary(a: dict, kernel):
    def run():
        y = np.empty_like(a["x"])
        kernel(a["x"], y)
        return (y,)
    return run


def relu_v1(a: dict):
    """One loop, one thread (a NaN propagates, as in NumPy and torch)."""
    return _unary(a, _relu_serial)


def relu_v2(a: dict):
    """prange over fixed 16K blocks with an inner loop: the inner loop's signed bounds kept
    LLVM from vectorising it (NOTES item 4: 1.7 ms vs 1.0 for a 15 MB ReLU)."""
    return _unary(a, _relu_blocked)


def relu_v3(a: dict):
    """A plain prange over elements (the backend's jitted kernel): vectorised and split by
    Numba, still writing a freshly allocated output on every call."""
    return _unary(a, K.relu_forward)


def relu_v4(a: dict):
    """Production (numba_cpu.relu_forward): the output is recycled once nobody holds it (a
    fresh 15 MB array page-faults on first touch: 1.9 -> 1.0 ms, item 6), and small arrays
    run on fewer threads (a parallel region costs more than it saves there, item 19)."""
    return lambda: (NB.relu_forward(a["x"])[0],)


RELU_FORWARD = Op(
    family="elementwise", name="relu_forward",
    versions=versions(relu_v1, relu_v2, relu_v3, relu_v4, production=4),
    checks=relu_checks, timings=relu_timings, make=relu_make,
    reference=lambda a: (np.maximum(f64(a)["x"], 0),), flops=lambda case: 0.0,
    nbytes=relu_bytes, rtol=0.0)


@jit()
def _relu_bwd_serial(dy, y, dx):
    zero = dy.dtype.type(0)
    for i in range(dy.size):
        dx[i] = dy[i] if y[i] > zero else zero


@jit()
def _relu_bwd_block(dy, y, dx, lo, hi):
    zero = dy.dtype.type(0)
    for i in range(lo, hi):
        dx[i] = dy[i] if y[i] > zero else zero


@jit(parallel=True)
def _relu_bwd_blocked(dy, y, dx):
    for bi in prange((dy.size + BLOCK - 1) // BLOCK):
        _relu_bwd_block(dy, y, dx, bi * BLOCK, min(dy.size, (bi + 1) * BLOCK))


def _binary(a: dict, kernel):
    def run():
        dx = np.empty_like(a["dy"])
        kernel(a["dy"], a["y"], dx)
        return (dx,)
    return run


def relu_bwd_v1(a: dict):
    """One loop, one thread: dX = dY where the forward output was > 0."""
    return _binary(a, _relu_bwd_serial)


def relu_bwd_v2(a: dict):
    """prange over fixed 16K blocks with an inner loop (item 4: did not vectorise)."""
    return _binary(a, _relu_bwd_blocked)


def relu_bwd_v3(a: dict):
    """A plain prange over elements (the backend's jitted kernel), fresh output per call."""
    return _binary(a, K.relu_backward)


def relu_bwd_v4(a: dict):
    """Production (numba_cpu.relu_backward): recycled output, thread team sized to the work
    (inside the seed CNN it is fused into the max-pool backward, see pooling)."""
    return lambda: (NB.relu_backward(a["dy"], a["y"]),)


RELU_BACKWARD = Op(
    family="elementwise", name="relu_backward",
    versions=versions(relu_bwd_v1, relu_bwd_v2, relu_bwd_v3, relu_bwd_v4, production=4),
    checks=relu_checks, timings=relu_timings, make=relu_make,
    reference=lambda a: (REF.relu_backward(f64(a)["dy"], f64(a)["y"]),), flops=lambda c: 0.0,
    nbytes=relu_bwd_bytes, rtol=0.0)


# --- optimiser updates ----------------------------------------------------------------------

#: Parameter counts of the seed CNN (3x32x32 and 1x28x28 inputs).
SEED_PARAMS = {"cifar": 612_042, "mnist": 431_242}
SGD = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False)
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-4)


def update_checks(quick: bool) -> list[Case]:
    return [_case(s) for s in (_SIZES[:4] if quick else _SIZES + [SEED_PARAMS["mnist"]])]


def update_timings(quick: bool) -> list[Case]:
    if quick:
        return [_case(4096, "tiny 4096")]
    return [_case(n, f"{name} seed CNN params") for name, n in SEED_PARAMS.items()]


def update_make(case: Case, rng: np.random.Generator) -> dict:
    n = case.p["size"]
    return dict(params=rng.standard_normal(n, np.float32),
                grads=rng.standard_normal(n, np.float32),
                m=rng.standard_normal(n, np.float32),
                v=rng.random(n, np.float32), step=3)


def _state(a: dict, *names: str) -> list[np.ndarray]:
    """Private copies of the buffers an update writes (the case's inputs stay as made)."""
    return [a[k].copy() for k in names]


def sgd_reference(a: dict) -> tuple:
    p, m = _state(f64(a), "params", "m")
    REF.sgd_update(p, f64(a)["grads"], m, first_step=False, **SGD)
    return p, m


@jit()
def _sgd_serial(p, g, vel, lr, momentum, weight_decay):
    for i in range(p.size):
        d = float(g[i]) + weight_decay * float(p[i])
        v = momentum * float(vel[i]) + d
        vel[i] = v
        p[i] = p[i] - lr * float(vel[i])


def sgd_v1(a: dict):
    """NumPy array expressions (the reference's sgd_update): four passes over the buffers
    and a temporary per expression."""
    p, m = _state(a, "params", "m")

    def run():
        REF.sgd_update(p, a["grads"], m, first_step=False, **SGD)
        return p, m
    return run


def sgd_v2(a: dict):
    """One jitted loop: every element read and written once, in float64 registers; one
    thread."""
    p, m = _state(a, "params", "m")

    def run():
        _sgd_serial(p, a["grads"], m, SGD["lr"], SGD["momentum"], SGD["weight_decay"])
        return p, m
    return run


def sgd_v3(a: dict):
    """Production (numba_cpu.sgd_update): the same single pass as a prange, torch.optim's
    full semantics (dampening, Nesterov, first step)."""
    p, m = _state(a, "params", "m")

    def run():
        NB.sgd_update(p, a["grads"], m, first_step=False, **SGD)
        return p, m
    return run


SGD_UPDATE = Op(
    family="elementwise", name="sgd_update",
    versions=versions(sgd_v1, sgd_v2, sgd_v3, production=3),
    checks=update_checks, timings=update_timings, make=update_make, reference=sgd_reference,
    flops=lambda c: 5.0 * c.p["size"], nbytes=lambda c: 20.0 * c.p["size"], rtol=1e-6)


def adam_reference(a: dict) -> tuple:
    p, m, v = _state(f64(a), "params", "m", "v")
    REF.adam_update(p, f64(a)["grads"], m, v, step=a["step"], **ADAM)
    return p, m, v


def adam_v1(a: dict):
    """NumPy array expressions (the reference's adam_update): a pass and a temporary per
    expression, about ten passes in all."""
    p, m, v = _state(a, "params", "m", "v")

    def run():
        REF.adam_update(p, a["grads"], m, v, step=a["step"], **ADAM)
        return p, m, v
    return run


def adam_v2(a: dict):
    """Production (numba_cpu.adam_update): one prange pass, float64 arithmetic per element,
    the bias corrections folded into two scalars."""
    p, m, v = _state(a, "params", "m", "v")

    def run():
        NB.adam_update(p, a["grads"], m, v, step=a["step"], **ADAM)
        return p, m, v
    return run


ADAM_UPDATE = Op(
    family="elementwise", name="adam_update",
    versions=versions(adam_v1, adam_v2, production=2),
    checks=update_checks, timings=update_timings, make=update_make, reference=adam_reference,
    flops=lambda c: 14.0 * c.p["size"], nbytes=lambda c: 28.0 * c.p["size"], rtol=1e-5)

OPS = [RELU_FORWARD, RELU_BACKWARD, SGD_UPDATE, ADAM_UPDATE]
