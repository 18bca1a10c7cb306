"""Network: a layer list over one flat parameter buffer, PyTorch-compatible ``state_dict``.

Every weight and bias lives in ``params`` (one contiguous 1-D array, in
``state_dict`` order, each slot C-contiguous) and every gradient in ``grads``
with the same layout. Layers see views. So an MPI allreduce is one call, a
HOGWILD worker maps one shared buffer and a parameter server sends one message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnn.backends import contract, get_backend
from cnn.errors import ShapeError
from cnn.io import save_npz
from cnn.layers import Conv2D, Layer, MaxPool2D, ReLU, Shape, layer_from_config


@dataclass(frozen=True)
class ParamSlot:
    """Where one named tensor sits in the flat buffer."""

    name: str  # "<layer index>.weight" / "<layer index>.bias", as torch.nn.Sequential names it
    layer: int
    key: str
    shape: Shape
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class Network:
    """A feed-forward network trained with mean softmax cross-entropy."""

    def __init__(self, layers: list[Layer], input_shape: Shape, backend: Any = "numpy",
                 dtype: Any = np.float32, seed: int = 0, threads: int | None = None,
                 params: np.ndarray | None = None):
        self.layers = list(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.seed = seed
        self.backend = get_backend(backend)
        self.threads = self.backend.configure(threads)
        self.shapes = self._infer_shapes()
        self.slots = self._layout()
        self.num_params = sum(s.size for s in self.slots)
        self.num_classes = self.shapes[-1][0]

        host = np.empty(self.num_params, dtype=self.dtype) if params is None else params
        if params is None:
            self._init_params(host, seed)
        elif params.shape != (self.num_params,) or params.dtype != self.dtype:
            raise ShapeError(f"params buffer must be ({self.num_params},) {self.dtype}, "
                             f"got {params.shape} {params.dtype}")
        # ``params`` may be caller-owned memory (a HOGWILD shared segment): used in place.
        self.params = self.backend.from_host(host)
        self.grads = self.backend.zeros(self.num_params, self.dtype)
        self._pviews = self._views(self.params)
        self._gviews = self._views(self.grads)
        self._first_param_layer = next(
            (i for i, layer in enumerate(self.layers) if layer.has_params), len(self.layers))
        self._fused_conv_relu, self._fused_relu_pool = self._fusion_plan()

    # --- construction ----------------------------------------------------------------

    def _infer_shapes(self) -> list[Shape]:
        shapes, shape = [], self.input_shape
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except ShapeError as exc:
                raise ShapeError(f"layer {i} ({layer!r}) cannot take input of shape {shape}: "
                                 f"{exc}. Use a larger input or add padding.") from None
            if min(shape) < 1:
                raise ShapeError(f"layer {i} ({layer!r}) maps input {shape} to an empty "
                                 f"output {shape}")
            shapes.append(shape)
        if len(shapes) == 0 or len(shapes[-1]) != 1:
            raise ShapeError(f"the last layer must output class scores (K,), got "
                             f"{shapes[-1] if shapes else 'no layers'}")
        return shapes

    def _layout(self) -> list[ParamSlot]:
        slots, offset = [], 0
        for i, layer in enumerate(self.layers):
            for key, shape in layer.param_shapes(self.in_shape(i)):
                slots.append(ParamSlot(f"{i}.{key}", i, key, tuple(shape), offset))
                offset += int(np.prod(shape))
        return slots

    def _init_params(self, host: np.ndarray, seed: int) -> None:
        # float64 draws then one cast: float32 and float64 nets with one seed start equal
        rng = np.random.default_rng(seed)
        for i, layer in enumerate(self.layers):
            for key, value in layer.init_params(rng, self.in_shape(i)).items():
                slot = self.slot(f"{i}.{key}")
                host[slot.offset:slot.offset + slot.size] = value.ravel()

    def _views(self, flat) -> list[dict[str, Any]]:
        views: list[dict[str, Any]] = [{} for _ in self.layers]
        for s in self.slots:
            views[s.layer][s.key] = flat[s.offset:s.offset + s.size].reshape(s.shape)
        return views

    def in_shape(self, i: int) -> Shape:
        """Per-sample input shape of layer ``i``."""
        return self.input_shape if i == 0 else self.shapes[i - 1]

    def slot(self, name: str) -> ParamSlot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(f"no parameter {name!r}; have {[s.name for s in self.slots]}")

    # --- compute ---------------------------------------------------------------------

    def _check_x(self, x) -> Any:
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise ShapeError(f"input must have shape (N, {', '.join(map(str, self.input_shape))})"
                             f", got {x.shape}")
        if x.shape[0] == 0:
            raise ShapeError("input batch is empty")
        return self.backend.from_host(np.ascontiguousarray(x, dtype=self.dtype))

    def _check_y(self, y, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise ShapeError(f"labels must be {n} integers, got shape {y.shape} dtype {y.dtype}")
        if n and (y.min() < 0 or y.max() >= self.num_classes):
            raise ShapeError(f"labels must lie in [0, {self.num_classes}), got "
                             f"[{y.min()}, {y.max()}]")
        return y.astype(np.int64, copy=False)

    def _fusion_plan(self) -> tuple[set[int], set[int]]:
        """Layer pairs a backend runs as one kernel (same numbers, one pass less).

        ``conv2d_relu_forward`` for Conv2D -> ReLU, ``maxpool2d_relu_backward`` for
        ReLU -> MaxPool2D; backends without them (the NumPy reference) run layer by layer.
        """
        pairs = list(zip(self.layers, self.layers[1:], strict=False))
        fused_conv = contract.supports(self.backend, "conv2d_relu_forward")
        fused_pool = contract.supports(self.backend, "maxpool2d_relu_backward")
        conv_relu = {i for i, (a, b) in enumerate(pairs) if isinstance(a, Conv2D)
                     and isinstance(b, ReLU) and fused_conv}
        relu_pool = {i for i, (a, b) in enumerate(pairs) if isinstance(a, ReLU)
                     and isinstance(b, MaxPool2D) and i >= self._first_param_layer
                     and fused_pool}
        return conv_relu, relu_pool

    def _forward(self, x):
        ctxs: list[Any] = []
        i = 0
        while i < len(self.layers):
            layer, p = self.layers[i], self._pviews[i]
            if i in self._fused_conv_relu:
                x, ctx = self.backend.conv2d_relu_forward(x, p["weight"], p["bias"],
                                                          layer.stride, layer.padding)
                ctxs += [ctx, x]  # the ReLU's ctx is its output, as relu_forward returns
                i += 2
                continue
            x, ctx = layer.forward(self.backend, x, p)
            ctxs.append(ctx)
            i += 1
        return x, ctxs

    def forward(self, x) -> np.ndarray:
        """Logits ``(N, K)`` for a batch ``(N, *input_shape)``, as a host array."""
        logits, _ = self._forward(self._check_x(x))
        return self.backend.to_host(logits)

    def loss_and_grad(self, x, y, on_layer: Callable[[int], None] | None = None) -> float:
        """Mean softmax cross-entropy of the batch; fills ``grads`` (overwrites, never adds).

        ``on_layer(i)`` runs right after layer ``i``'s backward, top layer first, so a
        caller can start reducing the gradients of the layers done while the layers below
        still run (``cnn.parallel.mpi --overlap``).
        """
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0])
        logits, ctxs = self._forward(x)
        loss, d = self.backend.softmax_cross_entropy(logits, y)
        i = len(self.layers) - 1
        while i >= self._first_param_layer:
            if i - 1 in self._fused_relu_pool:  # MaxPool2D i over ReLU i - 1
                d = self.backend.maxpool2d_relu_backward(d, ctxs[i])
                done = (i, i - 1)
                i -= 2
            else:
                d = self.layers[i].backward(self.backend, d, ctxs[i], self._pviews[i],
                                            self._gviews[i], need_dx=i > self._first_param_layer)
                done = (i,)
                i -= 1
            if on_layer is not None:
                for j in done:
                    on_layer(j)
        return float(loss)

    def evaluate(self, x, y, batch_size: int = 1000) -> tuple[float, float]:
        """``(mean loss, accuracy)`` over a whole split, in batches (no gradients)."""
        if len(x) != len(y) or len(y) == 0:
            raise ShapeError(f"evaluate needs as many labels as samples (and at least one), "
                             f"got {len(x)} samples and {len(y)} labels")
        y = self._check_y(y, len(y))
        total_loss, correct = 0.0, 0
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits, _ = self._forward(self._check_x(xb))
            loss, _ = self.backend.softmax_cross_entropy(logits, yb)
            total_loss += float(loss) * len(yb)
            correct += int((self.backend.to_host(logits).argmax(axis=1) == yb).sum())
        return total_loss / len(y), correct / len(y)

    def predict(self, x, batch_size: int = 1000) -> np.ndarray:
        """Predicted class index per sample."""
        if len(x) == 0:
            raise ShapeError("predict needs at least one sample")
        return np.concatenate([self.forward(x[i:i + batch_size]).argmax(axis=1)
                               for i in range(0, len(x), batch_size)])

    # --- weights ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{name: array}`` exactly as ``torch.nn.Sequential`` of the same layers names them."""
        host = self.backend.to_host(self.params)
        return {s.name: host[s.offset:s.offset + s.size].reshape(s.shape).copy()
                for s in self.slots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy every tensor in (names and shapes must match exactly; torch tensors accepted)."""
        names = {s.name for s in self.slots}
        missing, unexpected = names - set(state), set(state) - names
        if missing or unexpected:
            raise KeyError(f"state_dict mismatch: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        values = []
        for s in self.slots:  # check everything before touching any weight
            value = state[s.name]
            value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            if tuple(value.shape) != s.shape:
                raise ShapeError(f"{s.name}: expected shape {s.shape}, got {tuple(value.shape)}")
            values.append(np.ascontiguousarray(value, dtype=self.dtype))
        for s, value in zip(self.slots, values, strict=True):
            self.backend.copy_into(self._pviews[s.layer][s.key], value)

    def save(self, path: str | os.PathLike) -> None:
        """Weights as ``.npz`` (state_dict names), written atomically."""
        save_npz(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        with np.load(path) as data:
            self.load_state_dict({k: data[k] for k in data.files})

    # --- description -----------------------------------------------------------------

    def flops(self, train: bool = True) -> int:
        """FLOPs per sample: forward, or a training step (forward + dW + dx but the first dx)."""
        fwd = [layer.flops(self.in_shape(i)) for i, layer in enumerate(self.layers)]
        total = sum(fwd)
        if train:
            total += sum(2 * f for f, layer in zip(fwd, self.layers, strict=True)
                         if layer.has_params)
            total -= fwd[self._first_param_layer] if self._first_param_layer < len(fwd) else 0
        return total

    def config(self) -> dict[str, Any]:
        """Enough to rebuild the same network in another process (MPI ranks, HOGWILD workers)."""
        return {"layers": [layer.config() for layer in self.layers],
                "input_shape": self.input_shape, "dtype": self.dtype.name, "seed": self.seed}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **kw) -> Network:
        kw = {"dtype": cfg["dtype"], "seed": cfg["seed"], **kw}
        return cls([layer_from_config(c) for c in cfg["layers"]], cfg["input_shape"], **kw)

    def summary(self) -> str:
        rows = [f"{'#':>3}  {'layer':<60} {'output':<16} {'params':>9}"]
        for i, (layer, shape) in enumerate(zip(self.layers, self.shapes, strict=True)):
            n = sum(s.size for s in self.slots if s.layer == i)
            rows.append(f"{i:>3}  {layer!r:<60} {str(shape):<16} {n:>9,}")
        rows.append(f"total parameters: {self.num_params:,}  ({self.dtype}, backend "
                    f"{self.backend.NAME}); input {self.input_shape}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (f"Network({len(self.layers)} layers, input={self.input_shape}, "
                f"params={self.num_params:,}, backend={self.backend.NAME!r}, dtype={self.dtype})")
