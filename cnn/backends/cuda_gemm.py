"""GEMM-shaped CUDA kernels of the ``cuda`` backend, built once per dtype and tile shape.

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

Split-K in one launch. When a problem has fewer output tiles than the GPU has
multiprocessors (the dense layers, every weight gradient), the K range is split
over ``gridDim.z`` blocks per tile. Each writes its partial tile to a workspace
``ws[z]``, then takes a ticket from a per-tile counter; the block that draws the
last ticket sums ``ws[0..splits-1]`` *in z order* and runs the epilogue. The sum
order never depends on which block finishes last, so results are bitwise
deterministic run to run (no float atomics), and no second "reduce" kernel is
launched. The counters are left at zero for the next launch.

The bias gradient rides along as one extra GEMM column whose B operand is all ones
(``db[o] = sum_k dY[o, k] * 1``), so it costs no kernel of its own.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numba
import numpy as np
from numba import config, cuda, types

RM = RN = 4  # outputs per thread along M and N (register micro-tile)
TK = 16  # depth of the K slice staged through shared memory
PAD = 2  # shared-tile row padding: the k-fast stores below hit 32 distinct banks
THREADS = 256  # threads per GEMM block: (BM / RM) * (BN / RN)
#: (BM, BN) tile shapes, 256 threads each: square for wide M, flat for M <= 32
#: (first-layer convolutions, input-channel gradients) so fewer rows idle.
TILES = ((64, 64), (32, 128))
#: Minimum resident blocks per SM asked of the compiler (launch bounds, 256 threads),
#: which caps registers per thread: 4 -> 64 (50% occupancy), 3 -> 80 (37.5%),
#: 2 -> 128 (25%). Each is the highest that compiles for sm_90 without spills
#: (``python -m cnn.backends.cuda_compile``): float32 conv_dx needs 120 registers
#: (80 spill 96 bytes); float64 kernels need 103-126 (checks only, not timed).
MIN_BLOCKS_PER_SM = {("gemm", "float32"): 4, ("conv_fwd", "float32"): 3,
                     ("conv_dw", "float32"): 3, ("conv_dx", "float32"): 2}


def launch_bounds(name: str, dtype) -> tuple[int, int]:
    """``(threads per block, min blocks per SM)`` for GEMM kernel ``name``."""
    return THREADS, MIN_BLOCKS_PER_SM.get((name, np.dtype(dtype).name), 2)


def pick_tile(m: int) -> tuple[int, int]:
    """The GEMM tile shape for a problem with ``m`` rows."""
    return TILES[1] if m <= TILES[1][0] else TILES[0]


def conv_taps(channels: int, k: int) -> np.ndarray:
    """``(3, channels*k*k)`` int32: the ``(channel, i, j)`` of each flat index of a
    ``(channels, k, k)`` filter block (the K axis of the implicit GEMMs)."""
    flat = np.arange(channels * k * k)
    return np.stack([flat // (k * k), flat // k % k, flat % k]).astype(np.int32)


def signatures(dtype) -> dict[str, tuple]:
    """The argument types each GEMM kernel is compiled for (C-contiguous arrays).

    The backend launches nothing else: ``numba_cuda`` checks every launch against
    these in the simulator, and ``cuda_compile`` compiles exactly these for sm_90.
    """
    f = numba.from_dtype(np.dtype(dtype))
    f1, f2, f3, f4 = f[::1], f[:, ::1], f[:, :, ::1], f[:, :, :, ::1]
    i32_1, i32_2 = types.int32[::1], types.int32[:, ::1]
    i, b = types.int64, types.boolean
    return {
        # a, a_kr, b, b_kr, out, bias, has_bias, db, ones_at, k_chunk, ws, counters
        "gemm": (f2, b, f2, b, f2, f1, b, f1, i, i, f3, i32_1),
        # x, w2, bias, taps, y3, ow, stride, pad, relu, k_chunk, ws, counters
        "conv_fwd": (f4, f2, f1, i32_2, f3, i, i, i, b, i, f3, i32_1),
        # x, dy3, taps, dw2, db, ow, stride, pad, imgs_per_split, ws, counters
        "conv_dw": (f4, f3, i32_2, f2, f1, i, i, i, i, f3, i32_1),
        # dy, w, taps, dx3, wd, stride, pad, k_chunk, ws, counters
        "conv_dx": (f4, f4, i32_2, f3, i, i, i, i, f3, i32_1),
    }


@functools.cache
def gemm_functions(dtype, bm: int, bn: int) -> SimpleNamespace:
    """The Python functions of the GEMM kernels for one dtype and ``(BM, BN)`` tile
    (not yet compiled: :func:`cnn.backends.cuda_kernels.build` makes kernels of them)."""
    dt = numba.from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)
    one = np.dtype(dtype).type(1)
    tyn, txn = bm // RM, bn // RN  # thread grid of a block
    nt = tyn * txn
    if nt != THREADS or nt % bn or nt % TK or (TK * bm) % nt or (TK * bn) % nt:
        raise ValueError(f"tile {bm}x{bn} does not map evenly onto {THREADS} threads")
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

    if config.ENABLE_CUDASIM:  # the simulator has no cache-hinted loads (nor caches)
        @cuda.jit(device=True)
        def load_l2(ws, z, m, n):
            return ws[z, m, n]
    elif not hasattr(cuda, "ldcg"):  # an older numba-cuda: an atomic read also skips L1
        @cuda.jit(device=True)
        def load_l2(ws, z, m, n):
            return cuda.atomic.add(ws, (z, m, n), zero)
    else:
        @cuda.jit(device=True)
        def load_l2(ws, z, m, n):
            """ws[z, m, n] from L2 (``ld.global.cg``): another SM wrote it in this launch."""
            return cuda.ldcg(ws, (z, m, n))

    @cuda.jit(device=True)
    def split_done(acc, ws, counters, m_rows, n_cols, ty, tx, tid, flag):
        """True when this block holds the finished tile in ``acc`` and runs the epilogue:
        always without a split; with one, only the block that finishes last, after it
        summed every split's partial in z order (see the module doc)."""
        splits = cuda.gridDim.z
        if splits == 1:
            return True
        z = cuda.blockIdx.z
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < m_rows and n < n_cols:
                    ws[z, m, n] = acc[i, j]
        cuda.threadfence()  # the partial is visible device-wide before the ticket
        cuda.syncthreads()
        if tid == 0:
            tile = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
            ticket = cuda.atomic.add(counters, tile, 1)
            flag[0] = 1 if ticket == splits - 1 else 0
            if ticket == splits - 1:
                counters[tile] = 0  # ready for the next launch
        cuda.syncthreads()
        if flag[0] == 0:
            return False
        cuda.threadfence()
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < m_rows and n < n_cols:
                    s = load_l2(ws, 0, m, n)
                    for zz in range(1, splits):
                        s += load_l2(ws, zz, m, n)
                    acc[i, j] = s
        return True

    def gemm(a, a_kr, b, b_kr, out, bias, has_bias, db, ones_at, k_chunk, ws, counters):
        """out[m, n] = sum_k A[m, k] B[k, n] (+ bias[n]); A is (M, K) or, with ``a_kr``,
        (K, M); B is (N, K) or, with ``b_kr``, (K, N). With ``ones_at >= 0`` B has one
        more row that reads as ones, and column ``ones_at`` of the product goes to
        ``db[m]`` (the bias gradient). Split ``z`` sums K in ``[z*k_chunk, ...)``."""
        m_rows = a.shape[1] if a_kr else a.shape[0]
        k_len = a.shape[0] if a_kr else a.shape[1]
        b_rows = b.shape[1] if b_kr else b.shape[0]
        n_out = out.shape[1]
        n_cols = n_out + 1 if ones_at >= 0 else n_out
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        k_lo = cuda.blockIdx.z * k_chunk
        k_hi = min(k_len, k_lo + k_chunk)
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        flag = cuda.shared.array(1, types.int32)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        for k0 in range(k_lo, k_hi, TK):
            stage_a(a, a_kr, m0, k0, m_rows, k_hi, sa, -1, tid)
            stage_b(b, b_kr, n0, k0, b_rows, k_hi, sb, ones_at, tid)
            cuda.syncthreads()
            mma(sa, sb, acc, ty, tx)
            cuda.syncthreads()
        if not split_done(acc, ws, counters, m_rows, n_cols, ty, tx, tid, flag):
            return
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < m_rows and n < n_out:
                    out[m, n] = acc[i, j] + bias[n] if has_bias else acc[i, j]
                elif m < m_rows and n == ones_at:
                    db[m] = acc[i, j]

    def conv_fwd(x, w2, bias, taps, y3, ow, stride, pad, relu, k_chunk, ws, counters):
        """y3[img, o, p] = relu?(bias[o] + sum_k w2[o, k] * patch(img, p)[k]): implicit GEMM,
        M = O, N = images x pixels, K = C*kh*kw; y3 is the output viewed (N, O, OH*OW)."""
        c_out, k_len = w2.shape
        npix = y3.shape[2]
        n_cols = y3.shape[0] * npix
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        k_lo = cuda.blockIdx.z * k_chunk
        k_hi = min(k_len, k_lo + k_chunk)
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        flag = cuda.shared.array(1, types.int32)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        # the output pixel whose patch this thread gathers, the same for every K slice
        nn = tid % bn
        n = n0 + nn
        img = n // npix
        oy = (n - img * npix) // ow
        y0 = oy * stride - pad
        x0 = (n - img * npix - oy * ow) * stride - pad
        for k0 in range(k_lo, k_hi, TK):
            stage_a(w2, False, m0, k0, c_out, k_hi, sa, -1, tid)
            for kk in range(tid // bn, TK, nt // bn):
                k = k0 + kk
                if n < n_cols and k < k_hi:
                    sb[kk, nn] = pixel(x, img, taps[0, k], y0 + taps[1, k], x0 + taps[2, k])
                else:
                    sb[kk, nn] = zero
            cuda.syncthreads()
            mma(sa, sb, acc, ty, tx)
            cuda.syncthreads()
        if not split_done(acc, ws, counters, c_out, n_cols, ty, tx, tid, flag):
            return
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

    def conv_dw(x, dy3, taps, dw2, db, ow, stride, pad, imgs_per_split, ws, counters):
        """dw2[o, k] = sum over images and their pixels p of dy3[img, o, p] * patch(img, p)[k]
        for k < C*kh*kw, and db[o] = sum dy3[img, o, p] (the ones column C*kh*kw); split
        ``z`` takes images ``[z*imgs_per_split, ...)``."""
        c_out, npix = dy3.shape[1], dy3.shape[2]
        k_cols = taps.shape[1]
        n_cols = k_cols + 1
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        flag = cuda.shared.array(1, types.int32)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        kk = tid % TK  # this thread's pixel offset inside each staged slice
        img_lo = cuda.blockIdx.z * imgs_per_split
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
        if not split_done(acc, ws, counters, c_out, n_cols, ty, tx, tid, flag):
            return
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < c_out and n < k_cols:
                    dw2[m, n] = acc[i, j]
                elif m < c_out and n == k_cols:
                    db[m] = acc[i, j]

    def conv_dx(dy, w, taps, dx3, wd, stride, pad, k_chunk, ws, counters):
        """dx3[img, c, q] = sum over (o, i, j) of w[o, c, i, j] * dy[img, o, oy, ox] where input
        pixel q = (hy, hx) is tap (i, j) of output pixel (oy, ox): a gather, race-free.
        M = C, N = images x input pixels, K = O*kh*kw; dx3 is dx viewed (N, C, H*W)."""
        c_in, npix = dx3.shape[1], dx3.shape[2]
        n_cols = dx3.shape[0] * npix
        k_len = taps.shape[1]
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * txn + tx
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        k_lo = cuda.blockIdx.z * k_chunk
        k_hi = min(k_len, k_lo + k_chunk)
        sa = cuda.shared.array(a_tile, dt)
        sb = cuda.shared.array(b_tile, dt)
        flag = cuda.shared.array(1, types.int32)
        acc = cuda.local.array((RM, RN), dt)
        clear(acc)
        nn = tid % bn  # the input pixel this thread gathers for, fixed over the K loop
        n = n0 + nn
        img = n // npix
        hy = (n - img * npix) // wd
        hx = n - img * npix - hy * wd
        ka = tid % TK  # this thread's K offset when staging A (k-fast: w is (O, C, kh, kw))
        for k0 in range(k_lo, k_hi, TK):
            k = k0 + ka
            for mm in range(tid // TK, bm, nt // TK):
                if k < k_hi and m0 + mm < c_in:
                    sa[ka, mm] = w[taps[0, k], m0 + mm, taps[1, k], taps[2, k]]
                else:
                    sa[ka, mm] = zero
            for kk in range(tid // bn, TK, nt // bn):
                k = k0 + kk
                if n < n_cols and k < k_hi:
                    sb[kk, nn] = strided_pixel(dy, img, taps[0, k], hy + pad - taps[1, k],
                                               hx + pad - taps[2, k], stride)
                else:
                    sb[kk, nn] = zero
            cuda.syncthreads()
            mma(sa, sb, acc, ty, tx)
            cuda.syncthreads()
        if not split_done(acc, ws, counters, c_in, n_cols, ty, tx, tid, flag):
            return
        for i in range(RM):
            m = m0 + ty + tyn * i
            for j in range(RN):
                n = n0 + tx + txn * j
                if m < c_in and n < n_cols:
                    img = n // npix
                    dx3[img, m, n - img * npix] = acc[i, j]

    return SimpleNamespace(gemm=gemm, conv_fwd=conv_fwd, conv_dw=conv_dw, conv_dx=conv_dx,
                           bm=bm, bn=bn, block=(txn, tyn))
