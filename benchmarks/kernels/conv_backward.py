"""Convolution backward: dX (skipped for the first layer, ``need_dx`` false), dW and db
from dY, from the loop nest to the backend's chunked im2col + sgemm, then candidates.

Weight gradients sum over the batch. Every version below sums in an order fixed by the
shape alone (loop order, or 16 fixed batch chunks added in chunk order), so none depends
on the thread count. The second op, MaxPool+ReLU+Conv backward, times the production
chain against one fused pass.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .common import (
    N_,
    NB,
    QUICK_CONVS,
    REF,
    SEED_CONVS,
    T_,
    Case,
    K,
    Op,
    bounds,
    conv_bytes,
    conv_cases,
    conv_flops,
    conv_inputs,
    conv_out,
    f64,
    jit,
    threads,
    versions,
)
from .conv_forward import im2col_signed, pool_cases, pool_inputs

# --- cases and the reference ---------------------------------------------------------------


def _with_dx(cases: list[Case]) -> list[Case]:
    """Every other case computes dX (an inner layer), the rest only dW and db (the first)."""
    return [Case(c.label.removesuffix(" relu") + ("" if i % 2 else " +dx"), c.batch_size,
                 {**c.p, "need_dx": i % 2 == 0}) for i, c in enumerate(cases)]


def _timed(quick: bool) -> list[Case]:
    """As in the network: the first layer computes no dX, the second does."""
    out = []
    for c in QUICK_CONVS if quick else SEED_CONVS:
        first = "conv1" in c.label
        out.append(Case(c.label + ("" if first else " +dx"), c.batch_size,
                        {**c.p, "need_dx": not first}))
    return out


def make(case: Case, rng: np.random.Generator) -> dict:
    a = conv_inputs(case, rng)
    q = case.p
    oh, ow = conv_out(q["h"], q["w"], q["k"], q["s"], q["p"])
    a["dy"] = rng.standard_normal((q["n"], q["o"], oh, ow), np.float32)
    a["need_dx"] = q["need_dx"]
    return a


def reference(a: dict) -> tuple:
    d = f64(a)
    _, ctx = REF.conv2d_forward(d["x"], d["w"], d["b"], d["s"], d["p"])
    dw, db = np.empty_like(d["w"]), np.empty_like(d["b"])
    dx = REF.conv2d_backward(d["dy"], ctx, d["w"], dw, db, a["need_dx"])
    return dx, dw, db


def flops(case: Case) -> float:
    return conv_flops(case) * (2 if case.p["need_dx"] else 1)


def nbytes(case: Case) -> float:
    q = case.p
    return conv_bytes(case) + 4.0 * q["n"] * q["c"] * q["h"] * q["w"] * q["need_dx"]


def _outputs(a: dict):
    dx = np.empty_like(a["x"]) if a["need_dx"] else None
    return dx, np.empty_like(a["w"]), np.empty_like(a["b"])


# --- v1, v2: loop nests -------------------------------------------------------------------

@jit()
def _naive(x, w, dy, s, p, need_dx, dx, dw, db):
    n_img, cin, h, wd = x.shape
    o, _, k, _ = w.shape
    oh_n, ow_n = dy.shape[2], dy.shape[3]
    dw[...] = 0
    db[...] = 0
    if need_dx:
        dx[...] = 0
    for n in range(n_img):
        for oc in range(o):
            for r in range(oh_n):
                for q in range(ow_n):
                    g = dy[n, oc, r, q]
                    db[oc] += g
                    for c in range(cin):
                        for ki in range(k):
                            ih = r * s + ki - p
                            if ih < 0 or ih >= h:
                                continue
                            for kj in range(k):
                                iw = q * s + kj - p
                                if iw >= 0 and iw < wd:
                                    dw[oc, c, ki, kj] += g * x[n, c, ih, iw]
                                    if need_dx:
                                        dx[n, c, ih, iw] += g * w[oc, c, ki, kj]


@jit()
def _dw_pair(x, dy, s, p, oc, c, dwp):
    """dW[oc, c] (k x k) summed over the batch in image order."""
    n_img, _, h, wd = x.shape
    k = dwp.shape[0]
    oh_n, ow_n = dy.shape[2], dy.shape[3]
    for ki in range(k):
        for kj in range(k):
            acc = dwp.dtype.type(0)
            for n in range(n_img):
                for r in range(oh_n):
                    ih = r * s + ki - p
                    if ih < 0 or ih >= h:
                        continue
                    for q in range(ow_n):
                        iw = q * s + kj - p
                        if iw >= 0 and iw < wd:
                            acc += dy[n, oc, r, q] * x[n, c, ih, iw]
            dwp[ki, kj] = acc


@jit()
def _dx_plane(dy, w, s, p, n, c, dxp):
    """dX[n, c]: every output's gradient scattered back through the weights, owned here."""
    o, _, k, _ = w.shape
    h, wd = dxp.shape
    oh_n, ow_n = dy.shape[2], dy.shape[3]
    dxp[...] = 0
    for oc in range(o):
        for r in range(oh_n):
            for q in range(ow_n):
                g = dy[n, oc, r, q]
                for ki in range(k):
                    ih = r * s + ki - p
                    if ih < 0 or ih >= h:
                        continue
                    for kj in range(k):
                        iw = q * s + kj - p
                        if iw >= 0 and iw < wd:
                            dxp[ih, iw] += g * w[oc, c, ki, kj]


@jit(parallel=True)
def _naive_prange(x, w, dy, s, p, need_dx, dx, dw, db):
    n_img, cin = x.shape[0], x.shape[1]
    o = w.shape[0]
    for task in prange(o * cin):
        oc = task // cin
        _dw_pair(x, dy, s, p, oc, task - oc * cin, dw[oc, task - oc * cin])
    for oc in prange(o):
        acc = db.dtype.type(0)
        for n in range(n_img):
            for r in range(dy.shape[2]):
                for q in range(dy.shape[3]):
                    acc += dy[n, oc, r, q]
        db[oc] = acc
    if need_dx:
        for task in prange(n_img * cin):
            n = task // cin
            _dx_plane(dy, w, s, p, n, task - n * cin, dx[n, task - n * cin])


def _naive_run(a: dict, kernel):
    def run():
        dx, dw, db = _outputs(a)
        kernel(a["x"], a["w"], a["dy"], a["s"], a["p"], a["need_dx"],
               dx if dx is not None else np.empty((1, 1, 1, 1), a["x"].dtype), dw, db)
        return dx, dw, db
    return run


def v1(a: dict):
    """The textbook loop nest: each dY element scattered into dW, db and dX, one thread."""
    return _naive_run(a, _naive)


def v2(a: dict):
    """prange over owners: (out, in)-channel pairs of dW (batch summed in image order), out
    channels of db, (image, channel) planes of dX: no races, no cross-thread sums."""
    return _naive_run(a, _naive_prange)


# --- v3, v4: im2col + sgemm per image into fixed batch-chunk partials --------------------

@jit()
def _col2im_signed(dcols, k, s, p, oh_n, ow_n, dxn):
    cin, h, w = dxn.shape
    dxn[...] = 0
    for c in range(cin):
        for ki in range(k):
            for kj in range(k):
                row = (c * k + ki) * k + kj
                for r in range(oh_n):
                    ih = r * s + ki - p
                    for q in range(ow_n):
                        iw = q * s + kj - p
                        if 0 <= ih < h and 0 <= iw < w:
                            dxn[c, ih, iw] += dcols[row, r * ow_n + q]


@jit()
def _bwd_image(xn, dyn, w2, k, s, p, oh_n, ow_n, first, dwc, need_dx, dxn, ct, dct, signed):
    """dwc (CKK+1 x O) += cols @ dy^T (row CKK: db by a float64 loop); dxn = col2im(W^T dy)."""
    o, ckk = w2.shape
    ln = oh_n * ow_n
    if signed:
        im2col_signed(xn, k, s, p, oh_n, ow_n, ct)
    else:
        K.im2col(xn, k, s, p, oh_n, ow_n, ct)
    K.gemm(N_, T_, ckk, o, ln, 1.0, ct, ln, dyn, ln, 0.0 if first else 1.0, dwc, o)
    for oc in range(o):
        acc = 0.0
        for i in range(ln):
            acc += dyn[oc, i]
        dwc[ckk, oc] = acc if first else dwc[ckk, oc] + acc
    if need_dx:
        K.gemm(T_, N_, ckk, ln, o, 1.0, w2, ckk, dyn, ln, 0.0, dct, ln)
        if signed:
            _col2im_signed(dct, k, s, p, oh_n, ow_n, dxn)
        else:
            K.col2im(dct, k, s, p, oh_n, ow_n, dxn)


@jit(parallel=True)
def _chunked(x, dy, w2, k, s, p, oh_n, ow_n, chunk_lo, worker_lo, dwp, need_dx, dx, cols,
             dcols, signed):
    for t in prange(cols.shape[0]):
        for c in range(worker_lo[t], worker_lo[t + 1]):
            for n in range(chunk_lo[c], chunk_lo[c + 1]):
                _bwd_image(x[n], dy[n], w2, k, s, p, oh_n, ow_n, n == chunk_lo[c], dwp[c],
                           need_dx, dx[n if need_dx else 0], cols[t], dcols[t], signed)


def _setup(a: dict, shift: bool):
    """The backend's partition: 16 fixed batch chunks, whole chunks per worker."""
    x, w = a["x"], a["w"]
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    s, p = a["s"], a["p"]
    oh, ow = conv_out(h, wd, k, s, p)
    nch = min(n, NB.CHUNKS)
    t = max(1, min(nch, threads()))
    wp = wd + 2 * p
    ln = oh * wp if shift else oh * ow
    dt = x.dtype
    return dict(n=n, o=o, k=k, s=s, p=p, oh=oh, ow=ow, ckk=c * k * k, wp=wp, shift=shift,
                chunk_lo=bounds(n, nch), worker_lo=bounds(nch, t),
                dwp=np.empty((nch, c * k * k + 1, o), dt),
                cols=np.empty((t, c * k * k + 1, ln), dt),
                dcols=np.empty((t, c * k * k + 1, ln), dt),
                xpad=np.empty((t, c, (h + 2 * p) * wp) if shift and p else (t, 0, 0), dt),
                dyp=np.empty((t, o, ln) if shift else (t, 0, 0), dt))


def _dx_arg(a: dict, dx):
    return dx if dx is not None else np.empty((1, 1, 1, 1), a["x"].dtype)


def _plain_chunks(a: dict, signed: bool):
    g = _setup(a, shift=False)

    def run():
        dx, dw, db = _outputs(a)
        _chunked(a["x"], a["dy"].reshape(g["n"], g["o"], -1), a["w"].reshape(g["o"], -1),
                 g["k"], g["s"], g["p"], g["oh"], g["ow"], g["chunk_lo"], g["worker_lo"],
                 g["dwp"], a["need_dx"], _dx_arg(a, dx), g["cols"], g["dcols"], signed)
        K.reduce_chunks_t(g["dwp"], dw.reshape(g["o"], -1), db)
        return dx, dw, db
    return run


def v3(a: dict):
    """im2col + sgemm per image: each of 16 fixed batch chunks accumulates its dW partial
    in the GEMM (beta = 1), partials added in chunk order; db by a float64 sum loop."""
    return _plain_chunks(a, signed=True)


def v4(a: dict):
    """Unsigned indices in im2col and col2im: the copies vectorise (NOTES item 8)."""
    return _plain_chunks(a, signed=False)


# --- v5, v6: the backend's jitted kernels, called directly --------------------------------

def _backend_jit(a: dict, shift_all_stride1: bool):
    g = _setup(a, shift=shift_all_stride1 and a["s"] == 1)

    def run():
        dx, dw, db = _outputs(a)
        args = (a["x"], a["dy"].reshape(g["n"], g["o"], -1), a["w"].reshape(g["o"], -1), g["k"])
        parts = (g["chunk_lo"], g["worker_lo"], g["dwp"], a["need_dx"], _dx_arg(a, dx),
                 g["cols"], g["dcols"])
        if g["shift"]:
            K.conv2d_backward_s1(*args, g["p"], g["oh"], g["ow"], *parts, g["xpad"], g["dyp"])
        else:
            K.conv2d_backward(*args, g["s"], g["p"], g["oh"], g["ow"], *parts)
        K.reduce_chunks_t(g["dwp"], dw.reshape(g["o"], -1), db)
        return dx, dw, db
    return run


def v5(a: dict):
    """db rides in the dW GEMM (a row of ones under the columns): the float64 sum loop was
    a sequential pass that did not vectorise (NOTES item 7: conv1 backward 9.9 -> 5.5 ms)."""
    return _backend_jit(a, shift_all_stride1=False)


def v6(a: dict):
    """Stride 1: shift im2col and its adjoint on the padded width (one contiguous copy or
    add per row), dY copied onto the padded width once per image (NOTES items 2, 8)."""
    return _backend_jit(a, shift_all_stride1=True)


def v7(a: dict):
    """Production (numba_cpu.conv2d_backward): shift only where C*k*k >= O, recycled dX,
    scratch from the backend's pool, small layers on fewer threads."""
    _, ctx = NB.conv2d_forward(a["x"], a["w"], a["b"], a["s"], a["p"])

    def run():
        dw, db = np.empty_like(a["w"]), np.empty_like(a["b"])
        dx = NB.conv2d_backward(a["dy"], ctx, a["w"], dw, db, a["need_dx"])
        return dx, dw, db
    return run


# --- v8: candidate ------------------------------------------------------------------------

#: Output channels per dW task of the candidate (a split fixed by the shape, not threads).
DW_BLOCK = 16


@jit()
def _dw_rows(x, dy, k, s, p, oh_n, ow_n, o0, o1, dwb, ct, xp, dt, shift):
    """dW rows o0..o1 (with db in the last column) summed over every image in order:
    [dW | db][o0:o1] += dy[n, o0:o1] @ [cols(x[n]); 1]^T, straight into the result."""
    ckk1 = dwb.shape[1]
    wp = x.shape[3] + 2 * p
    ln = oh_n * wp if shift else oh_n * ow_n
    m = o1 - o0
    for n in range(x.shape[0]):
        beta = 0.0 if n == 0 else 1.0
        if shift:
            K.shift_cols(x[n], k, p, oh_n, wp, xp, ct)
            for oc in range(m):
                for r in range(oh_n):
                    src = dy[n, o0 + oc, r * ow_n:]
                    dst = dt[oc, r * wp:]
                    for q in range(ow_n):
                        dst[q] = src[q]
            K.gemm(N_, T_, m, ckk1, ln, 1.0, dt, ln, ct, ln, beta, dwb[o0:], ckk1)
        else:
            K.im2col(x[n], k, s, p, oh_n, ow_n, ct)
            K.gemm(N_, T_, m, ckk1, ln, 1.0, dy[n, o0:], ln, ct, ln, beta, dwb[o0:], ckk1)


@jit()
def _dx_image(dyn, w2, k, s, p, oh_n, ow_n, dxn, dct, xp, dt, shift):
    o, ckk = w2.shape
    if shift:
        wp = dxn.shape[2] + 2 * p
        ln = oh_n * wp
        for oc in range(o):
            for r in range(oh_n):
                src = dyn[oc, r * ow_n:]
                dst = dt[oc, r * wp:]
                for q in range(ow_n):
                    dst[q] = src[q]
        K.gemm(T_, N_, ckk, ln, o, 1.0, w2, ckk, dt, ln, 0.0, dct, ln)
        K.shift_col2im(dct, k, p, oh_n, wp, xp, dxn)
    else:
        ln = oh_n * ow_n
        K.gemm(T_, N_, ckk, ln, o, 1.0, w2, ckk, dyn, ln, 0.0, dct, ln)
        K.col2im(dct, k, s, p, oh_n, ow_n, dxn)


@jit(parallel=True)
def _blocked(x, dy, w2, k, s, p, oh_n, ow_n, blocks, dwb, need_dx, dx, cols, dcols, xpad, dyp,
             shift):
    ckk = w2.shape[1]
    for t in prange(blocks.size - 1):
        K.fill(cols[t, ckk], 1.0)
        K.zero2(dyp[t])
        _dw_rows(x, dy, k, s, p, oh_n, ow_n, blocks[t], blocks[t + 1], dwb, cols[t], xpad[t],
                 dyp[t], shift)
    if need_dx:
        n_img = x.shape[0]
        workers = cols.shape[0]
        for t in prange(workers):
            K.zero2(dyp[t])
            for n in range(t * n_img // workers, (t + 1) * n_img // workers):
                _dx_image(dy[n], w2, k, s, p, oh_n, ow_n, dx[n], dcols[t], xpad[t], dyp[t],
                          shift)


def v8(a: dict):
    """Candidate: dW without partial buffers, tasks owning 16 output channels summing all
    images in order straight into dW (one im2col per image per task); dX in a second loop."""
    x, w = a["x"], a["w"]
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    s, p = a["s"], a["p"]
    oh, ow = conv_out(h, wd, k, s, p)
    shift = s == 1 and c * k * k >= o
    wp = wd + 2 * p
    ln = oh * wp if shift else oh * ow
    blocks = np.array([*range(0, o, DW_BLOCK), o], np.int64)
    t = max(len(blocks) - 1, min(n, threads()))
    dt = x.dtype
    cols = np.empty((t, c * k * k + 1, ln), dt)
    dcols = np.empty((t, c * k * k + 1, ln), dt)
    xpad = np.empty((t, c, (h + 2 * p) * wp) if shift and p else (t, 0, 0), dt)
    dyp = np.empty((t, DW_BLOCK if not a["need_dx"] else max(o, DW_BLOCK), ln) if shift
                   else (t, 0, 0), dt)

    def run():
        dx, dw, db = _outputs(a)
        dwb = np.empty((o, c * k * k + 1), dt)
        _blocked(x, a["dy"].reshape(n, o, -1), w.reshape(o, -1), k, s, p, oh, ow, blocks, dwb,
                 a["need_dx"], _dx_arg(a, dx), cols, dcols, xpad, dyp, shift)
        dw.reshape(o, -1)[...] = dwb[:, :-1]
        db[...] = dwb[:, -1]
        return dx, dw, db
    return run


CONV_BACKWARD = Op(
    family="conv_backward", name="conv2d_backward",
    versions=versions(v1, v2, v3, v4, v5, v6, v7, v8, production=7, candidates=(8,)),
    checks=lambda quick: _with_dx(conv_cases(quick, seed=2)), timings=_timed, make=make,
    reference=reference, flops=flops, nbytes=nbytes)


# --- op 2: MaxPool + ReLU + Conv backward -------------------------------------------------

def fused_make(case: Case, rng: np.random.Generator) -> dict:
    a = pool_inputs(case, rng)
    a["need_dx"] = case.p["need_dx"]
    y, arg = _pooled(a)
    a["dy"] = rng.standard_normal(y.shape, np.float32)
    return a


def _pooled(a: dict):
    r, _ = NB.conv2d_relu_forward(a["x"], a["w"], a["b"], a["s"], a["p"])
    y, ctx = NB.maxpool2d_forward(r, a["pk"], a["ps"])
    return y, ctx


def fused_reference(a: dict) -> tuple:
    d = f64(a)
    y, cctx = REF.conv2d_forward(d["x"], d["w"], d["b"], d["s"], d["p"])
    r = np.maximum(y, 0)
    _, pctx = REF.maxpool2d_forward(r, a["pk"], a["ps"])
    dr = REF.maxpool2d_backward(d["dy"], pctx) * (r > 0)
    dw, db = np.empty_like(d["w"]), np.empty_like(d["b"])
    dx = REF.conv2d_backward(dr, cctx, d["w"], dw, db, a["need_dx"])
    return dx, dw, db


def fused_v1(a: dict):
    """Production chain: maxpool2d_relu_backward writes the full-size dY of the conv,
    conv2d_backward reads it back."""
    r, cctx = NB.conv2d_relu_forward(a["x"], a["w"], a["b"], a["s"], a["p"])
    _, pctx = NB.maxpool2d_forward(r, a["pk"], a["ps"])

    def run():
        d = NB.maxpool2d_relu_backward(a["dy"], pctx)
        dw, db = np.empty_like(a["w"]), np.empty_like(a["b"])
        dx = NB.conv2d_backward(d, cctx, a["w"], dw, db, a["need_dx"])
        return dx, dw, db
    return run


@jit(parallel=True)
def _fused(x, dyp, arg, ypool, offs, ps, w2, k, p, oh_n, ow_n, chunk_lo, worker_lo, dwp,
           need_dx, dx, cols, dcols, xpad, dyw, dconv, shift, s):
    """Per image: unpool dY through the argmax and the ReLU mask into per-thread scratch,
    then the production per-image backward from there (fixed chunks as in production)."""
    ckk = w2.shape[1]
    o = w2.shape[0]
    for t in prange(cols.shape[0]):
        K.fill(cols[t, ckk], 1.0)
        K.zero2(dyw[t])
        for c in range(worker_lo[t], worker_lo[t + 1]):
            for n in range(chunk_lo[c], chunk_lo[c + 1]):
                plane = dconv[t]
                for oc in range(o):
                    K.unpool_plane(dyp[n, oc], arg[n, oc], ps, offs, plane[oc], ypool[n, oc],
                                   True)
                d2 = plane.reshape(o, oh_n * ow_n)
                if shift:
                    K.conv_bwd_image_s1(x[n], d2, w2, k, p, oh_n, ow_n, n == chunk_lo[c],
                                        dwp[c], need_dx, dx[n if need_dx else 0], cols[t],
                                        dcols[t], xpad[t], dyw[t])
                else:
                    K.conv_bwd_image(x[n], d2, w2, k, s, p, oh_n, ow_n, n == chunk_lo[c],
                                     dwp[c], need_dx, dx[n if need_dx else 0], cols[t],
                                     dcols[t])


def fused_v2(a: dict):
    """Candidate, fewer passes over activations: dY unpooled (argmax, ReLU mask) per image
    into per-thread scratch and fed to the conv backward from cache, never written out."""
    x, w = a["x"], a["w"]
    o, c, k, _ = w.shape
    shift = a["s"] == 1 and c * k * k >= o
    g = _setup(a, shift=shift)
    y, pctx = _pooled(a)
    arg, _, pk, ps, ypool = pctx
    t = g["cols"].shape[0]
    offs = np.array([ki * g["ow"] + kj for ki in range(pk) for kj in range(pk)], np.int64)
    dconv = np.empty((t, o, g["oh"], g["ow"]), x.dtype)

    def run():
        dx, dw, db = _outputs(a)
        _fused(x, a["dy"], arg, ypool, offs, ps, w.reshape(o, -1), k, a["p"], g["oh"], g["ow"],
               g["chunk_lo"], g["worker_lo"], g["dwp"], a["need_dx"], _dx_arg(a, dx),
               g["cols"], g["dcols"], g["xpad"], g["dyp"], dconv, shift, a["s"])
        K.reduce_chunks_t(g["dwp"], dw.reshape(o, -1), db)
        return dx, dw, db
    return run


def _fused_cases(quick: bool) -> list[Case]:
    return [Case(c.label + ("" if i % 2 else " +dx"), c.batch_size, {**c.p, "need_dx": i % 2 == 0})
            for i, c in enumerate(pool_cases(quick))]


def _fused_timed(quick: bool) -> list[Case]:
    return [Case(c.label + " +pool", c.batch_size, {**c.p, "pk": 2, "ps": 2})
            for c in _timed(quick)]


FUSED_BACKWARD = Op(
    family="conv_backward", name="maxpool2d_relu_conv2d_backward",
    versions=versions(fused_v1, fused_v2, production=1, candidates=(2,)),
    checks=_fused_cases, timings=_fused_timed, make=fused_make, reference=fused_reference,
    flops=flops, nbytes=nbytes)

OPS = [CONV_BACKWARD, FUSED_BACKWARD]
