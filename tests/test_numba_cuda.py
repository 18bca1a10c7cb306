"""The CUDA backend against the NumPy reference: in Numba's CUDA simulator (CI) and on a GPU.

This file also holds the helpers the other CUDA test files (``tests/test_cuda_*.py``)
import. The simulator must be switched on before ``numba.cuda`` is first imported,
so it cannot be turned on inside a pytest process that other test files share. Hence:

- ``test_simulator_suite`` runs this file and every ``tests/test_cuda_*.py`` again
  in one subprocess with ``NUMBA_ENABLE_CUDASIM=1``; there the ``sim_*`` tests run
  (each kernel, a full ``loss_and_grad``, SGD and Adam steps, odd sizes that fill
  no block, memory and launch bookkeeping, state_dict loading). The outer process
  does not collect them: the suite test stands for them all.
- ``test_without_gpu_*`` run ``python -c`` without the variable.
- ``@pytest.mark.gpu`` tests need a real GPU and skip with the reason otherwise
  (``scripts/gpu_check.sh`` runs them on one).

The maintained CUDA target, numba-cuda (the ``cuda`` extra), must be installed:
without it these tests fail, they do not skip.

Tolerance: float32 kernels accumulate in a different order than BLAS, so results
are compared scale-relative, ``max|got - want| <= 1e-4 * max|want|`` per tensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ROOT = Path(__file__).resolve().parents[1]
REL = 1e-4


def sim_only(test):
    """Collected only inside the simulator subprocess (``test_simulator_suite`` runs them)."""
    test.__test__ = SIM
    return test


def python(code: str, sim: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -c code`` in the project root, with or without the simulator."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sim_files() -> list[str]:
    """The files whose ``sim_*`` tests the simulator suite runs."""
    here = Path(__file__).resolve()
    return [str(here), *sorted(str(p) for p in here.parent.glob("test_cuda_*.py"))]


# --- the outer process ---------------------------------------------------------------------

@pytest.mark.skipif(SIM, reason="already inside the simulator subprocess")
def test_simulator_suite():
    """Every sim_* test of the CUDA test files, in one subprocess with the simulator on."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    cmd = [sys.executable, "-m", "pytest", *sim_files(), "-q", "-m", "not gpu", "-p",
           "no:cacheprovider", "-k", "sim_", "--timeout", "560"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"simulator suite failed:\n{tail}"
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, tail


def test_numba_cuda_is_the_cuda_target():
    """numba-cuda (not numba's deprecated built-in target) provides ``numba.cuda``."""
    proc = python("""
        import numba_cuda, numba.cuda
        print(numba.cuda.__file__)
    """, sim=False, timeout=120)
    assert proc.returncode == 0, ("the cuda extra is not installed: pip install -e '.[cuda]' "
                                  f"(numba-cuda)\n{proc.stderr[-2000:]}")
    assert "numba_cuda" in proc.stdout, proc.stdout


@cache
def gpu_status() -> str:
    """"ok", or why there is no usable GPU here (asked in a subprocess, so this process
    never imports numba.cuda without the simulator just to find out)."""
    if SIM:
        return "inside the CUDA simulator"
    proc = python("""
        from cnn.errors import BackendUnavailable
        from cnn.backends import get_backend
        try:
            get_backend("cuda")
            print("ok")
        except BackendUnavailable as exc:
            print(exc)
    """, sim=False, timeout=180)
    return (proc.stdout.strip().splitlines() or [proc.stderr.strip()[-500:]])[-1]


def need_gpu() -> None:
    status = gpu_status()
    if status != "ok":
        pytest.skip(f"no usable CUDA GPU: {status}")


def gpu_scale() -> str:
    """"full" on a real GPU; "tiny" in the simulator under ``scripts/gpu_check.sh
    --simulate`` (the same checks at sizes the simulator finishes); else a skip."""
    if SIM:
        if os.environ.get("CNN_GPU_CHECK_SIMULATE") != "1":
            pytest.skip("a GPU test: in the simulator only under scripts/gpu_check.sh "
                        "--simulate")
        return "tiny"
    need_gpu()
    return "full"


@pytest.mark.skipif(SIM, reason="needs a process without the simulator")
def test_without_gpu_get_backend_says_what_to_do():
    if gpu_status() == "ok":
        pytest.skip("a CUDA GPU is present: the no-GPU message cannot be seen here")
    proc = python("""
        import sys
        import cnn
        assert "numba.cuda" not in sys.modules, "import cnn imported numba.cuda"
        from cnn.backends import available_backends
        try:
            cnn.get_backend("cuda")
        except cnn.BackendUnavailable as exc:
            print("MESSAGE", exc)
        print("STATUS", available_backends()["cuda"])
    """, sim=False)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.split("MESSAGE", 1)[1].split("\nSTATUS")[0]
    assert "\n" not in message.strip(), "the reason must be one line"
    for needle in ("no CUDA GPU/driver found", "NUMBA_ENABLE_CUDASIM=1", "[cuda]"):
        assert needle in message
    assert "STATUS backend 'cuda' needs an NVIDIA GPU" in proc.stdout


def test_without_numba_cuda_the_backend_says_so():
    """numba's built-in (deprecated) numba.cuda is no fallback: the probe names the
    missing package in one line (here numba-cuda is hidden from the import system)."""
    proc = python("""
        import sys, warnings
        warnings.simplefilter("ignore")
        sys.modules["numba_cuda"] = None  # as if the cuda extra were not installed
        from cnn.backends import get_backend
        from cnn.errors import BackendUnavailable
        try:
            get_backend("cuda")
        except BackendUnavailable as exc:
            print("MESSAGE", exc)
    """, sim=True)
    message = proc.stdout.partition("MESSAGE ")[2].strip()
    assert message and "\n" not in message, proc.stdout + proc.stderr[-2000:]
    assert "needs the numba-cuda package" in message and "[cuda]" in message


# --- helpers for the checks -----------------------------------------------------------------

def assert_close(got, want, rel=REL, what=""):
    from cnn.backends import numba_cuda as C

    got = np.asarray(C.to_host(got))
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.max(np.abs(want))), 1e-6) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x {scale:.3g}"


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def backends():
    from cnn.backends import get_backend

    return get_backend("numpy"), get_backend("cuda")


def tiny_nets(**kw):
    from cnn import models

    # batch 3 of 3x5x7 images, 4 and 5 filters, 6 hidden units, 3 classes: nothing fills a block
    kw = dict(input_shape=(3, 5, 7), num_classes=3, padding=1, filters=(4, 5), hidden=6, **kw)
    return models.seed_cnn(backend="numpy", **kw), models.seed_cnn(backend="cuda", **kw)


def batch(seed=7, n=3, shape=(3, 5, 7), classes=3):
    rng = np.random.default_rng(seed)
    return rand(rng, (n, *shape)), rng.integers(0, classes, size=n)


def assert_grads_close(net, ref, what=""):
    g = net.backend.to_host(net.grads)
    for s in ref.slots:
        assert_close(g[s.offset:s.offset + s.size], ref.grads[s.offset:s.offset + s.size],
                     what=f"{what} grad {s.name}")


# --- simulator checks: every kernel on tiny, odd shapes ---------------------------------------

CONV_CASES = {
    # name: (x shape, w shape, stride, padding)
    "odd-3x3": ((3, 5, 7, 9), (4, 5, 3, 3), 1, 0),
    "stride2-pad1": ((2, 5, 7, 9), (4, 5, 3, 3), 2, 1),
    "1x1-stride2": ((2, 3, 7, 9), (6, 3, 1, 1), 2, 0),  # skipped input pixels get dx = 0
    "wide-channels": ((2, 33, 3, 4), (34, 33, 2, 2), 1, 0),  # M > 32: the 64x64 tile
    "one-channel": ((3, 1, 6, 5), (4, 1, 3, 3), 1, 1),  # size-1 dims in x and w
}


@sim_only
@pytest.mark.parametrize("case", CONV_CASES)
def test_sim_conv2d(case):
    R, C = backends()
    xs, ws, stride, pad = CONV_CASES[case]
    rng = np.random.default_rng(0)
    x, w, b = rand(rng, xs), rand(rng, ws), rand(rng, ws[0])
    y, ctx = R.conv2d_forward(x, w, b, stride, pad)
    yd, ctxd = C.conv2d_forward(C.from_host(x), C.from_host(w), C.from_host(b), stride, pad)
    assert_close(yd, y, what="y")
    dy = rand(rng, y.shape)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = R.conv2d_backward(dy, ctx, w, dw, db, True)
    grads = C.zeros(w.size + b.size, np.float32)  # views into one flat buffer, as in Network
    dwd, dbd = grads[:w.size].reshape(w.shape), grads[w.size:]
    dxd = C.conv2d_backward(C.from_host(dy), ctxd, C.from_host(w), dwd, dbd, True)
    assert_close(dwd, dw, what="dw")
    assert_close(dbd, db, what="db")
    assert_close(dxd, dx, what="dx")
    assert C.conv2d_backward(C.from_host(dy), ctxd, C.from_host(w), dwd, dbd, False) is None


@sim_only
def test_sim_conv2d_relu_fused_and_float64():
    """``conv2d_relu_forward`` equals conv then ReLU; its ctx backpropagates like the
    unfused conv's (the ReLU's backward is the Network's separate step)."""
    R, C = backends()
    rng = np.random.default_rng(1)
    for dtype, rel in ((np.float32, REL), (np.float64, 1e-10)):
        x, w, b = rand(rng, (2, 3, 5, 6), dtype), rand(rng, (3, 3, 3, 3), dtype), \
            rand(rng, 3, dtype)
        y, ctx = R.conv2d_forward(x, w, b, 1, 1)
        r, rctx = R.relu_forward(y)
        yd, ctxd = C.conv2d_relu_forward(C.from_host(x), C.from_host(w), C.from_host(b), 1, 1)
        assert C.to_host(yd).dtype == dtype
        assert_close(yd, r, rel, what=f"relu(conv) {dtype.__name__}")
        dy = rand(rng, y.shape, dtype)
        dw, db = np.zeros_like(w), np.zeros_like(b)
        dx = R.conv2d_backward(R.relu_backward(dy, rctx), ctx, w, dw, db, True)
        dwd, dbd = C.zeros(w.size, dtype).reshape(w.shape), C.zeros(b.size, dtype)
        dyd = C.relu_backward(C.from_host(dy), yd)
        dxd = C.conv2d_backward(dyd, ctxd, C.from_host(w), dwd, dbd, True)
        for got, want, name in ((dwd, dw, "dw"), (dbd, db, "db"), (dxd, dx, "dx")):
            assert_close(got, want, rel, what=f"{name} {dtype.__name__}")


@sim_only
@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (2, 3)])
def test_sim_maxpool_and_fused_relu_backward(k, s):
    R, C = backends()
    rng = np.random.default_rng(2)
    # small integers: many ties, which must go to the first offset (torch's rule); zeros and
    # negatives: windows whose maximum the ReLU under the pool zeroed
    pre = rng.integers(-2, 3, size=(3, 2, 7, 9)).astype(np.float32)
    x, relu_ctx = R.relu_forward(pre)
    y, ctx = R.maxpool2d_forward(x, k, s)
    yd, ctxd = C.maxpool2d_forward(C.from_host(x), k, s)
    assert_close(yd, y, what="y")
    np.testing.assert_array_equal(C.to_host(ctxd[0]), ctx[0])
    dy = rand(rng, y.shape)
    dx = R.maxpool2d_backward(dy, ctx)
    assert_close(C.maxpool2d_backward(C.from_host(dy), ctxd), dx, what="dx")
    assert_close(C.maxpool2d_relu_backward(C.from_host(dy), ctxd),
                 R.relu_backward(dx, relu_ctx), what="dx through pool and ReLU")


@sim_only
def test_sim_relu_sigmoid():
    R, C = backends()
    rng = np.random.default_rng(3)
    x = rand(rng, (3, 5, 7)) * 4
    x[0, 0, :3] = [0.0, -100.0, 100.0]  # the ReLU kink and sigmoid's far tails
    dy = rand(rng, x.shape)
    for fwd, bwd in (("relu_forward", "relu_backward"), ("sigmoid_forward", "sigmoid_backward")):
        y, ctx = getattr(R, fwd)(x)
        yd, ctxd = getattr(C, fwd)(C.from_host(x))
        assert_close(yd, y, what=fwd)
        assert_close(getattr(C, bwd)(C.from_host(dy), ctxd), getattr(R, bwd)(dy, ctx),
                     what=bwd)


@sim_only
@pytest.mark.parametrize("n,i,o", [(3, 7, 5), (40, 37, 33), (130, 6, 3)])
def test_sim_dense(n, i, o):
    """(40, 37, 33): rows > 32 (the square tile); (130, 6, 3): dW and db split over the
    batch into partials that the last block sums in order (split-K, one launch)."""
    R, C = backends()
    rng = np.random.default_rng(4)
    x, w, b = rand(rng, (n, i)), rand(rng, (o, i)), rand(rng, o)
    y, ctx = R.dense_forward(x, w, b)
    yd, ctxd = C.dense_forward(C.from_host(x), C.from_host(w), C.from_host(b))
    assert_close(yd, y, what="y")
    dy = rand(rng, y.shape)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = R.dense_backward(dy, ctx, w, dw, db, True)
    dwd, dbd = C.zeros(w.size, np.float32).reshape(w.shape), C.zeros(o, np.float32)
    before = C.memory_stats()["launches"]
    dxd = C.dense_backward(C.from_host(dy), ctxd, C.from_host(w), dwd, dbd, True)
    assert C.memory_stats()["launches"] - before == 2, "dW+db and dx: one launch each"
    assert_close(dwd, dw, what="dw")
    assert_close(dbd, db, what="db")
    assert_close(dxd, dx, what="dx")


@sim_only
def test_sim_split_k_is_deterministic():
    """The split partials are summed in z order whichever block finishes last: the same
    inputs give bitwise the same gradient, and it matches the unsplit sum."""
    R, C = backends()
    rng = np.random.default_rng(10)
    x, dy = rand(rng, (130, 6)), rand(rng, (130, 3))
    w = rand(rng, (3, 6))
    runs = []
    for _ in range(2):
        dwd, dbd = C.zeros(18, np.float32).reshape(3, 6), C.zeros(3, np.float32)
        C.dense_backward(C.from_host(dy), C.from_host(x), C.from_host(w), dwd, dbd, False)
        runs.append((C.to_host(dwd), C.to_host(dbd)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert_close(runs[0][0], dy.T.astype(np.float64) @ x, what="dw")


@sim_only
def test_sim_softmax_cross_entropy_is_a_lazy_loss():
    R, C = backends()
    rng = np.random.default_rng(5)
    logits = rand(rng, (5, 7)) * 3
    logits[0] += 80.0  # log-sum-exp must not overflow
    labels = np.array([0, 6, 3, 3, 1])
    loss, grad = R.softmax_cross_entropy(logits, labels)
    lossd, gradd = C.softmax_cross_entropy(C.from_host(logits), labels)
    assert isinstance(lossd, C.DeviceLoss)  # not read back until asked
    C.synchronize()
    assert lossd.ready()
    assert float(lossd) == pytest.approx(loss, rel=1e-6)
    assert_close(gradd, grad, what="grad")


@sim_only
def test_sim_sgd_and_adam_updates():
    R, C = backends()
    rng = np.random.default_rng(6)
    n = 300  # more than one block
    sgd_cases = [dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
                 dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
                 dict(momentum=0.0, dampening=0.0, weight_decay=0.05, nesterov=False)]
    for hp in sgd_cases:
        p, v = rand(rng, n), np.zeros(n, np.float32)
        pd_, vd = C.from_host(p), C.zeros(n, np.float32)
        for step in range(3):
            g = rand(rng, n)
            R.sgd_update(p, g, v, 0.1, first_step=step == 0, **hp)
            C.sgd_update(pd_, C.from_host(g), vd, 0.1, first_step=step == 0, **hp)
        assert_close(pd_, p, what=f"sgd params {hp}")
        assert_close(vd, v, what=f"sgd velocity {hp}")
    p, m, v = rand(rng, n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    pd_, md, vd = C.from_host(p), C.zeros(n, np.float32), C.zeros(n, np.float32)
    for step in range(1, 4):
        g = rand(rng, n)
        R.adam_update(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, 0.01, step)
        C.adam_update(pd_, C.from_host(g), md, vd, 0.01, 0.9, 0.999, 1e-8, 0.01, step)
    for got, want, name in ((pd_, p, "params"), (md, m, "m"), (vd, v, "v")):
        assert_close(got, want, what=f"adam {name}")


@sim_only
def test_sim_arrays_and_device():
    _, C = backends()
    assert C.device_name() == "cuda-simulator"
    assert C.configure(None) == 1
    a = np.arange(12, dtype=np.float32)
    d = C.from_host(a)
    assert C.from_host(d) is d  # device arrays pass through
    view = d[2:8].reshape(2, 3)
    C.copy_into(view, -np.ones((2, 3), np.float32))
    C.copy_into(d[8:12].reshape(4, 1, 1), np.float32(7))  # size-1 dims, broadcast scalar
    want = a.copy()
    want[2:8] = -1
    want[8:] = 7
    np.testing.assert_array_equal(C.to_host(d), want)
    np.testing.assert_array_equal(C.to_host(C.zeros(5, np.float64)), np.zeros(5))
    for i in range(5):  # the pinned staging ring reuses its buffers
        b = np.random.default_rng(i).standard_normal((3, 4)).astype(np.float32)
        np.testing.assert_array_equal(C.to_host(C.from_host(b)), b)


@sim_only
def test_sim_pinned_buffers_and_prefetch():
    """A batch loaded straight into a pinned buffer, uploaded early, arrives intact, and
    refilling the buffers in turn never changes an upload already made."""
    _, C = backends()
    rng = np.random.default_rng(11)
    batches = [rand(rng, (4, 2, 3)) for _ in range(5)]
    got = []
    for xb in batches:
        buf = C.host_buffer(xb.shape, xb.dtype)
        np.copyto(buf, xb)
        C.prefetch(buf)
        got.append(C.from_host(buf))  # picks up the prefetched upload
    for dev, want in zip(got, batches, strict=True):
        np.testing.assert_array_equal(C.to_host(dev), want)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.prefetch(np.zeros((4, 4), np.float32)[:, ::2])


@sim_only
def test_sim_network_loss_and_grad():
    """The whole Network through the fused kernels (conv+ReLU, pool+ReLU backward)."""
    ref, net = tiny_nets()
    x, y = batch()
    assert_close(net.forward(x), ref.forward(x), what="logits")
    loss_ref, loss = ref.loss_and_grad(x, y), net.loss_and_grad(x, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(loss_ref, rel=REL)
    assert_grads_close(net, ref)
    first = net.backend.to_host(net.grads).copy()
    assert net.loss_and_grad(x, y) == loss  # deterministic: fixed-order reductions, no atomics
    np.testing.assert_array_equal(net.backend.to_host(net.grads), first)
    np.testing.assert_array_equal(net.predict(x), ref.predict(x))
    assert net.evaluate(x, y) == pytest.approx(ref.evaluate(x, y), rel=REL)


@sim_only
def test_sim_mlp_sigmoid_network():
    from cnn import models

    ref, net = (models.mlp((4,), num_classes=3, backend=b) for b in ("numpy", "cuda"))
    rng = np.random.default_rng(8)
    x, y = rand(rng, (5, 4)), rng.integers(0, 3, size=5)
    assert net.loss_and_grad(x, y) == pytest.approx(ref.loss_and_grad(x, y), rel=REL)
    assert_grads_close(net, ref, "mlp")


@sim_only
def test_sim_optimizer_steps_and_state():
    """cnn.optim's SGD (Nesterov momentum, weight decay) and Adam on device-resident state."""
    from cnn import models
    from cnn.optim import SGD, Adam

    def nets():  # dense layers only: the update kernels do not care, the simulator is slow
        return (models.mlp((4,), num_classes=3, hidden=(7,), backend=b) for b in ("numpy", "cuda"))

    rng = np.random.default_rng(9)
    batches = [(rand(rng, (5, 4)), rng.integers(0, 3, size=5)) for _ in range(3)]
    for make in (lambda n: SGD(n, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 lambda n: Adam(n, lr=0.01, weight_decay=1e-3)):
        ref, net = nets()
        opt_ref, opt = make(ref), make(net)
        for x, y in batches[:2]:
            ref.loss_and_grad(x, y)
            net.loss_and_grad(x, y)
            opt_ref.step()
            opt.step()
        name = type(opt).__name__
        for key, want in ref.state_dict().items():
            assert_close(net.state_dict()[key], want, what=f"{name} {key}")
        saved = opt.state_dict()
        for key, value in opt_ref.state_dict().items():
            if isinstance(value, np.ndarray):
                assert_close(saved[key], value, what=f"{name} state {key}")
        # a restored copy (weights and optimiser state) goes on exactly like the original
        twin = models.mlp((4,), num_classes=3, hidden=(7,), backend="cuda", seed=1)
        twin.load_state_dict(net.state_dict())
        opt_twin = make(twin)
        opt_twin.load_state_dict(saved)
        for n, o in ((net, opt), (twin, opt_twin)):
            n.loss_and_grad(*batches[2])
            o.step()
        np.testing.assert_array_equal(twin.backend.to_host(twin.params),
                                      net.backend.to_host(net.params))


# --- real GPU --------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_seed_cnn_full_size():
    """The seed CNN at its real size (3x32x32, batch 128): logits, loss and every gradient."""
    size = gpu_scale()
    from cnn import models

    shape, n, kw = ((3, 32, 32), 128, {}) if size == "full" else \
        ((3, 8, 8), 4, dict(filters=(4, 5), hidden=6, padding=1))
    ref, net = (models.seed_cnn(shape, backend=b, seed=0, **kw) for b in ("numpy", "cuda"))
    rng = np.random.default_rng(0)
    x, y = rand(rng, (n, *shape)), rng.integers(0, 10, size=n)
    if size == "full":
        assert net.backend.device_name() not in ("cpu", "cuda-simulator")
    assert_close(net.forward(x), ref.forward(x), what="logits")
    assert net.loss_and_grad(x, y) == pytest.approx(ref.loss_and_grad(x, y), rel=REL)
    assert_grads_close(net, ref, "seed_cnn")


@pytest.mark.gpu
def test_gpu_digits_training_matches_numpy():
    """A short SGD run on digits (cnn.train.fit): the cuda backend reaches the NumPy
    backend's accuracy (tiny: two steps, the same weights)."""
    size = gpu_scale()
    from cnn import data, models
    from cnn.optim import SGD
    from cnn.train import fit

    train, test = data.load("digits", "train"), data.load("digits", "test")
    epochs, bs, kw = 3, 64, {}
    if size == "tiny":  # two steps of a narrow net: the simulator runs every thread in Python
        train, test, epochs, bs = (train[0][:32], train[1][:32]), \
            (test[0][:16], test[1][:16]), 1, 16
        kw = dict(filters=(4, 5), hidden=8)
    acc, nets = {}, {}
    for backend in ("numpy", "cuda"):
        net = models.seed_cnn((1, 8, 8), num_classes=10, padding=1, backend=backend, seed=0,
                              **kw)
        opt = SGD(net, lr=0.05, momentum=0.9)
        rows = fit(net, train, test, epochs=epochs, batch_size=bs, optimizer=opt, seed=0,
                   log=None, progress=False)
        acc[backend], nets[backend] = float(rows["test_acc"].iloc[-1]), net
    if size == "tiny":
        for key, want in nets["numpy"].state_dict().items():
            assert_close(nets["cuda"].state_dict()[key], want, rel=1e-3, what=key)
        return
    assert acc["numpy"] > 0.9
    assert abs(acc["cuda"] - acc["numpy"]) <= 0.02, acc
