"""Parallel CNN training study: one network, many ways to run it.

>>> from cnn import models
>>> net = models.seed_cnn((1, 28, 28))
"""

from cnn.backends import available_backends, get_backend
from cnn.errors import BackendUnavailable, CnnError, DataError, DivergenceError, ShapeError
from cnn.layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, Sigmoid
from cnn.models import build as build_model
from cnn.models import lenet5, mlp, seed_cnn
from cnn.network import Network

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "CnnError", "Conv2D", "DataError", "Dense", "DivergenceError",
    "Flatten", "Layer", "MaxPool2D", "Network", "ReLU", "ShapeError", "Sigmoid",
    "available_backends", "build_model", "get_backend", "lenet5", "mlp", "seed_cnn",
]
