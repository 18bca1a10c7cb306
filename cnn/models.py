"""The study's networks. Each builder returns a ready ``Network``; extra keywords go to it."""

from __future__ import annotations

from typing import Any

from cnn.layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, Sigmoid
from cnn.network import Network


def seed_cnn(input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
             padding: int = 0, filters: tuple[int, int] = (32, 64), hidden: int = 256,
             **kw: Any) -> Network:
    """Conv(32,3x3)-ReLU-Pool-Conv(64,3x3)-ReLU-Pool-Flatten-Dense(256)-ReLU-Dense(K).

    The seed study's network. ``padding=1`` makes it fit 8x8 digits.
    """
    layers: list[Layer] = [
        Conv2D(filters[0], 3, padding=padding), ReLU(), MaxPool2D(2),
        Conv2D(filters[1], 3, padding=padding), ReLU(), MaxPool2D(2),
        Flatten(), Dense(hidden), ReLU(), Dense(num_classes),
    ]
    return Network(layers, input_shape, **kw)


def lenet5(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
           padding: int = 2, **kw: Any) -> Network:
    """LeNet-5 with ReLU and max pooling; ``padding=2`` gives the classic 28x28 -> 5x5x16."""
    layers: list[Layer] = [
        Conv2D(6, 5, padding=padding), ReLU(), MaxPool2D(2),
        Conv2D(16, 5), ReLU(), MaxPool2D(2),
        Flatten(), Dense(120), ReLU(), Dense(84), ReLU(), Dense(num_classes),
    ]
    return Network(layers, input_shape, **kw)


def mlp(input_shape: tuple[int, ...] = (4,), num_classes: int = 3,
        hidden: tuple[int, ...] = (30, 20), **kw: Any) -> Network:
    """The seed study's iris network 4-30-20-3 with sigmoid activations."""
    layers: list[Layer] = [Flatten()] if len(input_shape) > 1 else []
    for h in hidden:
        layers += [Dense(h), Sigmoid()]
    layers.append(Dense(num_classes))
    return Network(layers, input_shape, **kw)


MODELS = {"seed_cnn": seed_cnn, "lenet5": lenet5, "mlp": mlp}


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **kw: Any) -> Network:
    """Build a model by name (what the CLIs and worker processes call)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](input_shape=tuple(input_shape), num_classes=num_classes, **kw)
