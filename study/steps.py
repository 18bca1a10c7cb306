"""One training step of a backend, ready to time, and each kernel of it on its own.

A step is forward, mean softmax cross-entropy, backward and an SGD-momentum update of
the seed CNN (or another `cnn.models` network) on one synthetic batch (timing only).
The `cnn` backends (numpy, numba, cuda) run ``Network.loss_and_grad`` + `cnn.optim.SGD`;
the torch twin (`cnn.twin`: the same layers and weights as ``torch.nn.Sequential``)
runs ``cross_entropy`` + ``backward`` + ``torch.optim.SGD``. The same `Setup` shape for
both lets one timer (`study.measure.time_calls`) measure all of them, and `agreement`
checks they compute the same step before anything is timed (docs/DESIGN.md, "Backends
are interchangeable").
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from cnn.backends import BACKENDS, available_backends, get_backend
from cnn.errors import BackendUnavailable
from cnn.models import build
from cnn.optim import SGD
from study import checks, measure

NUM_CLASSES = 10
LR, MOMENTUM = 0.01, 0.9
#: What each kind of step is called in the results (``strategy``); numpy is the baseline.
STRATEGY = {"numpy": "sequential", "numba": "numba", "cuda": "cuda", "torch": "torch"}


# --- labels ------------------------------------------------------------------------------

def parse_shape(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"3x32x32"`` (or a sequence) -> ``(3, 32, 32)``."""
    if isinstance(value, str):
        parts = re.split(r"[x,]", value.strip().lower())
        if not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"input shape must look like 3x32x32, got {value!r}")
        value = [int(p) for p in parts]
    shape = tuple(int(v) for v in value)
    if not shape or min(shape) < 1:
        raise ValueError(f"input shape must be positive integers like 3x32x32, got {value!r}")
    return shape


def label(values: Sequence[int] | None, sep: str = "x") -> str:
    """``(3, 32, 32)`` -> ``"3x32x32"``; ``(32, 64)`` with ``sep=","`` -> ``"32,64"``."""
    return "" if values is None else sep.join(str(int(v)) for v in values)


def series(backend: str, threads: int) -> str:
    """``"numba 2t"``: how figures and logs name a (backend, threads) pair."""
    return f"{backend} {int(threads)}t"


# --- what is timed -------------------------------------------------------------------------

class Kernel(NamedTuple):
    """One kernel call to time, with its work for the roofline (FLOPs, bytes moved)."""

    name: str
    direction: str  # fwd | bwd | fwd+bwd (the loss) | update
    fn: Callable[[], Any]
    flops: float
    nbytes: float


@dataclass
class Setup:
    """A configuration ready to time: ``step()`` returns the loss; ``state()`` the weights."""

    step: Callable[[], float]
    sync: Callable[[], None]
    flops_per_sample: int
    device: str
    kernels: Callable[[], list[Kernel]]
    state: Callable[[], dict[str, np.ndarray]]


def synthetic_batch(batch: int, shape: Sequence[int], seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A float32 batch of standard normals and integer labels (timing only, labelled so)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(batch), *shape), dtype=np.float32)
    return x, rng.integers(0, NUM_CLASSES, size=int(batch)).astype(np.int64)


def build_net(shape: Sequence[int], filters: Sequence[int] | None, backend: str = "numpy",
              threads: int | None = None, model: str = "seed_cnn", seed: int = 0) -> Any:
    """The network being timed; ``filters`` (conv1, conv2) applies to seed_cnn only."""
    kw: dict[str, Any] = {"backend": backend, "threads": threads, "seed": seed}
    if filters is not None and model == "seed_cnn":
        kw["filters"] = tuple(int(f) for f in filters)
    return build(model, tuple(shape), NUM_CLASSES, **kw)


def _nbytes(*arrays: Any) -> int:
    return sum(int(getattr(a, "nbytes", 0) or 0) for a in arrays if a is not None)


def first_param_layer(net: Any) -> int:
    """Index of the first layer with weights: it computes no input gradient."""
    return next((i for i, layer in enumerate(net.layers) if layer.has_params), len(net.layers))


def layer_views(net: Any, flat: Any) -> list[dict[str, Any]]:
    """Per layer, ``{key: view}`` into a flat buffer laid out as ``net.params``."""
    views: list[dict[str, Any]] = [{} for _ in net.layers]
    for s in net.slots:
        views[s.layer][s.key] = flat[s.offset:s.offset + s.size].reshape(s.shape)
    return views


def backward_flops(layer: Any, fwd_flops: float, need_dx: bool) -> float:
    """dW costs one forward, dx another; the first parameter layer computes no dx."""
    return fwd_flops * (2 if need_dx else 1) if layer.has_params else 0.0


def network_kernels(net: Any, x: np.ndarray, y: np.ndarray,
                    update: Callable[[], None]) -> list[Kernel]:
    """Every backend kernel of one training step, called on the tensors of a real pass.

    Unfused (layer by layer): the per-kernel view shows each layer's cost; the whole step
    (`Setup.step`) runs the network's fused path.
    """
    B, first, n = net.backend, first_param_layer(net), x.shape[0]
    pv, gv = layer_views(net, net.params), layer_views(net, net.grads)
    h = B.from_host(np.ascontiguousarray(x, dtype=net.dtype))
    inputs, ctxs = [], []
    for layer, p in zip(net.layers, pv, strict=True):
        inputs.append(h)
        h, ctx = layer.forward(B, h, p)
        ctxs.append(ctx)
    outputs, logits = [*inputs[1:], h], h
    _, d = B.softmax_cross_entropy(logits, y)
    douts: list[Any] = [None] * len(net.layers)
    for i in range(len(net.layers) - 1, first - 1, -1):
        douts[i] = d
        d = net.layers[i].backward(B, d, ctxs[i], pv[i], gv[i], need_dx=i > first)
    out = []
    for i, layer in enumerate(net.layers):
        name, p, g = f"{i}.{type(layer).__name__}", pv[i], gv[i]
        flops = float(layer.flops(net.in_shape(i)) * n)
        pbytes = _nbytes(*p.values())
        out.append(Kernel(name, "fwd", partial(layer.forward, B, inputs[i], p), flops,
                          _nbytes(inputs[i], outputs[i]) + pbytes))
        if i >= first:
            need_dx = i > first
            nbytes = _nbytes(douts[i], inputs[i]) + need_dx * _nbytes(inputs[i]) + 2 * pbytes
            out.append(Kernel(name, "bwd", partial(layer.backward, B, douts[i], ctxs[i], p, g,
                                                   need_dx),
                              backward_flops(layer, flops, need_dx), nbytes))
    out.append(Kernel("loss", "fwd+bwd", partial(B.softmax_cross_entropy, logits, y), 0.0,
                      2 * _nbytes(logits)))
    out.append(Kernel("sgd_update", "update", update, 0.0, 5 * _nbytes(net.params)))
    return out


def cnn_setup(backend: str, threads: int, batch: int, shape: Sequence[int],
              filters: Sequence[int] | None, model: str = "seed_cnn", seed: int = 0) -> Setup:
    """A `cnn` backend: ``loss_and_grad`` then `cnn.optim.SGD` with momentum."""
    net = build_net(shape, filters, backend, threads, model, seed)
    x, y = synthetic_batch(batch, shape, seed)
    update = SGD(net, lr=LR, momentum=MOMENTUM).step

    def step() -> float:
        loss = net.loss_and_grad(x, y)
        update()
        return loss

    return Setup(step, net.backend.synchronize, net.flops(train=True),
                 net.backend.device_name(), partial(network_kernels, net, x, y, update),
                 net.state_dict)


def torch_kernels(model: Any, net: Any, xt: Any, yt: Any, opt: Any) -> list[Kernel]:
    """Each module of the twin alone (forward; autograd backward), the loss, the update."""
    import torch

    first, n = first_param_layer(net), xt.shape[0]
    cross_entropy = torch.nn.functional.cross_entropy
    h, inputs, outputs = xt, [], []
    for mod in model:
        inputs.append(h.detach())
        h = mod(h)
        h.retain_grad()
        outputs.append(h)
    opt.zero_grad(set_to_none=True)
    cross_entropy(h, yt).backward()
    out = []
    for i, (layer, mod) in enumerate(zip(net.layers, model, strict=True)):
        need_dx = i > first
        xin = inputs[i].clone().requires_grad_(need_dx)
        y, params = mod(xin), list(mod.parameters())
        name, flops = f"{i}.{type(layer).__name__}", float(layer.flops(net.in_shape(i)) * n)
        pbytes = sum(p.numel() * p.element_size() for p in params)
        io = xin.numel() * xin.element_size() + y.numel() * y.element_size()
        out.append(Kernel(name, "fwd", partial(mod, xin), flops, io + pbytes))
        targets = ([xin] if need_dx else []) + params
        if i >= first and targets:
            fn = partial(torch.autograd.grad, y, targets, outputs[i].grad, retain_graph=True)
            nbytes = io + need_dx * xin.numel() * xin.element_size() + 2 * pbytes
            out.append(Kernel(name, "bwd", fn, backward_flops(layer, flops, need_dx), nbytes))
    logits = outputs[-1].detach().requires_grad_(True)
    out.append(Kernel("loss", "fwd+bwd",
                      lambda: torch.autograd.grad(cross_entropy(logits, yt), logits), 0.0,
                      2 * logits.numel() * logits.element_size()))
    out.append(Kernel("sgd_update", "update", opt.step, 0.0,
                      5 * sum(p.numel() * p.element_size() for p in model.parameters())))
    return out


def torch_setup(threads: int, batch: int, shape: Sequence[int], filters: Sequence[int] | None,
                model: str = "seed_cnn", seed: int = 0) -> Setup:
    """The torch twin: forward + cross_entropy + backward + ``torch.optim.SGD`` step."""
    import torch

    from cnn.twin import torch_twin

    net = build_net(shape, filters, "numpy", None, model, seed)  # layers, weights, FLOPs
    twin = torch_twin(net).train()
    x, y = synthetic_batch(batch, shape, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    cross_entropy = torch.nn.functional.cross_entropy

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = cross_entropy(twin(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

    def state() -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in twin.state_dict().items()}

    return Setup(step, lambda: None, net.flops(train=True), "cpu",
                 partial(torch_kernels, twin, net, xt, yt, opt), state)


def make_setup(backend: str, threads: int, batch: int, shape: Sequence[int],
               filters: Sequence[int] | None = (32, 64), model: str = "seed_cnn",
               seed: int = 0) -> Setup:
    """One configuration ready to time (build it inside `study.measure.pinned_threads`)."""
    args = (threads, batch, tuple(shape), filters, model, seed)
    return torch_setup(*args) if backend == "torch" else cnn_setup(backend, *args)


# --- where a configuration can run ------------------------------------------------------

def backend_status(names: Sequence[str]) -> dict[str, str]:
    """``{name: "ok" | reason}`` for registered backends and ``torch`` (the twin)."""
    registered = available_backends()
    out = {}
    for name in names:
        if name == "torch":
            ok = importlib.util.find_spec("torch") is not None
            out[name] = "ok" if ok else "torch is not installed: pip install -e '.[compare]'"
        else:
            out[name] = registered.get(name, f"unknown backend {name!r}; choose from "
                                             f"{', '.join([*BACKENDS, 'torch'])}")
    return out


def blas_threads(backend: str, threads: int) -> int:
    """numpy and numba call BLAS single-threaded by design (numba from each prange thread)."""
    return 1 if backend in ("numpy", "numba") else int(threads)


def thread_problem(backend: str, threads: int) -> str | None:
    """Why ``backend`` cannot run at ``threads`` here, or None."""
    if backend == "numpy" and threads != 1:
        return "numpy is the sequential baseline: 1 thread only"
    limit = measure.max_threads()
    if limit is not None and threads > limit:
        return f"{threads} threads > NUMBA_NUM_THREADS={limit}"
    return None


def prepare(backend: str, threads: int) -> None:
    """Raise why a configuration cannot run; import torch before threads are pinned.

    A backend's first ``configure()`` sets process-wide state (numpy and numba pin BLAS to
    one thread for good): it happens here, outside `pinned_threads`, so that leaving the
    pinned block restores that state instead of undoing it.
    """
    reason = backend_status([backend])[backend]
    if reason != "ok":
        raise BackendUnavailable(reason)
    problem = thread_problem(backend, threads)
    if problem:
        raise ValueError(problem)
    if backend == "torch":
        import torch  # noqa: F401  (pinned_threads pins torch only once it is imported)
    get_backend("numpy" if backend == "torch" else backend).configure(None)


def pinned(backend: str, threads: int) -> Any:
    """The thread pools of a configuration, pinned (`study.measure.pinned_threads`)."""
    prepare(backend, threads)
    return measure.pinned_threads(threads, blas_threads(backend, threads))


def peak_memory(make: Callable[[], Setup]) -> dict[str, Any]:
    """Peak memory of a configuration: built afresh and stepped twice, untimed."""
    with measure.memory_probe() as mem:
        setup = make()
        setup.step()
        setup.step()
        setup.sync()
        del setup
    return mem


def agreement(backends: Sequence[str], shape: Sequence[int], batch: int,
              filters: Sequence[int] | None = (32, 64), model: str = "seed_cnn",
              steps: int = 2, seed: int = 0) -> list[checks.Check]:
    """Each backend's losses and weights after ``steps`` steps against the NumPy reference.

    Run before timing: a backend that computes another step must not be compared by speed.
    """
    def run(backend: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with pinned(backend, 1):
            s = make_setup(backend, 1, batch, shape, filters, model, seed)
            losses = np.array([s.step() for _ in range(steps)], dtype=np.float32)
            s.sync()
            return losses, s.state()

    want_loss, want = run("numpy")
    out = []
    for backend in backends:
        if backend == "numpy":
            continue
        loss, got = run(backend)
        out.append(checks.compare(loss, want_loss, f"{backend} loss"))
        out += [checks.compare(got[k], w, f"{backend} {k}") for k, w in want.items()]
    return out
