"""Max pooling forward (value and first-maximum offset) and backward (the gradient routed
to each window's argmax, optionally through the ReLU before the pool), from loop nests
to the backend's kernels.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .common import NB, REF, Case, Op, f64, jit, versions

# --- cases -----------------------------------------------------------------------------------

_SHAPES = [((2, 3, 8, 8), 2, 2), ((1, 2, 7, 9), 3, 2), ((3, 1, 6, 5), 2, 1), ((1, 4, 9, 9), 3, 3),
           ((2, 2, 5, 7), 3, 1), ((1, 1, 4, 4), 2, 3), ((1, 1, 2, 2), 2, 2), ((2, 5, 11, 13), 2, 2)]


def _case(shape, k, s, relu, label=""):
    n, c, h, w = shape
    name = label or f"n{n} c{c} {h}x{w} k{k} s{s}" + (" relu" if relu else "")
    return Case(name, n, dict(shape=shape, k=k, s=s, relu=relu))


def checks(quick: bool) -> list[Case]:
    shapes = _SHAPES[:6] if quick else _SHAPES + [((3, 32, 30, 30), 2, 2), ((2, 64, 13, 13), 2, 2)]
    return [_case(sh, k, s, relu=i % 2 == 1) for i, (sh, k, s) in enumerate(shapes)]


def timings(quick: bool) -> list[Case]:
    if quick:
        return [_case((2, 8, 8, 8), 2, 2, True, "tiny pool b2")]
    return [_case((128, 32, 30, 30), 2, 2, True, "cifar pool1 b128"),
            _case((128, 64, 13, 13), 2, 2, True, "cifar pool2 b128"),
            _case((64, 32, 26, 26), 2, 2, True, "mnist pool1 b64"),
            _case((64, 64, 11, 11), 2, 2, True, "mnist pool2 b64")]


def make(case: Case, rng: np.random.Generator) -> dict:
    q = case.p
    x = rng.standard_normal(q["shape"], np.float32)
    x[0, 0, :2, :2] = 1.5  # a tie: the first offset wins (reference, backend and torch)
    if q["relu"]:
        np.maximum(x, 0, out=x)  # the output of a ReLU: zeros, and ties among them
    y, ctx = NB.maxpool2d_forward(x, q["k"], q["s"])
    dy = rng.standard_normal(y.shape, np.float32)
    return dict(x=x, k=q["k"], s=q["s"], relu=q["relu"], dy=dy, y=y.copy(), arg=ctx[0].copy())


def _out_shape(a: dict) -> tuple[int, int, int, int]:
    n, c, h, w = a["x"].shape
    return n, c, (h - a["k"]) // a["s"] + 1, (w - a["k"]) // a["s"] + 1


def fwd_reference(a: dict) -> tuple:
    return (REF.maxpool2d_forward(f64(a)["x"], a["k"], a["s"])[0],)


def bwd_reference(a: dict) -> tuple:
    d = f64(a)
    _, ctx = REF.maxpool2d_forward(d["x"], a["k"], a["s"])
    dx = REF.maxpool2d_backward(d["dy"], ctx)
    return (dx * (d["x"] > 0) if a["relu"] else dx,)


def _elements(case: Case) -> float:
    return float(np.prod(case.p["shape"]))


def fwd_bytes(case: Case) -> float:
    return 4.0 * _elements(case) * (1 + 1.25 / case.p["s"] ** 2)  # x, then y + uint8 arg


def bwd_bytes(case: Case) -> float:
    return 4.0 * _elements(case) * (1 + 1.25 / case.p["s"] ** 2)  # dx, then dy + arg


# --- forward ----------------------------------------------------------------------------------

@jit()
def _window(xp, r, q, k, s):
    """(max, offset ki*k+kj) of one window: the first maximum wins, a NaN wins (as in the
    backend; its first element counts as offset 0 once more, harmlessly)."""
    best = xp[r * s, q * s]
    off = 0
    for ki in range(k):
        for kj in range(k):
            v = xp[r * s + ki, q * s + kj]
            if v > best or v != v:
                best = v
                off = ki * k + kj
    return best, off


@jit()
def _pool_plane(xp, k, s, yp, ap):
    for r in range(yp.shape[0]):
        for q in range(yp.shape[1]):
            best, off = _window(xp, r, q, k, s)
            yp[r, q] = best
            ap[r, q] = off


@jit()
def _naive_fwd(x, k, s, y, arg):
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            _pool_plane(x[n, c], k, s, y[n, c], arg[n, c])


@jit(parallel=True)
def _inline_fwd(x, k, s, y, arg):
    cin = x.shape[1]
    for pc in prange(x.shape[0] * cin):
        n = pc // cin
        c = pc - n * cin
        for r in range(y.shape[2]):
            for q in range(y.shape[3]):
                best = x[n, c, r * s, q * s]
                off = 0
                for ki in range(k):
                    for kj in range(k):
                        v = x[n, c, r * s + ki, q * s + kj]
                        if v > best or v != v:
                            best = v
                            off = ki * k + kj
                y[n, c, r, q] = best
                arg[n, c, r, q] = off


@jit(parallel=True)
def _helper_fwd(x, k, s, y, arg):
    cin = x.shape[1]
    for pc in prange(x.shape[0] * cin):
        n = pc // cin
        _pool_plane(x[n, pc - n * cin], k, s, y[n, pc - n * cin], arg[n, pc - n * cin])


def _fwd(a: dict, kernel):
    def run():
        y = np.empty(_out_shape(a), a["x"].dtype)
        kernel(a["x"], a["k"], a["s"], y, np.empty(y.shape, np.uint8))
        return (y,)
    return run


def fwd_v1(a: dict):
    """The loop nest: scan every window, keep the first maximum and its offset; one thread."""
    return _fwd(a, _naive_fwd)


def fwd_v2(a: dict):
    """prange over (image, channel) planes, the window loop written inline in the prange
    body (NOTES item 5: 9 ms for conv1's output, slower than NumPy's 7.7 ms)."""
    return _fwd(a, _inline_fwd)


def fwd_v3(a: dict):
    """The same loop moved into a helper the prange body calls: Numba's parfor lowering
    optimises a called function far better than an inlined body (item 5: 9 -> 3.4 ms)."""
    return _fwd(a, _helper_fwd)


def fwd_v4(a: dict):
    """Production (numba_cpu.maxpool2d_forward): a compare chain per 2x2 window along the
    row, a vectorisable row pass for other windows (item 9), recycled outputs."""
    return lambda: (NB.maxpool2d_forward(a["x"], a["k"], a["s"])[0],)


FORWARD = Op(
    family="pooling", name="maxpool2d_forward",
    versions=versions(fwd_v1, fwd_v2, fwd_v3, fwd_v4, production=4),
    checks=checks, timings=timings, make=make, reference=fwd_reference,
    flops=lambda case: 0.0, nbytes=fwd_bytes, rtol=0.0)


# --- backward ---------------------------------------------------------------------------------

@jit()
def _unpool_div(dyp, ap, k, s, yp, relu, dxp):
    """dx = 0, then each gradient to its window's argmax (ki, kj = divmod(offset, k)); with
    ``relu``, dropped where the pooled value is not > 0 (the ReLU before the pool)."""
    dxp[...] = 0
    zero = dxp.dtype.type(0)
    for r in range(dyp.shape[0]):
        for q in range(dyp.shape[1]):
            off = np.int64(ap[r, q])
            ki = off // k
            g = dyp[r, q]
            if relu and not yp[r, q] > zero:
                g = zero
            dxp[r * s + ki, q * s + off - ki * k] += g


@jit()
def _naive_bwd(dy, arg, k, s, y, relu, dx):
    for n in range(dy.shape[0]):
        for c in range(dy.shape[1]):
            _unpool_div(dy[n, c], arg[n, c], k, s, y[n, c], relu, dx[n, c])


@jit(parallel=True)
def _prange_bwd(dy, arg, k, s, y, relu, dx):
    cin = dy.shape[1]
    for pc in prange(dy.shape[0] * cin):
        n = pc // cin
        c = pc - n * cin
        _unpool_div(dy[n, c], arg[n, c], k, s, y[n, c], relu, dx[n, c])


def _bwd(a: dict, kernel):
    def run():
        dx = np.empty_like(a["x"])
        kernel(a["dy"], a["arg"], a["k"], a["s"], a["y"], a["relu"], dx)
        return (dx,)
    return run


def bwd_v1(a: dict):
    """The loop nest: zero dX, then route each gradient to its argmax, whose (ki, kj) come
    from an integer division of the stored offset; one thread."""
    return _bwd(a, _naive_bwd)


def bwd_v2(a: dict):
    """prange over (image, channel) planes: each plane's dX has one owner, no races."""
    return _bwd(a, _prange_bwd)


def _production_ctx(a: dict):
    _, ctx = NB.maxpool2d_forward(a["x"], a["k"], a["s"])
    return ctx


def bwd_v3(a: dict):
    """Production, unfused (maxpool2d_backward, then relu_backward): offsets looked up in
    a ki*W + kj table instead of divided (item 9: 2.1 -> 1.1 ms), recycled dX."""
    ctx = _production_ctx(a)

    def run():
        dx = NB.maxpool2d_backward(a["dy"], ctx)
        return (NB.relu_backward(dx, a["x"]) if a["relu"] else dx,)
    return run


def bwd_v4(a: dict):
    """Production as Network runs it: maxpool2d_relu_backward drops gradients whose pooled
    value is not > 0 while unpooling (the ReLU mask at the argmax), one pass fewer."""
    ctx = _production_ctx(a)
    f = NB.maxpool2d_relu_backward if a["relu"] else NB.maxpool2d_backward
    return lambda: (f(a["dy"], ctx),)


BACKWARD = Op(
    family="pooling", name="maxpool2d_backward",
    versions=versions(bwd_v1, bwd_v2, bwd_v3, bwd_v4, production=4),
    checks=checks, timings=timings, make=make, reference=bwd_reference,
    flops=lambda case: 0.0, nbytes=bwd_bytes)

OPS = [FORWARD, BACKWARD]
