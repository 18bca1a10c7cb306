"""The numba CPU backend equals the NumPy reference, is deterministic, caches its JIT
code on disk, trains like the reference, and rejects bad input before the jitted code.

Kernels are compared on a seeded sweep of odd shapes (batch 1, odd sizes, padding,
stride 1/2, pool kernel 2/3 and stride 1/2/3) at 1 and 2 threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from cnn import layers as L  # noqa: E402
from cnn.backends import get_backend  # noqa: E402
from cnn.backends import numpy_seq as REF  # noqa: E402
from cnn.errors import BackendUnavailable, ShapeError  # noqa: E402
from cnn.network import Network  # noqa: E402

NB = get_backend("numba")
REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-4


def close(a, b, rtol=RTOL, what=""):
    """|a - b| <= rtol * max|b| (+ a tiny floor): float32 sums in another order."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-6)
    err = float(np.abs(a - b).max(initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the test at this many numba threads, then restore the previous setting."""
    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"needs {request.param} numba threads")
    before = numba.get_num_threads()
    NB.configure(request.param)
    yield request.param
    numba.set_num_threads(before)


# --- kernels against the reference, on a seeded sweep of shapes ------------------------

def _conv_cases(count=14, seed=0):
    rng = np.random.default_rng(seed)
    cases = [(1, 3, 32, 32, 8, 3, 1, 0), (2, 1, 8, 8, 4, 3, 1, 1), (1, 2, 7, 5, 3, 3, 2, 1),
             (3, 4, 9, 6, 5, 1, 1, 0), (2, 2, 6, 7, 3, 5, 2, 2), (1, 1, 3, 3, 2, 3, 1, 0),
             (1, 1, 7, 6, 12, 3, 1, 1)]  # stride 1, C*k*k < O: the plain im2col path
    while len(cases) < count:
        k = int(rng.choice([1, 2, 3, 5]))
        p = int(rng.integers(0, 3))
        h = int(rng.integers(max(1, k - 2 * p), 12))
        w = int(rng.integers(max(1, k - 2 * p), 12))
        cases.append((int(rng.integers(1, 4)), int(rng.integers(1, 6)), h, w,
                      int(rng.integers(1, 9)), k, int(rng.choice([1, 2])), p))
    return cases


@pytest.mark.parametrize("case", _conv_cases(), ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}".format(*c))
def test_conv2d_matches_reference(case, threads):
    n, c, h, w, o, k, s, p = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    y0, ctx0 = REF.conv2d_forward(x, wt, b, s, p)
    y1, ctx1 = NB.conv2d_forward(x, wt, b, s, p)
    close(y1, y0, what="conv forward")
    dy = rng.standard_normal(y0.shape).astype(np.float32)
    for need_dx in (True, False):
        dw0, db0 = np.empty_like(wt), np.empty_like(b)
        dw1, db1 = np.full_like(wt, np.nan), np.full_like(b, np.nan)
        dx0 = REF.conv2d_backward(dy, ctx0, wt, dw0, db0, need_dx)
        dx1 = NB.conv2d_backward(dy, ctx1, wt, dw1, db1, need_dx)
        close(dw1, dw0, what="conv dW")
        close(db1, db0, what="conv db")
        if need_dx:
            close(dx1, dx0, what="conv dx")
        else:
            assert dx1 is None


@pytest.mark.parametrize("shape,k,s", [((2, 3, 8, 8), 2, 2), ((1, 2, 7, 9), 3, 2),
                                       ((3, 1, 6, 5), 2, 1), ((1, 4, 9, 9), 3, 3),
                                       ((2, 2, 5, 7), 3, 1), ((1, 1, 4, 4), 2, 3)])
def test_maxpool_matches_reference(shape, k, s, threads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, 0, :2, :2] = 1.5  # a tie: the first offset wins, as in the reference and torch
    y0, ctx0 = REF.maxpool2d_forward(x, k, s)
    y1, ctx1 = NB.maxpool2d_forward(x, k, s)
    np.testing.assert_array_equal(y1, y0)
    dy = rng.standard_normal(y0.shape).astype(np.float32)
    close(NB.maxpool2d_backward(dy, ctx1), REF.maxpool2d_backward(dy, ctx0), what="pool dx")


def test_elementwise_dense_and_loss_match_reference(threads):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 7)).astype(np.float32) * 20
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for fwd, bwd in (("relu_forward", "relu_backward"), ("sigmoid_forward", "sigmoid_backward")):
        y0, c0 = getattr(REF, fwd)(x)
        y1, c1 = getattr(NB, fwd)(x)
        close(y1, y0, what=fwd)
        close(getattr(NB, bwd)(dy, c1), getattr(REF, bwd)(dy, c0), what=bwd)
    for n, i, o in ((1, 1, 1), (7, 33, 5), (64, 300, 40)):
        a = rng.standard_normal((n, i)).astype(np.float32)
        w = rng.standard_normal((o, i)).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        y0, c0 = REF.dense_forward(a, w, b)
        y1, c1 = NB.dense_forward(a, w, b)
        close(y1, y0, what="dense forward")
        g = rng.standard_normal((n, o)).astype(np.float32)
        dw0, db0, dw1, db1 = (np.empty_like(w), np.empty_like(b), np.empty_like(w),
                              np.empty_like(b))
        close(NB.dense_backward(g, c1, w, dw1, db1, True),
              REF.dense_backward(g, c0, w, dw0, db0, True), what="dense dx")
        close(dw1, dw0, what="dense dW")
        close(db1, db0, what="dense db")
    logits = rng.standard_normal((9, 4)).astype(np.float32) * 30
    labels = rng.integers(0, 4, 9)
    l0, g0 = REF.softmax_cross_entropy(logits, labels)
    l1, g1 = NB.softmax_cross_entropy(logits, labels)
    assert abs(l1 - l0) <= RTOL * abs(l0)
    close(g1, g0, what="softmax grad")


@pytest.mark.parametrize("case", [(2, 3, 9, 8, 5, 3, 1, 1, 2, 2), (1, 2, 11, 7, 4, 3, 2, 0, 3, 1),
                                  (3, 1, 8, 8, 12, 3, 1, 1, 2, 2)])
def test_fused_kernels_equal_the_unfused_pair(case, threads):
    """conv2d_relu_forward == relu(conv) and maxpool2d_relu_backward == relu_bwd(pool_bwd),
    bit for bit (the extra kernels a Network may use for Conv-ReLU-MaxPool)."""
    n, c, h, w, o, k, s, p, pk, ps = case
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    y, _ = NB.conv2d_forward(x, wt, b, s, p)
    r, rctx = NB.relu_forward(y)
    r = r.copy()
    rf, _ = NB.conv2d_relu_forward(x, wt, b, s, p)
    np.testing.assert_array_equal(rf, r)
    pooled, pctx = NB.maxpool2d_forward(r, pk, ps)
    dy = rng.standard_normal(pooled.shape).astype(np.float32)
    expect = NB.relu_backward(NB.maxpool2d_backward(dy, pctx), r).copy()
    np.testing.assert_array_equal(NB.maxpool2d_relu_backward(dy, pctx), expect)


# --- whole networks: logits, loss, gradients, one SGD and one Adam step ----------------

def _nets():
    """Random small CNNs over odd shapes, padding, strides and pool kernels/strides."""
    return [
        ((3, 13, 11), [L.Conv2D(4, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
                      L.Conv2D(5, 3, stride=2, padding=1), L.ReLU(), L.MaxPool2D(3, 1),
                      L.Flatten(), L.Dense(7), L.Sigmoid(), L.Dense(3)], 1),
        ((1, 8, 8), [L.Conv2D(6, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
                     L.Conv2D(8, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
                     L.Flatten(), L.Dense(16), L.ReLU(), L.Dense(10)], 5),
        ((2, 13, 13), [L.Conv2D(3, 5, stride=2), L.ReLU(), L.MaxPool2D(3, 3),
                       L.Flatten(), L.Dense(4)], 3),
        ((4,), [L.Dense(9), L.Sigmoid(), L.Dense(5), L.ReLU(), L.Dense(3)], 17),
    ]


def _step(net, x, y, opt):
    """loss, logits, grads, and params after one update with the backend's kernel."""
    loss = net.loss_and_grad(x, y)
    logits = net.forward(x)
    grads = net.backend.to_host(net.grads).copy()
    if opt == "sgd":
        vel = net.backend.zeros(net.num_params, net.dtype)
        net.backend.sgd_update(net.params, net.grads, vel, 0.05, 0.9, 0.1, 1e-3, False, True)
        net.loss_and_grad(x, y)
        net.backend.sgd_update(net.params, net.grads, vel, 0.05, 0.9, 0.1, 1e-3, False, False)
    else:
        m = net.backend.zeros(net.num_params, net.dtype)
        v = net.backend.zeros(net.num_params, net.dtype)
        for t in (1, 2):
            net.loss_and_grad(x, y)
            net.backend.adam_update(net.params, net.grads, m, v, 1e-2, 0.9, 0.999, 1e-8, 1e-3, t)
    return loss, logits, grads, net.backend.to_host(net.params).copy()


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("idx", range(len(_nets())))
def test_network_matches_reference_and_is_deterministic(idx, opt, threads):
    shape, layers, n = _nets()[idx]
    rng = np.random.default_rng(idx)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, 3, n)
    ref = _step(Network(layers, shape, backend="numpy", seed=idx), x, y, opt)
    runs = [_step(Network(layers, shape, backend="numba", seed=idx, threads=threads), x, y, opt)
            for _ in range(2)]
    loss, logits, grads, params = runs[0]
    assert abs(loss - ref[0]) <= RTOL * abs(ref[0])
    close(logits, ref[1], what="logits")
    net = Network(layers, shape, seed=idx)
    for s in net.slots:
        sl = slice(s.offset, s.offset + s.size)
        close(grads[sl], ref[2][sl], what=f"grad {s.name}")
    close(params, ref[3], what=f"params after {opt}")
    # bit-identical run to run at a fixed thread count
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_float64_matches_reference():
    """float64 works too (for checks): a small seed-like CNN against the float64 reference."""
    layers = [L.Conv2D(4, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(5)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 6, 7))
    y = rng.integers(0, 5, 3)
    a = Network(layers, (2, 6, 7), backend="numpy", dtype=np.float64)
    b = Network(layers, (2, 6, 7), backend="numba", dtype=np.float64)
    assert b.forward(x).dtype == np.float64
    assert abs(a.loss_and_grad(x, y) - b.loss_and_grad(x, y)) < 1e-12
    close(b.grads, a.grads, rtol=1e-10, what="float64 grads")


def test_seed_cnn_batch_is_identical_across_thread_counts():
    """Weight-gradient partial sums use fixed batch chunks: the thread count changes no bit."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    from cnn.models import seed_cnn

    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 37)
    before = numba.get_num_threads()
    try:
        out = []
        for t in (1, 2, 1):
            net = seed_cnn((3, 16, 16), backend="numba", threads=t)
            out.append((net.loss_and_grad(x, y), net.grads.copy()))
    finally:
        numba.set_num_threads(before)
    for loss, g in out[1:]:
        assert loss == out[0][0]
        np.testing.assert_array_equal(g, out[0][1])


# --- training: same accuracy as the reference ------------------------------------------

def _train_digits(backend: str, epochs: int = 4) -> float:
    from cnn.data import iterate_batches, load
    from cnn.models import seed_cnn
    from cnn.optim import SGD

    xtr, ytr = load("digits", "train")
    xte, yte = load("digits", "test")
    net = seed_cnn((1, 8, 8), padding=1, backend=backend, seed=0)
    opt = SGD(net, lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        for idx in iterate_batches(len(ytr), 32, seed=0, epoch=epoch):
            net.loss_and_grad(xtr[idx], ytr[idx])
            opt.step()
    return net.evaluate(xte, yte)[1]


def test_training_on_digits_reaches_reference_accuracy():
    # float32 rounding differs between the kernels, and 4 epochs of SGD amplify it: the
    # step-level equality is tested above; here both must learn, and land within a few
    # of the 360 test images of each other (seen: up to 7 apart, depending on threads).
    acc_ref = _train_digits("numpy")
    acc = _train_digits("numba")
    assert acc_ref > 0.9, acc_ref
    assert acc > 0.9, acc
    assert abs(acc - acc_ref) <= 0.03, (acc, acc_ref)


# --- the on-disk JIT cache ---------------------------------------------------------------

_FIRST_STEP = textwrap.dedent("""
    import numpy as np
    from cnn.backends import numba_cpu
    from cnn.models import seed_cnn
    from cnn.optim import SGD
    net = seed_cnn((1, 8, 8), padding=1, backend="numba")
    opt = SGD(net, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    net.loss_and_grad(rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
                      rng.integers(0, 10, 16))
    opt.step()
    hits = misses = 0
    for name in dir(numba_cpu.kernels):
        stats = getattr(getattr(numba_cpu.kernels, name), "stats", None)
        if stats is not None:
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    print("CACHE", hits, misses)
""")


def _cache_hits_and_misses(cache_dir: str) -> tuple[int, int]:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", _FIRST_STEP], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    hits, misses = out.stdout.split("CACHE")[-1].split()
    return int(hits), int(misses)


def test_compiled_kernels_are_cached_on_disk(tmp_path):
    """A second process finds every kernel of a step in the on-disk cache: no compile.

    Uses the suite's cache (``$NUMBA_CACHE_DIR``, warmed by the other tests), so it only
    compiles cold when run alone; counts Numba's own cache hits, not seconds.
    """
    cache = os.environ.get("NUMBA_CACHE_DIR") or str(tmp_path)
    _cache_hits_and_misses(cache)  # fills the cache if it was cold
    hits, misses = _cache_hits_and_misses(cache)
    assert any(Path(cache).rglob("*.nbi")), "nothing was written to NUMBA_CACHE_DIR"
    assert hits > 0 and misses == 0, (hits, misses)


def test_unwritable_cache_dir_is_a_clear_error(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(BackendUnavailable, match="NUMBA_CACHE_DIR"):
        NB.check_available()
    with pytest.raises(BackendUnavailable, match="NUMBA_CACHE_DIR"):
        get_backend("numba")


# --- bad input: clear errors before the jitted code --------------------------------------

def test_bad_input_is_rejected_before_the_jitted_code():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="C-contiguous"):
        NB.conv2d_forward(x[:, :, :, ::2], w, b, 1, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        NB.conv2d_forward(x.astype(np.float16), w, b, 1, 0)
    with pytest.raises(TypeError, match="float32"):
        NB.conv2d_forward(x, w.astype(np.float64), b, 1, 0)
    with pytest.raises(TypeError, match="ndarray"):
        NB.relu_forward(x.tolist())
    with pytest.raises(ShapeError, match="4 dimensions"):
        NB.conv2d_forward(x[0], w, b, 1, 0)
    with pytest.raises(ShapeError, match="does not fit"):
        NB.conv2d_forward(x, w[:, :2].copy(), b, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        NB.conv2d_forward(x, w, b, 0, 0)
    with pytest.raises(TypeError, match="C-contiguous"):
        NB.dense_forward(x.reshape(2, -1)[:, ::2], np.ones((3, 96), np.float32),
                         np.ones(3, np.float32))
    with pytest.raises(ShapeError, match="shape"):
        NB.dense_forward(x.reshape(2, -1), np.ones((3, 5), np.float32), np.ones(3, np.float32))
    y, ctx = NB.maxpool2d_forward(x, 2, 2)
    with pytest.raises(ShapeError, match="shape"):
        NB.maxpool2d_backward(y[:1].copy(), ctx)
    p = np.zeros(10, np.float32)
    with pytest.raises(TypeError, match="float32"):
        NB.sgd_update(p, np.zeros(10), p.copy(), 0.1, 0.9, 0, 0, False, True)
    with pytest.raises(ShapeError, match="labels"):
        NB.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))


def test_thread_counts():
    top = numba.config.NUMBA_NUM_THREADS
    before = numba.get_num_threads()
    try:
        assert NB.configure(1) == 1 and numba.get_num_threads() == 1
        assert NB.configure() == top == numba.get_num_threads()
        with pytest.raises(ValueError, match=f"at most {top}.*NUMBA_NUM_THREADS"):
            NB.configure(top + 1)
        with pytest.raises(ValueError, match=">= 1"):
            NB.configure(0)
    finally:
        numba.set_num_threads(before)
    from threadpoolctl import threadpool_info

    assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")


def test_blas_is_repinned_to_one_thread_before_each_blas_kernel():
    """Someone else raising BLAS threads (a benchmark pinning torch's pools, a user's
    threadpool_limits) must not make every prange thread call a multi-threaded sgemm."""
    from threadpoolctl import threadpool_info, threadpool_limits

    NB.configure(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = np.zeros(4, np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        y, _ = NB.conv2d_forward(x, w, b, 1, 1)
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    close(y, REF.conv2d_forward(x, w, b, 1, 1)[0], what="conv forward")


def test_pooled_outputs_are_never_shared_with_live_arrays():
    """Outputs are recycled only when nobody holds them: a kept result stays intact."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 64, 64)).astype(np.float32)
    y1, _ = NB.relu_forward(x)
    keep = y1.copy()
    view = y1[1:]
    del y1
    y2, _ = NB.relu_forward(-x)
    np.testing.assert_array_equal(view, keep[1:])
    assert not np.shares_memory(y2, view)
    del view
    y3, _ = NB.relu_forward(x)  # now the first buffer is free again: recycled
    np.testing.assert_array_equal(y3, keep)


@pytest.fixture
def small_pool(monkeypatch):
    """A fresh view of the process-wide pool under a small cap (free arrays dropped first)."""
    NB.release_pool()
    monkeypatch.setattr(NB, "POOL_BYTES", 4 << 20)
    yield
    NB.release_pool()


def _held(stats):
    assert stats["held_bytes"] == stats["bytes"], stats  # the bookkeeping is exact
    return stats["bytes"]


def test_recycled_outputs_stay_within_the_pool_budget(small_pool):
    rng = np.random.default_rng(0)
    held = [NB.relu_forward(rng.standard_normal((256, 1024 + i), np.float32))[0]
            for i in range(3)]  # 1 MB each, kept by the caller
    for i in range(20):
        NB.relu_forward(rng.standard_normal((512, 1024 + i), np.float32))  # 2 MB, dropped
        assert _held(NB.pool_stats()) <= 4 << 20
    for a in held:  # arrays still in use are never dropped from under their owner
        a[...] = 1


def test_a_request_larger_than_the_cap_drops_nothing(small_pool):
    """A step with one array over the cap must not empty the pool each time: it did, and
    then every other array of the step was allocated (and page-faulted) again on every call.
    """
    small = np.ones((256, 1024), np.float32)  # 1 MB: fits
    big = np.ones((2048, 1024), np.float32)  # 8 MB: over the 4 MB cap
    misses = []
    for _ in range(5):
        ys = NB.relu_forward(small)[0]
        del ys  # free: the pool may hand it out again
        yb = NB.relu_forward(big)[0]
        del yb
        misses.append(NB.pool_stats()["misses"])
    # once both shapes are known only the big array misses (it can never be pooled)
    assert np.diff(misses).tolist()[1:] == [1, 1, 1], misses
    assert _held(NB.pool_stats()) == small.nbytes


def test_pool_stays_under_its_cap_across_large_shapes(monkeypatch):
    """Training steps at several shapes whose arrays together exceed the cap: the pool
    (outputs and kernel scratch, counted by its own bookkeeping) never holds more than the
    cap, drops the least recently used shapes, and a workload that fits allocates nothing
    from its second step on."""
    from cnn.models import seed_cnn

    NB.release_pool()
    cap = 32 << 20
    monkeypatch.setattr(NB, "POOL_BYTES", cap)
    rng = np.random.default_rng(0)
    try:
        for batch in (48, 56, 64, 40):  # each step holds 19-28 MB of pooled arrays
            net = seed_cnn((3, 32, 32), backend="numba", threads=2)
            x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
            y = rng.integers(0, 10, batch)
            for _ in range(3):
                net.loss_and_grad(x, y)
                assert _held(NB.pool_stats()) <= cap
            before = NB.pool_stats()["misses"]
            net.loss_and_grad(x, y)
            assert NB.pool_stats()["misses"] == before  # no new allocation in steady state
        # a small workload after the big ones: no growth, nothing allocated per step
        net = seed_cnn((1, 8, 8), padding=1, backend="numba", threads=2)
        x, y = rng.standard_normal((32, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 32)
        net.loss_and_grad(x, y)
        stats = NB.pool_stats()
        net.loss_and_grad(x, y)
        after = NB.pool_stats()
        assert after["misses"] == stats["misses"] and after["bytes"] == stats["bytes"]
    finally:
        NB.release_pool()


def test_idle_shapes_are_dropped_and_a_repeating_workload_keeps_its_arrays(monkeypatch):
    """After one configuration, steps of another release the first one's arrays once they
    have been idle for POOL_IDLE_TAKES requests, instead of keeping them up to the cap;
    the running configuration, which requests its shapes every step, loses nothing."""
    from cnn.models import seed_cnn

    monkeypatch.setattr(NB, "POOL_IDLE_TAKES", 64)  # a seed CNN step makes ~25 requests
    rng = np.random.default_rng(0)

    def steps(shape, batch, times):
        net = seed_cnn(shape, backend="numba", threads=2)
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        misses = []
        for _ in range(times):
            net.loss_and_grad(x, y)
            misses.append(NB.pool_stats()["misses"])
        return np.diff(misses).tolist()

    try:
        NB.release_pool()
        steps((1, 28, 28), 48, 2)
        alone = NB.pool_stats()["bytes"]
        NB.release_pool()
        steps((3, 32, 32), 96, 2)  # another configuration first (~32 MB)
        assert NB.pool_stats()["bytes"] > alone + (8 << 20)
        assert steps((1, 28, 28), 48, 8) == [0] * 7  # nothing of its own is ever dropped
        assert _held(NB.pool_stats()) == alone  # the other configuration's arrays are gone
    finally:
        NB.release_pool()


def test_pool_cap_from_the_environment():
    code = "from cnn.backends import numba_cpu as B; print(B.POOL_BYTES)"
    for value, ok in (("12", True), ("-3", False), ("lots", False)):
        env = {**os.environ, NB.POOL_ENV: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        if ok:
            assert out.returncode == 0 and int(out.stdout) == 12 << 20, out.stderr[-2000:]
        else:
            assert out.returncode != 0
            assert f"{NB.POOL_ENV} must be a whole number of MiB" in out.stderr
