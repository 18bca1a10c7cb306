"""Convolution forward (NCHW cross-correlation + bias, optionally followed by a ReLU):
from the textbook loop nest to the backend's fused Conv+ReLU, then candidates.

v1-v6 allocate their outputs on every call, as the backend did before it recycled them
(benchmarks/NOTES.md item 6); per-thread scratch is set up once, as it always was.
The second op, Conv+ReLU+MaxPool, times the production chain against one fused pass.
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
    Case,
    K,
    Op,
    U,
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

# --- the reference ----------------------------------------------------------------------


def reference(a: dict) -> tuple:
    d = f64(a)
    y, _ = REF.conv2d_forward(d["x"], d["w"], d["b"], d["s"], d["p"])
    return (np.maximum(y, 0) if a["relu"] else y,)


# --- v1, v2: loop nests ----------------------------------------------------------------

@jit()
def _naive_plane(xn, wo, bo, s, p, relu, yp):
    """One output plane: every output a dot product over C*k*k taps, bounds checked."""
    cin, h, wd = xn.shape
    k = wo.shape[1]
    oh_n, ow_n = yp.shape
    zero = yp.dtype.type(0)
    for r in range(oh_n):
        for q in range(ow_n):
            acc = bo
            for c in range(cin):
                for ki in range(k):
                    ih = r * s + ki - p
                    if ih < 0 or ih >= h:
                        continue
                    for kj in range(k):
                        iw = q * s + kj - p
                        if iw >= 0 and iw < wd:
                            acc += xn[c, ih, iw] * wo[c, ki, kj]
            yp[r, q] = zero if relu and acc < zero else acc


@jit()
def _naive(x, w, b, s, p, relu, y):
    for n in range(x.shape[0]):
        for oc in range(w.shape[0]):
            _naive_plane(x[n], w[oc], b[oc], s, p, relu, y[n, oc])


@jit(parallel=True)
def _naive_prange(x, w, b, s, p, relu, y):
    o = w.shape[0]
    for task in prange(x.shape[0] * o):
        n = task // o
        oc = task - n * o
        _naive_plane(x[n], w[oc], b[oc], s, p, relu, y[n, oc])


def _out_shape(a: dict) -> tuple[int, int, int, int]:
    n, _, h, w = a["x"].shape
    oh, ow = conv_out(h, w, a["w"].shape[2], a["s"], a["p"])
    return n, a["w"].shape[0], oh, ow


def v1(a: dict):
    """The textbook loop nest: C*k*k multiply-adds per output, the input re-read for every
    output channel, one thread (the baseline every rung is measured against)."""
    def run():
        y = np.empty(_out_shape(a), a["x"].dtype)
        _naive(a["x"], a["w"], a["b"], a["s"], a["p"], a["relu"], y)
        return (y,)
    return run


def v2(a: dict):
    """prange over (image, out-channel) planes: the same arithmetic on every core; each
    output has one owner, so any thread count gives the same bits."""
    def run():
        y = np.empty(_out_shape(a), a["x"].dtype)
        _naive_prange(a["x"], a["w"], a["b"], a["s"], a["p"], a["relu"], y)
        return (y,)
    return run


# --- v3, v4: im2col + sgemm per image, bias added after ---------------------------------

@jit()
def im2col_signed(xn, k, s, p, oh_n, ow_n, cols):
    """The first im2col: signed indices and a bounds check per element (Numba's negative
    index wraparound adds a compare per access, and LLVM does not vectorise the copy)."""
    cin, h, w = xn.shape
    for c in range(cin):
        for ki in range(k):
            for kj in range(k):
                row = (c * k + ki) * k + kj
                for r in range(oh_n):
                    ih = r * s + ki - p
                    for q in range(ow_n):
                        iw = q * s + kj - p
                        v = xn[c, ih, iw] if 0 <= ih < h and 0 <= iw < w else 0.0
                        cols[row, r * ow_n + q] = v


@jit()
def _gemm_image(xn, wb, k, s, p, oh_n, ow_n, yn, ct, signed):
    o, ckk1 = wb.shape
    ckk = ckk1 - 1
    ln = oh_n * ow_n
    if signed:
        im2col_signed(xn, k, s, p, oh_n, ow_n, ct)
    else:
        K.im2col(xn, k, s, p, oh_n, ow_n, ct)
    K.gemm(N_, N_, o, ln, ckk, 1.0, wb, ckk1, ct, ln, 0.0, yn, ln)
    for oc in range(o):
        bo = wb[oc, ckk]
        row = yn[oc]
        for i in range(ln):
            row[i] += bo


@jit(parallel=True)
def _im2col_gemm(x, wb, k, s, p, oh_n, ow_n, y, cols, signed):
    n_img = x.shape[0]
    workers = cols.shape[0]
    for t in prange(workers):
        for n in range(t * n_img // workers, (t + 1) * n_img // workers):
            _gemm_image(x[n], wb, k, s, p, oh_n, ow_n, y[n], cols[t], signed)


def _wb(a: dict) -> np.ndarray:
    o = a["w"].shape[0]
    return np.ascontiguousarray(np.concatenate([a["w"].reshape(o, -1), a["b"][:, None]], 1))


def _relu_pass(y: np.ndarray) -> np.ndarray:
    """The separate ReLU layer of the unfused network: a new array, one more pass."""
    r = np.empty_like(y)
    K.relu_forward(y.reshape(-1), r.reshape(-1))
    return r


def _plain_gemm(a: dict, signed: bool):
    n, o, oh, ow = _out_shape(a)
    k, s, p = a["w"].shape[2], a["s"], a["p"]
    wb = _wb(a)
    cols = np.empty((max(1, min(n, threads())), wb.shape[1], oh * ow), a["x"].dtype)

    def run():
        y = np.empty((n, o, oh, ow), a["x"].dtype)
        _im2col_gemm(a["x"], wb, k, s, p, oh, ow, y.reshape(n, o, -1), cols, signed)
        return (_relu_pass(y) if a["relu"] else y,)
    return run


def v3(a: dict):
    """im2col one image at a time into per-thread scratch, then one BLAS sgemm per image
    (BLAS on 1 thread, prange over images): the multiply-adds move into a tuned GEMM."""
    return _plain_gemm(a, signed=True)


def v4(a: dict):
    """Unsigned indices on 1-D rows in im2col: no wraparound branch, so the copies
    vectorise (NOTES item 8: plain im2col 18 -> 2.2 ms)."""
    return _plain_gemm(a, signed=False)


# --- v5, v6: the backend's jitted kernels, called directly ------------------------------

def _backend_jit(a: dict, shift_all_stride1: bool):
    n, o, oh, ow = _out_shape(a)
    c, k, s, p = a["x"].shape[1], a["w"].shape[2], a["s"], a["p"]
    wp = a["x"].shape[3] + 2 * p
    shift = shift_all_stride1 and s == 1
    t = max(1, min(n, threads()))
    dt = a["x"].dtype
    wb = _wb(a)
    cols = np.empty((t, wb.shape[1], oh * wp if shift else oh * ow), dt)
    xpad = np.empty((t, c, (a["x"].shape[2] + 2 * p) * wp) if shift and p else (t, 0, 0), dt)
    ypad = np.empty((t, o, oh * wp) if shift else (t, 0, 0), dt)

    def run():
        y = np.empty((n, o, oh, ow), dt)
        y3 = y.reshape(n, o, -1)
        if shift:
            K.conv2d_forward_s1(a["x"], wb, k, p, oh, ow, y3, cols, xpad, ypad, False)
        else:
            K.conv2d_forward(a["x"], wb, k, s, p, oh, ow, y3, cols, False)
        return (_relu_pass(y) if a["relu"] else y,)
    return run


def v5(a: dict):
    """The bias rides in the GEMM: [W | b] @ [cols; 1] (a row of ones), no separate bias
    pass over the output (NOTES item 7)."""
    return _backend_jit(a, shift_all_stride1=False)


def v6(a: dict):
    """Stride 1: "shift" im2col on the padded width, one contiguous copy per column row;
    the GEMM computes (k-1)/Wp garbage columns, dropped on the copy out (NOTES item 2)."""
    return _backend_jit(a, shift_all_stride1=True)


# --- v7, v8: production ------------------------------------------------------------------

def v7(a: dict):
    """Production, unfused (numba_cpu.conv2d_forward + relu_forward): shift only where
    C*k*k >= O (item 13), recycled outputs (item 6), small kernels on fewer threads."""
    def run():
        y, _ = NB.conv2d_forward(a["x"], a["w"], a["b"], a["s"], a["p"])
        return (NB.relu_forward(y)[0] if a["relu"] else y,)
    return run


def v8(a: dict):
    """Production as Network runs it: numba_cpu.conv2d_relu_forward applies the ReLU while
    the GEMM output is still in cache, saving a pass over the largest activation (item 18)."""
    def run():
        f = NB.conv2d_relu_forward if a["relu"] else NB.conv2d_forward
        return (f(a["x"], a["w"], a["b"], a["s"], a["p"])[0],)
    return run


# --- v9, v10: candidates -------------------------------------------------------------------

#: Output channels per direct-convolution task: their rows stay in L1 while one input row
#: is reused for all of them.
DIRECT_OC = 8


@jit()
def _direct_block(xn, w, b, s, p, relu, yn, o0, o1):
    cin, h, wd = xn.shape
    k = w.shape[2]
    oh_n, ow_n = yn.shape[1], yn.shape[2]
    zero = yn.dtype.type(0)
    for oc in range(o0, o1):
        for r in range(oh_n):
            for q in range(ow_n):
                yn[oc, r, q] = b[oc]
    for c in range(cin):
        for ki in range(k):
            for r in range(oh_n):
                ih = r * s + ki - p
                if ih < 0 or ih >= h:
                    continue
                xr = xn[c, ih]
                for kj in range(k):
                    lo, hi = K.out_range(kj, s, p, wd, ow_n)
                    src = U(lo * s + kj - p)
                    for oc in range(o0, o1):
                        wv = w[oc, c, ki, kj]
                        yr = yn[oc, r]
                        if s == 1:
                            for j in range(U(hi - lo)):
                                yr[U(lo) + j] += wv * xr[src + j]
                        else:
                            for j in range(U(hi - lo)):
                                yr[U(lo) + j] += wv * xr[src + j * U(s)]
    if relu:
        for oc in range(o0, o1):
            for r in range(oh_n):
                for q in range(ow_n):
                    if not yn[oc, r, q] > zero:
                        yn[oc, r, q] = zero


@jit(parallel=True)
def _direct(x, w, b, s, p, relu, y, ob):
    o = w.shape[0]
    nb = (o + ob - 1) // ob
    for task in prange(x.shape[0] * nb):
        n = task // nb
        j = task - n * nb
        _direct_block(x[n], w, b, s, p, relu, y[n], j * ob, min(o, (j + 1) * ob))


def v9(a: dict):
    """Candidate: direct convolution, each input row feeding 8 output channels' rows: no
    column matrix, which for conv1's 9 or 27 taps costs more than its thin GEMM."""
    def run():
        y = np.empty(_out_shape(a), a["x"].dtype)
        _direct(a["x"], a["w"], a["b"], a["s"], a["p"], a["relu"], y, DIRECT_OC)
        return (y,)
    return run


#: Images per GEMM in the grouped candidate.
GROUP = 4


@jit()
def _group_images(x, wb, k, s, p, oh_n, ow_n, y, n0, n1, ct, xp, yg, relu, shift):
    """Columns of images n0..n1 side by side, one GEMM of width G*L, copied out per image."""
    o, ckk1 = wb.shape
    wp = x.shape[3] + 2 * p
    ln = oh_n * wp if shift else oh_n * ow_n
    width = (n1 - n0) * ln
    zero = y.dtype.type(0)
    for g in range(n1 - n0):
        block = ct[:, g * ln:(g + 1) * ln]
        if shift:
            K.shift_cols(x[n0 + g], k, p, oh_n, wp, xp, block)
        else:
            K.im2col(x[n0 + g], k, s, p, oh_n, ow_n, block)
    K.gemm(N_, N_, o, width, ckk1, 1.0, wb, ckk1, ct, ct.shape[1], 0.0, yg, yg.shape[1])
    for g in range(n1 - n0):
        for oc in range(o):
            for r in range(oh_n):
                src = yg[oc, g * ln + r * (wp if shift else ow_n):]
                dst = y[n0 + g, oc, r]
                for q in range(ow_n):
                    v = src[q]
                    dst[q] = zero if relu and not v > zero else v


@jit(parallel=True)
def _grouped(x, wb, k, s, p, oh_n, ow_n, y, cols, xpad, ypad, relu, shift, group):
    n_img = x.shape[0]
    workers = cols.shape[0]
    ngroups = (n_img + group - 1) // group
    ckk = wb.shape[1] - 1
    for t in prange(workers):
        K.fill(cols[t, ckk], 1.0)
        for gi in range(t * ngroups // workers, (t + 1) * ngroups // workers):
            n0 = gi * group
            _group_images(x, wb, k, s, p, oh_n, ow_n, y, n0, min(n_img, n0 + group), cols[t],
                          xpad[t], ypad[t], relu, shift)


def v10(a: dict):
    """Candidate: larger per-thread tiles, 4 images' columns side by side in one wider GEMM
    (item 3 saw no gain when every layer used the shift layout; re-measured here)."""
    n, o, oh, ow = _out_shape(a)
    c, k, s, p = a["x"].shape[1], a["w"].shape[2], a["s"], a["p"]
    shift = s == 1 and c * k * k >= o
    wp = a["x"].shape[3] + 2 * p
    ln = oh * wp if shift else oh * ow
    t = max(1, min(-(-n // GROUP), threads()))
    dt = a["x"].dtype
    wb = _wb(a)
    cols = np.empty((t, wb.shape[1], GROUP * ln), dt)
    xpad = np.empty((t, c, (a["x"].shape[2] + 2 * p) * wp) if shift and p else (t, 0, 0), dt)
    ypad = np.empty((t, o, GROUP * ln), dt)

    def run():
        y = np.empty((n, o, oh, ow), dt)
        _grouped(a["x"], wb, k, s, p, oh, ow, y, cols, xpad, ypad, a["relu"], shift, GROUP)
        return (y,)
    return run


CONV = Op(
    family="conv_forward", name="conv2d_forward",
    versions=versions(v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, production=8,
                      candidates=(9, 10)),
    checks=conv_cases, timings=lambda quick: QUICK_CONVS if quick else SEED_CONVS,
    make=conv_inputs, reference=reference, flops=conv_flops, nbytes=conv_bytes)


# --- op 2: Conv + ReLU + MaxPool -----------------------------------------------------------

def pool_cases(quick: bool) -> list[Case]:
    """Conv cases whose output fits the pooling window; window/stride 2/2, 3/2, 2/1, 3/3."""
    out = []
    windows = [(2, 2), (3, 2), (2, 1), (3, 3)]
    for case in conv_cases(quick, seed=1):
        q = case.p
        oh, ow = conv_out(q["h"], q["w"], q["k"], q["s"], q["p"])
        pk, ps = windows[len(out) % len(windows)]
        if min(oh, ow) >= pk:
            out.append(Case(f"{case.label.removesuffix(' relu')} pool{pk}/{ps}", case.batch_size,
                            {**q, "relu": True, "pk": pk, "ps": ps}))
    return out


def _timed_pool_cases(quick: bool) -> list[Case]:
    return [Case(c.label + " +pool", c.batch_size, {**c.p, "pk": 2, "ps": 2})
            for c in (QUICK_CONVS if quick else SEED_CONVS)]


def pool_inputs(case: Case, rng: np.random.Generator) -> dict:
    return {**conv_inputs(case, rng), "pk": case.p["pk"], "ps": case.p["ps"]}


def pool_reference(a: dict) -> tuple:
    (r,) = reference({**a, "relu": True})
    return (REF.maxpool2d_forward(r, a["pk"], a["ps"])[0],)


def pool_v1(a: dict):
    """Production chain: conv2d_relu_forward writes the full-size activation, then
    maxpool2d_forward reads it back."""
    def run():
        r, _ = NB.conv2d_relu_forward(a["x"], a["w"], a["b"], a["s"], a["p"])
        return (NB.maxpool2d_forward(r, a["pk"], a["ps"])[0],)
    return run


@jit()
def _pool_scratch(ys, oh_n, ow_n, pk, ps, y, arg):
    """Max-pool each plane of one image's conv output (still in cache) into y and arg."""
    ph, pw = y.shape[1], y.shape[2]
    for oc in range(y.shape[0]):
        plane = ys[oc].reshape(oh_n, ow_n)
        for r in range(ph):
            if pk == 2 and ps == 2:
                K.pool_row22(plane[2 * r], plane[2 * r + 1], y[oc, r], arg[oc, r], pw)
            else:
                K.pool_row(plane, r, pk, ps, y[oc, r], arg[oc, r], pw)


@jit(parallel=True)
def _conv_relu_pool(x, wb, k, s, p, oh_n, ow_n, pk, ps, y, arg, cols, xpad, ypad, ys, shift):
    n_img = x.shape[0]
    workers = cols.shape[0]
    ckk = wb.shape[1] - 1
    for t in prange(workers):
        K.fill(cols[t, ckk], 1.0)
        for n in range(t * n_img // workers, (t + 1) * n_img // workers):
            if shift:
                K.conv_fwd_image_s1(x[n], wb, k, p, oh_n, ow_n, ys[t], cols[t], xpad[t],
                                    ypad[t], True)
            else:
                K.conv_fwd_image(x[n], wb, k, s, p, oh_n, ow_n, ys[t], cols[t], True)
            _pool_scratch(ys[t], oh_n, ow_n, pk, ps, y[n], arg[n])


def pool_v2(a: dict):
    """Candidate, fewer passes over activations: conv+ReLU per image into per-thread scratch,
    pooled from cache; the full-size activation is never written to memory."""
    n, o, oh, ow = _out_shape(a)
    c, k, s, p, pk, ps = a["x"].shape[1], a["w"].shape[2], a["s"], a["p"], a["pk"], a["ps"]
    shift = s == 1 and c * k * k >= o
    wp = a["x"].shape[3] + 2 * p
    t = max(1, min(n, threads()))
    dt = a["x"].dtype
    wb = _wb(a)
    cols = np.empty((t, wb.shape[1], oh * wp if shift else oh * ow), dt)
    xpad = np.empty((t, c, (a["x"].shape[2] + 2 * p) * wp) if shift and p else (t, 0, 0), dt)
    ypad = np.empty((t, o, oh * wp) if shift else (t, 0, 0), dt)
    ys = np.empty((t, o, oh * ow), dt)
    ph, pw = (oh - pk) // ps + 1, (ow - pk) // ps + 1

    def run():
        y = np.empty((n, o, ph, pw), dt)
        arg = np.empty((n, o, ph, pw), np.uint8)
        _conv_relu_pool(a["x"], wb, k, s, p, oh, ow, pk, ps, y, arg, cols, xpad, ypad, ys,
                        shift)
        return (y,)
    return run


def pool_flops(case: Case) -> float:
    return conv_flops(case)


def pool_bytes(case: Case) -> float:
    q = case.p
    oh, ow = conv_out(q["h"], q["w"], q["k"], q["s"], q["p"])
    ph, pw = (oh - q["pk"]) // q["ps"] + 1, (ow - q["pk"]) // q["ps"] + 1
    return conv_bytes(case) - 4.0 * q["n"] * q["o"] * (oh * ow - ph * pw)


CONV_RELU_POOL = Op(
    family="conv_forward", name="conv2d_relu_maxpool_forward",
    versions=versions(pool_v1, pool_v2, production=1, candidates=(2,)),
    checks=pool_cases, timings=_timed_pool_cases, make=pool_inputs, reference=pool_reference,
    flops=pool_flops, nbytes=pool_bytes)

OPS = [CONV, CONV_RELU_POOL]
