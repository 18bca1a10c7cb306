"""Weights in and out of the cuda backend: a state_dict loads whatever its shapes (a
1-channel conv weight ``(4, 1, 3, 3)`` once lost its size-1 dimension on the way),
and save, load and resume give back exactly the weights and the run they came from.
The ``sim_*`` tests run in the simulator (``test_numba_cuda.test_simulator_suite``)."""

from __future__ import annotations

import numpy as np
import pytest
from test_numba_cuda import assert_close, rand, sim_only


def _net(channels: int, backend: str, seed: int):
    from cnn import models

    return models.seed_cnn((channels, 6, 6), num_classes=3, padding=1, filters=(4, 5),
                           hidden=6, backend=backend, seed=seed)


@sim_only
@pytest.mark.parametrize("channels", [1, 3])
def test_sim_load_state_dict(channels):
    """NumPy weights into a cuda net (other seed): the same tensors and the same logits."""
    ref, net = _net(channels, "numpy", 0), _net(channels, "cuda", 1)
    state = ref.state_dict()
    assert state["0.weight"].shape == (4, channels, 3, 3)
    net.load_state_dict(state)
    for key, want in state.items():
        np.testing.assert_array_equal(net.state_dict()[key], want, err_msg=key)
    x = rand(np.random.default_rng(0), (2, channels, 6, 6))
    assert_close(net.forward(x), ref.forward(x), what="logits")


@sim_only
def test_sim_save_load_resume_round_trip(tmp_path):
    """Weights saved from the cuda backend load back bit for bit (and into NumPy); a run
    stopped after 3 steps and resumed from its checkpoint ends on the weights of the
    run that was never stopped."""
    from cnn.optim import SGD
    from cnn.train import fit

    rng = np.random.default_rng(4)
    train = (rand(rng, (6, 1, 6, 6)), rng.integers(0, 3, size=6))
    test = (rand(rng, (3, 1, 6, 6)), rng.integers(0, 3, size=3))

    def run(max_steps=None, ckpt=None, resume=False):
        net = _net(1, "cuda", 2)
        opt = SGD(net, lr=0.1, momentum=0.9)
        fit(net, train, test, epochs=2, batch_size=3, optimizer=opt, seed=5,
            max_steps=max_steps, checkpoint_dir=ckpt, resume=resume, progress=False, log=None)
        return net

    whole = run()
    run(max_steps=3, ckpt=tmp_path)
    resumed = run(ckpt=tmp_path, resume=True)
    for key, want in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], want, err_msg=key)

    path = tmp_path / "weights.npz"
    whole.save(path)
    back, ref = _net(1, "cuda", 9), _net(1, "numpy", 9)
    back.load(path)
    ref.load(path)
    for key, want in whole.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], want, err_msg=key)
    assert_close(back.forward(test[0]), ref.forward(test[0]), what="logits after load")
