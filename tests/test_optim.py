"""Optimisers and schedules against torch.optim on the torch twin."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnn import optim
from cnn.models import mlp, seed_cnn
from cnn.optim import (
    SGD,
    Adam,
    Constant,
    Cosine,
    CosineWarmRestarts,
    StepLR,
    WarmupCosine,
    make_optimizer,
    make_schedule,
)

STEPS = 5
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
ATOL = {np.float32: 1e-7, np.float64: 1e-15}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's thread pool only loses time, badly so on a busy 2-core box."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_net(dtype):
    return seed_cnn((1, 10, 10), num_classes=4, padding=1, filters=(4, 6), hidden=16,
                    dtype=dtype, seed=3)


def _batches(net, n=8, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, *net.input_shape)),
             rng.integers(0, net.num_classes, n)) for _ in range(steps)]


SGD_CASES = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.05, "momentum": 0.9},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    "weight_decay": {"lr": 0.1, "weight_decay": 0.01},
    "momentum_wd_dampening": {"lr": 0.05, "momentum": 0.8, "dampening": 0.3,
                              "weight_decay": 0.02},
    "nesterov_wd": {"lr": 0.05, "momentum": 0.7, "nesterov": True, "weight_decay": 0.05},
}
ADAM_CASES = {
    "default": {"lr": 1e-2},
    "weight_decay": {"lr": 1e-2, "weight_decay": 0.05},
    "betas_eps": {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6},
}


def _run_against_torch(kind, kw, dtype, lrs=None):
    """``STEPS`` updates with the same real grads fed to ours and to torch.optim."""
    torch = pytest.importorskip("torch")
    from cnn.twin import torch_twin

    net = _small_net(dtype)
    model = torch_twin(net)
    params = list(model.parameters())
    ours = make_optimizer(kind, net, **kw)
    theirs = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[kind](params, **kw)
    for t, (x, y) in enumerate(_batches(net)):
        net.loss_and_grad(x, y)
        grads = {s.name: net.grads[s.offset:s.offset + s.size].reshape(s.shape)
                 for s in net.slots}
        for (name, p) in model.named_parameters():
            p.grad = torch.from_numpy(grads[name].copy())
        if lrs is not None:
            for group in theirs.param_groups:
                group["lr"] = lrs[t]
        ours.step(None if lrs is None else lrs[t])
        theirs.step()
    assert ours.steps == STEPS
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    got = net.state_dict()
    assert list(got) == list(ref)
    moved = False
    start = _small_net(dtype).state_dict()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=RTOL[dtype], atol=ATOL[dtype],
                                   err_msg=name)
        moved |= not np.array_equal(got[name], start[name])
    assert moved, "the optimiser did not change the weights"
    return net, ours


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch(case, dtype):
    _run_against_torch("sgd", SGD_CASES[case], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_matches_torch(case, dtype):
    _run_against_torch("adam", ADAM_CASES[case], dtype)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_scheduled_lr_matches_torch(kind):
    """``step(lr)`` with a changing lr equals torch with param_group['lr'] set each step."""
    kw = {"lr": 0.05, "momentum": 0.9, "nesterov": True} if kind == "sgd" else {"lr": 1e-2}
    lrs = [Cosine(kw["lr"], STEPS)(t) for t in range(STEPS)]
    _, opt = _run_against_torch(kind, kw, np.float64, lrs=lrs)
    assert opt.lr == lrs[-1]


def test_zero_lr_leaves_weights_and_state_advances():
    net = _small_net(np.float64)
    before = net.params.copy()
    opt = Adam(net, lr=0.0)
    x, y = _batches(net, steps=1)[0]
    net.loss_and_grad(x, y)
    opt.step()
    np.testing.assert_array_equal(net.params, before)
    assert opt.steps == 1 and np.any(opt.m != 0)


# --- checkpoints -------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", [
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("sgd", {"lr": 0.05, "momentum": 0.5, "dampening": 0.5}),
    ("adam", {"lr": 1e-2, "weight_decay": 1e-3}),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_resume_is_bit_exact(kind, kw, dtype, tmp_path):
    batches = _batches(_small_net(dtype), steps=6, seed=7)
    sched = WarmupCosine(kw["lr"], 2, 6)

    ref_net = _small_net(dtype)
    ref = make_optimizer(kind, ref_net, **kw)
    for t, (x, y) in enumerate(batches):
        ref_net.loss_and_grad(x, y)
        ref.step(sched(ref.steps))
        if t == 2:
            weights, state = ref_net.state_dict(), ref.state_dict()

    # the checkpoint survives a trip through a file and later mutation of the live buffers
    np.savez(tmp_path / "opt.npz", **state)
    for name in ref._buffers:
        assert not np.shares_memory(state[name], getattr(ref, name))
    net = _small_net(dtype)
    net.load_state_dict(weights)
    opt = make_optimizer(kind, net, lr=123.0)  # hyperparameters come back from the state
    with np.load(tmp_path / "opt.npz") as data:
        opt.load_state_dict({k: data[k] for k in data.files})
    assert opt.steps == 3
    expected = make_optimizer(kind, _small_net(dtype), **kw).hyperparams()
    assert opt.hyperparams() == dict(expected, lr=sched(2))
    for x, y in batches[3:]:
        net.loss_and_grad(x, y)
        opt.step(sched(opt.steps))
    np.testing.assert_array_equal(net.params, ref_net.params)
    for name in ref._buffers:
        np.testing.assert_array_equal(getattr(opt, name), getattr(ref, name))


def test_state_dict_contents_and_mismatches():
    net = _small_net(np.float32)
    opt = SGD(net, lr=0.1, momentum=0.9)
    state = opt.state_dict()
    assert state["kind"] == "sgd" and state["steps"] == 0 and state["momentum"] == 0.9
    assert isinstance(state["velocity"], np.ndarray)
    assert state["velocity"].shape == (net.num_params,)
    with pytest.raises(ValueError, match="sgd"):
        Adam(net).load_state_dict(state)
    other = seed_cnn((1, 10, 10), num_classes=4, padding=1, filters=(4, 6), hidden=8)
    with pytest.raises(ValueError, match="another network"):
        SGD(other, lr=0.1).load_state_dict(state)
    bad = dict(state)
    del bad["velocity"]
    with pytest.raises(KeyError, match="velocity"):
        opt.load_state_dict(bad)
    bad = dict(state, nesterov=True, dampening=0.5)
    fresh = SGD(net, lr=0.1, momentum=0.9)
    fresh.velocity[:] = 1.0
    with pytest.raises(ValueError, match="Nesterov"):
        fresh.load_state_dict(bad)
    assert np.all(fresh.velocity == 1.0), "a rejected state must not be half-loaded"


def test_state_is_allocated_by_the_backend():
    calls = []

    class Spy:
        def __init__(self, backend):
            self._b = backend

        def __getattr__(self, name):
            return getattr(self._b, name)

        def zeros(self, n, dtype):
            calls.append((n, np.dtype(dtype)))
            return self._b.zeros(n, dtype)

    net = mlp(dtype=np.float64)
    net.backend = Spy(net.backend)
    Adam(net)
    SGD(net, lr=0.1)
    assert calls == [(net.num_params, np.dtype(np.float64))] * 3


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"lr": -0.1}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": 0.1, "momentum": -0.5}, "momentum"),
    ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
    ({"lr": 0.1, "dampening": 1.5}, "dampening"),
    ({"lr": 0.1, "nesterov": True}, "Nesterov"),
    ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "Nesterov"),
])
def test_sgd_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SGD(mlp(), **kw)


@pytest.mark.parametrize("kw,match", [
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"betas": (0.9,)}, "pair"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -1.0}, "weight_decay"),
])
def test_adam_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        Adam(mlp(), **kw)


def test_step_lr_validation_and_factory_errors():
    opt = SGD(mlp(), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.step(lr=-1.0)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'.*sgd, adam"):
        make_optimizer("rmsprop", mlp(), lr=0.1)
    with pytest.raises(ValueError, match="bad arguments.*adam"):
        make_optimizer("adam", mlp(), momentum=0.9)
    assert isinstance(make_optimizer("SGD", mlp(), lr=0.1), SGD)


# --- schedules ----------------------------------------------------------------------------

N_STEPS = 50


def _torch_lrs(make, lr, n=N_STEPS):
    """lr torch reports before each of ``n`` optimiser steps."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(torch.optim.lr_scheduler, opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


SCHEDULE_CASES = {
    "constant": (Constant(0.1), lambda L, o: L.ConstantLR(o, factor=1.0)),
    "step": (StepLR(0.1, 7), lambda L, o: L.StepLR(o, 7)),
    "step_gamma": (StepLR(0.3, 4, gamma=0.5), lambda L, o: L.StepLR(o, 4, gamma=0.5)),
    "cosine": (Cosine(0.1, N_STEPS), lambda L, o: L.CosineAnnealingLR(o, N_STEPS)),
    "cosine_min": (Cosine(0.1, 30, min_lr=1e-3),
                   lambda L, o: L.CosineAnnealingLR(o, 30, eta_min=1e-3)),
    "restarts": (CosineWarmRestarts(0.1, 8),
                 lambda L, o: L.CosineAnnealingWarmRestarts(o, 8)),
    "restarts_mult": (CosineWarmRestarts(0.1, 3, t_mult=2, min_lr=1e-3),
                      lambda L, o: L.CosineAnnealingWarmRestarts(o, 3, T_mult=2, eta_min=1e-3)),
    "warmup_cosine": (WarmupCosine(0.1, 5, N_STEPS, min_lr=1e-4), lambda L, o: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=1 / 5, end_factor=1.0, total_iters=4),
            L.CosineAnnealingLR(o, N_STEPS - 5, eta_min=1e-4)], milestones=[5])),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_schedule_matches_torch(case):
    ours, make = SCHEDULE_CASES[case]
    expected = _torch_lrs(make, ours.lr)
    got = np.array([ours(t) for t in range(N_STEPS)])
    # past its horizon our cosine holds min_lr where torch's climbs back up (documented)
    horizon = min(getattr(ours, "total_steps", N_STEPS), N_STEPS - 1) + 1
    np.testing.assert_allclose(got[:horizon], expected[:horizon], rtol=1e-12, atol=1e-15)
    assert np.all(got[horizon:] == getattr(ours, "min_lr", None))


def test_schedule_shapes():
    w = WarmupCosine(1.0, 4, 20, min_lr=0.1)
    assert [w(t) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert w(20) == w(1000) == 0.1
    assert all(w(t) > w(t + 1) for t in range(4, 20))
    c = Cosine(1.0, 10, min_lr=0.2)
    assert c(0) == 1.0 and c(10) == c(11) == 0.2 and c(5) == pytest.approx(0.6)
    r = CosineWarmRestarts(1.0, 2, t_mult=3)
    assert [r(t) for t in (0, 2, 8, 26)] == [1.0] * 4  # restarts at 2, 2+6, 8+18
    assert WarmupCosine(1.0, 0, 10)(0) == 1.0
    assert StepLR(1.0, 3)(9) == pytest.approx(1e-3)


@pytest.mark.parametrize("bad,match", [
    (lambda: Constant(-1.0), "lr"),
    (lambda: StepLR(0.1, 0), "step_size"),
    (lambda: StepLR(0.1, 2.5), "step_size"),
    (lambda: Cosine(0.1, 0), "total_steps"),
    (lambda: Cosine(0.1, 10, min_lr=-1), "min_lr"),
    (lambda: CosineWarmRestarts(0.1, 0), "t0"),
    (lambda: CosineWarmRestarts(0.1, 5, t_mult=0), "t_mult"),
    (lambda: WarmupCosine(0.1, 10, 10), "warmup_steps"),
    (lambda: WarmupCosine(0.1, -1, 10), "warmup_steps"),
    (lambda: Cosine(0.1, 10)(-1), "step"),
])
def test_schedule_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_make_schedule():
    assert make_schedule("constant", 0.1, 100)(99) == 0.1
    assert make_schedule("cosine", 0.1, 100, min_lr=0.01) == Cosine(0.1, 100, 0.01)
    assert make_schedule("step", 0.1, 90) == StepLR(0.1, 30, 0.1)
    assert make_schedule("step", 0.1, 90, step_size=10, gamma=0.5) == StepLR(0.1, 10, 0.5)
    assert make_schedule("restarts", 0.1, 100) == CosineWarmRestarts(0.1, 25)
    assert make_schedule("restarts", 0.1, 100, t0=10, t_mult=2) == CosineWarmRestarts(
        0.1, 10, 2)
    assert make_schedule("warmup-cosine", 0.1, 100) == WarmupCosine(0.1, 5, 100)
    assert make_schedule("warmup-cosine", 0.1, 1) == WarmupCosine(0.1, 0, 1)
    assert make_schedule("warmup-cosine", 0.1, 100, warmup_steps=None) == WarmupCosine(
        0.1, 5, 100)
    assert make_schedule("warmup-cosine", 0.1, 100, warmup_steps=10) == WarmupCosine(
        0.1, 10, 100)
    with pytest.raises(ValueError, match="unknown schedule 'linear'.*warmup-cosine"):
        make_schedule("linear", 0.1, 100)
    with pytest.raises(ValueError, match="gamma"):
        make_schedule("cosine", 0.1, 100, gamma=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("cosine", 0.1, 0)
    assert set(optim.SCHEDULES) == {"constant", "step", "cosine", "restarts", "warmup-cosine"}
    assert math.isclose(make_schedule("cosine", 0.1, 10)(5), 0.05)
