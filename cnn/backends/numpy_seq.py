"""Sequential NumPy backend: the reference every backend is checked against.

It is also the baseline every speedup is measured against, so it is the best
honest single-thread version: convolution is im2col + one batched GEMM per layer
(BLAS pinned to one thread), pooling loops over the k*k window offsets with
vectorised compares, and nothing allocates per sample.

Every backend module exposes the same kernel names and signatures. Forward
kernels return ``(out, ctx)``; backward kernels take that ``ctx`` back, write
weight gradients into the views they are given, and return ``dx`` (or None when
``need_dx`` is false, as for the first layer).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

NAME = "numpy"
DESCRIPTION = "sequential NumPy, im2col + GEMM, one BLAS thread"

def configure(threads: int | None = None) -> int:
    """Pin BLAS to one thread: this backend is the sequential baseline by definition.

    Re-applied on every call: a thread-limit context that exits elsewhere must not
    leave the baseline running on every core for the rest of the process.
    """
    if threads not in (None, 1):
        raise ValueError("the numpy backend is sequential: it runs on exactly 1 thread "
                         "(use --backend numba for threads)")
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    return 1


# --- arrays: the numpy backend keeps everything in host memory ----------------------

def zeros(n: int, dtype) -> np.ndarray:
    return np.zeros(n, dtype=dtype)


def from_host(a: np.ndarray) -> np.ndarray:
    return a


def to_host(a: np.ndarray) -> np.ndarray:
    return np.asarray(a)


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    dst[...] = src


def device_name() -> str:
    return "cpu"


def synchronize() -> None:
    """Nothing is asynchronous here; the CUDA backend waits for its stream."""


# --- convolution ---------------------------------------------------------------------

def _pad(x: np.ndarray, p: int) -> np.ndarray:
    if p == 0:
        return x
    n, c, h, w = x.shape
    out = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=x.dtype)
    out[:, :, p:p + h, p:p + w] = x
    return out


def conv2d_forward(x, w, b, stride: int, padding: int):
    """y[n] = W (O x CKK) @ cols[n] (CKK x OH*OW): NCHW comes out with no transpose."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = _pad(x, padding)
    oh = (h + 2 * padding - k) // stride + 1
    ow = (wd + 2 * padding - k) // stride + 1
    win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :oh, :ow]
    # (N, C, OH, OW, k, k) -> (N, C, k, k, OH, OW) -> (N, CKK, L): the one copy im2col needs
    cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * k * k, oh * ow)
    y = np.matmul(w.reshape(o, -1), cols)
    y += b[None, :, None]
    return y.reshape(n, o, oh, ow), (cols, x.shape, stride, padding)


def conv2d_backward(dy, ctx, w, dw, db, need_dx: bool):
    cols, x_shape, stride, padding = ctx
    n, c, h, wd = x_shape
    o, _, k, _ = w.shape
    oh, ow = dy.shape[2], dy.shape[3]
    dy3 = dy.reshape(n, o, oh * ow)
    db[...] = dy3.sum(axis=(0, 2))
    # sum_n dy[n] @ cols[n]^T: batched GEMMs then a sum beat tensordot's transposing copies
    dw[...] = np.matmul(dy3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(dw.shape)
    if not need_dx:
        return None
    dcols = np.matmul(w.reshape(o, -1).T, dy3).reshape(n, c, k, k, oh, ow)
    dxp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding), dtype=dy.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += dcols[:, :, i, j]
    return dxp[:, :, padding:padding + h, padding:padding + wd] if padding else dxp


# --- pooling -------------------------------------------------------------------------
# Masked copies (np.where, copyto(where=)) are several times slower than plain
# arithmetic here, so the argmax is built from compares and multiplies.

def _window_slices(k: int, s: int, oh: int, ow: int):
    for i in range(k):
        for j in range(k):
            yield i * k + j, (slice(None), slice(None), slice(i, i + s * oh, s),
                              slice(j, j + s * ow, s))


def maxpool2d_forward(x, k: int, s: int):
    """Max over the k*k window offsets; ties go to the first offset, as in torch."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    windows = [(off, x[sl]) for off, sl in _window_slices(k, s, oh, ow)]
    y = windows[0][1].copy()
    for _, v in windows[1:]:
        np.maximum(y, v, out=y)
    small = k * k <= 256  # uint8 indices are cheapest; large windows need wider ones
    arg = np.zeros(y.shape, dtype=np.uint8 if small else np.int32)
    found = windows[0][1] == y
    for off, v in windows[1:]:
        hit = v == y
        hit &= ~found
        arg += hit.view(np.uint8) * arg.dtype.type(off)
        found |= hit
    return y, (arg, x.shape, k, s)


def maxpool2d_backward(dy, ctx):
    arg, x_shape, k, s = ctx
    oh, ow = dy.shape[2], dy.shape[3]
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for off, sl in _window_slices(k, s, oh, ow):
        if k == s:  # windows do not overlap: each input gets at most one gradient
            np.multiply(dy, arg == off, out=dx[sl])
        else:
            dx[sl] += dy * (arg == off)
    return dx


# --- elementwise ---------------------------------------------------------------------

def relu_forward(x):
    y = np.maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    return dy * (y > 0)


def sigmoid_forward(x):
    # exp of a non-positive number only: no overflow warnings for large |x|
    e = np.exp(-np.abs(x))
    y = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
    return y, y


def sigmoid_backward(dy, y):
    return dy * y * (1 - y)


# --- dense ---------------------------------------------------------------------------

def dense_forward(x, w, b):
    y = x @ w.T
    y += b
    return y, x


def dense_backward(dy, x, w, dw, db, need_dx: bool):
    np.matmul(dy.T, x, out=dw)
    db[...] = dy.sum(axis=0)
    return dy @ w if need_dx else None


# --- loss ----------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy via log-sum-exp, and its gradient w.r.t. the logits."""
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    logp = z - lse
    rows = np.arange(n)
    loss = -float(logp[rows, labels].astype(np.float64).mean())
    grad = np.exp(logp)
    grad[rows, labels] -= 1
    grad /= n
    return loss, grad


# --- optimiser updates on the flat buffer (torch.optim semantics) ----------------------

def sgd_update(params, grads, velocity, lr: float, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, first_step: bool) -> None:
    d = grads
    if weight_decay:
        d = grads + weight_decay * params
    if momentum:
        if first_step:
            velocity[...] = d
        else:
            velocity *= momentum
            velocity += (1 - dampening) * d
        d = d + momentum * velocity if nesterov else velocity
    params -= lr * d


def adam_update(params, grads, m, v, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: int) -> None:
    g = grads + weight_decay * params if weight_decay else grads
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = np.sqrt(v) / np.sqrt(bc2)
    denom += eps
    params -= (lr / bc1) * (m / denom)
