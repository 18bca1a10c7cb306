"""CUDA backend: Numba CUDA kernels, parameters, gradients and optimiser state on the GPU.

The Network's flat ``params`` / ``grads`` buffers become device arrays (``from_host``
/ ``zeros``), the layer views are device-array slices, and every kernel takes and
returns device arrays. Batches go up from a pinned host staging buffer on the
backend's one stream, asynchronously; what comes back is the logits (``forward``,
``to_host``) and the loss: ``softmax_cross_entropy`` returns it as a Python float
after one small copy (the per-sample log-likelihoods, averaged in float64 on the
host, exactly like the NumPy reference).

Kernels (``_cuda_kernels``): convolution is an implicit GEMM tiled through shared
memory (no im2col buffer), fused with the bias and, optionally, the ReLU
(``conv2d_forward(..., relu=True)``); dense layers are a tiled GEMM with the bias
fused; weight gradients are split over the batch in per-block partials summed in
a fixed order, so gradients are bitwise deterministic run to run (no atomics).

Same names and signatures as ``numpy_seq`` (the reference). Without a GPU,
``check_available`` raises :class:`BackendUnavailable`; with
``NUMBA_ENABLE_CUDASIM=1`` set before Python starts the whole backend runs in
Numba's CUDA simulator (correct, and very slow: for tests on tiny shapes).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
from numba import config as _numba_config
from numba import cuda

from cnn.backends import _cuda_kernels as K
from cnn.errors import BackendUnavailable

NAME = "cuda"
DESCRIPTION = ("Numba CUDA: shared-memory tiled implicit-GEMM convolution and GEMM dense "
               "layers, weights and optimiser state resident on the GPU")

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

# Small layers, the loss and small batches launch grids of a few blocks by nature; Numba's
# low-occupancy warning would repeat for them on every new shape.
warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU under-")


def check_available() -> None:
    """Raise :class:`BackendUnavailable` saying why when no CUDA device can be used here."""
    if SIMULATOR:
        return
    if cuda.is_available():
        return
    try:  # the driver's own words, when it has some
        cuda.get_current_device()
        reason = ""
    except Exception as exc:  # noqa: BLE001 - any driver error is a reason to report
        reason = f" ({' '.join(str(exc).split()).strip(' :')})"
    raise BackendUnavailable(
        f"backend 'cuda' needs an NVIDIA GPU: no CUDA GPU/driver found{reason}. To run the "
        "(slow) CUDA simulator instead, set NUMBA_ENABLE_CUDASIM=1 in the environment before "
        "starting Python. On a GPU machine install the cuda extra: pip install -e '.[cuda]' "
        "(numba-cuda).")


def configure(threads: int | None = None) -> int:
    """The GPU is driven from one host thread; ``threads`` (a CPU setting) does not apply."""
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return 1


# --- stream, arrays, transfers ---------------------------------------------------------------

_stream = None


def stream():
    """The backend's one CUDA stream: every copy and kernel goes on it, in order."""
    global _stream
    if _stream is None:
        _stream = cuda.stream()
    return _stream


class _HeldFrees:
    """Numba returns freed device memory in batches of ``cuMemFree``, which waits for the
    whole device: in the middle of a training step that would stall the host's run-ahead.
    The backend defers frees (``cuda.defer_cleanup``) and lets them go where it waits for
    the stream anyway (``to_host``, ``synchronize``), or once ``max_allocs`` allocations
    or ``max_bytes`` have been made without such a point, so memory stays bounded (while
    frees are held, Numba cannot flush them to retry an allocation that ran out)."""

    def __init__(self, max_allocs: int = 512, max_bytes: int = 1 << 30):
        self.max_allocs, self.max_bytes = max_allocs, max_bytes
        self.allocs = self.nbytes = 0
        self._held: contextlib.ExitStack | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = contextlib.ExitStack()
            self._held.enter_context(cuda.defer_cleanup())

    def release(self) -> None:
        """Free what is pending (call right after a stream synchronize), then hold again."""
        if self._held is not None:
            self._held.close()
            self._held = None
            with contextlib.suppress(AttributeError):  # flushes by itself later otherwise
                cuda.current_context().deallocations.clear()
        self.allocs = self.nbytes = 0
        self.hold()

    def count(self, nbytes: int) -> None:
        self.allocs += 1
        self.nbytes += nbytes
        if self.allocs > self.max_allocs or self.nbytes > self.max_bytes:
            synchronize()


_frees = _HeldFrees()


def _empty(shape, dtype):
    dtype = np.dtype(dtype)
    _frees.count(int(np.prod(shape)) * dtype.itemsize)
    a = cuda.device_array(shape, dtype=dtype, stream=stream())
    _frees.hold()
    return a


def _blocks(n: int) -> int:
    """Blocks for a grid-stride elementwise launch over ``n`` items (capped: they loop)."""
    return max(1, min(math.ceil(n / K.THREADS_1D), 4096))


def _launch_1d(kernel, n: int, *args) -> None:
    kernel[_blocks(n), K.THREADS_1D, stream()](*args)


def _launch_gemm(kernels, kernel, m: int, n: int, *args, splits: int = 1) -> None:
    """One block per (BM x BN) output tile (and per K split), 256 threads each."""
    grid = (math.ceil(n / kernels.bn), math.ceil(m / kernels.bm), splits)
    kernel[grid, kernels.block, stream()](*args)


def _gemm_kernels(dtype, m: int):
    return K.gemm_kernels(np.dtype(dtype), *K.pick_tile(m))


def _pw(dtype):
    return K.pointwise_kernels(np.dtype(dtype))


class _PinnedStaging:
    """Page-locked host buffers for uploads, two per size, used in turn. An event per
    buffer marks when its last copy has left, so a buffer is never refilled mid-copy
    while the host runs ahead of the GPU."""

    def __init__(self, max_sizes: int = 16):
        self.buffers: OrderedDict[int, list] = OrderedDict()
        self.max_sizes = max_sizes

    def upload(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        ring = self.buffers.get(a.nbytes)
        if ring is None:
            ring = [[cuda.pinned_array(max(a.nbytes, 1), dtype=np.uint8), None] for _ in "ab"]
            self.buffers[a.nbytes] = ring
            if len(self.buffers) > self.max_sizes:
                self.buffers.popitem(last=False)
        self.buffers.move_to_end(a.nbytes)
        slot = ring[0]
        ring.reverse()
        buf, event = slot
        if event is not None:
            event.synchronize()  # the previous upload from this buffer has left
        host = buf[:a.nbytes].view(a.dtype).reshape(a.shape)
        host[...] = a
        dev = _empty(a.shape, a.dtype)
        dev.copy_to_device(host, stream=stream())
        slot[1] = event or cuda.event()
        slot[1].record(stream())
        return dev


_staging = _PinnedStaging()


def _on_device(a) -> bool:
    """A Numba device array (the simulator's fakes included), not a host array."""
    return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


def zeros(n: int, dtype):
    a = _empty(n, dtype)
    _launch_1d(_pw(dtype).fill, n, a, np.dtype(dtype).type(0))
    return a


def from_host(a):
    """A device copy of host array ``a`` (uploaded asynchronously from pinned memory);
    device arrays pass through unchanged."""
    if _on_device(a):
        return a
    return _staging.upload(np.asarray(a))


def to_host(a) -> np.ndarray:
    """A host copy (waits for the stream); host arrays pass through."""
    if not _on_device(a):
        return np.asarray(a)
    out = a.copy_to_host(stream=stream())
    synchronize()
    return out


def copy_into(dst, src) -> None:
    """``dst[...] = src`` for a device ``dst`` and a host or device ``src`` of its size."""
    if not _on_device(src):
        src = np.ascontiguousarray(np.broadcast_to(np.asarray(src, dtype=dst.dtype), dst.shape))
    dst.copy_to_device(src, stream=stream())
    synchronize()  # src may be a temporary the caller frees next


def device_name() -> str:
    if SIMULATOR:
        return "cuda-simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def synchronize() -> None:
    """Wait for everything queued on the backend's stream (timers stop after this)."""
    stream().synchronize()
    _frees.release()


def _flat(a):
    return a.reshape(a.size)


# --- convolution ---------------------------------------------------------------------------------

_taps_cache: dict[tuple[int, int], Any] = {}


def _taps(channels: int, k: int):
    """The device copy of ``_cuda_kernels.conv_taps``, uploaded once per geometry."""
    key = (channels, k)
    if key not in _taps_cache:
        _taps_cache[key] = cuda.to_device(K.conv_taps(channels, k), stream=stream())
    return _taps_cache[key]


def _splits(tiles: int, units: int) -> int:
    """How many ways to split a reduction of ``units`` so ``tiles`` output tiles make
    about two blocks per SM (fixed per shape: deterministic partial sums)."""
    return max(1, min(units, math.ceil(2 * _sm_count() / max(tiles, 1))))


_sms: int | None = None


def _sm_count() -> int:
    global _sms
    if _sms is None:
        _sms = 2 if SIMULATOR else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    return _sms


def conv2d_forward(x, w, b, stride: int, padding: int, relu: bool = False):
    """Implicit-GEMM convolution + bias; ``relu=True`` also applies the ReLU in the same
    kernel (then ``conv2d_backward`` masks ``dy`` itself). The Network calls it without."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh = (h + 2 * padding - k) // stride + 1
    ow = (wd + 2 * padding - k) // stride + 1
    y = _empty((n, o, oh, ow), x.dtype)
    kern = _gemm_kernels(x.dtype, o)
    _launch_gemm(kern, kern.conv_fwd, o, n * oh * ow, x, w.reshape(o, c * k * k), b,
                 _taps(c, k), y.reshape(n, o, oh * ow), ow, stride, padding, relu)
    return y, (x, stride, padding, y if relu else None)


def conv2d_backward(dy, ctx, w, dw, db, need_dx: bool):
    x, stride, padding, relu_out = ctx
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = dy.shape[2], dy.shape[3]
    if relu_out is not None:
        dy = relu_backward(dy, relu_out)
    # dW (+ db as the extra column), split over images into partials, then summed in order
    cols = c * k * k + 1
    kern = _gemm_kernels(x.dtype, o)
    tiles = math.ceil(o / kern.bm) * math.ceil(cols / kern.bn)
    splits = _splits(tiles, n)
    per_split = math.ceil(n / splits)
    splits = math.ceil(n / per_split)
    ws = _empty((splits, o, cols), x.dtype)
    _launch_gemm(kern, kern.conv_dw, o, cols, x, dy.reshape(n, o, oh * ow), _taps(c, k), ws,
                 ow, stride, padding, per_split, splits=splits)
    _launch_1d(_pw(x.dtype).reduce_splits, o * cols, ws, dw.reshape(o, cols - 1), db)
    if not need_dx:
        return None
    dx = _empty(x.shape, x.dtype)
    kern = _gemm_kernels(x.dtype, c)
    _launch_gemm(kern, kern.conv_dx, c, n * h * wd, dy, w, _taps(o, k),
                 dx.reshape(n, c, h * wd), wd, stride, padding)
    return dx


# --- pooling -------------------------------------------------------------------------------------

def maxpool2d_forward(x, k: int, s: int):
    """Max over each window; ties go to the first offset, as in torch."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = _empty((n, c, oh, ow), x.dtype)
    arg = _empty((n, c, oh, ow), np.uint8)
    _launch_1d(_pw(x.dtype).maxpool_fwd, y.size, x, y, arg, k, s)
    return y, (arg, x.shape, k, s)


def maxpool2d_backward(dy, ctx):
    arg, x_shape, k, s = ctx
    dx = _empty(x_shape, dy.dtype)
    _launch_1d(_pw(dy.dtype).maxpool_bwd, dx.size, dy, arg, dx, k, s)
    return dx


# --- elementwise ---------------------------------------------------------------------------------

def _map(kernel_name: str, out_like, *arrays):
    out = _empty(out_like.shape, out_like.dtype)
    kernel = getattr(_pw(out_like.dtype), kernel_name)
    _launch_1d(kernel, out.size, *(_flat(a) for a in arrays), _flat(out))
    return out


def relu_forward(x):
    y = _map("relu_fwd", x, x)
    return y, y


def relu_backward(dy, y):
    return _map("relu_bwd", dy, dy, y)


def sigmoid_forward(x):
    y = _map("sigmoid_fwd", x, x)
    return y, y


def sigmoid_backward(dy, y):
    return _map("sigmoid_bwd", dy, dy, y)


# --- dense ---------------------------------------------------------------------------------------

def _gemm(a, a_kr: bool, b, b_kr: bool, out3, bias=None, ones_at: int = -1, splits: int = 1):
    """``out3[z] = A @ B`` over K split ``z`` (see ``_cuda_kernels.gemm``)."""
    m = a.shape[1] if a_kr else a.shape[0]
    k_len = a.shape[0] if a_kr else a.shape[1]
    chunk = math.ceil(math.ceil(k_len / splits) / K.TK) * K.TK  # whole K slices per split
    kern = _gemm_kernels(a.dtype, m)
    has_bias = bias is not None
    _launch_gemm(kern, kern.gemm, m, out3.shape[2], a, a_kr, b, b_kr, out3,
                 bias if has_bias else out3.reshape(out3.size), has_bias, ones_at, chunk,
                 splits=splits)


def dense_forward(x, w, b):
    n, o = x.shape[0], w.shape[0]
    y = _empty((n, o), x.dtype)
    _gemm(x, False, w, False, y.reshape(1, n, o), bias=b)
    return y, x


def dense_backward(dy, x, w, dw, db, need_dx: bool):
    n, o = dy.shape
    i = x.shape[1]
    # dW[o, i] = sum_n dy[n, o] x[n, i]; the column i (B = ones) is db
    kern = _gemm_kernels(dy.dtype, o)
    tiles = math.ceil(o / kern.bm) * math.ceil((i + 1) / kern.bn)
    splits = _splits(tiles, math.ceil(n / K.TK))
    chunk = math.ceil(math.ceil(n / splits) / K.TK) * K.TK
    splits = math.ceil(n / chunk)
    ws = _empty((splits, o, i + 1), dy.dtype)
    _gemm(dy, True, x, True, ws, ones_at=i, splits=splits)
    _launch_1d(_pw(dy.dtype).reduce_splits, o * (i + 1), ws, dw, db)
    if not need_dx:
        return None
    dx = _empty((n, i), dy.dtype)
    _gemm(dy, False, w, True, dx.reshape(1, n, i))
    return dx


# --- loss ----------------------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy (a Python float: one small copy back) and its gradient on the GPU."""
    n = logits.shape[0]
    labels = from_host(np.asarray(labels, dtype=np.int64)) if not _on_device(labels) else labels
    grad = _empty(logits.shape, logits.dtype)
    logp = _empty(n, logits.dtype)
    kernel = _pw(logits.dtype).softmax_xent
    kernel[math.ceil(n / K.THREADS_1D), K.THREADS_1D, stream()](
        logits, labels, grad, logp, logits.dtype.type(n))
    loss = -float(to_host(logp).astype(np.float64).mean())
    return loss, grad


# --- optimiser updates on the flat buffer (torch.optim semantics) ----------------------------

def sgd_update(params, grads, velocity, lr: float, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, first_step: bool) -> None:
    t = params.dtype.type
    _launch_1d(_pw(params.dtype).sgd, params.size, params, grads, velocity, t(lr), t(momentum),
               t(dampening), t(weight_decay), bool(nesterov), bool(first_step))


def adam_update(params, grads, m, v, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: int) -> None:
    t = params.dtype.type
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    _launch_1d(_pw(params.dtype).adam, params.size, params, grads, m, v, t(lr / bc1), t(beta1),
               t(beta2), t(math.sqrt(bc2)), t(eps), t(weight_decay))
