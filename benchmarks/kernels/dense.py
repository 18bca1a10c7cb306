"""Dense layers: forward y = x W^T + b and backward (dX, dW, db), from loop nests to the
backend's fixed column blocks of single-threaded sgemm.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .common import N_, NB, REF, T_, Case, K, Op, f64, jit, versions

# --- cases -----------------------------------------------------------------------------------

_SHAPES = [(1, 1, 1), (7, 33, 5), (64, 300, 40), (1, 17, 130), (5, 64, 1)]


def _case(n, i, o, need_dx=True, label=""):
    name = label or f"n{n} in{i} out{o}" + (" +dx" if need_dx else "")
    return Case(name, n, dict(n=n, i=i, o=o, need_dx=need_dx))


def checks(quick: bool) -> list[Case]:
    shapes = _SHAPES if quick else _SHAPES + [(3, 2304, 256), (2, 256, 10), (9, 1600, 256)]
    return [_case(*sh, need_dx=j % 3 != 2) for j, sh in enumerate(shapes)]


def timings(quick: bool) -> list[Case]:
    if quick:
        return [_case(2, 40, 16, label="tiny dense b2")]
    return [_case(128, 2304, 256, label="cifar dense1 b128"),
            _case(128, 256, 10, label="cifar dense2 b128"),
            _case(64, 1600, 256, label="mnist dense1 b64"),
            _case(64, 256, 10, label="mnist dense2 b64")]


def make(case: Case, rng: np.random.Generator) -> dict:
    q = case.p
    x = rng.standard_normal((q["n"], q["i"]), np.float32)
    w = rng.standard_normal((q["o"], q["i"]), np.float32) * np.float32(1 / np.sqrt(q["i"]))
    b = rng.standard_normal(q["o"], np.float32)
    dy = rng.standard_normal((q["n"], q["o"]), np.float32)
    return dict(x=x, w=w, b=b, dy=dy, need_dx=q["need_dx"])


def fwd_reference(a: dict) -> tuple:
    d = f64(a)
    return (REF.dense_forward(d["x"], d["w"], d["b"])[0],)


def bwd_reference(a: dict) -> tuple:
    d = f64(a)
    dw, db = np.empty_like(d["w"]), np.empty_like(d["b"])
    dx = REF.dense_backward(d["dy"], d["x"], d["w"], dw, db, a["need_dx"])
    return dx, dw, db


def fwd_flops(case: Case) -> float:
    q = case.p
    return 2.0 * q["n"] * q["i"] * q["o"]


def bwd_flops(case: Case) -> float:
    return fwd_flops(case) * (2 if case.p["need_dx"] else 1)


def fwd_bytes(case: Case) -> float:
    q = case.p
    return 4.0 * (q["n"] * q["i"] + q["o"] * (q["i"] + 1) + q["n"] * q["o"])


def bwd_bytes(case: Case) -> float:
    q = case.p
    return fwd_bytes(case) + 4.0 * (q["o"] * (q["i"] + 1) + q["n"] * q["i"] * q["need_dx"])


# --- forward ----------------------------------------------------------------------------------

@jit()
def _row(x, w, b, y, n):
    for j in range(w.shape[0]):
        acc = b[j]
        for i in range(w.shape[1]):
            acc += x[n, i] * w[j, i]
        y[n, j] = acc


@jit()
def _naive_fwd(x, w, b, y):
    for n in range(x.shape[0]):
        _row(x, w, b, y, n)


@jit(parallel=True)
def _prange_fwd(x, w, b, y):
    for n in prange(x.shape[0]):
        _row(x, w, b, y, n)


def _fwd(a: dict, kernel):
    def run():
        y = np.empty((a["x"].shape[0], a["w"].shape[0]), a["x"].dtype)
        kernel(a["x"], a["w"], a["b"], y)
        return (y,)
    return run


def fwd_v1(a: dict):
    """The loop nest: one dot product of length In per output, one thread."""
    return _fwd(a, _naive_fwd)


def fwd_v2(a: dict):
    """prange over the batch's rows: the same dot products on every core."""
    return _fwd(a, _prange_fwd)


def fwd_v3(a: dict):
    """One BLAS sgemm with the bias pre-filled (beta = 1): blocked, vectorised, but on one
    thread (BLAS is pinned to 1 so it never oversubscribes the prange threads)."""
    x, w, b = a["x"], a["w"], a["b"]
    n, i = x.shape
    o = w.shape[0]

    def run():
        y = np.empty((n, o), x.dtype)
        y[...] = b
        K.gemm(N_, T_, n, o, i, 1.0, x, i, w, i, 1.0, y, o)
        return (y,)
    return run


def fwd_v4(a: dict):
    """Production (numba_cpu.dense_forward): the GEMM split into at most 12 fixed column
    blocks of >= 64 outputs, run in parallel (a split fixed by the shape, item 14)."""
    return lambda: (NB.dense_forward(a["x"], a["w"], a["b"])[0],)


FORWARD = Op(
    family="dense", name="dense_forward",
    versions=versions(fwd_v1, fwd_v2, fwd_v3, fwd_v4, production=4),
    checks=checks, timings=timings, make=make, reference=fwd_reference,
    flops=fwd_flops, nbytes=fwd_bytes)


# --- backward ---------------------------------------------------------------------------------

@jit()
def _dw_row(dy, x, dw, db, j):
    n_img, nin = x.shape
    acc = db.dtype.type(0)
    for n in range(n_img):
        acc += dy[n, j]
    db[j] = acc
    for i in range(nin):
        s = dw.dtype.type(0)
        for n in range(n_img):
            s += dy[n, j] * x[n, i]
        dw[j, i] = s


@jit()
def _dx_row(dy, w, dx, n):
    for i in range(w.shape[1]):
        s = dx.dtype.type(0)
        for j in range(w.shape[0]):
            s += dy[n, j] * w[j, i]
        dx[n, i] = s


@jit()
def _naive_bwd(dy, x, w, dw, db, need_dx, dx):
    for j in range(w.shape[0]):
        _dw_row(dy, x, dw, db, j)
    if need_dx:
        for n in range(x.shape[0]):
            _dx_row(dy, w, dx, n)


@jit(parallel=True)
def _prange_bwd(dy, x, w, dw, db, need_dx, dx):
    for j in prange(w.shape[0]):
        _dw_row(dy, x, dw, db, j)
    if need_dx:
        for n in prange(x.shape[0]):
            _dx_row(dy, w, dx, n)


def _outputs(a: dict):
    dx = np.empty_like(a["x"]) if a["need_dx"] else None
    return dx, np.empty_like(a["w"]), np.empty_like(a["b"])


def _bwd(a: dict, kernel):
    def run():
        dx, dw, db = _outputs(a)
        kernel(a["dy"], a["x"], a["w"], dw, db, a["need_dx"],
               dx if dx is not None else np.empty((1, 1), a["x"].dtype))
        return dx, dw, db
    return run


def bwd_v1(a: dict):
    """The loop nest: dW and db summed over the batch in order, dX row by row; one thread."""
    return _bwd(a, _naive_bwd)


def bwd_v2(a: dict):
    """prange over owners (output rows of dW and db, batch rows of dX): no shared sums."""
    return _bwd(a, _prange_bwd)


@jit()
def _gemm_bwd(dy, x, w, dw, db, need_dx, dx):
    n, nin = x.shape
    o = w.shape[0]
    K.gemm(T_, N_, o, nin, n, 1.0, dy, o, x, nin, 0.0, dw, nin)
    for j in range(o):
        acc = 0.0
        for i in range(n):
            acc += dy[i, j]
        db[j] = acc
    if need_dx:
        K.gemm(N_, N_, n, nin, o, 1.0, dy, o, w, nin, 0.0, dx, nin)


def bwd_v3(a: dict):
    """Two BLAS sgemms (dW = dY^T X, dX = dY W) and a db loop: fast, but on one thread."""
    return _bwd(a, _gemm_bwd)


def bwd_v4(a: dict):
    """Production (numba_cpu.dense_backward): dW rows and dX columns in at most 12 fixed
    blocks each, in parallel, no cross-block sums (36 blocks of 64 was 30% slower, item 14)."""
    def run():
        dw, db = np.empty_like(a["w"]), np.empty_like(a["b"])
        dx = NB.dense_backward(a["dy"], a["x"], a["w"], dw, db, a["need_dx"])
        return dx, dw, db
    return run


BACKWARD = Op(
    family="dense", name="dense_backward",
    versions=versions(bwd_v1, bwd_v2, bwd_v3, bwd_v4, production=4),
    checks=checks, timings=timings, make=make, reference=bwd_reference,
    flops=bwd_flops, nbytes=bwd_bytes)

OPS = [FORWARD, BACKWARD]
