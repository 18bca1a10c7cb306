"""Numba CPU backend: every kernel of the NumPy reference, jitted and threaded with ``prange``.

Select it with ``Network(..., backend="numba", threads=t)``. Same kernel names and
signatures as :mod:`cnn.backends.numpy_seq` (forward kernels return ``(out, ctx)``;
backward kernels take ``ctx``, write weight gradients into the views they are given
and return ``dx`` or None).

How it is parallel:

* convolution: the batch is split over the threads; each thread im2col's one image at
  a time into its own scratch buffer (L2-resident) and calls BLAS sgemm on it
  (BLAS pinned to one thread, so ``t`` numba threads use ``t`` cores, never more).
  Weight gradients are accumulated per *fixed* batch chunk (16 chunks whatever the
  thread count) and the chunk partials are added in chunk order;
* dense layers: one GEMM split into column/row blocks, no cross-thread reduction;
* pooling, activations, optimiser updates: ``prange`` over planes / elements.

So results are bit-identical run to run, and (up to 16 threads) for every thread
count. Everything is float32 by default; float64 is supported for checks.

Beyond the reference's kernel set: ``conv2d_relu_forward`` and
``maxpool2d_relu_backward`` (fused Conv+ReLU forward and ReLU+MaxPool backward,
bit-identical to the unfused pairs) for a Network that fuses those layers, and
``max_threads()``. Outputs are recycled buffers once nobody references them (see
``_out``), so a step allocates no big arrays; results a caller keeps are never reused.

The jitted code lives in :mod:`cnn.backends.numba_kernels` and is cached on disk
(``NUMBA_CACHE_DIR`` if set); this module checks arguments before entering it.
Tuning history and measurements: ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading

import numpy as np

from cnn.backends import numba_kernels as K

# host arrays: kept exactly as the reference keeps them
from cnn.backends.numpy_seq import copy_into, device_name, from_host, to_host, zeros  # noqa: F401
from cnn.errors import BackendUnavailable, ShapeError

#: The jitted kernels behind this module, public for the kernel ladder
#: (``benchmarks/kernels/``), whose intermediate versions call the same BLAS and im2col
#: helpers and whose production rungs are this module's own functions.
kernels = K

NAME = "numba"
DESCRIPTION = "Numba CPU, prange over images/blocks, im2col + per-thread BLAS sgemm"

#: Weight-gradient partial sums are kept per batch chunk; the count does not depend on
#: the thread count (up to this many threads), so neither do the summed bits.
CHUNKS = 16
#: Dense GEMMs are split into at most this many column blocks (12: divisible by 1-4, 6).
DENSE_BLOCKS = 12

#: Elementwise items (or GEMM FLOPs / 32) a thread must get before a kernel wakes it.
MIN_WORK = 1 << 18

#: Arrays at least this big (outputs and kernel scratch) are recycled through one
#: process-wide pool (see ``_Pool``), at most this many per shape.
_POOL_MIN_BYTES = 1 << 16
_POOL_PER_SHAPE = 6
#: Default cap on the bytes the pool holds (in use or free, all shapes, all Python threads).
POOL_BYTES_DEFAULT = 1 << 30
POOL_ENV = "CNN_NUMBA_POOL_MB"
#: A shape not requested in this many poolable requests (about 40 training steps of the
#: seed CNN) is idle: its free arrays are dropped, so a finished workload's arrays (a big
#: evaluation, an earlier configuration) do not sit in memory up to the cap.
POOL_IDLE_TAKES = 1024


def _pool_limit_from_env() -> int:
    raw = os.environ.get(POOL_ENV, "").strip()
    if not raw:
        return POOL_BYTES_DEFAULT
    try:
        mib = int(raw)
        if mib < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{POOL_ENV} must be a whole number of MiB >= 0 (the numba backend's "
                         f"recycled-array cap), got {raw!r}; unset it for the default "
                         f"{POOL_BYTES_DEFAULT >> 20}") from None
    return mib << 20


#: The cap on the pool's bytes (``CNN_NUMBA_POOL_MB`` sets it, default 1 GiB): a step whose
#: arrays fit runs without allocating; arrays beyond it are allocated fresh on every call.
POOL_BYTES = _pool_limit_from_env()

_blas_limiter = None
_blas_libs: list = []  # threadpoolctl controllers of every BLAS loaded at configure()
_get_threads = None
_set_threads = None


# --- availability and threads ----------------------------------------------------------

def _cache_dir_problem() -> str | None:
    """Why Numba's on-disk cache cannot be used here, or None."""
    path = os.environ.get("NUMBA_CACHE_DIR", "")
    if path:
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".cnn-probe-"):
                pass
        except OSError as exc:
            return (f"NUMBA_CACHE_DIR={path!r} is not a writable folder ({exc.strerror or exc}); "
                    "point NUMBA_CACHE_DIR at a writable folder or unset it")
    if K.CACHE_ERROR:
        return (f"Numba cannot cache compiled kernels here ({K.CACHE_ERROR}); set "
                "NUMBA_CACHE_DIR to a writable folder")
    return None


def check_available() -> None:
    """Raise :class:`BackendUnavailable` with the reason when this backend cannot run."""
    try:
        import numba  # noqa: F401
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba calls)
    except ImportError as exc:
        raise BackendUnavailable(f"the numba backend needs {exc.name!r}: pip install numba "
                                 "scipy") from exc
    problem = _cache_dir_problem()
    if problem:
        raise BackendUnavailable(f"numba backend: {problem}")


def max_threads() -> int:
    """The most threads Numba can use in this process (``NUMBA_NUM_THREADS``)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def configure(threads: int | None = None) -> int:
    """Use ``threads`` Numba threads (default: all); pin BLAS to 1 thread. Returns the count.

    Like ``numba.set_num_threads`` the count is per calling (Python) thread."""
    global _blas_limiter
    import numba

    top = max_threads()
    if threads is None:
        threads = top
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"threads must be an int, got {threads!r}")
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if threads > top:
        raise ValueError(
            f"numba can use at most {top} threads in this process (NUMBA_NUM_THREADS={top}, "
            f"{os.cpu_count()} CPUs); asked for {threads}. To raise it, set the environment "
            f"variable NUMBA_NUM_THREADS={threads} before Python starts (before numba is "
            "imported)")
    if _blas_limiter is None:
        import scipy.linalg.cython_blas  # noqa: F401  load the BLAS that numba calls first
        from threadpoolctl import ThreadpoolController, threadpool_limits

        _blas_limiter = threadpool_limits(limits=1, user_api="blas")
        _blas_libs[:] = ThreadpoolController().select(user_api="blas").lib_controllers
        _warm_blas()
    _pin_blas()
    numba.set_num_threads(threads)
    if _get_threads is None:
        _bind_thread_count_accessors()
    return threads


def _pin_blas() -> None:
    """BLAS on 1 thread, checked before every kernel that calls it (~0.5 us per library):
    something else in the process (a benchmark pinning BLAS to n threads for torch, a
    user's threadpool_limits) may have raised it, and t prange threads each calling an
    n-threaded sgemm oversubscribe the cores. Measured: 2 numba threads with BLAS at 2
    threads made the seed-CNN step ~15x slower (2.6 s instead of ~0.16 s)."""
    for lib in _blas_libs:
        if lib.get_num_threads() != 1:
            lib.set_num_threads(1)


def _warm_blas() -> None:
    """Numba resolves sgemm/dgemm lazily, taking the GIL: do it once, outside prange."""
    for dt in (np.float32, np.float64):
        a = np.ones((2, 2), dt)
        c = np.zeros((2, 2), dt)
        K.gemm(K.N_, K.N_, 2, 2, 2, 1.0, a, 2, a, 2, 0.0, c, 2)


def _threads() -> int:
    """The calling thread's numba thread count (configuring the backend on first use)."""
    if _get_threads is None:
        import numba

        configure(numba.get_num_threads())
    return _get_threads()


def _team(work: float) -> int:
    """Threads worth waking for ``work`` (elementwise items; FLOPs / 32 for GEMM kernels):
    each must get ``MIN_WORK`` or the parallel region costs more than it saves. Results
    never depend on it (every partition is fixed), only the speed does."""
    t = _threads()
    return max(1, min(t, int(work // MIN_WORK)))


def _run(team: int, kernel, *args):
    """``kernel(*args)`` on ``team`` numba threads (the configured count is restored)."""
    t = _get_threads()
    if team >= t:
        return kernel(*args)
    _set_threads(team)
    try:
        return kernel(*args)
    finally:
        _set_threads(t)


def _run_blas(team: int, kernel, *args):
    """``_run`` for kernels that call BLAS: BLAS is re-pinned to 1 thread first."""
    _pin_blas()
    return _run(team, kernel, *args)


def _bind_thread_count_accessors() -> None:
    """numba.get/set_num_threads re-check the thread pool on every call (~4 us, twice per
    kernel); once it is up, Numba's own ctypes accessors of the same thread-local value
    are used directly (the public functions where this Numba lacks them)."""
    global _get_threads, _set_threads
    import numba
    from numba.np.ufunc import parallel

    numba.get_num_threads()  # launches the pool
    _get_threads = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
    _set_threads = getattr(parallel, "_set_num_threads", None) or numba.set_num_threads


class _Pool:
    """Recycled arrays of the whole process: ``{(shape, dtype): [arrays]}`` with keys in
    least-recently-used order, holding at most ``POOL_BYTES`` in all (in use or free).

    An array is handed out again only when the pool's list is its last reference (any
    view or reference elsewhere blocks reuse), so callers never share one. A request that
    cannot fit even after dropping every free array is allocated without pooling and
    drops nothing: a request larger than the cap used to empty the pool, so a step with
    one such array re-allocated (and page-faulted) all of its arrays on every call. Every
    ``POOL_IDLE_TAKES`` requests, the free arrays of shapes not requested since the last
    such sweep are dropped; a workload that repeats its shapes keeps all of its arrays."""

    def __init__(self):
        self.arrays: dict[tuple, list[np.ndarray]] = {}
        self.last: dict[tuple, int] = {}  # request count at each shape's last request
        self.takes = 0
        self.nbytes = 0
        self.misses = 0  # poolable requests that found no free array
        self.lock = threading.Lock()

    def take(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        if math.prod(shape) * dtype.itemsize < _POOL_MIN_BYTES:
            return np.empty(shape, dtype)
        key = (shape, dtype.str)
        with self.lock:
            self.takes += 1
            if self.takes % POOL_IDLE_TAKES == 0:
                self._drop_idle()
            self.last[key] = self.takes
            arrays = self.arrays.pop(key, [])
            self.arrays[key] = arrays  # most recently used key last
            for i in range(len(arrays) - 1, -1, -1):
                # references: the list, and getrefcount's own argument
                if sys.getrefcount(arrays[i]) == 2:
                    a = arrays.pop(i)
                    arrays.append(a)  # most recently handed out last: likely still in cache
                    return a
            self.misses += 1
            a = np.empty(shape, dtype)
            if len(arrays) < _POOL_PER_SHAPE and self._make_room(a.nbytes):
                arrays.append(a)
                self.nbytes += a.nbytes
            return a

    def _free_bytes(self) -> int:
        return sum(a.nbytes for arrays in self.arrays.values() for a in arrays
                   if sys.getrefcount(a) == 3)  # the list, the loop variable, the argument

    def _drop_free(self, excess: float, keys: list[tuple] | None = None) -> int:
        """Drop free arrays of ``keys`` (default: all, least recently used first) until
        ``excess`` bytes are gone or none is left; returns the bytes dropped."""
        dropped = 0
        for key in list(self.arrays) if keys is None else keys:
            arrays = self.arrays[key]
            for i in range(len(arrays) - 1, -1, -1):
                if dropped >= excess:
                    break
                if sys.getrefcount(arrays[i]) == 2:
                    dropped += arrays.pop(i).nbytes
            if dropped >= excess:
                break
        self.nbytes -= dropped
        return dropped

    def _drop_idle(self) -> None:
        """Forget shapes idle for ``POOL_IDLE_TAKES`` requests: their free arrays go."""
        idle = [k for k, t in self.last.items() if self.takes - t >= POOL_IDLE_TAKES]
        self._drop_free(float("inf"), [k for k in idle if k in self.arrays])
        for key in idle:
            if not self.arrays.get(key, True):
                del self.arrays[key]
            if key not in self.arrays:
                del self.last[key]

    def _make_room(self, nbytes: int) -> bool:
        """Drop free arrays of the least recently used shapes until ``nbytes`` more fit;
        drop nothing (and return False) when even dropping every free array would not."""
        over = self.nbytes + nbytes - POOL_BYTES
        if over <= 0:
            return True
        if over > self._free_bytes():
            return False
        self._drop_free(over)
        return True

    def release(self) -> int:
        """Drop every free array; the bytes dropped."""
        with self.lock:
            dropped = self._drop_free(float("inf"))
            for key in [k for k, v in self.arrays.items() if not v]:
                del self.arrays[key]
                self.last.pop(key, None)
            return dropped

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"limit": POOL_BYTES, "bytes": self.nbytes, "free_bytes": self._free_bytes(),
                    "arrays": sum(len(v) for v in self.arrays.values()),
                    "shapes": len(self.arrays), "misses": self.misses,
                    "held_bytes": sum(a.nbytes for v in self.arrays.values() for a in v)}


_POOL = _Pool()


def pool_stats() -> dict[str, int]:
    """The recycled-array pool's bookkeeping: ``limit`` (``POOL_BYTES``), ``bytes`` it
    counts, ``held_bytes`` (the sum over the arrays it holds: equals ``bytes``),
    ``free_bytes`` (held by nobody else), ``arrays``, ``shapes`` and ``misses`` (requests
    that had to allocate: constant from step to step once a workload fits)."""
    return _POOL.stats()


def release_pool() -> int:
    """Hand every recycled array nobody holds back to the allocator (after a big
    evaluation, say); returns the bytes dropped. The next calls allocate afresh."""
    return _POOL.release()


def _out(shape, dtype) -> np.ndarray:
    """A fresh-to-the-caller output array, recycled from earlier calls when nobody else
    holds a reference to it.

    Large fresh allocations cost page faults every step (measured: a 15 MB ReLU output
    takes ~2x as long in a freshly mmapped array), so outputs are reused instead."""
    return _POOL.take(tuple(shape), np.dtype(dtype))


def _buf(shape, dtype) -> np.ndarray:
    """Kernel scratch: from the same pool as outputs (so under the same cap), held only
    while the kernel runs; its contents are garbage, every kernel overwrites what it reads."""
    return _POOL.take(tuple(shape), np.dtype(dtype))


# --- argument checks (before the jitted code: clear errors instead of crashes) ----------

def _arr(name: str, a, ndim: int | None = None, dtype=None, writable: bool = False):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in (np.float32, np.float64) and dtype is None:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype)} like the other arrays, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise TypeError(f"{name} must be C-contiguous (use np.ascontiguousarray), got strides "
                        f"{a.strides} for shape {a.shape}")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return a


def _shape(name: str, a: np.ndarray, shape: tuple) -> None:
    if a.shape != tuple(shape):
        raise ShapeError(f"{name} must have shape {tuple(shape)}, got {a.shape}")


def _pos_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _bounds(n: int, parts: int) -> np.ndarray:
    return np.array([i * n // parts for i in range(parts + 1)], dtype=np.int64)


def _blocks(n: int) -> np.ndarray:
    """Edges of a split of ``range(n)`` that depends on ``n`` only (never on the thread
    count): up to ``DENSE_BLOCKS`` blocks, each at least 64 wide, widths multiples of 16
    (many narrow GEMMs cost more: 36 blocks of 64 made the dense backward 30% slower)."""
    parts = max(1, min(DENSE_BLOCKS, n // 64))
    size = math.ceil(math.ceil(n / parts) / 16) * 16
    return np.array([*range(0, n, size), n], dtype=np.int64)


def _chunks(n: int, threads: int) -> int:
    return min(n, CHUNKS * -(-threads // CHUNKS))


def synchronize() -> None:
    """Kernels return when done: nothing to wait for."""


# --- convolution ---------------------------------------------------------------------

def _shift(x_shape, w_shape, s: int) -> bool:
    """Use the shift im2col (padded width) for this stride-1 layer? It makes the column
    copies cheap (one contiguous copy per row) but costs two O x L copies per image (drop
    the garbage columns of y, pad dy) and (k-1)/Wp more GEMM work; measured: a win for
    conv2 of the seed CNN (C*k*k = 288 >= O = 64, +1-3%), a loss for conv1 (27 < 32, -3%)."""
    o, c, k, _ = w_shape
    return s == 1 and c * k * k >= o


def _conv_scratch(t, x_shape, o, k, shift, p, oh, ow, dtype):
    """Per-worker im2col columns (+ a row of ones: the bias), and for the shift layout
    (rows of OH*Wp columns) the padded input plane and the padded-width GEMM output."""
    n, c, h, w = x_shape
    wp = w + 2 * p
    ln = oh * wp if shift else oh * ow
    cols = _buf((t, c * k * k + 1, ln), dtype)
    xpad = _buf((t, c, (h + 2 * p) * wp) if (shift and p) else (t, 0, 0), dtype)
    ypad = _buf((t, o, ln) if shift else (t, 0, 0), dtype)
    return cols, xpad, ypad


def conv2d_forward(x, w, b, stride: int, padding: int):
    """NCHW cross-correlation; ``ctx`` keeps the input (im2col is recomputed in backward)."""
    return _conv_forward(x, w, b, stride, padding, False)


def conv2d_relu_forward(x, w, b, stride: int, padding: int):
    """``relu_forward(conv2d_forward(...))`` in one pass: ``(r, ctx)``, ``r = max(y, 0)``.

    Not part of the reference's kernel set: a fused kernel a Network may use for a
    Conv2D followed by ReLU (``ctx`` is the conv's; the ReLU's ctx is ``r`` itself, as
    ``relu_forward`` returns it). Saves the separate ReLU pass over the conv output."""
    return _conv_forward(x, w, b, stride, padding, True)


def _conv_forward(x, w, b, stride, padding, relu: bool):
    x = _arr("x", x, 4)
    w = _arr("w", w, 4, x.dtype)
    b = _arr("b", b, 1, x.dtype)
    s = _pos_int("stride", stride)
    p = _pos_int("padding", padding, 0)
    n, c, h, wd = x.shape
    o, ci, k, k2 = w.shape
    if ci != c or k != k2:
        raise ShapeError(f"weight {w.shape} does not fit input {x.shape} (need (O, {c}, k, k))")
    _shape("b", b, (o,))
    if h + 2 * p < k or wd + 2 * p < k:
        raise ShapeError(f"input {x.shape} with padding {p} is smaller than the {k}x{k} kernel")
    oh = (h + 2 * p - k) // s + 1
    ow = (wd + 2 * p - k) // s + 1
    t = max(1, min(_team(n * o * c * k * k * oh * ow / 16), n))
    y = _out((n, o, oh, ow), x.dtype)
    shift = _shift(x.shape, w.shape, s)
    cols, xpad, ypad = _conv_scratch(t, x.shape, o, k, shift, p, oh, ow, x.dtype)
    wb = _buf((o, c * k * k + 1), x.dtype)
    wb[:, :-1] = w.reshape(o, c * k * k)
    wb[:, -1] = b
    if shift:
        _run_blas(t, K.conv2d_forward_s1, x, wb, k, p, oh, ow, y.reshape(n, o, oh * ow),
                  cols, xpad, ypad, relu)
    else:
        _run_blas(t, K.conv2d_forward, x, wb, k, s, p, oh, ow, y.reshape(n, o, oh * ow),
                  cols, relu)
    return y, (x, s, p)


def conv2d_backward(dy, ctx, w, dw, db, need_dx: bool):
    x, s, p = ctx
    dy = _arr("dy", dy, 4, x.dtype)
    w = _arr("w", w, 4, x.dtype)
    dw = _arr("dw", dw, 4, x.dtype, writable=True)
    db = _arr("db", db, 1, x.dtype, writable=True)
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh = (h + 2 * p - k) // s + 1
    ow = (wd + 2 * p - k) // s + 1
    _shape("dy", dy, (n, o, oh, ow))
    _shape("dw", dw, w.shape)
    _shape("db", db, (o,))
    if n == 0:  # an empty batch: no gradient
        dw[...] = 0
        db[...] = 0
        return np.zeros(x.shape, x.dtype) if need_dx else None
    threads = _threads()
    nch = _chunks(n, threads)
    t = max(1, min(_team(n * o * c * k * k * oh * ow / (8 if need_dx else 16)), nch))
    ckk = c * k * k
    dwp = _buf((nch, ckk + 1, o), x.dtype)
    shift = _shift(x.shape, w.shape, s)
    cols, xpad, dyp = _conv_scratch(t, x.shape, o, k, shift, p, oh, ow, x.dtype)
    if need_dx:
        dx = _out(x.shape, x.dtype)
        dcols = _buf(cols.shape, x.dtype)
    else:
        dx = np.empty((1, 1, 1, 1), x.dtype)
        dcols = np.empty((0, 0, 0), x.dtype)
    args = (x, dy.reshape(n, o, oh * ow), w.reshape(o, ckk))
    parts = (_bounds(n, nch), _bounds(nch, t), dwp, bool(need_dx), dx, cols, dcols)
    if shift:
        _run_blas(t, K.conv2d_backward_s1, *args, k, p, oh, ow, *parts, xpad, dyp)
    else:
        _run_blas(t, K.conv2d_backward, *args, k, s, p, oh, ow, *parts)
    _run(_team(nch * (ckk + 1) * o), K.reduce_chunks_t, dwp, dw.reshape(o, ckk), db)
    return dx if need_dx else None


# --- pooling -------------------------------------------------------------------------

def maxpool2d_forward(x, k: int, s: int):
    """Max pooling (floor mode); ties go to the first window offset, as in torch."""
    x = _arr("x", x, 4)
    k = _pos_int("kernel_size", k)
    s = _pos_int("stride", s)
    n, c, h, w = x.shape
    if h < k or w < k:
        raise ShapeError(f"input {x.shape} is smaller than the {k}x{k} pooling window")
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = _out((n, c, oh, ow), x.dtype)
    arg = _out((n, c, oh, ow), np.uint8 if k * k <= 256 else np.int32)
    _run(_team(x.size), K.maxpool2d_forward, x, k, s, y, arg)
    return y, (arg, x.shape, k, s, y)


def maxpool2d_backward(dy, ctx):
    return _unpool(dy, ctx, False)


def maxpool2d_relu_backward(dy, ctx):
    """``relu_backward(maxpool2d_backward(dy, ctx), r)`` in one pass, for a max-pool whose
    input ``r`` is a ReLU's output (so ``r > 0`` at a window's argmax iff the pooled value
    is > 0). Not part of the reference's kernel set: a fused kernel a Network may use for
    ReLU followed by MaxPool2D. Saves the separate ReLU-backward pass."""
    return _unpool(dy, ctx, True)


def _unpool(dy, ctx, relu: bool):
    arg, x_shape, k, s, y = ctx
    dy = _arr("dy", dy, 4)
    _shape("dy", dy, arg.shape)
    dx = _out(x_shape, dy.dtype)
    w = x_shape[3]
    offs = np.array([ki * w + kj for ki in range(k) for kj in range(k)], dtype=np.int64)
    _run(_team(dx.size), K.maxpool2d_backward, dy, arg, s, offs, dx, y, relu)
    return dx


# --- elementwise ---------------------------------------------------------------------

def _pointwise(kernel, x):
    """``y = f(x)`` elementwise; the ctx is ``y`` (what the backward kernels need)."""
    x = _arr("x", x)
    y = _out(x.shape, x.dtype)
    _run(_team(x.size), kernel, x.reshape(-1), y.reshape(-1))
    return y, y


def _pointwise_backward(kernel, dy, y):
    y = _arr("y", y)
    dy = _arr("dy", dy, dtype=y.dtype)
    _shape("dy", dy, y.shape)
    dx = _out(dy.shape, dy.dtype)
    _run(_team(dy.size), kernel, dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
    return dx


def relu_forward(x):
    return _pointwise(K.relu_forward, x)


def relu_backward(dy, y):
    return _pointwise_backward(K.relu_backward, dy, y)


def sigmoid_forward(x):
    return _pointwise(K.sigmoid_forward, x)


def sigmoid_backward(dy, y):
    return _pointwise_backward(K.sigmoid_backward, dy, y)


# --- dense ---------------------------------------------------------------------------

def dense_forward(x, w, b):
    x = _arr("x", x, 2)
    w = _arr("w", w, 2, x.dtype)
    b = _arr("b", b, 1, x.dtype)
    n, i = x.shape
    o = w.shape[0]
    _shape("w", w, (o, i))
    _shape("b", b, (o,))
    y = _out((n, o), x.dtype)
    _run_blas(_team(n * i * o / 16), K.dense_forward, x, w, b, y, _blocks(o))
    return y, x


def dense_backward(dy, x, w, dw, db, need_dx: bool):
    x = _arr("x", x, 2)
    dy = _arr("dy", dy, 2, x.dtype)
    w = _arr("w", w, 2, x.dtype)
    dw = _arr("dw", dw, 2, x.dtype, writable=True)
    db = _arr("db", db, 1, x.dtype, writable=True)
    n, i = x.shape
    o = w.shape[0]
    _shape("w", w, (o, i))
    _shape("dy", dy, (n, o))
    _shape("dw", dw, (o, i))
    _shape("db", db, (o,))
    dx = _out((n, i), x.dtype) if need_dx else np.empty((1, 1), x.dtype)
    _run_blas(_team(n * i * o / (8 if need_dx else 16)), K.dense_backward, dy, x, w, dw, db,
         bool(need_dx), dx, _blocks(o), _blocks(i))
    return dx if need_dx else None


# --- loss ----------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy via log-sum-exp (float64 per row), and its gradient."""
    logits = _arr("logits", logits, 2)
    labels = np.asarray(labels)
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ShapeError(f"labels must be {logits.shape[0]} integers, got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ShapeError(f"labels must lie in [0, {logits.shape[1]})")
    grad = np.empty_like(logits)
    loss = K.softmax_cross_entropy(
        logits, np.ascontiguousarray(labels, dtype=np.int64), grad)
    return float(loss), grad


# --- optimiser updates on the flat buffer (torch.optim semantics) ----------------------

def _flat_triplet(params, grads, *state):
    params = _arr("params", params, 1, writable=True)
    grads = _arr("grads", grads, 1, params.dtype)
    _shape("grads", grads, params.shape)
    for i, st in enumerate(state):
        _arr(f"state[{i}]", st, 1, params.dtype, writable=True)
        _shape(f"state[{i}]", st, params.shape)
    return params, grads


def sgd_update(params, grads, velocity, lr: float, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, first_step: bool) -> None:
    if momentum:
        params, grads = _flat_triplet(params, grads, velocity)
    else:
        params, grads = _flat_triplet(params, grads)
        velocity = params  # unused by the kernel when momentum == 0
    _run(_team(params.size), K.sgd_update, params, grads, velocity, float(lr),
         float(momentum), float(dampening), float(weight_decay), bool(nesterov),
         bool(first_step))


def adam_update(params, grads, m, v, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: int) -> None:
    params, grads = _flat_triplet(params, grads, m, v)
    step = _pos_int("step", step)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    _run(_team(params.size), K.adam_update, params, grads, m, v, float(lr / bc1),
         float(beta1), float(beta2), float(eps), float(weight_decay), float(np.sqrt(bc2)))
