"""What every family file of the ladder is made of: cases, versions, ops, and the helpers
their versions share.

A *version* is a function ``vN(a: dict) -> Callable[[], tuple]``: given one case's inputs
it does its untimed set-up (scratch, private copies of in-place state) and returns the
call the checker compares and the timer times. Its docstring's first paragraph says what
changed against the version before it, and why. An *op* is one kernel contract (inputs,
NumPy reference, FLOP and byte counts) with its versions v1..vN in order: the naive loop
nest first, today's production kernel (imported from ``cnn.backends.numba_cpu``, never
copied) marked ``production``, and candidates not yet in the backend after it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from cnn.backends import numba_cpu as NB
from cnn.backends import numpy_seq as REF  # noqa: F401  (the reference, for the families)

#: The backend's jitted kernels (gemm, im2col, ...): intermediate versions reuse them.
K = NB.kernels
N_, T_ = K.N_, K.T_
U = np.uint64

Run = Callable[[], tuple]


def jit(parallel: bool = False) -> Callable:
    """The ladder's own kernels compile like the backend's: cached, no GIL, numpy errors."""
    return numba.njit(nogil=True, cache=True, parallel=parallel, error_model="numpy")


@dataclass(frozen=True)
class Case:
    """One shape of an op: ``label`` names it in tables, ``p`` holds its parameters."""

    label: str
    batch_size: int
    p: dict[str, Any]


@dataclass(frozen=True)
class Version:
    name: str
    prepare: Callable[[dict], Run]
    status: str  # "history", "production" or "candidate"
    deterministic: bool  # bit-identical for every thread count

    @property
    def what(self) -> str:
        """The docstring's first paragraph, on one line: what changed, and why."""
        doc = inspect.getdoc(self.prepare) or ""
        return " ".join(doc.split("\n\n")[0].split())


def versions(*fns: Callable[[dict], Run], production: int, candidates: Sequence[int] = (),
             nondeterministic: Sequence[int] = ()) -> tuple[Version, ...]:
    """Versions v1..vN from functions whose names end in v1..vN, in order; ``production``
    is today's rung, ``candidates`` are rungs not (yet) in the backend."""
    out = []
    for i, fn in enumerate(fns, start=1):
        if not fn.__name__.endswith(f"v{i}"):
            raise ValueError(f"version {i} is {fn.__name__!r}: name the functions ...v1..vN")
        if not (inspect.getdoc(fn) or "").strip():
            raise ValueError(f"{fn.__module__}.{fn.__name__} needs a docstring: what changed")
        status = ("production" if i == production else
                  "candidate" if i in candidates else "history")
        out.append(Version(f"v{i}", fn, status, i not in nondeterministic))
    return tuple(out)


@dataclass(frozen=True)
class Op:
    """One kernel contract and its ladder of versions."""

    family: str
    name: str
    versions: tuple[Version, ...]
    checks: Callable[[bool], list[Case]]  # (quick) -> check cases
    timings: Callable[[bool], list[Case]]  # (quick) -> timed cases
    make: Callable[[Case, np.random.Generator], dict]  # float32 inputs of a case
    reference: Callable[[dict], tuple]  # float64 NumPy reference outputs (None: no output)
    flops: Callable[[Case], float]
    nbytes: Callable[[Case], float]  # bytes a kernel must at least read and write
    rtol: float = 1e-4


def f64(a: dict) -> dict:
    """The case's inputs with every float array in float64 (for the reference)."""
    return {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
            else v for k, v in a.items()}


def rel_error(got: np.ndarray | None, want: np.ndarray | None) -> float:
    """max |got - want| / max |want| (0 when both are absent; inf on a shape mismatch)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    if not np.isfinite(got).all():
        return float("inf")
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
    return float(np.abs(got - want).max(initial=0.0)) / scale


def same_bits(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None
                                             and np.array_equal(x, y, equal_nan=True))
               for x, y in zip(a, b, strict=True))


def threads() -> int:
    """The numba thread count the harness set for this call."""
    return numba.get_num_threads()


def bounds(n: int, parts: int) -> np.ndarray:
    """Edges of ``parts`` near-equal parts of ``range(n)``."""
    return np.array([i * n // parts for i in range(parts + 1)], dtype=np.int64)


def conv_out(h: int, w: int, k: int, s: int, p: int) -> tuple[int, int]:
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def conv_cases(quick: bool, seed: int = 0) -> list[Case]:
    """Odd sizes, 1 channel, batch 1, k = 1..5, stride 1/2, padding 0-2, C*k*k below and
    above O (the backend's two im2col layouts), with and without a ReLU after."""
    fixed = [(1, 3, 9, 9, 4, 3, 1, 0), (2, 1, 8, 8, 4, 3, 1, 1), (1, 2, 7, 5, 3, 3, 2, 1),
             (3, 4, 9, 6, 5, 1, 1, 0), (2, 2, 6, 7, 3, 5, 2, 2), (1, 1, 3, 3, 2, 3, 1, 0),
             (1, 1, 7, 6, 12, 3, 1, 1), (2, 5, 5, 8, 4, 2, 1, 0)]
    rng = np.random.default_rng(seed)
    count = 10 if quick else 24
    while len(fixed) < count:
        k = int(rng.choice([1, 2, 3, 5]))
        p = int(rng.integers(0, 3))
        h = int(rng.integers(max(1, k - 2 * p), 12))
        w = int(rng.integers(max(1, k - 2 * p), 12))
        fixed.append((int(rng.integers(1, 4)), int(rng.integers(1, 7)), h, w,
                      int(rng.integers(1, 13)), k, int(rng.choice([1, 2])), p))
    if not quick:  # the seed CNN's layers at a small batch (both conv layouts, real widths)
        fixed += [(3, 3, 32, 32, 32, 3, 1, 0), (3, 32, 15, 15, 64, 3, 1, 0),
                  (2, 1, 28, 28, 32, 3, 1, 0), (2, 32, 13, 13, 64, 3, 1, 1)]
    return [conv_case(*c, relu=i % 2 == 1) for i, c in enumerate(fixed)]


def conv_case(n: int, c: int, h: int, w: int, o: int, k: int, s: int, p: int,
              relu: bool = True, label: str = "") -> Case:
    name = label or f"n{n} c{c} {h}x{w} o{o} k{k} s{s} p{p}" + (" relu" if relu else "")
    return Case(name, n, dict(n=n, c=c, h=h, w=w, o=o, k=k, s=s, p=p, relu=relu))


#: The layers the timer measures: the seed CNN on 3x32x32 at batch 128 (the headline
#: configuration) and on 1x28x28 at batch 64 (the MPI and HOGWILD configuration).
SEED_CONVS = [conv_case(128, 3, 32, 32, 32, 3, 1, 0, label="cifar conv1 b128"),
              conv_case(128, 32, 15, 15, 64, 3, 1, 0, label="cifar conv2 b128"),
              conv_case(64, 1, 28, 28, 32, 3, 1, 0, label="mnist conv1 b64"),
              conv_case(64, 32, 13, 13, 64, 3, 1, 0, label="mnist conv2 b64")]
QUICK_CONVS = [conv_case(2, 3, 10, 10, 8, 3, 1, 0, label="tiny conv1 b2"),
               conv_case(2, 8, 6, 6, 12, 3, 1, 1, label="tiny conv2 b2")]


def conv_inputs(case: Case, rng: np.random.Generator) -> dict:
    q = case.p
    x = rng.standard_normal((q["n"], q["c"], q["h"], q["w"]), np.float32)
    w = rng.standard_normal((q["o"], q["c"], q["k"], q["k"]), np.float32)
    w *= np.float32(1 / np.sqrt(q["c"] * q["k"] ** 2))
    b = rng.standard_normal(q["o"], np.float32)
    return dict(x=x, w=w, b=b, s=q["s"], p=q["p"], relu=q["relu"])


def conv_flops(case: Case) -> float:
    q = case.p
    oh, ow = conv_out(q["h"], q["w"], q["k"], q["s"], q["p"])
    return 2.0 * q["n"] * q["o"] * oh * ow * q["c"] * q["k"] ** 2


def conv_bytes(case: Case) -> float:
    q = case.p
    oh, ow = conv_out(q["h"], q["w"], q["k"], q["s"], q["p"])
    return 4.0 * (q["n"] * q["c"] * q["h"] * q["w"] + q["o"] * (q["c"] * q["k"] ** 2 + 1)
                  + q["n"] * q["o"] * oh * ow)
