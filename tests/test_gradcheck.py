"""Central finite differences in float64: every kernel's dx/dW/db and whole-network grads.

Inputs are random and re-drawn until no ReLU input lies within ``MARGIN`` of its kink
and no pooling window has a near tie, so the loss is smooth around every check point.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from cnn.backends import numpy_seq as B
from cnn.layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, Sigmoid
from cnn.network import Network

H = 1e-6
MARGIN = 1e-4
TOL = 1e-6


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def numeric_grad(f, x: np.ndarray, idx=None) -> np.ndarray:
    """d f / d x[i] by central differences, for the flat indices ``idx`` (all by default)."""
    flat = x.reshape(-1)
    idx = np.arange(flat.size) if idx is None else idx
    out = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + H
        fp = f()
        flat[i] = old - H
        fm = f()
        flat[i] = old
        out[j] = (fp - fm) / (2 * H)
    return out


def pool_gap(x: np.ndarray, k: int, s: int) -> float:
    """Smallest gap between the two largest values of any window (ties of exact ReLU
    zeros excluded: they stay zero under a perturbation, so they are no kink)."""
    win = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    oh, ow = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
    win = np.sort(win[:, :, :oh, :ow].reshape(*win.shape[:2], oh, ow, k * k), axis=-1)
    gap = win[..., -1] - win[..., -2]
    gap[win[..., -1] == 0] = np.inf
    return float(gap.min())


# --- layer kernels from the reference backend --------------------------------------------

def check_kernel(forward, backward, inputs: dict[str, np.ndarray], grads_of: list[str],
                 rng) -> None:
    """f = sum(forward(**inputs) * R); compare backward's gradients with numerical ones."""
    y, ctx = forward(**inputs)
    r = rng.standard_normal(y.shape)
    analytic = backward(r, ctx)
    for name in grads_of:
        num = numeric_grad(lambda: float(np.sum(forward(**inputs)[0] * r)), inputs[name])
        err = rel_err(analytic[name].reshape(-1), num)
        assert err < TOL, f"d/d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("k,s,p", [(3, 1, 0), (3, 2, 1), (5, 1, 2), (2, 3, 2), (1, 2, 0),
                                   (4, 2, 1), (3, 1, 1)])
def test_conv2d_kernel(k, s, p):
    rng = np.random.default_rng(10 * k + s + p)
    x = rng.standard_normal((2, 3, 7, 6))
    w = rng.standard_normal((4, 3, k, k))
    b = rng.standard_normal(4)

    def backward(dy, ctx):
        dw, db = np.empty_like(w), np.empty_like(b)
        dx = B.conv2d_backward(dy, ctx, w, dw, db, need_dx=True)
        assert dx.shape == x.shape
        assert B.conv2d_backward(dy, ctx, w, np.empty_like(w), np.empty_like(b), False) is None
        return {"x": dx, "w": dw, "b": db}

    check_kernel(lambda x, w, b: B.conv2d_forward(x, w, b, s, p), backward,
                 {"x": x, "w": w, "b": b}, ["x", "w", "b"], rng)


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 3), (3, 1), (2, 1), (1, 1)])
def test_maxpool2d_kernel(k, s):
    rng = np.random.default_rng(k * 7 + s)
    x = rng.standard_normal((2, 3, 8, 7))
    if k > 1:
        assert pool_gap(x, k, s) > MARGIN
    check_kernel(lambda x: B.maxpool2d_forward(x, k, s),
                 lambda dy, ctx: {"x": B.maxpool2d_backward(dy, ctx)}, {"x": x}, ["x"], rng)


def test_relu_kernel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < MARGIN] = 0.5
    check_kernel(B.relu_forward, lambda dy, ctx: {"x": B.relu_backward(dy, ctx)},
                 {"x": x}, ["x"], rng)


def test_sigmoid_kernel():
    rng = np.random.default_rng(1)
    x = 3 * rng.standard_normal((3, 4, 5))
    x[0, 0, :3] = [-40.0, 40.0, 0.0]  # saturated and centre points
    check_kernel(B.sigmoid_forward, lambda dy, ctx: {"x": B.sigmoid_backward(dy, ctx)},
                 {"x": x}, ["x"], rng)


def test_dense_kernel():
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((4, 7)), rng.standard_normal((5, 7)), rng.standard_normal(5)

    def backward(dy, ctx):
        dw, db = np.empty_like(w), np.empty_like(b)
        dx = B.dense_backward(dy, ctx, w, dw, db, need_dx=True)
        return {"x": dx, "w": dw, "b": db}

    check_kernel(B.dense_forward, backward, {"x": x, "w": w, "b": b}, ["x", "w", "b"], rng)


def test_flatten_layer():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5))
    layer = Flatten()
    check_kernel(lambda x: layer.forward(B, x, {}),
                 lambda dy, ctx: {"x": layer.backward(B, dy, ctx, {}, {}, True)},
                 {"x": x}, ["x"], rng)


@pytest.mark.parametrize("n,k", [(1, 2), (5, 3), (8, 10)])
def test_softmax_cross_entropy(n, k):
    rng = np.random.default_rng(n * k)
    logits = 4 * rng.standard_normal((n, k))
    labels = rng.integers(0, k, n)
    loss, grad = B.softmax_cross_entropy(logits, labels)
    shifted = logits - logits.max(axis=1, keepdims=True)
    ref = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(n), labels])
    assert loss == pytest.approx(ref, rel=1e-12)
    num = numeric_grad(lambda: B.softmax_cross_entropy(logits, labels)[0], logits)
    assert rel_err(grad.reshape(-1), num) < TOL
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)  # softmax - onehot


def test_softmax_cross_entropy_is_stable():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1000.0, 1000.0, 0.0]])
    loss, grad = B.softmax_cross_entropy(logits, np.array([0, 2]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(1000.0 / 2)


# --- whole networks: loss_and_grad w.r.t. the flat parameters ---------------------------

def smooth_batch(net: Network, n: int, seed: int, tries: int = 200):
    """A random batch on which every ReLU input and pooling window is MARGIN from a kink."""
    for attempt in range(tries):
        rng = np.random.default_rng(seed * 1000 + attempt)
        x = rng.standard_normal((n, *net.input_shape))
        ok, a = True, x
        state = net.state_dict()
        for i, layer in enumerate(net.layers):
            if isinstance(layer, ReLU) and np.min(np.abs(a)) <= MARGIN:
                ok = False
            if isinstance(layer, MaxPool2D) and pool_gap(a, layer.kernel_size,
                                                         layer.step) <= MARGIN:
                ok = False
            p = {s.key: state[s.name] for s in net.slots if s.layer == i}
            a, _ = layer.forward(B, a, p)
        if ok:
            return x, rng.integers(0, net.num_classes, n)
    raise AssertionError(f"no smooth batch in {tries} draws; make the network smaller")


def check_network(layers: list[Layer], shape, n: int = 3, per_slot: int = 6,
                  seed: int = 0) -> None:
    net = Network(layers, shape, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed)
    # larger weights than torch's init so every layer's gradient is well above round-off
    net.params[:] = rng.uniform(-1, 1, net.num_params)
    x, y = smooth_batch(net, n, seed)
    net.loss_and_grad(x, y)
    analytic = net.grads.copy()
    idx = np.concatenate([s.offset + rng.choice(s.size, min(per_slot, s.size), replace=False)
                          for s in net.slots])
    num = numeric_grad(lambda: net.loss_and_grad(x, y), net.params, idx)
    for s in net.slots:
        sel = (idx >= s.offset) & (idx < s.offset + s.size)
        err = rel_err(analytic[idx[sel]], num[sel])
        assert err < TOL, f"{s.name}: relative error {err:.2e}"
    assert rel_err(analytic[idx], num) < TOL


NETWORKS = {
    "seed_like": ([Conv2D(3, 3), ReLU(), MaxPool2D(2), Conv2D(4, 3), ReLU(), MaxPool2D(2),
                   Flatten(), Dense(6), ReLU(), Dense(3)], (2, 12, 12)),
    "conv_stride2_pad1": ([Conv2D(3, 3, stride=2, padding=1), Sigmoid(),
                           Conv2D(4, 3, stride=2, padding=2), ReLU(), Flatten(), Dense(4)],
                          (2, 9, 8)),
    "pool_overlap_k3_s2": ([Conv2D(3, 3, padding=1), ReLU(), MaxPool2D(3, stride=2),
                            Flatten(), Dense(4)], (1, 9, 9)),
    "pool_k3_s3_sigmoid": ([Conv2D(3, 2), Sigmoid(), MaxPool2D(3, stride=3), Flatten(),
                            Dense(5), Sigmoid(), Dense(3)], (2, 10, 8)),
    "pool_first": ([MaxPool2D(3, stride=1), Conv2D(3, 3, stride=2), ReLU(), Flatten(),
                    Dense(3)], (2, 9, 9)),
    "relu_first": ([ReLU(), Flatten(), Dense(5), ReLU(), Dense(3)], (2, 3, 3)),
    "mlp_sigmoid": ([Dense(6), Sigmoid(), Dense(5), Sigmoid(), Dense(3)], (4,)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_grads(name):
    layers, shape = NETWORKS[name]
    check_network(layers, shape)


@pytest.mark.parametrize("n", [1, 4])
def test_network_grads_batch_sizes(n):
    check_network(*NETWORKS["seed_like"], n=n, seed=n)
