"""CUDA backend: Numba CUDA kernels (numba-cuda), parameters, gradients and optimiser
state on the GPU.

The Network's flat ``params`` / ``grads`` buffers become device arrays (``from_host``
/ ``zeros``), the layer views are device-array slices, and every kernel takes and
returns device arrays.

Memory (``cuda_memory``): every array comes from a pool that hands a block of the
same size out again once nothing refers to it, so after the first step a training
step allocates nothing and device memory stays flat; :func:`memory_stats` is the
bookkeeping. Out of memory raises :class:`OutOfDeviceMemory` naming the batch size
and the memory the step needed.

Streams: kernels and downloads run in order on the compute stream; uploads go from
page-locked buffers on a copy stream that overlaps compute (the compute stream waits
for each upload's event). A caller can load a batch straight into a pinned buffer
(:func:`host_buffer`) and start its upload early (:func:`prefetch`). The loss comes
back as a :class:`DeviceLoss`: ``float()`` waits for the loss's own copy (an event),
not for the rest of the step.

Kernels (``cuda_kernels``, ``cuda_gemm``): convolution is an implicit GEMM tiled
through shared memory (no im2col buffer) with the bias and, in
``conv2d_relu_forward``, the ReLU fused; dense layers are a tiled GEMM with the bias
fused; ``maxpool2d_relu_backward`` does the pool's and the ReLU's backward in one
pass. Where there are fewer output tiles than multiprocessors the K range is split
over blocks and summed in a fixed order by the last block (bitwise deterministic,
one launch). Every launch is counted (``memory_stats()["launches"]``).

Same names and signatures as ``numpy_seq`` (the reference; ``contract.py``). Without
a GPU, ``check_available`` raises :class:`BackendUnavailable` in one line; with
``NUMBA_ENABLE_CUDASIM=1`` set before Python starts the whole backend runs in
Numba's CUDA simulator (correct, and very slow: for tests on tiny shapes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np
from numba import config as _numba_config
from numba import cuda

from cnn.backends import cuda_gemm as G
from cnn.backends import cuda_kernels as K
from cnn.backends.cuda_memory import (
    DeviceLoss,
    DevicePool,
    LossSlots,
    OutOfDeviceMemory,
    PinnedStaging,
    new_event,
)
from cnn.errors import BackendUnavailable

NAME = "cuda"
DESCRIPTION = ("Numba CUDA (numba-cuda): shared-memory tiled implicit-GEMM convolution and "
               "GEMM dense layers, split-K in one launch, weights, optimiser state and "
               "reused buffers resident on the GPU")

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

__all__ = ["DeviceLoss", "OutOfDeviceMemory"]

# Small layers, the loss and small batches launch grids of a few blocks by nature; Numba's
# low-occupancy warning would repeat for them on every new shape.
warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU under-")

_available: str | None = None  # "" once the probe passed, else the reason it failed


def _probe() -> str:
    """Why this process cannot use the backend ("" when it can): numba-cuda present, a GPU
    (or the simulator), and a probe kernel using ``min`` compiled, launched and right."""
    if importlib.util.find_spec("numba_cuda") is None:
        return ("backend 'cuda' needs the numba-cuda package (numba's built-in numba.cuda is "
                "deprecated and cannot compile these kernels): pip install -e '.[cuda]'")
    if not SIMULATOR and not cuda.is_available():
        try:  # the driver's own words, when it has some
            cuda.get_current_device()
            reason = ""
        except Exception as exc:  # noqa: BLE001 - any driver error is a reason to report
            reason = f" ({' '.join(str(exc).split()).strip(' :')})"
        return (f"backend 'cuda' needs an NVIDIA GPU: no CUDA GPU/driver found{reason}. To "
                "run the (slow) CUDA simulator instead, set NUMBA_ENABLE_CUDASIM=1 in the "
                "environment before starting Python. On a GPU machine install the cuda extra: "
                "pip install -e '.[cuda]' (numba-cuda).")
    try:
        a = np.array([0.5, 1.5, 3.0, -1.0], np.float32)
        d_a, d_out = cuda.to_device(a), cuda.device_array(4, np.float32)
        K.probe_kernel()[1, 32](d_a, d_out)
        got = d_out.copy_to_host()
        cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, in one line
        words = " ".join(str(exc).split())[:300]
        return (f"backend 'cuda' cannot compile or launch a kernel here ({type(exc).__name__}: "
                f"{words}). numba-cuda needs NVVM and libdevice: install the cuda extra "
                "(pip install -e '.[cuda]') or a CUDA toolkit it can find (CUDA_HOME).")
    want = np.minimum(a, 2 - a)
    if not np.array_equal(got, want):
        return f"backend 'cuda': the probe kernel computed {got.tolist()}, not {want.tolist()}"
    return ""


def check_available() -> None:
    """Raise :class:`BackendUnavailable` in one line saying why when the backend cannot run
    here (asked once per process: the probe compiles and launches a kernel)."""
    global _available
    if _available is None:
        _available = _probe()
    if _available:
        raise BackendUnavailable(_available)


def configure(threads: int | None = None) -> int:
    """The GPU is driven from one host thread; ``threads`` (a CPU setting) does not apply."""
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return 1


# --- streams, memory, transfers ---------------------------------------------------------------

_streams: dict[str, Any] = {}


def stream():
    """The compute stream: every kernel and download goes on it, in order."""
    if "compute" not in _streams:
        _streams["compute"] = cuda.stream()
    return _streams["compute"]


def copy_stream():
    """The upload stream: host-to-device copies overlap the compute stream's kernels."""
    if "copy" not in _streams:
        _streams["copy"] = cuda.stream()
    return _streams["copy"]


_pool = DevicePool("arrays")  # activations, gradients, workspaces, optimiser state
_uploads = DevicePool("uploads", ordered=True)  # written by the copy stream
_fixed = DevicePool("fixed")  # tap tables and split counters, kept for the process
_staging = PinnedStaging()
_loss_slots = LossSlots()
_prefetched: dict[int, tuple[np.ndarray, Any]] = {}
_count = {"launches": 0, "uploads": 0, "batch": 0}


def memory_stats() -> dict[str, int]:
    """The backend's bookkeeping: device ``allocations`` made so far (cudaMalloc calls,
    all pools), ``reuses``, bytes ``held`` and ``in_use`` now, ``peak_held_bytes``, and
    the ``launches`` and ``uploads`` made so far. A step that allocates nothing leaves
    ``allocations`` unchanged."""
    pools = [p.stats() for p in (_pool, _uploads, _fixed)]
    total = {key: sum(p[key] for p in pools) for key in pools[0]}
    return {**total, "launches": _count["launches"], "uploads": _count["uploads"]}


def set_memory_limit(nbytes: int | None) -> None:
    """Cap the bytes the backend's arrays may hold (None: as much as the GPU has). An
    array over the cap raises :class:`OutOfDeviceMemory`, as a full GPU would."""
    _pool.limit = None if nbytes is None else int(nbytes)


def release_memory() -> int:
    """Give every cached, unused device block back to the GPU (between benchmark
    configurations); returns the bytes freed. Peak counters restart."""
    synchronize()
    freed = _pool.trim() + _uploads.trim() + _fixed.trim()
    for pool in (_pool, _uploads, _fixed):
        pool.reset_peak()
    return freed


def _empty(shape, dtype):
    return _pool.empty(shape, dtype, stream(), _count["batch"] or None)[0]


def _on_device(a) -> bool:
    """A Numba device array (the simulator's fakes included), not a host array."""
    return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


def _upload(a: np.ndarray):
    """A device copy of C-contiguous ``a``, made on the copy stream (see module doc)."""
    if a.ndim >= 2:
        _count["batch"] = int(a.shape[0])
    slot = _staging.slot_of(a)
    if slot is None:  # a plain host array: through the next pinned buffer
        slot = _staging.next_slot(a.nbytes)
        host = slot.view(a.shape, a.dtype)
        host[...] = a
    else:  # loaded straight into our pinned buffer: no host copy
        host = a
    dev, block = _uploads.empty(a.shape, a.dtype, stream(), _count["batch"] or None)
    copy = copy_stream()
    if block.free_event is not None:  # queued kernels may still read the block
        block.free_event.wait(copy)
        block.free_event = None
    if a.size:
        dev.copy_to_device(host, stream=copy)
    slot.event = slot.event or new_event()
    slot.event.record(copy)
    slot.event.wait(stream())  # kernels queued from now on run after the upload
    _count["uploads"] += 1
    return dev


def host_buffer(shape, dtype=np.float32) -> np.ndarray:
    """A page-locked host array to load the next batch into (``np.take(..., out=buf)``);
    ``from_host(buf)`` (or a Network given ``buf``) then uploads it without a copy. The
    backend keeps a few per size and hands them out in turn, each once its last upload
    has left."""
    return _staging.buffer(tuple(int(s) for s in shape), dtype)


def prefetch(a: np.ndarray) -> None:
    """Start uploading ``a`` now (on the copy stream, overlapping queued kernels); the
    next ``from_host`` of this same array object returns that upload. ``a`` must be
    C-contiguous (a :func:`host_buffer` is) and must not change in between."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError("prefetch needs a C-contiguous NumPy array (e.g. from host_buffer), "
                         f"got {type(a).__name__}")
    if len(_prefetched) >= 8:  # never picked up: drop the oldest
        _prefetched.pop(next(iter(_prefetched)))
    _prefetched[id(a)] = (a, _upload(a))  # holding ``a`` keeps its id from being reused


def zeros(n: int, dtype):
    """A zeroed device vector (made when a Network or optimiser is set up, not per step:
    one copy of host zeros, which the simulator does fast too)."""
    a = _empty((int(n),), dtype)
    a.copy_to_device(np.zeros(a.shape, a.dtype), stream=stream())
    stream().synchronize()  # the host zeros are a temporary
    return a


def from_host(a):
    """A device copy of host array ``a`` (uploaded asynchronously from pinned memory);
    device arrays pass through unchanged."""
    if _on_device(a):
        return a
    a = np.ascontiguousarray(a)
    early = _prefetched.get(id(a))
    if early is not None and early[0] is a:
        del _prefetched[id(a)]
        return early[1]
    return _upload(a)


def to_host(a) -> np.ndarray:
    """A host copy (waits for the compute stream); host arrays pass through."""
    if not _on_device(a):
        return np.asarray(a)
    out = a.copy_to_host(stream=stream())
    stream().synchronize()
    return out


def copy_into(dst, src) -> None:
    """``dst[...] = src`` for a C-contiguous device ``dst`` and a host or device ``src``
    of its size. Copies flat, so size-1 dimensions (a 1-channel conv weight
    ``(32, 1, 3, 3)``) cannot be dropped or broadcast on the way."""
    if not dst.is_c_contiguous():
        raise ValueError(f"copy_into needs a C-contiguous device array, got shape {dst.shape} "
                         f"strides {dst.strides}")
    flat = dst.reshape(dst.size)
    if _on_device(src):
        if src.size != dst.size:
            raise ValueError(f"copy_into: source of shape {src.shape} does not fit {dst.shape}")
        flat.copy_to_device(src.reshape(src.size), stream=stream())
    else:
        host = np.broadcast_to(np.asarray(src, dtype=dst.dtype), dst.shape)
        flat.copy_to_device(np.ascontiguousarray(host).reshape(-1), stream=stream())
    stream().synchronize()  # src may be a temporary the caller frees next


def device_name() -> str:
    if SIMULATOR:
        return "cuda-simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def synchronize() -> None:
    """Wait for everything queued on both streams (timers stop after this)."""
    copy_stream().synchronize()
    stream().synchronize()


def _flat(a):
    return a.reshape(a.size)


# --- launching ---------------------------------------------------------------------------------

def _pw(dtype):
    return K.pointwise_kernels(np.dtype(dtype))


def _gemm_kernels(dtype, m: int):
    return K.gemm_kernels(np.dtype(dtype), *G.pick_tile(m))


def _blocks(n: int) -> int:
    """Blocks for a grid-stride elementwise launch over ``n`` items (capped: they loop)."""
    return max(1, min(math.ceil(n / K.THREADS_1D), 4096))


def _check_types(kernels, name: str, args) -> None:
    """In the simulator (which compiles nothing), that a launch's argument types are the
    ones the kernel is compiled for on a GPU: a mismatch there would fail to launch."""
    got = tuple(numba.typeof(a) for a in args)
    want = kernels.signatures[name]
    if got != want:
        bad = [f"arg {i}: {g} (compiled for {w})" for i, (g, w) in
               enumerate(zip(got, want, strict=False)) if g != w]
        raise TypeError(f"kernel {name} launched with {len(got)} args, compiled for "
                        f"{len(want)}: " + "; ".join(bad))


_dry: list[bool] = []


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Inside, kernels are counted (and type-checked in the simulator) but not run;
    memory, uploads and downloads work as usual. For bookkeeping checks at full size
    (launches and allocations per step) where running the kernels would take the
    simulator hours; the numbers computed inside are garbage."""
    _dry.append(True)
    try:
        yield
    finally:
        _dry.pop()


def _launch(kernels, name: str, grid, block, *args) -> None:
    """Every kernel goes through here: counted, type-checked in the simulator."""
    if SIMULATOR:
        _check_types(kernels, name, args)
    _count["launches"] += 1
    if not _dry:
        getattr(kernels, name)[grid, block, stream()](*args)


_sms: list[int] = []


def _sm_count() -> int:
    if not _sms:
        _sms.append(2 if SIMULATOR else int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
    return _sms[0]


def _splits(tiles: int, units: int, min_units: int = 1) -> int:
    """How many ways to split a reduction of ``units`` (keeping at least ``min_units``
    each) so ``tiles`` output tiles make about two blocks per multiprocessor (fixed per
    shape: the partial sums, and so the results, do not depend on timing)."""
    want = math.ceil(2 * _sm_count() / max(tiles, 1))
    return max(1, min(want, units // max(min_units, 1)))


def _split_k(tiles: int, k_len: int) -> tuple[int, int]:
    """``(splits, k_chunk)`` for a K range of ``k_len``: whole ``TK`` slices, at least
    four per split."""
    slices = math.ceil(k_len / G.TK)
    splits = _splits(tiles, slices, 4)
    chunk = math.ceil(slices / splits) * G.TK
    return math.ceil(k_len / chunk) if k_len else 1, max(chunk, G.TK)


_tile_counters: list[Any] = []


def _counters(tiles: int):
    """Zeroed int32 tile counters for split launches (each launch leaves them at zero)."""
    if not _tile_counters or _tile_counters[0].size < tiles:
        n = max(4096, 1 << (tiles - 1).bit_length())
        have, _ = _fixed.empty((n,), np.int32, stream())
        have.copy_to_device(np.zeros(n, np.int32), stream=stream())
        _tile_counters[:] = [have]
    return _tile_counters[0]


def _workspace(splits: int, rows: int, cols: int, dtype, fallback3):
    """Per-split partial tiles, or (no split) any 3-D array of the dtype: it goes unused."""
    return _empty((splits, rows, cols), dtype) if splits > 1 else fallback3


def _launch_gemm(kernels, name: str, m: int, n: int, splits: int, *args) -> None:
    """One block per (BM x BN) output tile and per split, 256 threads each."""
    grid = (math.ceil(n / kernels.bn), math.ceil(m / kernels.bm), splits)
    _launch(kernels, name, grid, kernels.block, *args)


def _tiles(kernels, m: int, n: int) -> int:
    return math.ceil(m / kernels.bm) * math.ceil(n / kernels.bn)


# --- convolution ---------------------------------------------------------------------------------

_taps_cache: dict[tuple[int, int], Any] = {}


def _taps(channels: int, k: int):
    """The device copy of ``cuda_gemm.conv_taps``, uploaded once per geometry."""
    key = (channels, k)
    if key not in _taps_cache:
        host = G.conv_taps(channels, k)
        dev, _ = _fixed.empty(host.shape, np.int32, stream())
        dev.copy_to_device(host, stream=stream())
        _taps_cache[key] = dev
    return _taps_cache[key]


def _conv_forward(x, w, b, stride: int, padding: int, relu: bool):
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh = (h + 2 * padding - k) // stride + 1
    ow = (wd + 2 * padding - k) // stride + 1
    y = _empty((n, o, oh, ow), x.dtype)
    y3 = y.reshape(n, o, oh * ow)
    kern = _gemm_kernels(x.dtype, o)
    cols, k_len = n * oh * ow, c * k * k
    tiles = _tiles(kern, o, cols)
    splits, chunk = _split_k(tiles, k_len)
    _launch_gemm(kern, "conv_fwd", o, cols, splits, x, w.reshape(o, k_len), b, _taps(c, k), y3,
                 ow, stride, padding, relu, chunk,
                 _workspace(splits, o, cols, x.dtype, y3), _counters(tiles))
    return y, (x, stride, padding)


def conv2d_forward(x, w, b, stride: int, padding: int, relu: bool = False):
    """Implicit-GEMM convolution + bias (``relu=True``: as ``conv2d_relu_forward``)."""
    return _conv_forward(x, w, b, stride, padding, relu)


def conv2d_relu_forward(x, w, b, stride: int, padding: int):
    """Convolution + bias + ReLU in one kernel: ``(relu output, the convolution's ctx)``."""
    return _conv_forward(x, w, b, stride, padding, True)


def conv2d_backward(dy, ctx, w, dw, db, need_dx: bool):
    x, stride, padding = ctx
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = dy.shape[2], dy.shape[3]
    # dW (+ db as the extra column), split over images, summed in order by the last block
    cols = c * k * k + 1
    kern = _gemm_kernels(x.dtype, o)
    tiles = _tiles(kern, o, cols)
    per_split = math.ceil(n / _splits(tiles, n))
    splits = math.ceil(n / per_split)
    dw2 = dw.reshape(o, cols - 1)
    _launch_gemm(kern, "conv_dw", o, cols, splits, x, dy.reshape(n, o, oh * ow), _taps(c, k),
                 dw2, db, ow, stride, padding, per_split,
                 _workspace(splits, o, cols, x.dtype, dw2.reshape(1, o, cols - 1)),
                 _counters(tiles))
    if not need_dx:
        return None
    dx = _empty(x.shape, x.dtype)
    dx3 = dx.reshape(n, c, h * wd)
    kern = _gemm_kernels(x.dtype, c)
    cols = n * h * wd
    tiles = _tiles(kern, c, cols)
    splits, chunk = _split_k(tiles, o * k * k)
    _launch_gemm(kern, "conv_dx", c, cols, splits, dy, w, _taps(o, k), dx3, wd, stride,
                 padding, chunk, _workspace(splits, c, cols, x.dtype, dx3), _counters(tiles))
    return dx


# --- pooling -------------------------------------------------------------------------------------

def maxpool2d_forward(x, k: int, s: int):
    """Max over each window; ties go to the first offset, as in torch."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = _empty((n, c, oh, ow), x.dtype)
    arg = _empty((n, c, oh, ow), np.uint8)
    _launch(_pw(x.dtype), "maxpool_fwd", _blocks(y.size), K.THREADS_1D, x, y, arg, k, s)
    return y, (arg, y, x.shape, k, s)


def _maxpool_backward(dy, ctx, relu: bool):
    arg, y, x_shape, k, s = ctx
    dx = _empty(x_shape, dy.dtype)
    _launch(_pw(dy.dtype), "maxpool_bwd", _blocks(dx.size), K.THREADS_1D, dy, y, arg, dx, k, s,
            relu)
    return dx


def maxpool2d_backward(dy, ctx):
    return _maxpool_backward(dy, ctx, False)


def maxpool2d_relu_backward(dy, ctx):
    """The pool's backward and the ReLU's under it in one pass: a window passes its
    gradient to its maximum only where that maximum (the ReLU's output) is positive."""
    return _maxpool_backward(dy, ctx, True)


# --- elementwise ---------------------------------------------------------------------------------

def _map(kernel_name: str, out_like, *arrays):
    out = _empty(out_like.shape, out_like.dtype)
    _launch(_pw(out_like.dtype), kernel_name, _blocks(out.size), K.THREADS_1D,
            *(_flat(a) for a in arrays), _flat(out))
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

def _gemm(a, a_kr: bool, b, b_kr: bool, out, bias=None, db=None, ones_at: int = -1) -> None:
    """``out = A @ B (+ bias)`` (see ``cuda_gemm.gemm``), split over K when the output
    has fewer tiles than the GPU has multiprocessors."""
    m = a.shape[1] if a_kr else a.shape[0]
    k_len = a.shape[0] if a_kr else a.shape[1]
    cols = out.shape[1] + (1 if ones_at >= 0 else 0)
    kern = _gemm_kernels(a.dtype, m)
    tiles = _tiles(kern, m, cols)
    splits, chunk = _split_k(tiles, k_len)
    flat = _flat(out)
    _launch_gemm(kern, "gemm", m, cols, splits, a, a_kr, b, b_kr, out,
                 bias if bias is not None else flat, bias is not None,
                 db if db is not None else flat, ones_at, chunk,
                 _workspace(splits, m, cols, a.dtype, out.reshape(1, *out.shape)),
                 _counters(tiles))


def dense_forward(x, w, b):
    n, o = x.shape[0], w.shape[0]
    y = _empty((n, o), x.dtype)
    _gemm(x, False, w, False, y, bias=b)
    return y, x


def dense_backward(dy, x, w, dw, db, need_dx: bool):
    i = x.shape[1]
    # dW[o, i] = sum_n dy[n, o] x[n, i]; column i (B = ones) is db
    _gemm(dy, True, x, True, dw, db=db, ones_at=i)
    if not need_dx:
        return None
    dx = _empty((dy.shape[0], i), dy.dtype)
    _gemm(dy, False, w, True, dx)
    return dx


# --- loss ----------------------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy as a :class:`DeviceLoss` (``float()`` waits for it alone) and its
    gradient on the GPU; one kernel, the mean summed in float64 in a fixed order."""
    labels = from_host(np.asarray(labels, dtype=np.int64)) if not _on_device(labels) else labels
    grad = _empty(logits.shape, logits.dtype)
    loss = _empty((1,), np.float64)
    _launch(_pw(logits.dtype), "softmax_xent", 1, K.THREADS_1D, logits, labels, grad, loss)
    return DeviceLoss(_loss_slots).start(loss, stream()), grad


# --- optimiser updates on the flat buffer (torch.optim semantics) ----------------------------

def sgd_update(params, grads, velocity, lr: float, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, first_step: bool) -> None:
    t = params.dtype.type
    _launch(_pw(params.dtype), "sgd", _blocks(params.size), K.THREADS_1D, params, grads,
            velocity, t(lr), t(momentum), t(dampening), t(weight_decay), bool(nesterov),
            bool(first_step))


def adam_update(params, grads, m, v, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: int) -> None:
    t = params.dtype.type
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    _launch(_pw(params.dtype), "adam", _blocks(params.size), K.THREADS_1D, params, grads, m, v,
            t(lr / bc1), t(beta1), t(beta2), t(math.sqrt(bc2)), t(eps), t(weight_decay))
