"""The ``cuda`` backend's kernels: what each is, the types it is compiled for, and the build.

Every kernel is declared once, as a :class:`KernelSpec`: its Python function, the
argument types it is compiled for (one signature per dtype; arrays C-contiguous)
and its launch bounds. :func:`kernels` builds them with ``numba.cuda.jit`` (eagerly
for those signatures on a GPU, so a launch with other types is an error, not a
silent recompile); ``cnn.backends.cuda_compile`` compiles the same specs to PTX for
sm_90 without a GPU and reports registers, shared memory and spills per kernel.

The GEMM-shaped kernels live in ``cuda_gemm``; here are the elementwise, pooling,
loss, optimiser and probe kernels. All elementwise kernels use grid-stride loops
over flat indices; typed constants keep float32 maths in float32 (a bare ``1.0``
would promote it to float64).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np
from numba import config, cuda, types

from cnn.backends import cuda_gemm as G

# The GEMM tile constants, also read from here (the notebook's kernel table).
PAD, RM, RN, TILES, TK = G.PAD, G.RM, G.RN, G.TILES, G.TK

THREADS_1D = 256  # block size of the elementwise kernels and of the loss kernel
GEMM_NAMES = ("gemm", "conv_fwd", "conv_dw", "conv_dx")
POINTWISE_NAMES = ("relu_fwd", "relu_bwd", "sigmoid_fwd", "sigmoid_bwd",
                   "maxpool_fwd", "maxpool_bwd", "softmax_xent", "sgd", "adam")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel as compiled: ``name`` (with the tile for GEMMs), Python function,
    argument types and launch bounds ``(threads per block, min blocks per SM)``."""

    name: str
    pyfunc: Callable[..., None]
    signature: tuple[Any, ...]
    launch_bounds: tuple[int, int] | None = None
    dtype: str = "float32"


def pointwise_signatures(dtype) -> dict[str, tuple]:
    """The argument types of each elementwise/pool/loss/optimiser kernel for ``dtype``."""
    f = numba.from_dtype(np.dtype(dtype))
    f1, f2, f4 = f[::1], f[:, ::1], f[:, :, :, ::1]
    u8_4 = types.uint8[:, :, :, ::1]
    i, b = types.int64, types.boolean
    return {
        "relu_fwd": (f1, f1),
        "relu_bwd": (f1, f1, f1),
        "sigmoid_fwd": (f1, f1),
        "sigmoid_bwd": (f1, f1, f1),
        "maxpool_fwd": (f4, f4, u8_4, i, i),
        # dy, y (pool output), arg, dx, k, s, relu
        "maxpool_bwd": (f4, f4, u8_4, f4, i, i, b),
        # logits, labels, grad, loss (float64[1])
        "softmax_xent": (f2, types.int64[::1], f2, types.float64[::1]),
        "sgd": (f1, f1, f1, f, f, f, f, b, b),
        "adam": (f1, f1, f1, f1, f, f, f, f, f, f),
    }


def pointwise_functions(dtype) -> SimpleNamespace:
    """The Python functions of the elementwise, pooling, loss and optimiser kernels."""
    cast = np.dtype(dtype).type  # a typed cast inside kernels and in the simulator alike
    zero = cast(0)
    one = cast(1)

    def relu_fwd(x, y):
        for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            y[e] = x[e] if x[e] > zero else zero

    def relu_bwd(dy, y, dx):
        for e in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
            dx[e] = dy[e] if y[e] > zero else zero

    def sigmoid_fwd(x, y):
        for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            t = math.exp(-abs(x[e]))  # exp of a non-positive number: no overflow
            y[e] = one / (one + t) if x[e] >= zero else t / (one + t)

    def sigmoid_bwd(dy, y, dx):
        for e in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
            dx[e] = dy[e] * y[e] * (one - y[e])

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

    def maxpool_bwd(dy, y, arg, dx, k, s, relu):
        """dx[pixel] = sum of dy over the windows whose maximum it was: a gather, race-free.
        With ``relu`` the pool's input was a ReLU's output, and a window whose maximum
        ``y`` is not positive passes no gradient (the ReLU's backward, fused)."""
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
                    if arg[img, ch, oy, ox] == (hy - oy * s) * k + hx - ox * s and (
                            not relu or y[img, ch, oy, ox] > zero):
                        acc += dy[img, ch, oy, ox]
            dx[img, ch, hy, hx] = acc

    def softmax_xent(logits, labels, grad, loss):
        """One block. Per row: log-softmax via log-sum-exp; grad = (softmax - onehot) / N;
        loss[0] = -mean log p(label) in float64, summed in a fixed order (deterministic)."""
        tid = cuda.threadIdx.x
        n_rows, classes = logits.shape
        nf = cast(n_rows)
        part = cuda.shared.array(THREADS_1D, types.float64)
        total_logp = 0.0
        for r in range(tid, n_rows, THREADS_1D):
            mx = logits[r, 0]
            for j in range(1, classes):
                mx = max(mx, logits[r, j])
            total = zero
            for j in range(classes):
                total += math.exp(logits[r, j] - mx)
            lse = math.log(total)
            lab = labels[r]
            total_logp += float(logits[r, lab] - mx - lse)
            for j in range(classes):
                g = math.exp(logits[r, j] - mx - lse)
                if j == lab:
                    g -= one
                grad[r, j] = g / nf
        part[tid] = total_logp
        cuda.syncthreads()
        half = THREADS_1D // 2
        while half > 0:
            if tid < half:
                part[tid] += part[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            loss[0] = -part[0] / n_rows

    def sgd(p, g, vel, lr, momentum, dampening, weight_decay, nesterov, first_step):
        """torch.optim.SGD on flat buffers, one element per thread."""
        for e in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            d = g[e] + weight_decay * p[e] if weight_decay != zero else g[e]
            if momentum != zero:
                v = d if first_step else momentum * vel[e] + (one - dampening) * d
                vel[e] = v
                d = d + momentum * v if nesterov else v
            p[e] -= lr * d

    def adam(p, g, m, v, lr_bc1, beta1, beta2, sqrt_bc2, eps, weight_decay):
        """torch.optim.Adam on flat buffers; the bias corrections come in precomputed."""
        for e in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            d = g[e] + weight_decay * p[e] if weight_decay != zero else g[e]
            m1 = beta1 * m[e] + (one - beta1) * d
            v1 = beta2 * v[e] + (one - beta2) * d * d
            m[e] = m1
            v[e] = v1
            p[e] -= lr_bc1 * (m1 / (math.sqrt(v1) / sqrt_bc2 + eps))

    return SimpleNamespace(relu_fwd=relu_fwd, relu_bwd=relu_bwd,
                           sigmoid_fwd=sigmoid_fwd, sigmoid_bwd=sigmoid_bwd,
                           maxpool_fwd=maxpool_fwd, maxpool_bwd=maxpool_bwd,
                           softmax_xent=softmax_xent, sgd=sgd, adam=adam)


def probe(a, out):
    """out[i] = min(a[i], 2 - a[i]): the availability probe (``min`` once failed to compile
    under numba's built-in CUDA target with "Signature mismatch")."""
    i = cuda.grid(1)
    if i < a.size:
        out[i] = min(a[i], np.float32(2) - a[i])


PROBE_SIGNATURE = (types.float32[::1], types.float32[::1])


def specs(dtype) -> list[KernelSpec]:
    """Every kernel the backend launches for ``dtype``: GEMMs per tile, then the rest."""
    dtype = np.dtype(dtype)
    out = []
    gemm_sigs = G.signatures(dtype)
    for bm, bn in G.TILES:
        fns = G.gemm_functions(dtype, bm, bn)
        out += [KernelSpec(f"{name}/{bm}x{bn}", getattr(fns, name), gemm_sigs[name],
                           G.launch_bounds(name, dtype), dtype.name)
                for name in GEMM_NAMES]
    pw_sigs = pointwise_signatures(dtype)
    fns = pointwise_functions(dtype)
    out += [KernelSpec(name, getattr(fns, name), pw_sigs[name], None, dtype.name)
            for name in POINTWISE_NAMES]
    return out


def jit_options(launch_bounds: tuple[int, int] | None) -> dict[str, Any]:
    """``cuda.jit`` keywords for a register cap: ``launch_bounds`` where numba-cuda has
    it, else the same cap as ``max_registers`` (older numba-cuda)."""
    if not launch_bounds:
        return {}
    if "launch_bounds" in inspect.signature(cuda.jit).parameters:
        return {"launch_bounds": launch_bounds}
    threads, blocks = launch_bounds
    return {"max_registers": 65536 // (threads * blocks) // 8 * 8}


def _jit(spec: KernelSpec):
    if config.ENABLE_CUDASIM:  # the simulator runs the Python function; no signatures
        return cuda.jit(spec.pyfunc)
    return cuda.jit([spec.signature], **jit_options(spec.launch_bounds))(spec.pyfunc)


@functools.cache
def gemm_kernels(dtype, bm: int, bn: int) -> SimpleNamespace:
    """The compiled GEMM-shaped kernels for one dtype and tile (compiled on first use)."""
    dtype = np.dtype(dtype)
    fns, sigs = G.gemm_functions(dtype, bm, bn), G.signatures(dtype)
    built = {name: _jit(KernelSpec(f"{name}/{bm}x{bn}", getattr(fns, name), sigs[name],
                                   G.launch_bounds(name, dtype), dtype.name))
             for name in GEMM_NAMES}
    return SimpleNamespace(**built, bm=bm, bn=bn, block=fns.block,
                           signatures={n: sigs[n] for n in GEMM_NAMES})


@functools.cache
def pointwise_kernels(dtype) -> SimpleNamespace:
    """The compiled elementwise, pooling, loss and optimiser kernels for one dtype."""
    dtype = np.dtype(dtype)
    fns, sigs = pointwise_functions(dtype), pointwise_signatures(dtype)
    built = {name: _jit(KernelSpec(name, getattr(fns, name), sigs[name], None, dtype.name))
             for name in POINTWISE_NAMES}
    return SimpleNamespace(**built, signatures={n: sigs[n] for n in POINTWISE_NAMES})


@functools.cache
def probe_kernel():
    """The compiled availability probe."""
    return _jit(KernelSpec("probe", probe, PROBE_SIGNATURE))
