"""The jitted kernels behind ``cnn.backends.numba_cpu`` (no argument checking here).

Every function is ``@njit(nogil=True, cache=True)``; the ones that spread work over
threads are also ``parallel=True`` and split it with ``prange`` over a *fixed*
partition: either output elements (no reduction, so the thread count cannot change
a bit), or, for weight gradients, a fixed number of batch chunks whose partial sums
are added in chunk order. Results therefore never depend on thread scheduling.

Matrix products call BLAS (scipy's ``cython_blas`` sgemm/dgemm) through Numba's own
``numba_xxgemm`` helper, referenced by symbol name so the on-disk cache stays valid
across processes (a ctypes pointer would be a "dynamic global" and forbid caching).
The caller pins BLAS to one thread, so BLAS never oversubscribes the prange threads.

Per-image and per-row helpers (``conv_fwd_image``, ``pool_row22``, ``unpool_plane``, ...)
are public: the kernel ladder (``benchmarks/kernels/``) builds its versions from them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numba import njit, prange, types
from numba.core.errors import NumbaWarning

# --- cache: decide once whether on-disk caching can work here ------------------------

CACHE_ERROR: str | None = None


def _probe_cache() -> bool:
    """``njit(cache=True)`` raises at decoration when no cache locator is usable."""
    global CACHE_ERROR
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaWarning)
            njit(cache=True)(lambda: 0)  # decoration only: nothing is compiled
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        CACHE_ERROR = str(exc)
        return False
    return True


_CACHE = _probe_cache()


def _jit(parallel: bool = False):
    return njit(nogil=True, cache=_CACHE, parallel=parallel, error_model="numpy")


# --- BLAS ----------------------------------------------------------------------------

_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char,          # kind, transa, transb
    types.intp, types.intp, types.intp,          # m, n, k
    types.voidptr, types.voidptr, types.intp,    # alpha, a, lda
    types.voidptr, types.intp, types.voidptr,    # b, ldb, beta
    types.voidptr, types.intp,                   # c, ldc
))

U = np.uint64  # unsigned indices: no wraparound branch, so LLVM vectorises the loop
N_ = 110  # ord('n')
T_ = 116  # ord('t')


@_jit()
def gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major ``c[m, n] = alpha * op(a)[m, k] @ op(b)[k, n] + beta * c``.

    ``a``, ``b``, ``c`` are arrays whose first element is the matrix's first element
    and whose rows are ``lda``/``ldb``/``ldc`` elements apart (unit stride in a row).
    ``ta``/``tb`` are ``N_`` or ``T_``. Row-major is column-major transposed, so this
    is BLAS's ``c^T = op(b)^T @ op(a)^T``.
    """
    if m == 0 or n == 0:
        return
    sc = np.empty(2, c.dtype)
    sc[0] = alpha
    sc[1] = beta
    kind = 115 if c.itemsize == 4 else 100  # 's' / 'd'
    _xxgemm(np.int8(kind), np.int8(tb), np.int8(ta), n, m, k, sc[0:].ctypes, b.ctypes,
            max(ldb, 1), a.ctypes, max(lda, 1), sc[1:].ctypes, c.ctypes, max(ldc, 1))


# --- convolution ---------------------------------------------------------------------

@_jit()
def out_range(kj, s, p, w, ow_n):
    """``[lo, hi)`` of output columns whose input column ``ow*s + kj - p`` lies in ``[0, w)``."""
    d = p - kj
    lo = (d + s - 1) // s if d > 0 else 0
    e = w - 1 - kj + p
    hi = min(ow_n, e // s + 1) if e >= 0 else 0
    if hi < lo:
        hi = lo
    return lo, hi


@_jit()
def im2col(xn, k, s, p, oh_n, ow_n, cols):
    """cols[(c*k + ki)*k + kj, oh*OW + ow] = x[c, oh*s + ki - p, ow*s + kj - p] (0 outside).

    Indices are uint64 on 1-D rows: Numba's negative-index wraparound on signed indices
    (and views made inside the loops) stop LLVM from vectorising these short copies."""
    cin, h, w = xn.shape
    zero = cols.dtype.type(0)
    uw, us, uow = U(w), U(s), U(ow_n)
    for c in range(cin):
        xc = xn[c].reshape(-1)
        for ki in range(k):
            for kj in range(k):
                row = cols[(c * k + ki) * k + kj]
                lo, hi = out_range(kj, s, p, w, ow_n)
                ulo, uhi = U(lo), U(hi)
                for oh in range(oh_n):
                    ih = oh * s + ki - p
                    b = U(oh) * uow
                    if ih < 0 or ih >= h or hi == lo:
                        for j in range(uow):
                            row[b + j] = zero
                        continue
                    for j in range(ulo):
                        row[b + j] = zero
                    src = U(ih) * uw + U(lo * s + kj - p)
                    dst = b + ulo
                    if s == 1:
                        for j in range(uhi - ulo):
                            row[dst + j] = xc[src + j]
                    else:
                        for j in range(uhi - ulo):
                            row[dst + j] = xc[src + j * us]
                    for j in range(uhi, uow):
                        row[b + j] = zero


@_jit()
def col2im(dcols, k, s, p, oh_n, ow_n, dxn):
    """The adjoint of ``im2col``: dx[c, ih, iw] += dcols[...] (dxn zeroed here first)."""
    cin, h, w = dxn.shape
    uw, us, uow = U(w), U(s), U(ow_n)
    for c in range(cin):
        xc = dxn[c].reshape(-1)
        for i in range(U(h) * uw):
            xc[i] = 0
        for ki in range(k):
            for kj in range(k):
                row = dcols[(c * k + ki) * k + kj]
                lo, hi = out_range(kj, s, p, w, ow_n)
                if hi == lo:
                    continue
                n = U(hi - lo)
                for oh in range(oh_n):
                    ih = oh * s + ki - p
                    if ih < 0 or ih >= h:
                        continue
                    dst = U(ih) * uw + U(lo * s + kj - p)
                    src = U(oh) * uow + U(lo)
                    if s == 1:
                        for j in range(n):
                            xc[dst + j] += row[src + j]
                    else:
                        for j in range(n):
                            xc[dst + j * us] += row[src + j]


@_jit()
def shift_cols(xn, k, p, oh_n, wp, xpad, cols):
    """Stride-1 im2col on the *padded width*: cols[(c*k+ki)*k+kj, i] = xpad[c, ki*wp+kj+i]
    for i < OH*Wp. Each row is one contiguous copy (fast); the columns with
    ``i % wp >= OW`` are garbage the caller ignores (they cost (k-1)/Wp extra GEMM work)."""
    cin, h, w = xn.shape
    plane = (h + 2 * p) * wp
    ln = oh_n * wp
    if p > 0:
        for c in range(cin):
            xc = xpad[c]
            for i in range(p * wp + p):
                xc[i] = 0
            for ih in range(h):
                dst = xc[(ih + p) * wp + p:]
                src = xn[c, ih]
                for iw in range(w):
                    dst[iw] = src[iw]
                for iw in range(w, w + 2 * p):
                    dst[iw] = 0
            for i in range((h + p) * wp + p, plane):
                xc[i] = 0
        planes = xpad
    else:
        planes = xn.reshape(cin, h * w)
    for c in range(cin):
        sc = planes[c]
        for ki in range(k):
            for kj in range(k):
                sh = ki * wp + kj
                cr = cols[(c * k + ki) * k + kj]
                m = min(ln, plane - sh)
                src = sc[sh:]
                for i in range(m):
                    cr[i] = src[i]
                for i in range(m, ln):
                    cr[i] = 0


@_jit()
def shift_col2im(dcols, k, p, oh_n, wp, dxpad, dxn):
    """The adjoint of ``shift_cols`` (garbage columns of dcols must be 0): dx = crop(sum of
    the k*k shifted rows). dxn is overwritten."""
    cin, h, w = dxn.shape
    plane = (h + 2 * p) * wp
    ln = oh_n * wp
    acc = dxpad if p > 0 else dxn.reshape(cin, h * w)
    for c in range(cin):
        dc = acc[c]
        for i in range(plane):
            dc[i] = 0
        for ki in range(k):
            for kj in range(k):
                sh = ki * wp + kj
                cr = dcols[(c * k + ki) * k + kj]
                m = min(ln, plane - sh)
                dst = dc[sh:]
                for i in range(m):
                    dst[i] += cr[i]
    if p > 0:
        for c in range(cin):
            for ih in range(h):
                src = dxpad[c, (ih + p) * wp + p:]
                dst = dxn[c, ih]
                for iw in range(w):
                    dst[iw] = src[iw]


@_jit()
def fill(a, v):
    for i in range(a.size):
        a[i] = v


@_jit()
def conv_fwd_image_s1(xn, wb, k, p, oh_n, ow_n, yn, ct, xp, yp, relu):
    """Stride 1: y = [W | b] @ [shift_cols; 1] on the padded width, then the garbage
    columns are dropped while copying into y (applying the ReLU there if ``relu``).
    The bias rides in the GEMM (row of ones)."""
    o = wb.shape[0]
    ckk1 = wb.shape[1]
    wp = xn.shape[2] + 2 * p
    ln = oh_n * wp
    zero = yn.dtype.type(0)
    shift_cols(xn, k, p, oh_n, wp, xp, ct)
    gemm(N_, N_, o, ln, ckk1, 1.0, wb, ckk1, ct, ln, 0.0, yp, ln)
    for oc in range(o):
        for oh in range(oh_n):
            src = yp[oc, oh * wp:]
            dst = yn[oc, oh * ow_n:]
            if relu:
                for ow in range(ow_n):
                    v = src[ow]
                    dst[ow] = v if not v <= zero else zero
            else:
                for ow in range(ow_n):
                    dst[ow] = src[ow]


@_jit()
def conv_fwd_image(xn, wb, k, s, p, oh_n, ow_n, yn, ct, relu):
    """Any stride: y = [W | b] @ [im2col; 1], straight into y (then ReLU'd in place while
    still in cache, if ``relu``)."""
    o = wb.shape[0]
    ckk1 = wb.shape[1]
    ln = oh_n * ow_n
    im2col(xn, k, s, p, oh_n, ow_n, ct)
    gemm(N_, N_, o, ln, ckk1, 1.0, wb, ckk1, ct, ln, 0.0, yn, ln)
    if relu:
        relu_inplace(yn.reshape(-1))


@_jit()
def relu_inplace(a):
    zero = a.dtype.type(0)
    for i in range(a.size):
        v = a[i]
        a[i] = v if not v <= zero else zero


@_jit(parallel=True)
def conv2d_forward_s1(x, wb, k, p, oh_n, ow_n, y, cols, xpad, ypad, relu):
    """y[n] (O x L) = [W | b] (O x CKK+1) @ [cols(x[n]); 1], stride 1, one image at a time
    per worker. (Separate kernels per stride kind: each compiles only when used.)"""
    n_img = x.shape[0]
    workers = cols.shape[0]
    ckk = wb.shape[1] - 1
    for t in prange(workers):
        fill(cols[t, ckk], 1.0)
        for n in range(t * n_img // workers, (t + 1) * n_img // workers):
            conv_fwd_image_s1(x[n], wb, k, p, oh_n, ow_n, y[n], cols[t], xpad[t], ypad[t],
                               relu)


@_jit(parallel=True)
def conv2d_forward(x, wb, k, s, p, oh_n, ow_n, y, cols, relu):
    """As ``conv2d_forward_s1`` for any stride, with the plain im2col."""
    n_img = x.shape[0]
    workers = cols.shape[0]
    ckk = wb.shape[1] - 1
    for t in prange(workers):
        fill(cols[t, ckk], 1.0)
        for n in range(t * n_img // workers, (t + 1) * n_img // workers):
            conv_fwd_image(x[n], wb, k, s, p, oh_n, ow_n, y[n], cols[t], relu)


@_jit()
def conv_bwd_image_s1(xn, dyn, w2, k, p, oh_n, ow_n, first, dwc, need_dx, dxn, ct, dct, xp,
                       dt):
    """One image's share, stride 1: dwc ((CKK+1) x O) += [cols; 1] @ dy^T (the last row
    is db), dxn = col2im(W^T @ dy) if need_dx; dy is laid out on the padded width (dt),
    whose garbage columns stay 0."""
    o = w2.shape[0]
    ckk = w2.shape[1]
    wp = xn.shape[2] + 2 * p
    ln = oh_n * wp
    for oc in range(o):
        for oh in range(oh_n):
            src = dyn[oc, oh * ow_n:]
            dst = dt[oc, oh * wp:]
            for ow in range(ow_n):
                dst[ow] = src[ow]
    shift_cols(xn, k, p, oh_n, wp, xp, ct)
    gemm(N_, T_, ckk + 1, o, ln, 1.0, ct, ln, dt, ln, 0.0 if first else 1.0, dwc, o)
    if need_dx:
        gemm(T_, N_, ckk, ln, o, 1.0, w2, ckk, dt, ln, 0.0, dct, ln)
        shift_col2im(dct, k, p, oh_n, wp, xp, dxn)


@_jit()
def conv_bwd_image(xn, dyn, w2, k, s, p, oh_n, ow_n, first, dwc, need_dx, dxn, ct, dct):
    """As ``conv_bwd_image_s1`` for any stride, with the plain im2col / col2im."""
    o = w2.shape[0]
    ckk = w2.shape[1]
    ln = oh_n * ow_n
    im2col(xn, k, s, p, oh_n, ow_n, ct)
    gemm(N_, T_, ckk + 1, o, ln, 1.0, ct, ln, dyn, ln, 0.0 if first else 1.0, dwc, o)
    if need_dx:
        gemm(T_, N_, ckk, ln, o, 1.0, w2, ckk, dyn, ln, 0.0, dct, ln)
        col2im(dct, k, s, p, oh_n, ow_n, dxn)


@_jit()
def zero2(a):
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            a[i, j] = 0


@_jit(parallel=True)
def conv2d_backward_s1(x, dy, w2, k, p, oh_n, ow_n, chunk_lo, worker_lo, dwp, need_dx, dx,
                       cols, dcols, xpad, dyp):
    """Per fixed batch chunk c: dwp[c] = sum_n [cols[n]; 1] @ dy[n]^T ((CKK+1) x O, the
    last row is db); dx[n] = col2im(W^T @ dy[n]). Workers own whole chunks; im2col is
    recomputed here (cheaper than keeping the batch's columns from the forward pass)."""
    workers = cols.shape[0]
    ckk = w2.shape[1]
    for t in prange(workers):
        fill(cols[t, ckk], 1.0)
        zero2(dyp[t])
        for c in range(worker_lo[t], worker_lo[t + 1]):
            for n in range(chunk_lo[c], chunk_lo[c + 1]):
                conv_bwd_image_s1(x[n], dy[n], w2, k, p, oh_n, ow_n, n == chunk_lo[c],
                                   dwp[c], need_dx, dx[n if need_dx else 0], cols[t],
                                   dcols[t], xpad[t], dyp[t])


@_jit(parallel=True)
def conv2d_backward(x, dy, w2, k, s, p, oh_n, ow_n, chunk_lo, worker_lo, dwp, need_dx, dx,
                    cols, dcols):
    """As ``conv2d_backward_s1`` for any stride, with the plain im2col / col2im."""
    workers = cols.shape[0]
    ckk = w2.shape[1]
    for t in prange(workers):
        fill(cols[t, ckk], 1.0)
        for c in range(worker_lo[t], worker_lo[t + 1]):
            for n in range(chunk_lo[c], chunk_lo[c + 1]):
                conv_bwd_image(x[n], dy[n], w2, k, s, p, oh_n, ow_n, n == chunk_lo[c],
                                dwp[c], need_dx, dx[n if need_dx else 0], cols[t],
                                dcols[t])


@_jit(parallel=True)
def reduce_chunks_t(parts, dw, db):
    """dw[o, r] = sum_c parts[c, r, o], db[o] = sum_c parts[c, CKK, o], in chunk order."""
    for oc in prange(dw.shape[0]):
        _reduce_t_row(parts, dw, db, oc)


@_jit()
def _reduce_t_row(parts, dw, db, oc):
    ckk = dw.shape[1]
    for r in range(ckk + 1):
        acc = 0.0
        for c in range(parts.shape[0]):
            acc += parts[c, r, oc]
        if r < ckk:
            dw[oc, r] = acc
        else:
            db[oc] = acc


# --- pooling -------------------------------------------------------------------------

@_jit()
def pool_row22(r0, r1, yr, ar, ow_n):
    """2x2 stride-2 windows along one output row; the first maximum wins, a NaN wins."""
    for ow in range(ow_n):
        best = r0[2 * ow]
        off = 0
        v = r0[2 * ow + 1]
        if v > best or v != v:
            best = v
            off = 1
        v = r1[2 * ow]
        if v > best or v != v:
            best = v
            off = 2
        v = r1[2 * ow + 1]
        if v > best or v != v:
            best = v
            off = 3
        yr[ow] = best
        ar[ow] = off


@_jit()
def pool_row(xp, oh, k, s, yr, ar, ow_n):
    """Any k, s: window offsets outside, a vectorisable pass over the output row inside."""
    r = xp[oh * s]
    for ow in range(ow_n):
        yr[ow] = r[ow * s]
        ar[ow] = 0
    for ki in range(k):
        r = xp[oh * s + ki]
        for kj in range(k):
            if ki == 0 and kj == 0:
                continue
            off = ki * k + kj
            for ow in range(ow_n):
                v = r[ow * s + kj]
                if v > yr[ow] or v != v:
                    yr[ow] = v
                    ar[ow] = off


@_jit(parallel=True)
def maxpool2d_forward(x, k, s, y, arg):
    """Max over each k x k window and the offset ki*k + kj of the maximum: the first one
    (torch's tie rule); a NaN propagates, as in torch. One (image, channel) plane per task."""
    n_img, cin = x.shape[0], x.shape[1]
    oh_n, ow_n = y.shape[2], y.shape[3]
    for pc in prange(n_img * cin):
        n = pc // cin
        c = pc - n * cin
        xp = x[n, c]
        yp = y[n, c]
        ap = arg[n, c]
        if k == 2 and s == 2:
            for oh in range(oh_n):
                pool_row22(xp[2 * oh], xp[2 * oh + 1], yp[oh], ap[oh], ow_n)
        else:
            for oh in range(oh_n):
                pool_row(xp, oh, k, s, yp[oh], ap[oh], ow_n)


@_jit()
def unpool_plane(dyp, ap, s, offs, dxp, yp, relu):
    """dx = 0, then each dy goes to its window's argmax; ``offs[off]`` = ki*W + kj (a table
    lookup: an integer division by k per element cost 2x the whole kernel). With ``relu``
    a dy whose pooled value yp is not > 0 is dropped: the preceding ReLU's backward."""
    w = dxp.shape[1]
    oh_n, ow_n = dyp.shape
    df = dxp.reshape(-1)
    zero = dxp.dtype.type(0)
    for i in range(df.size):
        df[i] = 0
    for oh in range(oh_n):
        g = dyp[oh]
        a = ap[oh]
        row = df[oh * s * w:]
        if relu:
            yr = yp[oh]
            for ow in range(ow_n):
                row[ow * s + offs[a[ow]]] += g[ow] if yr[ow] > zero else zero
        else:
            for ow in range(ow_n):
                row[ow * s + offs[a[ow]]] += g[ow]


@_jit(parallel=True)
def maxpool2d_backward(dy, arg, s, offs, dx, y, relu):
    n_img, cin = dy.shape[0], dy.shape[1]
    for pc in prange(n_img * cin):
        n = pc // cin
        c = pc - n * cin
        unpool_plane(dy[n, c], arg[n, c], s, offs, dx[n, c], y[n, c], relu)


# --- elementwise (flat views; no reductions, so any split is deterministic) ----------

@_jit(parallel=True)
def relu_forward(x, y):
    zero = x.dtype.type(0)
    for i in prange(x.size):
        v = x[i]
        y[i] = v if not v <= zero else zero  # a NaN propagates, as in numpy and torch


@_jit(parallel=True)
def relu_backward(dy, y, dx):
    zero = dy.dtype.type(0)
    for i in prange(dy.size):
        dx[i] = dy[i] if y[i] > zero else zero


@_jit(parallel=True)
def sigmoid_forward(x, y):
    for i in prange(x.size):
        v = x[i]
        if v >= 0:
            y[i] = 1 / (1 + math.exp(-v))
        else:
            e = math.exp(v)
            y[i] = e / (1 + e)


@_jit(parallel=True)
def sigmoid_backward(dy, y, dx):
    for i in prange(dy.size):
        yi = y[i]
        dx[i] = dy[i] * yi * (1 - yi)


# --- dense ---------------------------------------------------------------------------

@_jit()
def _dense_fwd_block(x, w, b, y, j0, j1):
    n_img, nin = x.shape
    for i in range(n_img):
        yi = y[i]
        for j in range(j0, j1):
            yi[j] = b[j]
    gemm(N_, T_, n_img, j1 - j0, nin, 1.0, x, nin, w[j0:], nin, 1.0, y[:, j0:], w.shape[0])


@_jit(parallel=True)
def dense_forward(x, w, b, y, col_lo):
    """y[:, j0:j1] = x @ W[j0:j1]^T + b[j0:j1]; fixed blocks of output features in parallel."""
    for bi in prange(col_lo.size - 1):
        _dense_fwd_block(x, w, b, y, col_lo[bi], col_lo[bi + 1])


@_jit()
def _dense_dw_block(dy, x, dw, db, j0, j1):
    n_img, nin = x.shape
    nout = dy.shape[1]
    gemm(T_, N_, j1 - j0, nin, n_img, 1.0, dy[:, j0:], nout, x, nin, 0.0, dw[j0:], nin)
    for j in range(j0, j1):
        acc = 0.0
        for i in range(n_img):
            acc += dy[i, j]
        db[j] = acc


@_jit()
def _dense_dx_block(dy, w, dx, i0, i1):
    n_img, nout = dy.shape
    nin = w.shape[1]
    gemm(N_, N_, n_img, i1 - i0, nout, 1.0, dy, nout, w[:, i0:], nin, 0.0, dx[:, i0:], nin)


@_jit(parallel=True)
def dense_backward(dy, x, w, dw, db, need_dx, dx, row_lo, col_lo):
    """dW[j0:j1] = dy[:, j0:j1]^T @ x, db = column sums of dy (batch order),
    dx[:, i0:i1] = dy @ W[:, i0:i1]; fixed blocks in parallel, no cross-block reductions."""
    for bi in prange(row_lo.size - 1):
        _dense_dw_block(dy, x, dw, db, row_lo[bi], row_lo[bi + 1])
    if need_dx:
        for bi in prange(col_lo.size - 1):
            _dense_dx_block(dy, w, dx, col_lo[bi], col_lo[bi + 1])


# --- loss ----------------------------------------------------------------------------

@_jit()
def softmax_cross_entropy(logits, labels, grad):
    """Mean cross-entropy (float64 log-sum-exp per row) and its gradient into ``grad``."""
    n, kk = logits.shape
    total = 0.0
    for i in range(n):
        mx = logits[i, 0]
        for j in range(1, kk):
            if logits[i, j] > mx:
                mx = logits[i, j]
        se = 0.0
        for j in range(kk):
            se += math.exp(float(logits[i, j]) - mx)
        lse = math.log(se)
        total -= float(logits[i, labels[i]]) - mx - lse
        for j in range(kk):
            grad[i, j] = math.exp(float(logits[i, j]) - mx - lse) / n
        grad[i, labels[i]] -= 1.0 / n
    return total / n


# --- optimiser updates (torch.optim semantics, flat buffers) ---------------------------

@_jit(parallel=True)
def sgd_update(params, grads, velocity, lr, momentum, dampening, weight_decay, nesterov,
               first_step):
    for i in prange(params.size):
        d = float(grads[i])
        if weight_decay != 0.0:
            d += weight_decay * float(params[i])
        if momentum != 0.0:
            v = d if first_step else momentum * float(velocity[i]) + (1.0 - dampening) * d
            velocity[i] = v
            v = float(velocity[i])  # what is stored is what the next step sees
            d = d + momentum * v if nesterov else v
        params[i] = params[i] - lr * d


@_jit(parallel=True)
def adam_update(params, grads, m_buf, v_buf, lr_bc1, beta1, beta2, eps, weight_decay,
                sqrt_bc2):
    for i in prange(params.size):
        g = float(grads[i])
        if weight_decay != 0.0:
            g += weight_decay * float(params[i])
        mi = beta1 * float(m_buf[i]) + (1.0 - beta1) * g
        vi = beta2 * float(v_buf[i]) + (1.0 - beta2) * g * g
        m_buf[i] = mi
        v_buf[i] = vi
        mi = float(m_buf[i])
        vi = float(v_buf[i])
        denom = math.sqrt(vi) / sqrt_bc2 + eps
        params[i] = params[i] - lr_bc1 * (mi / denom)
