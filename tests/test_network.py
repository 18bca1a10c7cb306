"""Network contracts: the flat buffer, shapes and errors, save/load, config, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.errors import ShapeError
from cnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sigmoid
from cnn.models import lenet5, mlp, seed_cnn
from cnn.network import Network

MODELS = {
    "seed_cnn": lambda **kw: seed_cnn((3, 32, 32), **kw),
    "seed_cnn_digits": lambda **kw: seed_cnn((1, 8, 8), padding=1, **kw),
    "lenet5": lambda **kw: lenet5(**kw),
    "mlp": lambda **kw: mlp(**kw),
}


def batch(net: Network, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *net.input_shape)).astype(net.dtype),
            rng.integers(0, net.num_classes, n))


# --- the flat buffer ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(MODELS))
def test_flat_buffer_contract(name, dtype):
    net = MODELS[name](dtype=dtype)
    for buf in (net.params, net.grads):
        assert isinstance(buf, np.ndarray) and buf.ndim == 1
        assert buf.flags.c_contiguous and buf.dtype == dtype
        assert buf.size == net.num_params
    assert not np.shares_memory(net.params, net.grads)

    # slots: layer order, weight then bias, packed back to back from offset 0
    expected = [f"{i}.{key}" for i, layer in enumerate(net.layers) if layer.has_params
                for key in ("weight", "bias")]
    assert [s.name for s in net.slots] == expected
    assert list(net.state_dict()) == expected
    offset = 0
    for s in net.slots:
        assert s.offset == offset
        offset += s.size
    assert offset == net.num_params == sum(v.size for v in net.state_dict().values())

    # every layer view is a C-contiguous window of the flat buffers
    for s in net.slots:
        for views, flat in ((net._pviews, net.params), (net._gviews, net.grads)):
            v = views[s.layer][s.key]
            assert v.shape == s.shape and v.flags.c_contiguous
            assert np.shares_memory(v, flat)
            assert v.__array_interface__["data"][0] == (
                flat.__array_interface__["data"][0] + s.offset * flat.itemsize)
        np.testing.assert_array_equal(net.state_dict()[s.name],
                                      net.params[s.offset:s.offset + s.size].reshape(s.shape))


def test_views_are_live_and_state_dict_is_a_copy():
    net = seed_cnn((1, 8, 8), padding=1, dtype=np.float64)
    x, _ = batch(net, 2)
    before = net.forward(x)
    sd = net.state_dict()
    assert not any(np.shares_memory(v, net.params) for v in sd.values())
    sd["9.bias"][:] += 100.0  # mutating the copy changes nothing
    np.testing.assert_array_equal(net.forward(x), before)
    s = net.slot("9.bias")
    net.params[s.offset:s.offset + s.size] += 1.0  # writing the flat buffer reaches the layer
    np.testing.assert_allclose(net.forward(x), before + 1.0, rtol=1e-12)
    with pytest.raises(KeyError, match="no parameter '9.gamma'"):
        net.slot("9.gamma")


def test_caller_owned_params_buffer_is_used_in_place():
    ref = mlp(dtype=np.float64, seed=3)
    shared = ref.params.copy()
    net = Network(ref.layers, ref.input_shape, dtype=np.float64, params=shared)
    assert net.params is shared or np.shares_memory(net.params, shared)
    shared[:] = 0.0
    assert np.all(net.forward(np.ones((1, 4))) == 0.0)
    with pytest.raises(ShapeError, match="params buffer"):
        Network(ref.layers, ref.input_shape, dtype=np.float64, params=shared[:-1])
    with pytest.raises(ShapeError, match="params buffer"):
        Network(ref.layers, ref.input_shape, dtype=np.float32, params=shared)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_grad_overwrites(name):
    net = MODELS[name](dtype=np.float64)
    xa, ya = batch(net, 4, seed=1)
    xb, yb = batch(net, 3, seed=2)
    net.loss_and_grad(xb, yb)
    only_b = net.grads.copy()
    assert np.any(only_b != 0)
    net.loss_and_grad(xa, ya)
    net.loss_and_grad(xb, yb)
    np.testing.assert_array_equal(net.grads, only_b)
    net.grads[:] = 1e9  # stale garbage must not leak into any slot
    loss = net.loss_and_grad(xb, yb)
    np.testing.assert_array_equal(net.grads, only_b)
    assert isinstance(loss, float) and loss > 0


# --- shapes and errors --------------------------------------------------------------------

def test_too_small_input_names_layer_and_shape():
    with pytest.raises(ShapeError) as exc:
        seed_cnn((1, 8, 8))
    msg = str(exc.value)
    assert "layer 5" in msg and "MaxPool2D" in msg and "(64, 1, 1)" in msg
    with pytest.raises(ShapeError, match=r"layer 0 .*\(1, 2, 2\)"):
        seed_cnn((1, 2, 2))
    with pytest.raises(ShapeError, match="layer 0"):
        Network([Dense(3)], (2, 4, 4))  # Dense needs Flatten first
    with pytest.raises(ShapeError, match="class scores"):
        Network([Conv2D(2, 3)], (1, 5, 5))
    seed_cnn((1, 8, 8), padding=1)  # the fix the message suggests


@pytest.mark.parametrize("bad", [(2, 3, 32, 31), (2, 1, 32, 32), (3, 32, 32), (0, 3, 32, 32),
                                 (2, 3 * 32 * 32)])
def test_wrong_input_shape(bad):
    net = seed_cnn((3, 32, 32))
    with pytest.raises(ShapeError, match="input"):
        net.forward(np.zeros(bad, dtype=np.float32))
    with pytest.raises(ShapeError, match="input"):
        net.loss_and_grad(np.zeros(bad, dtype=np.float32), np.zeros(bad[0], dtype=int))


@pytest.mark.parametrize("labels", [
    np.array([0, 1]),                     # too few
    np.array([[0], [1], [2]]),            # wrong rank
    np.array([0.0, 1.0, 2.0]),            # not integers
    np.array([0, 1, 3]),                  # class 3 of 3
    np.array([0, -1, 2]),                 # negative
])
def test_wrong_labels(labels):
    net = mlp()
    with pytest.raises(ShapeError, match="labels"):
        net.loss_and_grad(np.zeros((3, 4), dtype=np.float32), labels)


def test_invalid_dtype():
    with pytest.raises(TypeError, match="float32 or float64"):
        mlp(dtype=np.float16)


# --- persistence and rebuilding --------------------------------------------------------------

def test_save_load_npz_round_trip(tmp_path):
    net = lenet5(seed=1)
    path = tmp_path / "sub" / "weights.npz"
    net.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.npz"]
    with np.load(path) as data:
        assert list(data.files) == list(net.state_dict())
    other = lenet5(seed=2)
    assert not np.array_equal(other.params, net.params)
    other.load(path)
    np.testing.assert_array_equal(other.params, net.params)
    x, _ = batch(net, 2)
    np.testing.assert_array_equal(other.forward(x), net.forward(x))


def test_save_is_atomic(tmp_path, monkeypatch):
    net = mlp(seed=1)
    path = tmp_path / "w.npz"
    net.save(path)
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        mlp(seed=2).save(path)
    assert path.read_bytes() == good  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]  # no temp file left


def test_load_wrong_network_fails_clearly(tmp_path):
    path = tmp_path / "w.npz"
    mlp(hidden=(30, 20)).save(path)
    with pytest.raises(ShapeError, match=r"0\.weight"):
        mlp(hidden=(31, 20)).load(path)
    with pytest.raises(KeyError, match="missing"):
        mlp(hidden=(30, 20, 10)).load(path)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_config_rebuilds_identical_network(name, dtype):
    net = MODELS[name](dtype=dtype, seed=7)
    cfg = net.config()
    clone = Network.from_config(cfg)
    assert clone.layers == net.layers
    assert clone.input_shape == net.input_shape and clone.dtype == net.dtype
    assert [(s.name, s.shape, s.offset) for s in clone.slots] == [
        (s.name, s.shape, s.offset) for s in net.slots]
    np.testing.assert_array_equal(clone.params, net.params)
    x, _ = batch(net, 2)
    np.testing.assert_array_equal(clone.forward(x), net.forward(x))
    assert Network.from_config(cfg, seed=8).params.tolist() != net.params.tolist()


def test_config_is_plain_data():
    import json

    net = Network([Conv2D(2, 3, stride=2, padding=1), Sigmoid(), MaxPool2D(3, stride=1),
                   Flatten(), Dense(4), ReLU(), Dense(2)], (1, 9, 9))
    cfg = json.loads(json.dumps(net.config()))  # what a worker process receives
    clone = Network.from_config(cfg)
    assert clone.layers == net.layers
    np.testing.assert_array_equal(clone.params, net.params)


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_and_float64_start_equal(name):
    net32 = MODELS[name](dtype=np.float32, seed=11)
    net64 = MODELS[name](dtype=np.float64, seed=11)
    np.testing.assert_array_equal(net32.params, net64.params.astype(np.float32))
    assert not np.array_equal(MODELS[name](dtype=np.float64, seed=12).params, net64.params)


def test_init_bounds_like_torch():
    net = seed_cnn((3, 32, 32), dtype=np.float64)
    for s in net.slots:
        fan_in = int(np.prod(net.slot(f"{s.layer}.weight").shape[1:]))
        values = net.state_dict()[s.name]
        assert np.abs(values).max() <= 1 / np.sqrt(fan_in)
        assert np.abs(values).max() > 0.8 / np.sqrt(fan_in)


# --- inference helpers --------------------------------------------------------------------

def test_predict_and_evaluate():
    net = seed_cnn((1, 8, 8), num_classes=4, padding=1, dtype=np.float64, seed=3)
    x, y = batch(net, 7, seed=5)
    logits = net.forward(x)
    pred = net.predict(x)
    np.testing.assert_array_equal(pred, logits.argmax(axis=1))
    np.testing.assert_array_equal(net.predict(x, batch_size=3), pred)
    assert pred.shape == (7,) and np.issubdtype(pred.dtype, np.integer)
    loss, acc = net.evaluate(x, y)
    assert acc == pytest.approx(np.mean(pred == y))
    assert loss == pytest.approx(net.loss_and_grad(x, y), rel=1e-12)
    loss3, acc3 = net.evaluate(x, y, batch_size=3)  # uneven batches weigh by size
    assert loss3 == pytest.approx(loss, rel=1e-12) and acc3 == acc
    y_true = pred.copy()
    assert net.evaluate(x, y_true)[1] == 1.0


def test_summary_and_repr():
    net = seed_cnn((3, 32, 32))
    text = net.summary()
    assert f"{net.num_params:,}" in text and "Conv2D" in text and "(64, 6, 6)" in text
    assert f"params={net.num_params:,}" in repr(net) and "'numpy'" in repr(net)


# --- FLOPs ---------------------------------------------------------------------------------

def test_flops_seed_cnn():
    net = seed_cnn((3, 32, 32))
    conv1 = 2 * 32 * 30 * 30 * 27
    forward = 2 * (32 * 30 * 30 * 27 + 64 * 13 * 13 * 288 + 2304 * 256 + 256 * 10)
    assert net.flops(train=False) == forward
    # training: forward + weight grads (= forward of param layers) + dx except the first
    assert net.flops(train=True) == 3 * forward - conv1
    assert net.num_params == (32 * 27 + 32) + (64 * 288 + 64) + (2304 * 256 + 256) + 2570


def test_flops_mlp():
    net = mlp()  # 4-30-20-3
    forward = 2 * (4 * 30 + 30 * 20 + 20 * 3)
    assert net.flops(train=False) == forward
    assert net.flops() == 3 * forward - 2 * 4 * 30
