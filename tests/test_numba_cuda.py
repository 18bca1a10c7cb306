"""The CUDA backend against the NumPy reference: in Numba's CUDA simulator (CI) and on a GPU.

The simulator must be switched on before ``numba.cuda`` is first imported, so it
cannot be turned on inside a pytest process that other test files share. Hence:

- ``test_simulator_suite`` runs this same file again in a subprocess with
  ``NUMBA_ENABLE_CUDASIM=1``; there the ``sim_*`` tests below run (each kernel,
  a full ``loss_and_grad``, SGD and Adam steps, odd sizes that fill no block).
  The outer process does not collect them: the suite test stands for them all.
- ``test_without_gpu_*`` run ``python -c`` without the variable.
- ``test_kernels_compile_for_sm90`` compiles every kernel the backend launches to
  PTX for a real GPU (no device needed, but NVVM/NVRTC: skipped without them)
  and checks float32 kernels use no float64 and no local memory.
- ``@pytest.mark.gpu`` tests need a real GPU and skip with the reason otherwise.

Tolerance: float32 kernels accumulate in a different order than BLAS, so results
are compared scale-relative, ``max|got - want| <= 1e-4 * max|want|`` per tensor.
"""

from __future__ import annotations

import importlib.util
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


def _python(code: str, sim: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- the outer process ---------------------------------------------------------------------

@pytest.mark.skipif(SIM, reason="already inside the simulator subprocess")
def test_simulator_suite():
    """Every sim_* test below, in one subprocess with the simulator on."""
    if importlib.util.find_spec("numba.cuda") is None:
        pytest.skip("numba.cuda is not installed: pip install -e '.[cuda]' (numba-cuda)")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-m", "not gpu", "-p",
           "no:cacheprovider", "-k", "sim_"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"simulator suite failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


@cache
def _gpu_status() -> str:
    """"ok", or why there is no usable GPU here (asked in a subprocess, so this process
    never imports numba.cuda without the simulator just to find out)."""
    if SIM:
        return "inside the CUDA simulator"
    proc = _python("""
        from cnn.errors import BackendUnavailable
        from cnn.backends import get_backend
        try:
            get_backend("cuda")
            print("ok")
        except BackendUnavailable as exc:
            print(exc)
    """, sim=False, timeout=120)
    return (proc.stdout.strip().splitlines() or [proc.stderr.strip()[-500:]])[-1]


@pytest.mark.skipif(SIM, reason="needs a process without the simulator")
def test_without_gpu_get_backend_says_what_to_do():
    if _gpu_status() == "ok":
        pytest.skip("a CUDA GPU is present: the no-GPU message cannot be seen here")
    proc = _python("""
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
    message = proc.stdout.split("MESSAGE", 1)[1]
    for needle in ("no CUDA GPU/driver found", "NUMBA_ENABLE_CUDASIM=1", "[cuda]"):
        assert needle in message
    assert "STATUS backend 'cuda' needs an NVIDIA GPU" in proc.stdout


PTX_CHECK = r"""
import re, sys
from types import SimpleNamespace
import numpy as np, numba
from numba import cuda
try:
    cuda.compile_ptx(lambda a: None, (numba.float32[:],), cc=(9, 0))
except Exception as exc:  # no NVVM / NVRTC: nothing to compile with
    print("SKIP", " ".join(str(exc).split())[:300]); sys.exit(3)
import numba.cuda.dispatcher as dispatcher
# device functions compile for the "current" device: pretend one (sm_90) exists
dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
from cnn import models, optim
from cnn.backends import _cuda_kernels as K, numba_cuda as C

launched = {}
class Record:
    def __init__(self, name, kernel): self.name, self.kernel = name, kernel
    def __getitem__(self, config):
        def launch(*args):
            launched.setdefault((self.name, tuple(numba.typeof(a) for a in args)), self.kernel)
        return launch
def record(ns):
    tag = f"/{ns.bm}x{ns.bn}" if hasattr(ns, "bm") else ""
    return SimpleNamespace(**{k: Record(k + tag, v) if hasattr(v, "py_func") else v
                              for k, v in vars(ns).items()})
gemm_kernels, pointwise_kernels = K.gemm_kernels, K.pointwise_kernels
# host arrays stand in for device arrays (same numba types); launches are recorded
C._gemm_kernels = lambda dt, m: record(gemm_kernels(np.dtype(dt), *K.pick_tile(m)))
C._pw = lambda dt: record(pointwise_kernels(np.dtype(dt)))
C._empty = lambda shape, dtype: np.zeros(shape, dtype)
C.from_host = C.to_host = np.asarray
C._taps = K.conv_taps
C.stream = lambda: None
C._sm_count = lambda: 132
for dt in (np.float32, np.float64):
    for net in (models.seed_cnn((3, 16, 16), backend=C, dtype=dt),
                models.mlp((4,), backend=C, dtype=dt)):
        x = np.zeros((4, *net.input_shape), dt)
        net.loss_and_grad(x, np.zeros(4, np.int64))
        optim.SGD(net, lr=0.1, momentum=0.9).step()
        optim.Adam(net).step()
    C.conv2d_backward(np.zeros((2, 2, 3, 3), dt), C.conv2d_forward(
        np.zeros((2, 3, 5, 5), dt), np.zeros((2, 3, 3, 3), dt), np.zeros(2, dt), 1, 0,
        relu=True)[1], np.zeros((2, 3, 3, 3), dt), np.zeros((2, 3, 3, 3), dt), np.zeros(2, dt),
        True)
    C.zeros(3, dt)
problems = []
for (name, sig), kernel in sorted(launched.items(), key=lambda kv: str(kv[0])):
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    f32 = all(getattr(t, "dtype", None) != numba.float64 for t in sig)
    f64_ops = len(re.findall(r"\.f64\b", ptx)) if f32 else 0
    local = len(re.findall(r"\b(ld|st)\.local", ptx))
    print(f"{name:16s} f64 ops {f64_ops:3d}  local ld/st {local:3d}")
    if f64_ops or local:
        problems.append(name)
print("compiled", len(launched), "problems", problems)
sys.exit(1 if problems else 0)
"""


def _has_numba_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba_cuda") is not None


@pytest.mark.skipif(SIM, reason="needs a process without the simulator")
@pytest.mark.skipif(not _has_numba_cuda(), reason="needs the maintained numba-cuda package "
                    "(the cuda extra); numba's deprecated built-in numba.cuda compiles "
                    "differently")
def test_kernels_compile_for_sm90():
    """Each kernel the backend launches (with the argument types it launches with)
    compiles for sm_90: typing errors the simulator cannot see; and float32 kernels
    stay free of float64 arithmetic and of local-memory (register spill) traffic."""
    proc = _python(PTX_CHECK, sim=False, timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"cannot compile PTX here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compiled" in proc.stdout


# --- helpers for the checks -----------------------------------------------------------------

def assert_close(got, want, rel=REL, what=""):
    from cnn.backends import numba_cuda as C

    got = np.asarray(C.to_host(got))
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.max(np.abs(want))), 1e-6) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x {scale:.3g}"


def _rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _backends():
    from cnn.backends import get_backend

    return get_backend("numpy"), get_backend("cuda")


# --- simulator checks: every kernel on tiny, odd shapes ---------------------------------------

CONV_CASES = {
    # name: (x shape, w shape, stride, padding)
    "odd-3x3": ((3, 5, 7, 9), (4, 5, 3, 3), 1, 0),
    "stride2-pad1": ((2, 5, 7, 9), (4, 5, 3, 3), 2, 1),
    "1x1-stride2": ((2, 3, 7, 9), (6, 3, 1, 1), 2, 0),  # skipped input pixels get dx = 0
    "wide-channels": ((2, 33, 3, 4), (34, 33, 2, 2), 1, 0),  # M > 32: the 64x64 tile
}


@sim_only
@pytest.mark.parametrize("case", CONV_CASES)
def test_sim_conv2d(case):
    R, C = _backends()
    xs, ws, stride, pad = CONV_CASES[case]
    rng = np.random.default_rng(0)
    x, w, b = _rand(rng, xs), _rand(rng, ws), _rand(rng, ws[0])
    y, ctx = R.conv2d_forward(x, w, b, stride, pad)
    yd, ctxd = C.conv2d_forward(C.from_host(x), C.from_host(w), C.from_host(b), stride, pad)
    assert_close(yd, y, what="y")
    dy = _rand(rng, y.shape)
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
def test_sim_conv2d_fused_relu_and_float64():
    R, C = _backends()
    rng = np.random.default_rng(1)
    for dtype, rel in ((np.float32, REL), (np.float64, 1e-10)):
        x, w, b = _rand(rng, (2, 3, 5, 6), dtype), _rand(rng, (3, 3, 3, 3), dtype), \
            _rand(rng, 3, dtype)
        y, ctx = R.conv2d_forward(x, w, b, 1, 1)
        r, rctx = R.relu_forward(y)
        yd, ctxd = C.conv2d_forward(C.from_host(x), C.from_host(w), C.from_host(b), 1, 1,
                                    relu=True)
        assert C.to_host(yd).dtype == dtype
        assert_close(yd, r, rel, what=f"relu(conv) {dtype.__name__}")
        dy = _rand(rng, y.shape, dtype)
        dw, db = np.zeros_like(w), np.zeros_like(b)
        dx = R.conv2d_backward(R.relu_backward(dy, rctx), ctx, w, dw, db, True)
        dwd, dbd = C.zeros(w.size, dtype).reshape(w.shape), C.zeros(b.size, dtype)
        dxd = C.conv2d_backward(C.from_host(dy), ctxd, C.from_host(w), dwd, dbd, True)
        for got, want, name in ((dwd, dw, "dw"), (dbd, db, "db"), (dxd, dx, "dx")):
            assert_close(got, want, rel, what=f"{name} {dtype.__name__}")


@sim_only
@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (2, 3)])
def test_sim_maxpool(k, s):
    R, C = _backends()
    rng = np.random.default_rng(2)
    # small integers: many ties, which must go to the first offset (torch's rule)
    x = rng.integers(-2, 3, size=(3, 2, 7, 9)).astype(np.float32)
    y, ctx = R.maxpool2d_forward(x, k, s)
    yd, ctxd = C.maxpool2d_forward(C.from_host(x), k, s)
    assert_close(yd, y, what="y")
    np.testing.assert_array_equal(C.to_host(ctxd[0]), ctx[0])
    dy = _rand(rng, y.shape)
    assert_close(C.maxpool2d_backward(C.from_host(dy), ctxd), R.maxpool2d_backward(dy, ctx),
                 what="dx")


@sim_only
def test_sim_relu_sigmoid():
    R, C = _backends()
    rng = np.random.default_rng(3)
    x = _rand(rng, (3, 5, 7)) * 4
    x[0, 0, :3] = [0.0, -100.0, 100.0]  # the ReLU kink and sigmoid's far tails
    dy = _rand(rng, x.shape)
    for fwd, bwd in (("relu_forward", "relu_backward"), ("sigmoid_forward", "sigmoid_backward")):
        y, ctx = getattr(R, fwd)(x)
        yd, ctxd = getattr(C, fwd)(C.from_host(x))
        assert_close(yd, y, what=fwd)
        assert_close(getattr(C, bwd)(C.from_host(dy), ctxd), getattr(R, bwd)(dy, ctx),
                     what=bwd)


@sim_only
@pytest.mark.parametrize("n,i,o", [(3, 7, 5), (40, 37, 33)])
def test_sim_dense(n, i, o):
    """(40, 37, 33): rows > 32 (the square tile) and dW split over the batch."""
    R, C = _backends()
    rng = np.random.default_rng(4)
    x, w, b = _rand(rng, (n, i)), _rand(rng, (o, i)), _rand(rng, o)
    y, ctx = R.dense_forward(x, w, b)
    yd, ctxd = C.dense_forward(C.from_host(x), C.from_host(w), C.from_host(b))
    assert_close(yd, y, what="y")
    dy = _rand(rng, y.shape)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = R.dense_backward(dy, ctx, w, dw, db, True)
    dwd, dbd = C.zeros(w.size, np.float32).reshape(w.shape), C.zeros(o, np.float32)
    dxd = C.dense_backward(C.from_host(dy), ctxd, C.from_host(w), dwd, dbd, True)
    assert_close(dwd, dw, what="dw")
    assert_close(dbd, db, what="db")
    assert_close(dxd, dx, what="dx")


@sim_only
def test_sim_softmax_cross_entropy():
    R, C = _backends()
    rng = np.random.default_rng(5)
    logits = _rand(rng, (5, 7)) * 3
    logits[0] += 80.0  # log-sum-exp must not overflow
    labels = np.array([0, 6, 3, 3, 1])
    loss, grad = R.softmax_cross_entropy(logits, labels)
    lossd, gradd = C.softmax_cross_entropy(C.from_host(logits), labels)
    assert isinstance(lossd, float)
    assert lossd == pytest.approx(loss, rel=REL)
    assert_close(gradd, grad, what="grad")


@sim_only
def test_sim_sgd_and_adam_updates():
    R, C = _backends()
    rng = np.random.default_rng(6)
    n = 300  # more than one block
    sgd_cases = [dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
                 dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
                 dict(momentum=0.0, dampening=0.0, weight_decay=0.05, nesterov=False)]
    for hp in sgd_cases:
        p, v = _rand(rng, n), np.zeros(n, np.float32)
        pd_, vd = C.from_host(p), C.zeros(n, np.float32)
        for step in range(3):
            g = _rand(rng, n)
            R.sgd_update(p, g, v, 0.1, first_step=step == 0, **hp)
            C.sgd_update(pd_, C.from_host(g), vd, 0.1, first_step=step == 0, **hp)
        assert_close(pd_, p, what=f"sgd params {hp}")
        assert_close(vd, v, what=f"sgd velocity {hp}")
    p, m, v = _rand(rng, n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    pd_, md, vd = C.from_host(p), C.zeros(n, np.float32), C.zeros(n, np.float32)
    for step in range(1, 4):
        g = _rand(rng, n)
        R.adam_update(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, 0.01, step)
        C.adam_update(pd_, C.from_host(g), md, vd, 0.01, 0.9, 0.999, 1e-8, 0.01, step)
    for got, want, name in ((pd_, p, "params"), (md, m, "m"), (vd, v, "v")):
        assert_close(got, want, what=f"adam {name}")


@sim_only
def test_sim_arrays_and_device():
    _, C = _backends()
    assert C.device_name() == "cuda-simulator"
    assert C.configure(None) == 1
    a = np.arange(12, dtype=np.float32)
    d = C.from_host(a)
    assert C.from_host(d) is d  # device arrays pass through
    view = d[2:8].reshape(2, 3)
    C.copy_into(view, -np.ones((2, 3), np.float32))
    C.synchronize()
    want = a.copy()
    want[2:8] = -1
    np.testing.assert_array_equal(C.to_host(d), want)
    np.testing.assert_array_equal(C.to_host(C.zeros(5, np.float64)), np.zeros(5))
    for _ in range(3):  # the pinned staging ring reuses its buffers
        b = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        np.testing.assert_array_equal(C.to_host(C.from_host(b)), b)


def _tiny_nets(**kw):
    from cnn import models

    # batch 3 of 3x5x7 images, 4 and 5 filters, 6 hidden units, 3 classes: nothing fills a block
    kw = dict(input_shape=(3, 5, 7), num_classes=3, padding=1, filters=(4, 5), hidden=6, **kw)
    return models.seed_cnn(backend="numpy", **kw), models.seed_cnn(backend="cuda", **kw)


def _batch(seed=7, n=3):
    rng = np.random.default_rng(seed)
    return _rand(rng, (n, 3, 5, 7)), rng.integers(0, 3, size=n)


def _assert_grads_close(net, ref, what=""):
    g = net.backend.to_host(net.grads)
    for s in ref.slots:
        assert_close(g[s.offset:s.offset + s.size], ref.grads[s.offset:s.offset + s.size],
                     what=f"{what} grad {s.name}")


@sim_only
def test_sim_network_loss_and_grad():
    ref, net = _tiny_nets()
    x, y = _batch()
    assert_close(net.forward(x), ref.forward(x), what="logits")
    loss_ref, loss = ref.loss_and_grad(x, y), net.loss_and_grad(x, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(loss_ref, rel=REL)
    _assert_grads_close(net, ref)
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
    x, y = _rand(rng, (5, 4)), rng.integers(0, 3, size=5)
    assert net.loss_and_grad(x, y) == pytest.approx(ref.loss_and_grad(x, y), rel=REL)
    _assert_grads_close(net, ref, "mlp")


@sim_only
def test_sim_optimizer_steps_and_state():
    """cnn.optim's SGD (Nesterov momentum, weight decay) and Adam on device-resident state."""
    from cnn import models
    from cnn.optim import SGD, Adam

    def nets():  # dense layers only: the update kernels do not care, the simulator is slow
        return (models.mlp((4,), num_classes=3, hidden=(7,), backend=b) for b in ("numpy", "cuda"))

    rng = np.random.default_rng(9)
    batches = [(_rand(rng, (5, 4)), rng.integers(0, 3, size=5)) for _ in range(3)]
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

def _need_gpu():
    status = _gpu_status()
    if status != "ok":
        pytest.skip(f"no usable CUDA GPU: {status}")


@pytest.mark.gpu
def test_gpu_seed_cnn_full_size():
    """The seed CNN at its real size (3x32x32, batch 128): logits, loss and every gradient."""
    _need_gpu()
    from cnn import models

    ref, net = (models.seed_cnn((3, 32, 32), backend=b, seed=0) for b in ("numpy", "cuda"))
    rng = np.random.default_rng(0)
    x, y = _rand(rng, (128, 3, 32, 32)), rng.integers(0, 10, size=128)
    assert net.backend.device_name() not in ("cpu", "cuda-simulator")
    assert_close(net.forward(x), ref.forward(x), what="logits")
    assert net.loss_and_grad(x, y) == pytest.approx(ref.loss_and_grad(x, y), rel=REL)
    _assert_grads_close(net, ref, "seed_cnn")


@pytest.mark.gpu
def test_gpu_digits_training_matches_numpy():
    """A short SGD run on digits: the cuda backend reaches the NumPy backend's accuracy."""
    _need_gpu()
    from cnn import data, models
    from cnn.optim import SGD
    from cnn.train import fit

    train, test = data.load("digits", "train"), data.load("digits", "test")
    acc = {}
    for backend in ("numpy", "cuda"):
        net = models.seed_cnn((1, 8, 8), num_classes=10, padding=1, backend=backend, seed=0)
        opt = SGD(net, lr=0.05, momentum=0.9)
        rows = fit(net, train, test, epochs=3, batch_size=64, optimizer=opt, seed=0,
                   log=None, progress=False)
        acc[backend] = float(rows["test_acc"].iloc[-1])
    assert acc["numpy"] > 0.9
    assert abs(acc["cuda"] - acc["numpy"]) <= 0.02, acc
