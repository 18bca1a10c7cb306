"""Device memory and launches of the cuda backend, through its own bookkeeping
(``memory_stats``): flat over 200 steps, nothing allocated per step after the first,
launches per step counted, out-of-memory explained.

Before issue 17 a seed-CNN step made 27 launches and 27 device allocations that were
never freed (about 100 MB per step at batch 128); now it makes 19 launches and none.
The ``sim_*`` tests run in the simulator (``test_numba_cuda.test_simulator_suite``);
the ``gpu`` ones on a GPU (``scripts/gpu_check.sh``), or at tiny sizes in the simulator
under ``scripts/gpu_check.sh --simulate``.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from test_numba_cuda import assert_close, batch, gpu_scale, sim_only, tiny_nets

#: Kernel launches per SGD step of the seed CNN (forward 7, loss 1, backward 10, update 1).
LAUNCHES_PER_STEP = 19
UPLOADS_PER_STEP = 2  # the batch and its labels
FLAT_KEYS = ("allocations", "blocks", "held_bytes", "in_use_bytes")


def run_steps(net, opt, x, y, steps: int) -> list[dict[str, int]]:
    """``steps`` SGD steps; the backend's bookkeeping after each (stream drained)."""
    C = net.backend
    out = []
    for _ in range(steps):
        net.loss_and_grad(x, y)
        opt.step()
        C.synchronize()
        out.append(C.memory_stats())
    return out


def assert_flat(stats: list[dict[str, int]]) -> None:
    """After the first step: no allocation, the same blocks and bytes, the same launches
    and uploads every step."""
    for key in FLAT_KEYS:
        values = {s[key] for s in stats}
        assert len(values) == 1, f"{key} changed over the steps: {sorted(values)}"
    assert set(np.diff([s["launches"] for s in stats])) == {LAUNCHES_PER_STEP}
    assert set(np.diff([s["uploads"] for s in stats])) == {UPLOADS_PER_STEP}


def _seed_cnn(backend="cuda", size="full", seed=0):
    from cnn import models

    if size == "full":
        return models.seed_cnn((3, 32, 32), backend=backend, seed=seed)
    return models.seed_cnn((3, 8, 8), num_classes=3, padding=1, filters=(4, 5), hidden=6,
                           backend=backend, seed=seed)


def _batch(size="full", n=128):
    return batch(n=n, shape=(3, 32, 32), classes=10) if size == "full" else \
        batch(n=4, shape=(3, 8, 8), classes=3)


@sim_only
def test_sim_memory_flat_over_200_steps_at_full_size():
    """200 SGD steps of the seed CNN, 3x32x32 at batch 128: after the first, no device
    allocation, the same bytes held, 19 launches and 2 uploads per step. The kernels are
    counted and type-checked but not run (``dry_run``): the simulator would take hours."""
    from cnn.optim import SGD

    net = _seed_cnn()
    C = net.backend
    opt = SGD(net, lr=0.01, momentum=0.9)
    x, y = _batch()
    with C.dry_run():
        stats = run_steps(net, opt, x, y, 201)[1:]
    assert_flat(stats)
    per_step = net.num_params * 4 * 3  # params, grads, velocity: the floor of what stays
    assert stats[-1]["in_use_bytes"] >= per_step


@sim_only
def test_sim_steps_allocate_nothing_and_match_numpy():
    """Real kernels, tiny shapes, batches loaded into pinned buffers and prefetched: the
    second and third steps allocate nothing, and the weights follow NumPy's."""
    from cnn.optim import SGD

    ref, net = tiny_nets()
    C = net.backend
    opt_ref, opt = SGD(ref, lr=0.1, momentum=0.9), SGD(net, lr=0.1, momentum=0.9)
    x, y = batch()
    stats = []
    for _ in range(3):
        buf = C.host_buffer(x.shape, x.dtype)
        np.copyto(buf, x)
        C.prefetch(buf)
        ref.loss_and_grad(x, y)
        net.loss_and_grad(buf, y)
        opt_ref.step()
        opt.step()
        C.synchronize()
        stats.append(C.memory_stats())
    assert_flat(stats[1:])
    for key, want in ref.state_dict().items():
        assert_close(net.state_dict()[key], want, what=key)


@sim_only
def test_sim_out_of_memory_names_batch_size_and_memory():
    from cnn.backends import get_backend
    from cnn.optim import SGD

    C = get_backend("cuda")
    net = _seed_cnn()
    opt = SGD(net, lr=0.01)
    x, y = _batch(n=64)
    C.set_memory_limit(4 * 2 ** 20)  # far less than a step at batch 64 needs
    try:
        with C.dry_run(), pytest.raises(C.OutOfDeviceMemory) as err:
            run_steps(net, opt, x, y, 1)
    finally:
        C.set_memory_limit(None)
    message = str(err.value)
    assert "\n" not in message
    for needle in ("batch size 64", "MiB", "needs at least", "--batch-size"):
        assert needle in message, message


@sim_only
def test_sim_release_memory_gives_cached_blocks_back():
    from cnn.backends import get_backend
    from cnn.optim import SGD

    C = get_backend("cuda")
    net = _seed_cnn()
    x, y = _batch(n=32)
    with C.dry_run():
        run_steps(net, SGD(net, lr=0.01), x, y, 2)
    held = C.memory_stats()["held_bytes"]
    del net
    gc.collect()
    freed = C.release_memory()
    after = C.memory_stats()
    assert freed > 0 and after["held_bytes"] == held - freed
    assert after["in_use_bytes"] == after["held_bytes"]  # only what is referenced is kept


# --- on a GPU (or tiny, in the simulator, under gpu_check.sh --simulate) ----------------------

@pytest.mark.gpu
def test_gpu_memory_flat_over_200_steps():
    """200 real SGD steps at batch 128: the pool allocates nothing after the first step
    and the GPU's free memory does not move."""
    size = gpu_scale()
    from numba import cuda

    from cnn.optim import SGD

    net = _seed_cnn(size=size)
    C = net.backend
    opt = SGD(net, lr=0.01, momentum=0.9)
    x, y = _batch(size)
    if size == "tiny":  # the simulator: bookkeeping only (its kernels take seconds each)
        with C.dry_run():
            assert_flat(run_steps(net, opt, x, y, 201)[1:])
        return
    run_steps(net, opt, x, y, 1)
    free_before = cuda.current_context().get_memory_info()[0]
    stats = run_steps(net, opt, x, y, 200)
    free_after = cuda.current_context().get_memory_info()[0]
    assert_flat(stats)
    assert abs(free_after - free_before) <= 2 * 2 ** 20, (free_before, free_after)


@pytest.mark.gpu
def test_gpu_prefetched_batches_give_the_same_weights():
    """Batches loaded into pinned buffers and uploaded on the copy stream while the
    previous step computes give bitwise the weights of plain uploads (no race between
    the streams)."""
    size = gpu_scale()
    from cnn.optim import SGD

    rng = np.random.default_rng(3)
    shape, classes = ((3, 32, 32), 10) if size == "full" else ((3, 8, 8), 3)
    n, steps = (128, 8) if size == "full" else (4, 2)
    data = [(rng.standard_normal((n, *shape)).astype(np.float32),
             rng.integers(0, classes, n)) for _ in range(steps)]
    nets = [_seed_cnn(size=size, seed=5) for _ in range(2)]
    C = nets[0].backend
    plain, early = nets
    opt_plain, opt_early = SGD(plain, lr=0.05, momentum=0.9), SGD(early, lr=0.05, momentum=0.9)
    for xb, yb in data:
        plain.loss_and_grad(xb, yb)
        opt_plain.step()
    bufs = []
    for xb, _ in data[:1]:
        bufs.append(C.host_buffer(xb.shape, xb.dtype))
        np.copyto(bufs[-1], xb)
        C.prefetch(bufs[-1])
    for k, (_, yb) in enumerate(data):
        early.loss_and_grad(bufs[k], yb)
        opt_early.step()
        if k + 1 < steps:  # load and start the next batch while this step computes
            bufs.append(C.host_buffer(shape=data[k + 1][0].shape, dtype=np.float32))
            np.copyto(bufs[-1], data[k + 1][0])
            C.prefetch(bufs[-1])
    np.testing.assert_array_equal(C.to_host(early.params), C.to_host(plain.params))
