"""The torch twin: the same layers as ``torch.nn.Sequential``, loaded through ``state_dict``.

This is how every backend is checked (same logits, loss, gradients) and the
reference column of every benchmark. torch is optional (the ``compare`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sigmoid
from cnn.network import Network


def torch_twin(net: Network, device: str = "cpu") -> Any:
    """A ``torch.nn.Sequential`` with the network's layers and a copy of its weights."""
    import torch
    from torch import nn

    mods = []
    for i, layer in enumerate(net.layers):
        in_shape = net.in_shape(i)
        if isinstance(layer, Conv2D):
            mods.append(nn.Conv2d(in_shape[0], layer.out_channels, layer.kernel_size,
                                  stride=layer.stride, padding=layer.padding))
        elif isinstance(layer, Dense):
            mods.append(nn.Linear(in_shape[0], layer.out_features))
        elif isinstance(layer, MaxPool2D):
            mods.append(nn.MaxPool2d(layer.kernel_size, stride=layer.step))
        elif isinstance(layer, ReLU):
            mods.append(nn.ReLU())
        elif isinstance(layer, Sigmoid):
            mods.append(nn.Sigmoid())
        elif isinstance(layer, Flatten):
            mods.append(nn.Flatten())
        else:
            raise TypeError(f"no torch twin for {layer!r}")
    dtype = torch.float64 if net.dtype == np.float64 else torch.float32
    model = nn.Sequential(*mods).to(device=device, dtype=dtype)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
    return model


def torch_loss_and_grads(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, Any, dict]:
    """``(loss, logits, {name: grad})`` of the twin on one batch, as NumPy arrays."""
    import torch

    model.zero_grad(set_to_none=True)
    param = next(model.parameters())
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(param.device, param.dtype)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(param.device)
    logits = model(xt)
    loss = torch.nn.functional.cross_entropy(logits, yt)
    loss.backward()
    grads = {k: p.grad.detach().cpu().numpy() for k, p in model.named_parameters()}
    return loss.item(), logits.detach().cpu().numpy(), grads
