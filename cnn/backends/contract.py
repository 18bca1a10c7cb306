"""The backend contract: which kernels a backend must provide, which it may, and their signatures.

`Network` calls a backend only through these names, so a new backend is done when
`check(module)` returns no problem and its numbers match the NumPy reference
(docs/DESIGN.md, "Backend contract"). Forward kernels return ``(out, ctx)``;
backward kernels take that ``ctx`` back, write weight gradients into the views they
are given and return ``dx`` (None when ``need_dx`` is false).
"""

from __future__ import annotations

import inspect
from types import ModuleType

from cnn.errors import BackendUnavailable

#: Attributes every backend module has: a short name and a one-line description.
ATTRIBUTES: tuple[str, ...] = ("NAME", "DESCRIPTION")

#: Kernel name -> its positional parameters, in order. Every backend has all of these.
REQUIRED: dict[str, tuple[str, ...]] = {
    # set-up and memory
    "configure": ("threads",),
    "zeros": ("n", "dtype"),
    "from_host": ("a",),
    "to_host": ("a",),
    "copy_into": ("dst", "src"),
    "device_name": (),
    "synchronize": (),
    # layers
    "conv2d_forward": ("x", "w", "b", "stride", "padding"),
    "conv2d_backward": ("dy", "ctx", "w", "dw", "db", "need_dx"),
    "maxpool2d_forward": ("x", "k", "s"),
    "maxpool2d_backward": ("dy", "ctx"),
    "relu_forward": ("x",),
    "relu_backward": ("dy", "y"),
    "sigmoid_forward": ("x",),
    "sigmoid_backward": ("dy", "y"),
    "dense_forward": ("x", "w", "b"),
    "dense_backward": ("dy", "x", "w", "dw", "db", "need_dx"),
    # loss and optimisers
    "softmax_cross_entropy": ("logits", "labels"),
    "sgd_update": ("params", "grads", "velocity", "lr", "momentum", "dampening",
                   "weight_decay", "nesterov", "first_step"),
    "adam_update": ("params", "grads", "m", "v", "lr", "beta1", "beta2", "eps",
                    "weight_decay", "step"),
}

#: Fused kernels a backend may offer. `Network` uses one when present; the numbers must
#: equal the unfused pair's (tests check bit-identity where the backend claims it).
OPTIONAL: dict[str, tuple[str, ...]] = {
    # Conv2D -> ReLU in one pass: returns (relu_out, conv_ctx)
    "conv2d_relu_forward": ("x", "w", "b", "stride", "padding"),
    # ReLU -> MaxPool2D backward in one pass: dy of the pool to dx of the ReLU's input
    "maxpool2d_relu_backward": ("dy", "ctx"),
    # a probe the backend runs before it is handed out (no GPU, no compiler, ...)
    "check_available": (),
}


def _params(fn: object) -> tuple[str, ...] | None:
    try:
        sig = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return tuple(p.name for p in sig.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def problems(module: ModuleType) -> list[str]:
    """Every way ``module`` breaks the contract, one line each (empty when it complies)."""
    out = [f"missing attribute {a}" for a in ATTRIBUTES if not hasattr(module, a)]
    for table, required in ((REQUIRED, True), (OPTIONAL, False)):
        for name, want in table.items():
            fn = getattr(module, name, None)
            if fn is None:
                if required:
                    out.append(f"missing kernel {name}{want}")
                continue
            if not callable(fn):
                out.append(f"{name} is not callable")
                continue
            got = _params(fn)
            if got is not None and got[:len(want)] != want:
                out.append(f"{name} takes {got}, the contract says {want}")
    return out


def check(module: ModuleType) -> None:
    """Raise `BackendUnavailable` naming every breach; the registry runs this on load."""
    found = problems(module)
    if found:
        name = getattr(module, "NAME", module.__name__)
        raise BackendUnavailable(f"backend {name!r} breaks the kernel contract "
                                 f"(cnn/backends/contract.py): " + "; ".join(found))


def supports(module: ModuleType, kernel: str) -> bool:
    """Whether ``module`` offers the optional ``kernel`` (the fused pairs)."""
    if kernel not in OPTIONAL:
        raise KeyError(f"{kernel!r} is not an optional kernel of the contract")
    return callable(getattr(module, kernel, None))
