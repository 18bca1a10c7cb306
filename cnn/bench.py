"""The study's one timing harness: every backend timed by the same code (llm.c's ladder).

One training step (forward, mean softmax cross-entropy, backward, SGD-momentum
update) is timed for each (backend, threads, batch size, input shape, filter
counts), on synthetic random data (rows say ``dataset="synthetic"``: timing
only). The NumPy, Numba and CUDA backends and the torch twin (the same network
and batch as ``torch.nn.Sequential``, loaded through ``state_dict``) all go
through one timing function that takes a step callable. Every measurement is one
row of the results schema (DESIGN.md, "Results"), saved to
``results/<experiment>.pkl`` with rows measured on other hosts kept.

Examples::

    python -m cnn.bench --help
    # the CPU ladder (the defaults, which add cuda where there is a GPU): numpy at 1 thread,
    # numba and torch at 1 and 2 threads
    python -m cnn.bench --backends numpy,numba,torch --threads 1,2 --batch-sizes 32,128,256
    # a quick look: the seed CNN, batch 128, one thread, 5 timed steps
    python -m cnn.bench --backends numpy,torch --threads 1 --batch-sizes 128 --repeats 5
    # MNIST-sized input and a filter-count grid (each item is "conv1,conv2")
    python -m cnn.bench --input-shape 1x28x28 --filters 16,32 32,64 64,128
    # per-kernel times, the roofline view, into its own experiment
    python -m cnn.bench --kernels --batch-sizes 128 --experiment bench_kernels
    # the GPU backend against the torch twin (skipped with a reason where there is no GPU)
    python -m cnn.bench --backends cuda,torch --experiment bench_gpu

From a notebook::

    from cnn import bench
    row = bench.bench_step("numpy", threads=1, batch_size=128, input_shape=(3, 32, 32))
    df = bench.run(backends=["numpy", "torch"], threads=[1], batch_sizes=[128], save=False)

Honest timing (DESIGN.md):

- Every thread pool is pinned per configuration by :func:`pinned_threads`
  (Numba, BLAS and OpenMP via threadpoolctl, PyTorch) and restored afterwards.
  The numpy backend is the sequential baseline: it runs at 1 thread only.
- The first call (JIT compile, allocator and BLAS warm-up) and ``--warmup`` more
  steps are excluded from the step times; ``compile_s`` is the time they took
  beyond ordinary steps (:func:`cnn.results.step_stats`), ``first_call_s`` the
  raw first call. Then ``--repeats`` timed steps give ``step_ms_median`` and
  ``step_ms_iqr``. ``backend.synchronize()`` runs before every timer stops.
- ``samples_per_s`` = batch / median step; ``samples`` = batch x repeats and
  ``wall_s`` = the summed time of the timed steps.
- ``gflops`` = ``net.flops(train=True) * batch / median / 1e9`` (a multiply-add
  counts 2); ``pct_of_peak`` = gflops / the host's measured GEMM ceiling at the
  same thread count x 100. The ceiling (a ``strategy="gemm-ceiling"`` row) is a
  float32 ``n x n x n`` NumPy matmul, median of several. Torch uses its own
  BLAS/oneDNN and may exceed it.
- ``peak_mem_mb`` (MiB) is measured in a separate, untimed pass that builds the
  configuration afresh (network, batch, optimizer state) and runs two steps. It
  is the larger of ``traced_mem_mb``, the peak that ``tracemalloc`` saw (exact
  for every NumPy allocation, blind to torch's allocator and to arrays allocated
  inside Numba-compiled code), and ``rss_mem_mb``, the rise of the process's
  peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``;
  elsewhere the RSS delta from psutil, a lower bound).

Per-kernel rows (``--kernels``, ``strategy="kernel"``): each layer's forward and
backward kernel called on its own with the inputs of a real forward/backward
pass, plus the loss and the optimizer update; ``direction`` is fwd, bwd,
fwd+bwd (the loss) or update. Kernel FLOPs are ``layer.flops``; backward is 2x
forward for layers with parameters (dW and dx) and 1x for the first one (dW
only), so they add up to ``net.flops(train=True)``. ``mbytes`` estimates the
bytes each kernel reads and writes (inputs, outputs, parameters, gradients) and
``gbytes_per_s`` the bandwidth, for the memory side of the roofline. The torch
twin is timed per module the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import re
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cnn.backends import BACKENDS, available_backends, get_backend
from cnn.errors import BackendUnavailable
from cnn.models import build
from cnn.results import make_row, save_results, step_stats, to_frame

# --- defaults a researcher can read at a glance (the CLI shows them in --help) ---------

DEFAULTS: dict[str, Any] = dict(
    backends=(*BACKENDS, "torch"),  # every registered backend + the torch twin; unavailable skip
    threads=(1, 2),
    model="seed_cnn",
    input_shapes=((3, 32, 32),),
    batch_sizes=(32, 128, 256),
    filters=((32, 64),),  # conv filter counts of seed_cnn; several make a grid
    repeats=20,
    warmup=3,
    kernels=False,
    gemm=True,
    gemm_size=2048,
    gemm_repeats=5,
    memory=True,
    experiment="bench_cpu",
    out=None,  # None: results/<experiment>.pkl
    lr=0.01,
    momentum=0.9,
    seed=0,
)

NUM_CLASSES = 10
MB = 2**20
STRATEGY = {"numpy": "sequential", "numba": "numba", "cuda": "cuda", "torch": "torch"}
NON_STEP_STRATEGIES = ("kernel", "gemm-ceiling")
#: The columns that identify one measurement when merging into an existing results file.
#: Columns every bench row carries after the schema's, in this order (NaN/None when n/a).
EXTRA_COLUMNS = ["input_shape", "filters", "kernel", "direction", "blas_threads", "gflops",
                 "pct_of_peak", "gemm_gflops", "peak_mem_mb", "traced_mem_mb", "rss_mem_mb",
                 "rss_method", "first_call_s", "repeats", "warmup", "kernel_flops", "mbytes",
                 "gbytes_per_s", "optimizer"]
_TEXT_COLUMNS = {"input_shape", "filters", "kernel", "direction", "rss_method", "optimizer"}
MERGE_ON = ["experiment", "strategy", "backend", "threads", "device", "model", "dataset",
            "batch_size", "input_shape", "filters", "kernel", "direction", "host"]


@dataclass(frozen=True)
class BenchConfig:
    """Everything :func:`run` needs; the CLI builds one, notebooks may pass keywords."""

    backends: tuple[str, ...] = DEFAULTS["backends"]
    threads: tuple[int, ...] = DEFAULTS["threads"]
    model: str = DEFAULTS["model"]
    input_shapes: tuple[tuple[int, ...], ...] = DEFAULTS["input_shapes"]
    batch_sizes: tuple[int, ...] = DEFAULTS["batch_sizes"]
    filters: tuple[tuple[int, int], ...] = DEFAULTS["filters"]
    repeats: int = DEFAULTS["repeats"]
    warmup: int = DEFAULTS["warmup"]
    kernels: bool = DEFAULTS["kernels"]
    gemm: bool = DEFAULTS["gemm"]
    gemm_size: int = DEFAULTS["gemm_size"]
    gemm_repeats: int = DEFAULTS["gemm_repeats"]
    memory: bool = DEFAULTS["memory"]
    experiment: str = DEFAULTS["experiment"]
    out: str | None = DEFAULTS["out"]
    lr: float = DEFAULTS["lr"]
    momentum: float = DEFAULTS["momentum"]
    seed: int = DEFAULTS["seed"]

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path("results") / f"{self.experiment}.pkl"


# --- parsing ---------------------------------------------------------------------------

def parse_shape(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"3x32x32"`` (or a sequence) -> ``(3, 32, 32)``."""
    if isinstance(value, str):
        parts = re.split(r"[x,]", value.strip().lower())
        if not parts or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"input shape must look like 3x32x32, got {value!r}")
        value = [int(p) for p in parts]
    shape = tuple(int(v) for v in value)
    if not shape or min(shape) < 1:
        raise ValueError(f"input shape must be positive integers, got {value!r}")
    return shape


def parse_ints(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"1,2"`` (or an int, or a sequence) -> ``(1, 2)``; every value must be >= 1."""
    if isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
        if not items or not all(v.isdigit() for v in items):
            raise ValueError(f"expected comma-separated positive integers, got {value!r}")
        value = [int(v) for v in items]
    elif isinstance(value, int | np.integer):
        value = [value]
    out = tuple(int(v) for v in value)
    if not out or min(out) < 1:
        raise ValueError(f"expected positive integers, got {value!r}")
    return out


def parse_filters(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"32,64"`` -> ``(32, 64)``: the two conv filter counts of seed_cnn."""
    if value is None:
        return None
    out = parse_ints(value)
    if len(out) != 2:
        raise ValueError(f"filters are two conv filter counts like 32,64, got {value!r}")
    return out


def _label(value: Sequence[int] | None, sep: str) -> str | None:
    return None if value is None else sep.join(str(v) for v in value)


# --- thread pools ----------------------------------------------------------------------

def _numba() -> Any:
    try:
        import numba
    except ImportError:
        return None
    return numba


def max_threads() -> int | None:
    """The most threads :func:`pinned_threads` can give Numba (``NUMBA_NUM_THREADS``)."""
    numba = _numba()
    return None if numba is None else int(numba.config.NUMBA_NUM_THREADS)


@contextlib.contextmanager
def pinned_threads(n: int, blas: int | None = None) -> Iterator[int]:
    """Pin every library's thread pool to ``n`` threads inside the block; restore on exit.

    Pins Numba (``numba.set_num_threads``), every OpenMP and BLAS library loaded
    (threadpoolctl; BLAS gets ``blas`` threads, default ``n``) and PyTorch
    (``torch.set_num_threads``, when torch is already imported: import it before
    entering). Numba cannot go above ``NUMBA_NUM_THREADS`` (the core count unless
    set in the environment): asking for more is a ``ValueError``.
    """
    from threadpoolctl import threadpool_limits

    n, blas = int(n), int(n if blas is None else blas)
    if n < 1 or blas < 1:
        raise ValueError(f"threads must be >= 1, got {n} (BLAS {blas})")
    numba = _numba()
    torch = sys.modules.get("torch")
    if numba is not None and n > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"{n} threads is more than Numba's NUMBA_NUM_THREADS="
                         f"{numba.config.NUMBA_NUM_THREADS}; set NUMBA_NUM_THREADS={n} in the "
                         "environment before starting Python to oversubscribe")
    saved_numba = numba.get_num_threads() if numba is not None else None
    saved_torch = torch.get_num_threads() if torch is not None else None
    limiter = threadpool_limits(limits={"openmp": n, "blas": blas})
    try:
        if numba is not None:
            numba.set_num_threads(n)
        if torch is not None:
            torch.set_num_threads(n)
        yield n
    finally:
        if torch is not None:
            torch.set_num_threads(saved_torch)
        if numba is not None:
            numba.set_num_threads(saved_numba)
        limiter.restore_original_limits()


# --- the one timing function -----------------------------------------------------------

def _noop() -> None:
    return None


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 0,
               sync: Callable[[], None] = _noop, collect: bool = True) -> dict[str, Any]:
    """Time ``fn()``: the first call and ``warmup`` more untimed for the statistics, then
    ``repeats`` timed calls; ``sync()`` runs before each timer stops. With ``collect`` the
    garbage collector runs once (untimed) before the timed calls.

    Returns :func:`cnn.results.step_stats` (``compile_s``, ``step_ms_median``,
    ``step_ms_iqr``) plus ``first_call_s``, ``wall_s`` (sum of the timed calls),
    ``times_s`` and ``result`` (what the last call returned).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    times, result = [], None
    for i in range(1 + warmup + repeats):
        if collect and i == 1 + warmup:
            gc.collect()  # not inside a timed call
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    timed = times[1 + warmup:]
    return {**step_stats(times, 1 + warmup), "first_call_s": times[0], "wall_s": sum(timed),
            "times_s": timed, "result": result}


# --- memory ----------------------------------------------------------------------------

def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            match = re.search(r"^VmHWM:\s+(\d+)\s*kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: RSS rises are real


@contextlib.contextmanager
def memory_probe() -> Iterator[dict[str, Any]]:
    """Measure the block's peak memory; the yielded dict is filled on exit with
    ``traced_mem_mb``, ``rss_mem_mb``, ``rss_method`` and ``peak_mem_mb`` (the larger)."""
    gc.collect()
    _malloc_trim()
    hwm = _reset_rss_peak() and _rss_peak_bytes() is not None
    rss0 = _rss_bytes()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    out: dict[str, Any] = {}
    try:
        yield out
    finally:
        traced = max(0, tracemalloc.get_traced_memory()[1] - traced0) / MB
        if started:
            tracemalloc.stop()
        peak = max(_rss_peak_bytes() or 0, _rss_bytes()) if hwm else _rss_bytes()
        rss = max(0, peak - rss0) / MB
        out.update(traced_mem_mb=traced, rss_mem_mb=rss, peak_mem_mb=max(traced, rss),
                   rss_method="VmHWM" if hwm else "rss-delta")


# --- what is timed: one setup per backend kind -------------------------------------------

class Kernel(NamedTuple):
    """One kernel call to time, with its work for the roofline view."""

    name: str
    direction: str
    fn: Callable[[], Any]
    flops: float
    nbytes: float


@dataclass
class Setup:
    """A configuration ready to time: the step callable and what the rows need."""

    step: Callable[[], float]
    sync: Callable[[], None]
    flops_per_sample: int
    device: str
    optimizer: str
    kernels: Callable[[], list[Kernel]]


def _synthetic(batch: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    return x, rng.integers(0, NUM_CLASSES, size=batch).astype(np.int64)


def _build_net(model: str, shape: tuple[int, ...], filters: tuple[int, int] | None,
               backend: str, threads: int | None, seed: int) -> Any:
    kw: dict[str, Any] = {"backend": backend, "threads": threads, "seed": seed}
    if filters is not None:
        kw["filters"] = tuple(filters)
    return build(model, shape, NUM_CLASSES, **kw)


def _optimizer(net: Any, lr: float, momentum: float) -> tuple[Callable[[], None], str]:
    """SGD with momentum on the flat buffer: ``cnn.optim.SGD``, else the backend kernel."""
    try:
        from cnn.optim import SGD
    except ImportError:
        SGD = None
    if SGD is not None:
        return SGD(net, lr=lr, momentum=momentum).step, "cnn.optim.SGD"
    B, velocity, state = net.backend, net.backend.zeros(net.num_params, net.dtype), [True]

    def update() -> None:
        B.sgd_update(net.params, net.grads, velocity, lr, momentum, 0.0, 0.0, False, state[0])
        state[0] = False

    return update, "backend.sgd_update"


def _nbytes(*arrays: Any) -> int:
    return sum(int(getattr(a, "nbytes", 0) or 0) for a in arrays if a is not None)


def _bwd_flops(layer: Any, fwd_flops: float, need_dx: bool) -> float:
    """dW costs one forward, dx another; the first parameter layer computes no dx."""
    return fwd_flops * (2 if need_dx else 1) if layer.has_params else 0.0


def _network_kernels(net: Any, x: np.ndarray, y: np.ndarray,
                     update: Callable[[], None]) -> list[Kernel]:
    """Every backend kernel of one training step, called on the tensors of a real pass."""
    B, first, n = net.backend, net._first_param_layer, x.shape[0]
    h, yy = net._check_x(x), net._check_y(y, n)
    inputs, ctxs = [], []
    for layer, p in zip(net.layers, net._pviews, strict=True):
        inputs.append(h)
        h, ctx = layer.forward(B, h, p)
        ctxs.append(ctx)
    outputs, logits = [*inputs[1:], h], h
    _, d = B.softmax_cross_entropy(logits, yy)
    douts: list[Any] = [None] * len(net.layers)
    for i in range(len(net.layers) - 1, first - 1, -1):
        douts[i] = d
        d = net.layers[i].backward(B, d, ctxs[i], net._pviews[i], net._gviews[i],
                                   need_dx=i > first)
    kernels = []
    for i, layer in enumerate(net.layers):
        name, p, g = f"{i}.{type(layer).__name__}", net._pviews[i], net._gviews[i]
        flops = float(layer.flops(net.in_shape(i)) * n)
        pbytes = _nbytes(*p.values())
        kernels.append(Kernel(name, "fwd", partial(layer.forward, B, inputs[i], p), flops,
                              _nbytes(inputs[i], outputs[i]) + pbytes))
        if i >= first:
            need_dx = i > first
            fn = partial(layer.backward, B, douts[i], ctxs[i], p, g, need_dx)
            nbytes = _nbytes(douts[i], inputs[i]) + need_dx * _nbytes(inputs[i]) + 2 * pbytes
            kernels.append(Kernel(name, "bwd", fn, _bwd_flops(layer, flops, need_dx), nbytes))
    kernels.append(Kernel("loss", "fwd+bwd", partial(B.softmax_cross_entropy, logits, yy), 0.0,
                          2 * _nbytes(logits)))
    kernels.append(Kernel("sgd_update", "update", update, 0.0, 5 * _nbytes(net.params)))
    return kernels


def _numpy_like_setup(backend: str, threads: int, batch: int, shape: tuple[int, ...],
                      filters: tuple[int, int] | None, model: str, seed: int, lr: float,
                      momentum: float) -> Setup:
    """A ``cnn`` backend (numpy, numba, cuda): ``loss_and_grad`` then the SGD update."""
    net = _build_net(model, shape, filters, backend, threads, seed)
    x, y = _synthetic(batch, shape, seed)
    update, opt_name = _optimizer(net, lr, momentum)

    def step() -> float:
        loss = net.loss_and_grad(x, y)
        update()
        return loss

    device = getattr(net.backend, "device_name", lambda: "cpu")()
    return Setup(step, net.backend.synchronize, net.flops(train=True), device, opt_name,
                 partial(_network_kernels, net, x, y, update))


def _torch_kernels(model: Any, net: Any, xt: Any, yt: Any, opt: Any) -> list[Kernel]:
    """Each module of the twin run alone (forward; autograd backward), the loss, the update."""
    import torch

    first, n = net._first_param_layer, xt.shape[0]
    cross_entropy = torch.nn.functional.cross_entropy
    h, inputs, outputs = xt, [], []
    for mod in model:
        inputs.append(h.detach())
        h = mod(h)
        h.retain_grad()
        outputs.append(h)
    opt.zero_grad(set_to_none=True)
    cross_entropy(h, yt).backward()
    kernels = []
    for i, (layer, mod) in enumerate(zip(net.layers, model, strict=True)):
        need_dx = i > first
        xin = inputs[i].clone().requires_grad_(need_dx)
        out, params = mod(xin), list(mod.parameters())
        name, flops = f"{i}.{type(layer).__name__}", float(layer.flops(net.in_shape(i)) * n)
        pbytes = sum(p.numel() * p.element_size() for p in params)
        io = (xin.numel() * xin.element_size() + out.numel() * out.element_size())
        kernels.append(Kernel(name, "fwd", partial(mod, xin), flops, io + pbytes))
        targets = ([xin] if need_dx else []) + params
        if i >= first and targets:
            fn = partial(torch.autograd.grad, out, targets, outputs[i].grad, retain_graph=True)
            nbytes = io + need_dx * xin.numel() * xin.element_size() + 2 * pbytes
            kernels.append(Kernel(name, "bwd", fn, _bwd_flops(layer, flops, need_dx), nbytes))
    logits = outputs[-1].detach().requires_grad_(True)

    def loss() -> Any:
        return torch.autograd.grad(cross_entropy(logits, yt), logits)

    kernels.append(Kernel("loss", "fwd+bwd", loss, 0.0, 2 * logits.numel() * 4))
    kernels.append(Kernel("sgd_update", "update", opt.step, 0.0,
                          5 * sum(p.numel() * p.element_size() for p in model.parameters())))
    return kernels


def _torch_setup(threads: int, batch: int, shape: tuple[int, ...],
                 filters: tuple[int, int] | None, model: str, seed: int, lr: float,
                 momentum: float) -> Setup:
    """The torch twin: forward + cross_entropy + backward + ``torch.optim.SGD`` step."""
    import torch

    from cnn.twin import torch_twin

    net = _build_net(model, shape, filters, "numpy", None, seed)  # layers, weights and FLOPs
    twin = torch_twin(net).train()
    x, y = _synthetic(batch, shape, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum)
    cross_entropy = torch.nn.functional.cross_entropy

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = cross_entropy(twin(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

    return Setup(step, _noop, net.flops(train=True), "cpu", "torch.optim.SGD",
                 partial(_torch_kernels, twin, net, xt, yt, opt))


def make_setup(backend: str, threads: int, batch_size: int, input_shape: tuple[int, ...],
               filters: tuple[int, int] | None = (32, 64), model: str = "seed_cnn",
               seed: int = 0, lr: float = 0.01, momentum: float = 0.9) -> Setup:
    """Build one configuration ready to time (call inside :func:`pinned_threads`)."""
    args = (threads, batch_size, input_shape, filters, model, seed, lr, momentum)
    return _torch_setup(*args) if backend == "torch" else _numpy_like_setup(backend, *args)


# --- availability ------------------------------------------------------------------------

def backend_status(names: Sequence[str]) -> dict[str, str]:
    """``{name: "ok" | reason}``: the registered backends plus ``torch`` (the twin)."""
    registered = available_backends()
    status = {}
    for name in names:
        if name == "torch":
            ok = importlib.util.find_spec("torch") is not None
            status[name] = "ok" if ok else "torch is not installed: pip install -e '.[compare]'"
        else:
            status[name] = registered.get(
                name, f"unknown backend {name!r}; choose from {', '.join([*BACKENDS, 'torch'])}")
    return status


def _device(backend: str) -> str:
    if backend == "torch":
        return "cpu"
    return getattr(get_backend(backend), "device_name", lambda: "cpu")()


def blas_threads(backend: str, threads: int) -> int:
    """BLAS threads for a configuration: the numpy and numba backends call BLAS on one thread
    by design (numba calls sgemm from inside each prange thread); the rest get ``threads``."""
    return 1 if backend in ("numpy", "numba") else threads


def thread_problem(backend: str, threads: int) -> str | None:
    """Why ``backend`` cannot run at ``threads`` here, or None."""
    if backend == "numpy" and threads != 1:
        return "numpy is the sequential baseline: 1 thread only"
    limit = max_threads()
    if limit is not None and threads > limit:
        return f"{threads} threads > NUMBA_NUM_THREADS={limit}"
    return None


def _prepare(backend: str, threads: int) -> None:
    """Raise the reason a configuration cannot run; import torch before pinning threads."""
    reason = backend_status([backend])[backend]
    if reason != "ok":
        raise BackendUnavailable(reason)
    problem = thread_problem(backend, threads)
    if problem:
        raise ValueError(problem)
    if backend == "torch":
        import torch  # noqa: F401  (pinned_threads pins torch only once it is imported)
    # A backend's first configure() sets process-wide state (numpy and numba pin BLAS to 1
    # thread for good). Let it happen here, outside pinned_threads, so that leaving the
    # pinned block restores that state rather than undoing it. (torch builds a numpy net.)
    get_backend("numpy" if backend == "torch" else backend).configure(None)


# --- rows --------------------------------------------------------------------------------

def _common(backend: str, threads: int, device: str, model: str | None, batch_size: Any,
            input_shape: tuple[int, ...] | None, filters: tuple[int, int] | None,
            experiment: str, strategy: str | None = None) -> dict[str, Any]:
    return dict(experiment=experiment, strategy=strategy or STRATEGY.get(backend, backend),
                backend=backend, processes=1, threads=int(threads), device=device, model=model,
                dataset="synthetic", batch_size=batch_size, epochs=0, comm_s=0.0,
                test_acc=float("nan"), input_shape=_label(input_shape, "x"),
                filters=_label(filters, ","), blas_threads=blas_threads(backend, threads))


def _row(**fields: Any) -> dict[str, Any]:
    """A schema row (``make_row``) with :data:`EXTRA_COLUMNS` after it, in order."""
    extras = {c: fields.pop(c, None if c in _TEXT_COLUMNS else float("nan"))
              for c in EXTRA_COLUMNS}
    return make_row(**fields, **extras)


def _pct(gflops: float, ceiling: float | None) -> float:
    return 100.0 * gflops / ceiling if ceiling and np.isfinite(ceiling) else float("nan")


def bench_step(backend: str, threads: int = 1, batch_size: int = 128,
               input_shape: str | Sequence[int] = (3, 32, 32),
               filters: str | Sequence[int] | None = (32, 64),
               repeats: int = DEFAULTS["repeats"], warmup: int = DEFAULTS["warmup"], *,
               model: str = DEFAULTS["model"], ceiling: float | None = None,
               memory: bool = DEFAULTS["memory"], experiment: str = DEFAULTS["experiment"],
               seed: int = DEFAULTS["seed"], lr: float = DEFAULTS["lr"],
               momentum: float = DEFAULTS["momentum"]) -> dict[str, Any]:
    """Time full training steps of one configuration; one results row.

    ``ceiling`` is the GEMM rate (GFLOP/s) at this thread count for ``pct_of_peak``
    (NaN without it; :func:`gemm_ceiling` measures it). ``filters`` applies to
    seed_cnn only (pass None for other models).
    """
    shape, filters = parse_shape(input_shape), parse_filters(filters)
    _prepare(backend, threads)
    make = partial(make_setup, backend, threads, batch_size, shape, filters, model, seed, lr,
                   momentum)
    with pinned_threads(threads, blas_threads(backend, threads)):
        setup = make()
        t = time_calls(setup.step, repeats, warmup, setup.sync)
        flops, device, optimizer = setup.flops_per_sample, setup.device, setup.optimizer
        del setup
        mem = _peak_memory(make) if memory else {}
    median_s = t["step_ms_median"] / 1e3
    gflops = flops * batch_size / median_s / 1e9
    return _row(**_common(backend, threads, device, model, batch_size, shape, filters,
                              experiment),
                    samples=batch_size * repeats, wall_s=t["wall_s"], compile_s=t["compile_s"],
                    step_ms_median=t["step_ms_median"], step_ms_iqr=t["step_ms_iqr"],
                    samples_per_s=batch_size / median_s, final_loss=float(t["result"]),
                    gflops=gflops, pct_of_peak=_pct(gflops, ceiling),
                    peak_mem_mb=mem.get("peak_mem_mb", float("nan")),
                    traced_mem_mb=mem.get("traced_mem_mb", float("nan")),
                    rss_mem_mb=mem.get("rss_mem_mb", float("nan")),
                    rss_method=mem.get("rss_method"),
                    first_call_s=t["first_call_s"], repeats=repeats, warmup=warmup,
                    gemm_gflops=ceiling if ceiling is not None else float("nan"),
                    optimizer=optimizer)


def _peak_memory(make: Callable[[], Setup]) -> dict[str, Any]:
    """Build the configuration afresh and run two steps under :func:`memory_probe`."""
    with memory_probe() as mem:
        setup = make()
        setup.step()
        setup.step()
        setup.sync()
        del setup
    return mem


def bench_kernels(backend: str, threads: int = 1, batch_size: int = 128,
                  input_shape: str | Sequence[int] = (3, 32, 32),
                  filters: str | Sequence[int] | None = (32, 64),
                  repeats: int = DEFAULTS["repeats"], warmup: int = DEFAULTS["warmup"], *,
                  model: str = DEFAULTS["model"], ceiling: float | None = None,
                  experiment: str = DEFAULTS["experiment"], seed: int = DEFAULTS["seed"],
                  lr: float = DEFAULTS["lr"],
                  momentum: float = DEFAULTS["momentum"]) -> list[dict[str, Any]]:
    """Time every kernel of one training step on its own: one ``strategy="kernel"`` row each."""
    shape, filters = parse_shape(input_shape), parse_filters(filters)
    _prepare(backend, threads)
    rows = []
    with pinned_threads(threads, blas_threads(backend, threads)):
        setup = make_setup(backend, threads, batch_size, shape, filters, model, seed, lr,
                           momentum)
        kernels = setup.kernels()
        gc.collect()  # once, not per kernel (a full collection costs more than most kernels)
        for k in kernels:
            t = time_calls(k.fn, repeats, warmup, setup.sync, collect=False)
            median_s = t["step_ms_median"] / 1e3
            gflops = k.flops / median_s / 1e9 if k.flops else float("nan")
            rows.append(_row(
                **_common(backend, threads, setup.device, model, batch_size, shape, filters,
                          experiment, strategy="kernel"),
                samples=batch_size * repeats, wall_s=t["wall_s"], compile_s=t["compile_s"],
                step_ms_median=t["step_ms_median"], step_ms_iqr=t["step_ms_iqr"],
                samples_per_s=float("nan"), final_loss=float("nan"), gflops=gflops,
                pct_of_peak=_pct(gflops, ceiling), kernel=k.name, direction=k.direction,
                kernel_flops=k.flops, mbytes=k.nbytes / MB,
                gbytes_per_s=k.nbytes / median_s / 1e9, first_call_s=t["first_call_s"],
                repeats=repeats, warmup=warmup,
                gemm_gflops=ceiling if ceiling is not None else float("nan")))
    return rows


def gemm_row(threads: int = 1, n: int = DEFAULTS["gemm_size"],
             repeats: int = DEFAULTS["gemm_repeats"],
             experiment: str = DEFAULTS["experiment"]) -> dict[str, Any]:
    """The host's practical ceiling: a float32 ``n x n x n`` NumPy matmul at ``threads``."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), dtype=np.float32)
    with pinned_threads(threads):
        t = time_calls(partial(np.matmul, a, b, out=c), repeats, warmup=1)
    gflops = 2.0 * n**3 / (t["step_ms_median"] / 1e3) / 1e9
    common = _common("numpy", threads, "cpu", None, float("nan"), None, None, experiment,
                     strategy="gemm-ceiling")
    return _row(**{**common, "dataset": None, "blas_threads": threads},
                samples=float("nan"), wall_s=t["wall_s"], compile_s=t["compile_s"],
                step_ms_median=t["step_ms_median"], step_ms_iqr=t["step_ms_iqr"],
                gflops=gflops, pct_of_peak=100.0, kernel=f"sgemm {n}x{n}x{n}",
                kernel_flops=2.0 * n**3, repeats=repeats, warmup=1, gemm_gflops=gflops)


def gemm_ceiling(threads: int = 1, n: int = DEFAULTS["gemm_size"],
                 repeats: int = DEFAULTS["gemm_repeats"]) -> float:
    """GFLOP/s of a float32 ``n^3`` NumPy matmul at ``threads`` (median of ``repeats``)."""
    return float(gemm_row(threads, n, repeats)["gflops"])


# --- the whole grid ------------------------------------------------------------------------

def _config(config: BenchConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]
            ) -> BenchConfig:
    base = config if isinstance(config, BenchConfig) else BenchConfig()
    kw = {**(dict(config) if isinstance(config, Mapping) else {}), **overrides}
    known = {f.name for f in fields(BenchConfig)}
    unknown = set(kw) - known
    if unknown:
        raise TypeError(f"unknown bench option(s) {sorted(unknown)}; known: {sorted(known)}")
    conv = {"backends": lambda v: tuple(v.split(",")) if isinstance(v, str) else tuple(v),
            "threads": parse_ints, "batch_sizes": parse_ints,
            "input_shapes": partial(_many, parse_shape), "filters": partial(_many, parse_filters)}
    return replace(base, **{k: conv[k](v) if k in conv else v for k, v in kw.items()})


def _many(parse: Callable[[Any], Any], value: Any) -> tuple[Any, ...]:
    """One item ("3x32x32", (3, 32, 32), None) or several, parsed into a tuple of items."""
    if value is None or isinstance(value, str) or all(
            isinstance(v, int | np.integer) for v in value):
        return (parse(value),)
    return tuple(parse(v) for v in value)


def _describe(row: Mapping[str, Any]) -> str:
    return (f"{row['backend']:>6} {row['threads']}t  batch {row['batch_size']:>4}  "
            f"{row['input_shape']}  filters {row['filters']}: {row['step_ms_median']:8.2f} ms "
            f"(IQR {row['step_ms_iqr']:.2f})  {row['samples_per_s']:9.1f} samples/s  "
            f"{row['gflops']:6.1f} GFLOP/s ({row['pct_of_peak']:.0f}% of GEMM)  "
            f"compile {row['compile_s']:.2f} s  peak {row['peak_mem_mb']:.1f} MiB")


def run(config: BenchConfig | Mapping[str, Any] | None = None, *, save: bool = True,
        log: Callable[[str], Any] | None = print, **overrides: Any) -> pd.DataFrame:
    """Run the grid: GEMM ceiling per thread count, then every available backend's steps
    (and kernels with ``kernels=True``). Saves to ``config.out_path`` (merging rows from
    other hosts) unless ``save=False``, prints the side-by-side table, returns the rows."""
    cfg = _config(config, overrides)
    say = log or (lambda _msg: None)
    status = backend_status(cfg.backends)
    for name, why in status.items():
        if why != "ok":
            say(f"skip {name}: {why}")
    backends = [b for b in cfg.backends if status[b] == "ok"]
    filters = cfg.filters if cfg.model == "seed_cnn" else (None,)
    rows: list[dict[str, Any]] = []
    for threads in cfg.threads:
        limit = max_threads()
        if limit is not None and threads > limit:
            say(f"skip {threads} threads: more than NUMBA_NUM_THREADS={limit}")
            continue
        ceiling = None
        if cfg.gemm:
            rows.append(gemm_row(threads, cfg.gemm_size, cfg.gemm_repeats, cfg.experiment))
            ceiling = rows[-1]["gflops"]
            say(f"GEMM ceiling at {threads} thread(s): {ceiling:.1f} GFLOP/s "
                f"(float32 {cfg.gemm_size}^3)")
        for backend in backends:
            problem = thread_problem(backend, threads)
            if problem is None and _device(backend) != "cpu" and threads != cfg.threads[0]:
                problem = "a GPU backend: timed once, at the first thread count"
            if problem:
                say(f"skip {backend} at {threads} thread(s): {problem}")
                continue
            for shape in cfg.input_shapes:
                for f in filters:
                    for batch in cfg.batch_sizes:
                        kw = dict(model=cfg.model, ceiling=ceiling, experiment=cfg.experiment,
                                  seed=cfg.seed, lr=cfg.lr, momentum=cfg.momentum)
                        rows.append(bench_step(backend, threads, batch, shape, f, cfg.repeats,
                                               cfg.warmup, memory=cfg.memory, **kw))
                        say(_describe(rows[-1]))
                        if cfg.kernels:
                            rows += bench_kernels(backend, threads, batch, shape, f,
                                                  cfg.repeats, cfg.warmup, **kw)
    df = to_frame(rows)
    if save:
        save_results(df, cfg.out_path, merge_on=MERGE_ON)
        say(f"wrote {len(df)} rows to {cfg.out_path}")
    if log:
        log(format_tables(df))
    return df


# --- tables ----------------------------------------------------------------------------------

def _column(df: pd.DataFrame) -> pd.Series:
    return df["backend"].astype(str) + "/" + df["threads"].astype(int).astype(str) + "t"


def _column_order(columns: Sequence[str], backends: Sequence[str]) -> list[str]:
    rank = {b: i for i, b in enumerate(backends)}

    def key(col: str) -> tuple[int, int, str]:
        backend, threads = col.rsplit("/", 1)
        return int(threads[:-1]), rank.get(backend, len(rank)), backend

    return sorted(columns, key=key)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Samples/s of the step rows: rows = (input shape, filters, batch), columns =
    backend/threads, plus ``<col> x torch`` = samples/s over torch's at the same threads."""
    steps = df[~df["strategy"].isin(NON_STEP_STRATEGIES)]
    if steps.empty:
        return pd.DataFrame()
    steps = steps.assign(column=_column(steps), filters=steps["filters"].fillna("-"),
                         input_shape=steps["input_shape"].fillna("-"),
                         batch_size=steps["batch_size"].astype(int))
    table = steps.pivot_table(index=["input_shape", "filters", "batch_size"], columns="column",
                              values="samples_per_s", aggfunc="median", sort=False)
    order = _column_order(list(table.columns), list(dict.fromkeys(steps["backend"])))
    table = table[order]
    for col in order:
        backend, threads = col.rsplit("/", 1)
        ref = f"torch/{threads}"
        if backend != "torch" and ref in table.columns:
            table[f"{col} x torch"] = table[col] / table[ref]
    table.columns.name = "samples/s"
    return table


def kernel_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median ms per kernel: rows = (shape, filters, batch, kernel, direction), columns =
    backend/threads."""
    k = df[df["strategy"] == "kernel"]
    if k.empty:
        return pd.DataFrame()
    k = k.assign(column=_column(k), filters=k["filters"].fillna("-"),
                 batch_size=k["batch_size"].astype(int))
    table = k.pivot_table(index=["input_shape", "filters", "batch_size", "kernel", "direction"],
                          columns="column", values="step_ms_median", aggfunc="median",
                          sort=False)
    table = table[_column_order(list(table.columns), list(dict.fromkeys(k["backend"])))]
    table.columns.name = "ms"
    return table


def format_tables(df: pd.DataFrame) -> str:
    """The printable summary: the samples/s table and, when present, the kernel table."""
    parts = []
    steps = summary_table(df)
    if not steps.empty:
        fmt = {c: ("{:.2f}x".format if c.endswith("x torch") else "{:,.1f}".format)
               for c in steps.columns}
        parts.append("samples/s (higher is better); 'x torch' = over torch at the same "
                     "threads\n" + steps.to_string(formatters=fmt, na_rep="-"))
    kernels = kernel_table(df)
    if not kernels.empty:
        parts.append("median ms per kernel\n" + kernels.to_string(float_format="{:.3f}".format,
                                                                 na_rep="-"))
    return "\n\n".join(parts) if parts else "(no step rows)"


# --- CLI -------------------------------------------------------------------------------------

def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _backends_arg(value: str) -> tuple[str, ...]:
    names = tuple(v for v in value.replace(" ", "").split(",") if v)
    known = [*BACKENDS, "torch"]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"unknown backend(s) {bad}; choose from {', '.join(known)}")
    return names


def parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m cnn.bench", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples::"):__doc__.index("From a notebook")],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", type=_arg(_backends_arg), default=d["backends"],
                   help=f"comma-separated (default {','.join(d['backends'])}); torch = the "
                        "torch twin; unavailable ones are skipped with the reason")
    p.add_argument("--threads", type=_arg(parse_ints), default=d["threads"],
                   help="thread counts, pinned for every library (default 1,2)")
    p.add_argument("--model", default=d["model"], help="seed_cnn, lenet5 or mlp")
    p.add_argument("--input-shape", dest="input_shapes", type=_arg(parse_shape), nargs="+",
                   default=d["input_shapes"], help="CxHxW, one or more (default 3x32x32)")
    p.add_argument("--batch-sizes", type=_arg(parse_ints), default=d["batch_sizes"],
                   help="comma-separated (default 32,128,256)")
    p.add_argument("--filters", type=_arg(parse_filters), nargs="+", default=d["filters"],
                   help="seed_cnn conv filter counts 'c1,c2', one or more for a grid "
                        "(default 32,64)")
    p.add_argument("--repeats", type=int, default=d["repeats"], help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=d["warmup"],
                   help="untimed steps after the first call (default 3)")
    p.add_argument("--kernels", action="store_true", help="also time each kernel")
    p.add_argument("--gemm", action=argparse.BooleanOptionalAction, default=d["gemm"],
                   help="measure the GEMM ceiling per thread count (default on)")
    p.add_argument("--gemm-size", type=int, default=d["gemm_size"],
                   help="n of the n^3 float32 GEMM (default 2048)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=d["memory"],
                   help="measure peak memory in a separate untimed pass (default on)")
    p.add_argument("--experiment", default=d["experiment"], help="experiment name (default "
                   f"{d['experiment']})")
    p.add_argument("--out", default=d["out"],
                   help="results pickle (default results/<experiment>.pkl)")
    p.add_argument("--seed", type=int, default=d["seed"])
    return p


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = vars(parser().parse_args(argv))
    return run(BenchConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in args.items()}))


if __name__ == "__main__":
    main()
