"""The Numba CPU kernels as a ladder: every version of every kernel, v1..vN, runnable side
by side, checked against the NumPy reference by one checker and timed by one timer
(``python benchmarks/ladder.py --check`` / ``--time``; llm.c's ``dev/cuda`` is the model).

One file per kernel family (conv forward, conv backward, pooling, dense, elementwise and
the optimiser updates); each holds one or more ops (:class:`common.Op`), each op its
versions in order. The production rung calls ``cnn.backends.numba_cpu`` itself; rungs
marked ``candidate`` are not in the backend and wait for the timed ladder to decide.
"""

from __future__ import annotations

from . import conv_backward, conv_forward, dense, elementwise, pooling
from .common import Op

#: Family name -> its module, in the order of a training step.
FAMILIES = {"conv_forward": conv_forward, "conv_backward": conv_backward, "pooling": pooling,
            "dense": dense, "elementwise": elementwise}


def ops(families: list[str] | None = None, names: list[str] | None = None) -> list[Op]:
    """The ops of the given families (all by default), optionally only the named ops."""
    chosen = families or list(FAMILIES)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown kernel family {', '.join(unknown)}; choose from "
                         f"{', '.join(FAMILIES)}")
    out = [op for f in chosen for op in FAMILIES[f].OPS]
    if names:
        missing = set(names) - {op.name for op in out}
        if missing:
            raise ValueError(f"unknown op {', '.join(sorted(missing))}; choose from "
                             f"{', '.join(op.name for op in out)}")
        out = [op for op in out if op.name in names]
    return out
