"""Layer specs: shapes, parameter slots and PyTorch names; the arithmetic lives in backends.

A layer holds no arrays. The Network gives it views into the flat parameter and
gradient buffers, and a backend module (numpy, numba, cuda) does the work, so one
layer list runs unchanged on every backend.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from cnn.errors import ShapeError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """Base class. Subclasses are frozen dataclasses, so a layer list is its own config."""

    has_params: ClassVar[bool] = False

    def output_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def param_shapes(self, in_shape: Shape) -> list[tuple[str, Shape]]:
        """``[(suffix, shape)]`` in PyTorch order: weight then bias."""
        return []

    def init_params(self, rng: np.random.Generator, in_shape: Shape) -> dict[str, np.ndarray]:
        return {}

    def forward(self, B: Any, x: Any, p: dict[str, Any]) -> tuple[Any, Any]:
        raise NotImplementedError

    def backward(self, B: Any, dy: Any, ctx: Any, p: dict, g: dict, need_dx: bool) -> Any:
        raise NotImplementedError

    def flops(self, in_shape: Shape) -> int:
        """Forward floating-point operations per sample (a multiply-add counts 2)."""
        return 0

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **asdict(self)}


def _torch_uniform(rng: np.random.Generator, shapes: list[tuple[str, Shape]], fan_in: int):
    """torch.nn's default init (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return {name: rng.uniform(-bound, bound, size=shape) for name, shape in shapes}


@dataclass(frozen=True)
class Conv2D(Layer):
    """2-D cross-correlation, NCHW, weight ``(out, in, k, k)`` like ``torch.nn.Conv2d``."""

    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 0
    has_params: ClassVar[bool] = True

    def __post_init__(self):
        if self.out_channels < 1 or self.kernel_size < 1 or self.stride < 1 or self.padding < 0:
            raise ShapeError(f"invalid {self!r}: channels, kernel and stride must be >= 1, "
                             "padding >= 0")

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise ShapeError(f"expects (C, H, W) input, got {in_shape}")
        c, h, w = in_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        if h + 2 * p < k or w + 2 * p < k:
            raise ShapeError(f"input {in_shape} with padding {p} is smaller than the "
                             f"{k}x{k} kernel")
        return (self.out_channels, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)

    def param_shapes(self, in_shape: Shape) -> list[tuple[str, Shape]]:
        k = self.kernel_size
        return [("weight", (self.out_channels, in_shape[0], k, k)), ("bias", (self.out_channels,))]

    def init_params(self, rng, in_shape):
        return _torch_uniform(rng, self.param_shapes(in_shape), in_shape[0] * self.kernel_size ** 2)

    def forward(self, B, x, p):
        return B.conv2d_forward(x, p["weight"], p["bias"], self.stride, self.padding)

    def backward(self, B, dy, ctx, p, g, need_dx):
        return B.conv2d_backward(dy, ctx, p["weight"], g["weight"], g["bias"], need_dx)

    def flops(self, in_shape):
        o, oh, ow = self.output_shape(in_shape)
        return 2 * o * oh * ow * in_shape[0] * self.kernel_size ** 2


@dataclass(frozen=True)
class MaxPool2D(Layer):
    """Max pooling; ``stride`` defaults to ``kernel_size`` (torch's default). Floors like torch."""

    kernel_size: int = 2
    stride: int | None = None

    @property
    def step(self) -> int:
        return self.kernel_size if self.stride is None else self.stride

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise ShapeError(f"expects (C, H, W) input, got {in_shape}")
        c, h, w = in_shape
        k, s = self.kernel_size, self.step
        if h < k or w < k:
            raise ShapeError(f"input {in_shape} is smaller than the {k}x{k} pooling window")
        return (c, (h - k) // s + 1, (w - k) // s + 1)

    def forward(self, B, x, p):
        return B.maxpool2d_forward(x, self.kernel_size, self.step)

    def backward(self, B, dy, ctx, p, g, need_dx):
        return B.maxpool2d_backward(dy, ctx)


@dataclass(frozen=True)
class ReLU(Layer):
    def forward(self, B, x, p):
        return B.relu_forward(x)

    def backward(self, B, dy, ctx, p, g, need_dx):
        return B.relu_backward(dy, ctx)


@dataclass(frozen=True)
class Sigmoid(Layer):
    def forward(self, B, x, p):
        return B.sigmoid_forward(x)

    def backward(self, B, dy, ctx, p, g, need_dx):
        return B.sigmoid_backward(dy, ctx)


@dataclass(frozen=True)
class Flatten(Layer):
    def output_shape(self, in_shape: Shape) -> Shape:
        return (int(np.prod(in_shape)),)

    def forward(self, B, x, p):
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:]))), x.shape

    def backward(self, B, dy, ctx, p, g, need_dx):
        return dy.reshape(ctx)


@dataclass(frozen=True)
class Dense(Layer):
    """Fully connected, weight ``(out, in)`` like ``torch.nn.Linear``; needs flat input."""

    out_features: int
    has_params: ClassVar[bool] = True

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise ShapeError(f"expects flat (features,) input, got {in_shape}: add Flatten() "
                             "before it")
        return (self.out_features,)

    def param_shapes(self, in_shape):
        return [("weight", (self.out_features, in_shape[0])), ("bias", (self.out_features,))]

    def init_params(self, rng, in_shape):
        return _torch_uniform(rng, self.param_shapes(in_shape), in_shape[0])

    def forward(self, B, x, p):
        return B.dense_forward(x, p["weight"], p["bias"])

    def backward(self, B, dy, ctx, p, g, need_dx):
        return B.dense_backward(dy, ctx, p["weight"], g["weight"], g["bias"], need_dx)

    def flops(self, in_shape):
        return 2 * in_shape[0] * self.out_features


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls for cls in (Conv2D, MaxPool2D, ReLU, Sigmoid, Flatten, Dense)
}


def layer_from_config(cfg: dict[str, Any]) -> Layer:
    """Inverse of ``Layer.config()``: how worker processes rebuild the same network."""
    cfg = dict(cfg)
    return LAYER_TYPES[cfg.pop("type")](**cfg)
