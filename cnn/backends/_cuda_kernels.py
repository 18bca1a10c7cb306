"""Numba CUDA kernels of the ``cuda`` backend, built once per dtype (and GEMM tile shape).

Everything GEMM-shaped (convolution forward, dW and dX; dense forward, dW and dX)
is one structure: a block of ``TY x TX = 256`` threads computes a ``BM x BN`` tile
of ``C[M, N] = A[M, K] @ B[K, N]``, staging ``TK``-deep slices of A and B through
shared memory; each thread accumulates an ``RM x RN`` micro-tile in registers
(``mma``). The kernels differ only in how they *gather* A and B (convolution is
an implicit GEMM: no im2col buffer, the patches are read straight from the image
with zero padding done by bounds checks) and in their epilogue (bias, ReLU, where
the result goes). Every index is bounds-checked, so sizes that do not fill a tile
(batch 3, 7x9 images, 5 channels) are handled by the same code.

Convolution index maps, K ordered like the torch weight ``(c, i, j)``:

- forward: ``M = out channels``, ``N = images x output pixels``, ``K = C*kh*kw``;
- dW:      ``M = out channels``, ``N = C*kh*kw (+1)``, ``K = images x output pixels``;
- dX:      ``M = in channels``,  ``N = images x input pixels``, ``K = O*kh*kw``
  (a gather over the taps that reach each input pixel: race-free, no col2im scatter).

The ``(c, i, j)`` of a K index comes from a small int32 table (``taps``) built on the
host, so the inner loops do no integer division.

Weight gradients are race-free and deterministic: the long reduction over the
batch is split across blocks (``blockIdx.z``), each writes its partial tile to a
workspace, and ``reduce_splits`` sums the partials in a fixed order. The bias
gradient rides along as one extra GEMM column whose B operand is all ones
(``db[o] = sum_k dY[o, k] * 1``), so it costs no kernel of its own.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numba
import numpy as np
from numba import cuda

THREADS_1D = 256  # block size of the elementwise kernels
RM = RN = 4  # outputs per thread along M and N (register micro-tile)
TK = 16  # depth of the K slice staged through shared memory
PAD = 2  # shared-tile row padding: the k-fast stores below hit 32 distinct banks
#: (BM, BN) tile shapes, 256 threads each: square for wide M, flat for M <= 32
#: (first-layer convolutions, input-channel gradients) so fewer rows idle.
TILES = ((64, 64), (32, 128))


def pick_tile(m: int) -> tuple[int, int]:
    """The GEMM tile shape for a problem with ``m`` rows."""
    return TILES[1] if m <= TILES[1][0] else TILES[0]


def conv_taps(channels: int, k: int) -> np.ndarray:
    """``(3, channels*k*k)`` int32: the ``(channel, i, j)`` of each flat index of a
    ``(channels, k, k)`` filter block (the K axis of the implicit GEMMs)."""
    flat = np.arange(channels * k * k)
    return np.stack([flat // (k * k), flat // k % k, flat % k]).astype(np.int32)


@functools.cache
def gemm_kernels(dtype, bm: int, bn: int) -> SimpleNamespace:
    """The GEMM-shaped kernels for one dtype and one ``(BM, BN)`` tile (see module doc)."""
    dt = numba.from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)
    one = np.dtype(dtype).type(1)
    tyn, txn = bm // RM, bn // RN  # thread grid of a block
    nt = tyn * txn
    if nt % bn or nt % TK or (TK * bm) % nt or (TK * bn) % nt:
        raise ValueError(f"tile {bm}x{bn} does not map evenly onto {nt} threads")
    a_tile, b_tile = (TK, bm + PAD), (TK, bn + PAD)  # shared-memory shapes: compile-time

    def make_stage(width):
        @cuda.jit(device=True)
        def stage(src, kr, r0, k0, rows, kend, tile, ones_at, tid):
            """tile[kk, rr] = src[r0 + rr, k0 + kk] (src is (rows, K), k contiguous) or
            src[k0 + kk, r0 + rr] when ``kr`` (src is (K, rows)); 0 outside
            ``[0, rows) x [k0, kend)``, 1 on row ``ones_at`` (the bias column).
            Consecutive threads take consecutive addresses of src (coalesced)."""
            for e in range(tid, TK * width, nt):
                if kr:
                    kk = e // width
                    rr = e - kk * width
                else:
                    rr = e // TK
                    kk = e - rr * TK
                r = r0 + rr
                k = k0 + kk
                if k < kend and r < rows:
                    tile[kk, rr] = src[k, r] if kr else src[r, k]
                elif k < kend and r == ones_at:
                    tile[kk, rr] = one
                else:
                    tile[kk, rr] = zero
        return stage

    stage_a, stage_b = make_stage(bm), make_stage(bn)

    @cuda.jit(device=True)
    def mma(sa, sb, acc, ty, tx):
        """acc[i, j] += sum_kk sa[kk, ty + TY*i] * sb[kk, tx + TX*j] over the staged slice."""
        a = cuda.local.array(RM, dt)
        b = cuda.local.array(RN, dt)
        for kk in range(TK):
            for i in range(RM):
                a[i] = sa[kk, ty + tyn * i]
            for j in range(RN):
                b[j] = sb[kk, tx + txn * j]
            for i in range(RM):
                for j in range(RN):
                    acc[i, j] += a[i] * b[j]

    @cuda.jit(device=True)
    def clear(acc):
        for i in range(RM):
            for j in range(RN):
                acc[i, j] = zero

    @cuda.jit(device=True)
    def pixel(a, img, ch, yy, xx):
        """a[img, ch, yy, xx], or 0 outside the image (zero padding)."""
        if 0 <= yy < a.shape[2] and 0 <= xx < a.shape[3]:
            return a[img, ch, yy, xx]
        return zero

    @cuda.jit(device=True)
    def strided_pixel(a, img, ch, ty, tx, stride):
        """a[img, ch, ty / stride, tx / stride] where both divide exactly and land inside."""
        if ty < 0 or tx < 0:
            return zero
        if stride == 1:
            return pixel(a, img, ch, ty, tx)
        oy = ty // stride
        ox = tx // stride
        if oy * stride != ty or ox * stride != tx:
            return zero
        return pixel(a, img, ch, oy, ox)

    @cuda.jit
    def gemm(a, a_kr, b, b_kr, out, bias, has_bias, ones_at, k_chunk):
        """out[z, m, n] = sum over split z of A[m, k] B[k, n] (+ bias[n]); A is a (M, K) or,
        with ``a_kr``, (K, M); B is (N, K) or, with ``b_kr``, (K, N); B's row ``ones_at``
        (= N of the weights, when out has one column more) reads as ones."""
        m_rows = a.shape[1] if a_kr else a.shape[0]
        k_len = a.shape[0] if a_kr else a.shape[1]
        b_rows = b.shape[1] if b_kr else b.shape[0]
        n_cols = out.shape[2]
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0, z = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn, cuda.blockIdx.z
        k_lo = z * k_chunk
        k_hi = min(k_len, k_lo + k_chunk)
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        for k0 in range(k_lo, k_hi, TK):
            stage_a(a, a_kr, m0, k0, m_rows, k_hi, sa, -1, tid)
            stage_b(b, b_kr, n0, k0, b_rows, k_hi, sb, ones_at, tid)
            cuda.syncthreads()
            mma(sa, sb, acc, ty, tx)
            cuda.syncthreads()
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < m_rows and n < n_cols:
                    out[z, m, n] = acc[i, j] + bias[n] if has_bias else acc[i, j]

    @cuda.jit
    def conv_fwd(x, w2, bias, taps, y3, ow, stride, pad, relu):
        """y3[img, o, p] = relu?(bias[o] + sum_k w2[o, k] * patch(img, p)[k]): implicit GEMM,
        M = O, N = images x pixels, K = C*kh*kw; y3 is the output viewed (N, O, OH*OW)."""
        c_out, k_len = w2.shape
        npix = y3.shape[2]
        n_cols = y3.shape[0] * npix
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        # the output pixel whose patch this thread gathers, the same for every K slice
        nn = tid % bn
        n = n0 + nn
        img = n // npix
        oy = (n - img * npix) // ow
        y0 = oy * stride - pad
        x0 = (n - img * npix - oy * ow) * stride - pad
        for k0 in range(0, k_len, TK):
            stage_a(w2, False, m0, k0, c_out, k_len, sa, -1, tid)
            for kk in range(tid // bn, TK, nt // bn):
                k = k0 + kk
                if n < n_cols and k < k_len:
                    sb[kk, nn] = pixel(x, img, taps[0, k], y0 + taps[1, k], x0 + taps[2, k])
                else:
                    sb[kk, nn] = zero
            cuda.syncthreads()
            mma(sa, sb, acc, ty, tx)
            cuda.syncthreads()
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < c_out and n < n_cols:
                    v = acc[i, j] + bias[m]
                    if relu and v < zero:
                        v = zero
                    img = n // npix
                    y3[img, m, n - img * npix] = v

    @cuda.jit
    def conv_dw(x, dy3, taps, ws, ow, stride, pad, imgs_per_split):
        """ws[z, o, k] = sum over the images of split z and their pixels p of
        dy3[img, o, p] * patch(img, p)[k], for k < C*kh*kw; column C*kh*kw is sum dy (db)."""
        c_out, npix = dy3.shape[1], dy3.shape[2]
        k_cols = taps.shape[1]
        n_cols = ws.shape[2]
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0, z = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn, cuda.blockIdx.z
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        kk = tid % TK  # this thread's pixel offset inside each staged slice
        img_lo = z * imgs_per_split
        for img in range(img_lo, min(x.shape[0], img_lo + imgs_per_split)):
            for p0 in range(0, npix, TK):
                stage_a(dy3[img], False, m0, p0, c_out, npix, sa, -1, tid)
                p = p0 + kk
                oy = p // ow
                y0 = oy * stride - pad
                x0 = (p - oy * ow) * stride - pad
                for nn in range(tid // TK, bn, nt // TK):
                    n = n0 + nn
                    if p < npix and n < k_cols:
                        sb[kk, nn] = pixel(x, img, taps[0, n], y0 + taps[1, n], x0 + taps[2, n])
                    elif p < npix and n == k_cols:
                        sb[kk, nn] = one
                    else:
                        sb[kk, nn] = zero
                cuda.syncthreads()
                mma(sa, sb, acc, ty, tx)
                cuda.syncthreads()
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < c_out and n < n_cols:
                    ws[z, m, n] = acc[i, j]

    @cuda.jit
    def conv_dx(dy, w, taps, dx3, wd, stride, pad):
        """dx3[img, c, q] = sum over (o, i, j) of w[o, c, i, j] * dy[img, o, oy, ox] where input
        pixel q = (hy, hx) is tap (i, j) of output pixel (oy, ox): a gather, race-free.
        M = C, N = images x input pixels, K = O*kh*kw; dx3 is dx viewed (N, C, H*W)."""
        c_in, npix = dx3.shape[1], dx3.shape[2]
        n_cols = dx3.shape[0] * npix
        k_len = taps.shape[1]
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        nn = tid % bn  # the input pixel this thread gathers for, fixed over the K loop
        n = n0 + nn
        img = n // npix
        hy = (n - img * npix) // wd
        hx = n - img * npix - hy * wd
        ka = tid % TK  # this thread's K offset when staging A (k-fast: w is (O, C, kh, kw))
        for k0 in range(0, k_len, TK):
            k = k0 + ka
            for mm in range(tid // TK, bm, nt // TK):
                if k < k_len and m0 + mm < c_in:
                    sa[ka, mm] = w[taps[0, k], m0 + mm, taps[1, k], taps[2, k]]
                else:
                    sa[ka, mm] = zero
            for kk in range(tid // bn, TK, nt // bn):
                k = k0 + kk
                if n < n_cols and k < k_len:
                    sb[kk, nn] = strided_pixel(dy, img, taps[0, k], hy + pad - taps[1, k],
                                               hx + pad - taps[2, k], stride)
                else:
                    sb[kk, nn] = zero
            cuda.syncthreads()
            mma(sa, sb, acc, ty, tx)
            cuda.syncthreads()
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < c_in and n < n_cols:
                    img = n // npix
                    dx3[img, m, n - img * npix] = acc[i, j]

    return SimpleNamespace(gemm=gemm, conv_fwd=conv_fwd, conv_dw=conv_dw, conv_dx=conv_dx,
                           bm=bm, bn=bn, block=(txn, tyn))


@functools.cache
def pointwise_kernels(dtype) -> SimpleNamespace:
    """Elementwise, pooling, loss, reduction and optimiser kernels for one dtype.

    All use grid-stride loops over flat indices; typed constants keep float32 maths
    in float32 (a bare ``1.0`` would promote it to float64)."""
    zero = np.dtype(dtype).type(0)
    one = np.dtype(dtype).type(1)

    @cuda.jit
    def fill(a, value):
        for e in range(cuda.grid(1), a.size, cuda.gridsize(1)):
            a[e] = value

    @cuda.jit
    def reduce_splits(ws, dw2, db):
        """dw2[m, n] = sum_z ws[z, m, n], z in order (deterministic); the last column -> db[m]."""
        splits, rows, cols = ws.shape
        for e in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
            m = e // cols
            n = e - m * cols
            s = ws[0, m, n]
            for z in range(1, splits):
                s += ws[z, m, n]
            if n < cols - 1:
                dw2[m, n] = s
            else:
                db[m] = s

    @cuda.jit
    def relu_fwd(x, y):
        for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            y[e] = x[e] if x[e] > zero else zero

    @cuda.jit
    def relu_bwd(dy, y, dx):
        for e in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
            dx[e] = dy[e] if y[e] > zero else zero

    @cuda.jit
    def sigmoid_fwd(x, y):
        for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            t = math.exp(-abs(x[e]))  # exp of a non-positive number: no overflow
            y[e] = one / (one + t) if x[e] >= zero else t / (one + t)

    @cuda.jit
    def sigmoid_bwd(dy, y, dx):
        for e in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
            dx[e] = dy[e] * y[e] * (one - y[e])

    @cuda.jit
    def maxpool_fwd(x, y, arg, k, s):
        """Max over each k x k window; arg = i*k + j of the first maximum (torch's tie rule)."""
        _, chans, oh, ow = y.shape
        for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
            ox = e % ow
            oy = e // ow % oh
            ch = e // (ow * oh) % chans
            img = e // (ow * oh * chans)
            best = x[img, ch, oy * s, ox * s]
            off = 0
            for i in range(k):
                for j in range(k):
                    v = x[img, ch, oy * s + i, ox * s + j]
                    if v > best:
                        best = v
                        off = i * k + j
            y[img, ch, oy, ox] = best
            arg[img, ch, oy, ox] = off

    @cuda.jit
    def maxpool_bwd(dy, arg, dx, k, s):
        """dx[pixel] = sum of dy over the windows whose maximum it was: a gather, race-free."""
        _, chans, h, w = dx.shape
        oh, ow = dy.shape[2], dy.shape[3]
        for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
            hx = e % w
            hy = e // w % h
            ch = e // (w * h) % chans
            img = e // (w * h * chans)
            acc = zero
            # windows oy*s <= hy < oy*s + k, clipped to the output
            for oy in range(max(0, (hy - k + s) // s), min(oh, hy // s + 1)):
                for ox in range(max(0, (hx - k + s) // s), min(ow, hx // s + 1)):
                    if arg[img, ch, oy, ox] == (hy - oy * s) * k + hx - ox * s:
                        acc += dy[img, ch, oy, ox]
            dx[img, ch, hy, hx] = acc

    @cuda.jit
    def softmax_xent(logits, labels, grad, logp_label, n_rows):
        """Per row: log-softmax via log-sum-exp; grad = (softmax - onehot) / n_rows;
        logp_label[r] = log p(label r) (the host averages these in float64)."""
        r = cuda.grid(1)
        if r < logits.shape[0]:
            classes = logits.shape[1]
            mx = logits[r, 0]
            for j in range(1, classes):
                mx = max(mx, logits[r, j])
            total = zero
            for j in range(classes):
                total += math.exp(logits[r, j] - mx)
            lse = math.log(total)
            lab = labels[r]
            logp_label[r] = logits[r, lab] - mx - lse
            for j in range(classes):
                g = math.exp(logits[r, j] - mx - lse)
                if j == lab:
                    g -= one
                grad[r, j] = g / n_rows

    @cuda.jit
    def sgd(p, g, vel, lr, momentum, dampening, weight_decay, nesterov, first_step):
        """torch.optim.SGD on flat buffers, one element per thread."""
        for e in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            d = g[e] + weight_decay * p[e] if weight_decay != zero else g[e]
            if momentum != zero:
                v = d if first_step else momentum * vel[e] + (one - dampening) * d
                vel[e] = v
                d = d + momentum * v if nesterov else v
            p[e] -= lr * d

    @cuda.jit
    def adam(p, g, m, v, lr_bc1, beta1, beta2, sqrt_bc2, eps, weight_decay):
        """torch.optim.Adam on flat buffers; the bias corrections come in precomputed."""
        for e in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            d = g[e] + weight_decay * p[e] if weight_decay != zero else g[e]
            m1 = beta1 * m[e] + (one - beta1) * d
            v1 = beta2 * v[e] + (one - beta2) * d * d
            m[e] = m1
            v[e] = v1
            p[e] -= lr_bc1 * (m1 / (math.sqrt(v1) / sqrt_bc2 + eps))

    return SimpleNamespace(fill=fill, reduce_splits=reduce_splits, relu_fwd=relu_fwd,
                           relu_bwd=relu_bwd, sigmoid_fwd=sigmoid_fwd, sigmoid_bwd=sigmoid_bwd,
                           maxpool_fwd=maxpool_fwd, maxpool_bwd=maxpool_bwd,
                           softmax_xent=softmax_xent, sgd=sgd, adam=adam)
