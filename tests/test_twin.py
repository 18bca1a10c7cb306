"""The NumPy reference network against its torch twin: logits, loss, every gradient."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.errors import ShapeError
from cnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sigmoid
from cnn.models import lenet5, mlp, seed_cnn
from cnn.network import Network

torch = pytest.importorskip("torch")
from cnn.twin import torch_loss_and_grads, torch_twin  # noqa: E402

TOL = {np.float32: 1e-4, np.float64: 1e-9}
DTYPES = [np.float32, np.float64]
BATCHES = [1, 3, 16]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's thread pool only loses time, badly so on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_twin(net: Network, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *net.input_shape)).astype(net.dtype)
    y = rng.integers(0, net.num_classes, n)
    model = torch_twin(net)
    tol = TOL[net.dtype.type]

    loss = net.loss_and_grad(x, y)
    t_loss, t_logits, t_grads = torch_loss_and_grads(model, x, y)
    logits = net.forward(x)
    assert logits.shape == (n, net.num_classes) and logits.dtype == net.dtype
    assert rel_err(logits, t_logits) < tol
    assert abs(loss - t_loss) / max(abs(t_loss), 1e-30) < tol
    assert list(t_grads) == [s.name for s in net.slots]
    for s in net.slots:
        g = net.grads[s.offset:s.offset + s.size].reshape(s.shape)
        assert np.any(t_grads[s.name] != 0), f"{s.name}: torch gradient is all zero"
        assert rel_err(g, t_grads[s.name]) < tol, s.name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("shape,padding", [
    ((3, 32, 32), 0), ((1, 28, 28), 0), ((1, 8, 8), 1), ((2, 19, 23), 0), ((3, 12, 9), 1),
])
def test_seed_cnn(shape, padding, n, dtype):
    check_twin(seed_cnn(shape, num_classes=10, padding=padding, dtype=dtype, seed=n), n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("shape,padding", [((1, 28, 28), 2), ((3, 32, 32), 0),
                                           ((2, 17, 21), 2)])
def test_lenet5(shape, padding, n, dtype):
    check_twin(lenet5(shape, num_classes=7, padding=padding, dtype=dtype, seed=1), n, seed=n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("shape,hidden", [((4,), (30, 20)), ((64,), (32,)),
                                          ((1, 8, 8), (16, 8)), ((2, 3, 5), (7, 6, 5))])
def test_mlp(shape, hidden, n, dtype):
    check_twin(mlp(shape, num_classes=3, hidden=hidden, dtype=dtype, seed=2), n, seed=n)


HAND_BUILT = {
    # stride 2 with padding 1, and a stride that skips the last input row/column
    "conv_stride2_pad1": ([Conv2D(5, 3, stride=2, padding=1), ReLU(), Conv2D(4, 3, stride=2),
                           ReLU(), Flatten(), Dense(6)], (3, 11, 12)),
    "conv_pad2_stride3": ([Conv2D(4, 5, padding=2), Sigmoid(), Conv2D(3, 2, stride=3,
                                                                       padding=2),
                           Flatten(), Dense(5)], (2, 9, 10)),
    "pool_k3_s2_overlap": ([Conv2D(6, 3), ReLU(), MaxPool2D(3, stride=2), Flatten(),
                            Dense(8), Sigmoid(), Dense(4)], (2, 13, 14)),
    "pool_k3_s3": ([Conv2D(4, 3, padding=1), ReLU(), MaxPool2D(3, stride=3), Flatten(),
                    Dense(5)], (1, 11, 10)),
    "pool_k3_s1_first": ([MaxPool2D(3, stride=1), Conv2D(3, 2), Sigmoid(),
                          MaxPool2D(2, stride=1), Flatten(), Dense(4)], (2, 7, 8)),
    "conv_1x1_stride2": ([Conv2D(3, 1, stride=2), ReLU(), Conv2D(5, 3, stride=1, padding=1),
                          Sigmoid(), MaxPool2D(2), Flatten(), Dense(3)], (4, 9, 9)),
    "sigmoid_dense_only": ([Flatten(), Dense(9), Sigmoid(), Dense(7), Sigmoid(), Dense(4)],
                           (2, 3, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_hand_built(name, n, dtype):
    layers, shape = HAND_BUILT[name]
    check_twin(Network(layers, shape, dtype=dtype, seed=4), n, seed=n)


# --- state_dict ------------------------------------------------------------------------

MODELS = [
    lambda: seed_cnn((3, 32, 32)),
    lambda: seed_cnn((1, 8, 8), padding=1),
    lambda: lenet5(),
    lambda: mlp(),
    lambda: Network(*HAND_BUILT["pool_k3_s1_first"]),
]


@pytest.mark.parametrize("make", MODELS)
def test_state_dict_names_shapes_order(make):
    net = make()
    ours = net.state_dict()
    theirs = torch_twin(net).state_dict()
    assert list(ours) == list(theirs)
    assert [v.shape for v in ours.values()] == [tuple(v.shape) for v in theirs.values()]
    assert all(v.dtype == net.dtype for v in ours.values())
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k].numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_torch_state_dict_round_trip(dtype):
    net = lenet5(dtype=dtype, seed=0)
    model = torch_twin(net)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()  # parameters that still require grad: load must detach them itself
    net.load_state_dict(dict(model.named_parameters()))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(net.state_dict()[k], v.numpy())
    # the weights really are live: the same logits as the twin
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(dtype)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert rel_err(net.forward(x), ref) < TOL[dtype]
    # and back: a fresh twin of the loaded network carries the same tensors
    for k, v in torch_twin(net).state_dict().items():
        np.testing.assert_array_equal(v.numpy(), model.state_dict()[k].numpy())


def test_load_casts_dtype():
    net32 = mlp(dtype=np.float32, seed=5)
    net64 = mlp(dtype=np.float64, seed=9)
    net32.load_state_dict(torch_twin(net64).state_dict())
    for k, v in net64.state_dict().items():
        np.testing.assert_array_equal(net32.state_dict()[k], v.astype(np.float32))


def test_load_state_dict_errors():
    net = seed_cnn((1, 8, 8), padding=1)
    state = torch_twin(net).state_dict()
    bad = dict(state)
    bad["9.weight"] = torch.zeros(10, 255)
    with pytest.raises(ShapeError, match=r"9\.weight.*\(10, 256\).*\(10, 255\)"):
        net.load_state_dict(bad)
    missing = {k: v for k, v in state.items() if k != "3.bias"}
    with pytest.raises(KeyError, match=r"missing \['3\.bias'\]"):
        net.load_state_dict(missing)
    extra = dict(state, **{"10.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"unexpected \['10\.weight'\]"):
        net.load_state_dict(extra)
