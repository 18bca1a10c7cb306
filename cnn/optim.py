"""Optimisers on the flat parameter buffer, and learning-rate schedules.

The optimisers hold no arithmetic of their own: each step is one call to the
network backend's ``sgd_update`` / ``adam_update`` kernel on the whole flat
buffer, so the same optimiser runs on every backend (NumPy, Numba, CUDA) and its
state lives where the weights live. The kernels follow ``torch.optim`` exactly,
which is how the tests check them.

Schedules are pure functions of the *optimiser step* ``t = 0, 1, 2, ...`` (the
number of updates already taken, not the epoch): ``schedule(t)`` is the lr of
update ``t``, equal to the lr a ``torch.optim.lr_scheduler`` reports after ``t``
calls of ``scheduler.step()``. Being pure, a schedule needs no state in a
checkpoint and every MPI rank or HOGWILD worker computes the same lr on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "Adam", "Constant", "Cosine", "CosineWarmRestarts", "Optimizer",
    "SGD", "Schedule", "StepLR", "WarmupCosine", "make_optimizer", "make_schedule",
]


def _check_number(name: str, value: float, lo: float = 0.0, hi: float | None = None,
                  hi_open: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < lo or (hi is not None and (
            value >= hi if hi_open else value > hi)):
        bound = f"in [{lo}, {hi}{')' if hi_open else ']'}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_int(name: str, value: int, lo: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


# --- optimisers ------------------------------------------------------------------------

class Optimizer:
    """Base: a network, its current lr, a step counter and backend-resident state buffers."""

    kind: str = ""
    _buffers: tuple[str, ...] = ()

    def __init__(self, net: Any, lr: float):
        self.net = net
        self.lr = _check_number("lr", lr)
        self.steps = 0  # updates taken so far; also the schedule's argument for the next one
        for name in self._buffers:
            setattr(self, name, net.backend.zeros(net.num_params, net.dtype))

    def hyperparams(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_hyperparams(self, **hp: Any) -> None:
        raise NotImplementedError

    def _update(self, lr: float) -> None:
        raise NotImplementedError

    def step(self, lr: float | None = None) -> None:
        """One update from ``net.grads``; ``lr`` (a schedule's value) replaces ``self.lr``."""
        if lr is not None:
            self.lr = _check_number("lr", lr)
        self._update(self.lr)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Host copies of every buffer plus counters and hyperparameters (for checkpoints)."""
        state: dict[str, Any] = {"kind": self.kind, "steps": self.steps, **self.hyperparams()}
        for name in self._buffers:
            state[name] = np.array(self.net.backend.to_host(getattr(self, name)), copy=True)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where ``state_dict`` was taken; hyperparameters come back too, as
        with ``torch.optim``. Everything is checked before anything is overwritten."""
        if state.get("kind") != self.kind:
            raise ValueError(f"optimizer state is for {state.get('kind')!r}, not {self.kind!r}")
        missing = [k for k in ("steps", *self.hyperparams(), *self._buffers) if k not in state]
        if missing:
            raise KeyError(f"{self.kind} optimizer state lacks {missing}")
        arrays = {}
        for name in self._buffers:
            a = np.asarray(state[name])
            if a.shape != (self.net.num_params,):
                raise ValueError(f"{name}: expected shape ({self.net.num_params},), got "
                                 f"{a.shape}; the state belongs to another network")
            arrays[name] = np.ascontiguousarray(a, dtype=self.net.dtype)
        steps = _check_int("steps", state["steps"], 0)
        self._set_hyperparams(**{k: state[k] for k in self.hyperparams()})  # validates
        for name, a in arrays.items():
            self.net.backend.copy_into(getattr(self, name), a)
        self.steps = steps

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({hp}, steps={self.steps})"


class SGD(Optimizer):
    """``torch.optim.SGD``: weight decay added to the gradient, then (Nesterov) momentum.

    The velocity buffer is allocated even without momentum so every backend's kernel
    gets the same arguments (it is not touched then).
    """

    kind = "sgd"
    _buffers = ("velocity",)

    def __init__(self, net: Any, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(net, lr)
        self._set_hyperparams(lr=lr, momentum=momentum, dampening=dampening,
                              nesterov=nesterov, weight_decay=weight_decay)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def _set_hyperparams(self, lr: float, momentum: float, dampening: float, nesterov: bool,
                         weight_decay: float) -> None:
        lr = _check_number("lr", lr)
        momentum = _check_number("momentum", momentum)
        dampening = _check_number("dampening", dampening, hi=1.0)
        weight_decay = _check_number("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0 "
                             f"(as in torch.optim.SGD), got momentum={momentum}, "
                             f"dampening={dampening}")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = bool(nesterov), weight_decay

    def _update(self, lr: float) -> None:
        net = self.net
        net.backend.sgd_update(net.params, net.grads, self.velocity, lr, self.momentum,
                               self.dampening, self.weight_decay, self.nesterov,
                               self.steps == 0)


class Adam(Optimizer):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient, not AdamW)."""

    kind = "adam"
    _buffers = ("m", "v")

    def __init__(self, net: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(net, lr)
        self._set_hyperparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _set_hyperparams(self, lr: float, betas: tuple[float, float], eps: float,
                         weight_decay: float) -> None:
        lr = _check_number("lr", lr)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1 = _check_number("betas[0]", betas[0], hi=1.0, hi_open=True)
        b2 = _check_number("betas[1]", betas[1], hi=1.0, hi_open=True)
        eps = _check_number("eps", eps)
        weight_decay = _check_number("weight_decay", weight_decay)
        self.lr, self.betas, self.eps, self.weight_decay = lr, (b1, b2), eps, weight_decay

    def _update(self, lr: float) -> None:
        net = self.net
        net.backend.adam_update(net.params, net.grads, self.m, self.v, lr, self.betas[0],
                                self.betas[1], self.eps, self.weight_decay, self.steps + 1)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam}


def make_optimizer(name: str, net: Any, **kw: Any) -> Optimizer:
    """Build an optimiser by name (what the training CLI calls)."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[key](net, **kw)
    except TypeError as exc:
        raise ValueError(f"bad arguments for optimizer {key!r}: {exc}") from None


# --- schedules -------------------------------------------------------------------------

class Schedule:
    """``schedule(t)`` -> lr of optimiser step ``t`` (0-based)."""

    lr: float

    def __call__(self, step: int) -> float:
        return self.at(_check_int("step", step, 0))

    def at(self, step: int) -> float:
        raise NotImplementedError


def _cosine(lr: float, min_lr: float, t: float, period: float) -> float:
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / period)) / 2


@dataclass(frozen=True)
class Constant(Schedule):
    lr: float

    def __post_init__(self):
        _check_number("lr", self.lr)

    def at(self, step: int) -> float:
        return float(self.lr)


@dataclass(frozen=True)
class StepLR(Schedule):
    """``lr * gamma ** (step // step_size)`` (torch ``StepLR``)."""

    lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        _check_number("lr", self.lr)
        _check_int("step_size", self.step_size, 1)
        _check_number("gamma", self.gamma)

    def at(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.step_size)


@dataclass(frozen=True)
class Cosine(Schedule):
    """``CosineAnnealingLR`` closed form with ``T_max = total_steps``.

    Past ``total_steps`` it stays at ``min_lr`` (torch's would rise again).
    """

    lr: float
    total_steps: int
    min_lr: float = 0.0

    def __post_init__(self):
        _check_number("lr", self.lr)
        _check_int("total_steps", self.total_steps, 1)
        _check_number("min_lr", self.min_lr)

    def at(self, step: int) -> float:
        if step >= self.total_steps:
            return float(self.min_lr)
        return _cosine(self.lr, self.min_lr, step, self.total_steps)


@dataclass(frozen=True)
class CosineWarmRestarts(Schedule):
    """``CosineAnnealingWarmRestarts``: cosine over ``t0`` steps, then over ``t0 * t_mult``, ..."""

    lr: float
    t0: int
    t_mult: int = 1
    min_lr: float = 0.0

    def __post_init__(self):
        _check_number("lr", self.lr)
        _check_int("t0", self.t0, 1)
        _check_int("t_mult", self.t_mult, 1)
        _check_number("min_lr", self.min_lr)

    def at(self, step: int) -> float:
        # integer walk over the periods: exact, unlike torch's log() when given an epoch
        t, period = step, self.t0
        if self.t_mult == 1:
            t %= period
        else:
            while t >= period:
                t -= period
                period *= self.t_mult
        return _cosine(self.lr, self.min_lr, t, period)


@dataclass(frozen=True)
class WarmupCosine(Schedule):
    """Linear warmup ``lr * (t + 1) / warmup_steps`` (reaching ``lr`` at its last step), then
    cosine from ``lr`` to ``min_lr`` over the remaining ``total_steps - warmup_steps``.

    Equal to torch ``SequentialLR([LinearLR(start_factor=1/w, total_iters=w-1),
    CosineAnnealingLR(T_max=total-w, eta_min=min_lr)], milestones=[w])``. Warmup keeps
    large-batch and Adam runs from diverging on their first noisy steps.
    """

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0

    def __post_init__(self):
        _check_number("lr", self.lr)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("total_steps", self.total_steps, 1)
        _check_number("min_lr", self.min_lr)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be less than "
                             f"total_steps ({self.total_steps})")

    def at(self, step: int) -> float:
        w = self.warmup_steps
        if step < w:
            return self.lr * (step + 1) / w
        if step >= self.total_steps:
            return float(self.min_lr)
        return _cosine(self.lr, self.min_lr, step - w, self.total_steps - w)


def _step(lr: float, total: int, step_size: int | None = None, gamma: float = 0.1) -> Schedule:
    return StepLR(lr, max(1, total // 3) if step_size is None else step_size, gamma)


def _restarts(lr: float, total: int, t0: int | None = None, t_mult: int = 1,
              min_lr: float = 0.0) -> Schedule:
    return CosineWarmRestarts(lr, max(1, total // 4) if t0 is None else t0, t_mult, min_lr)


def _warmup_cosine(lr: float, total: int, warmup_steps: int | None = None,
                   min_lr: float = 0.0) -> Schedule:
    if warmup_steps is None:
        warmup_steps = min(max(1, total // 20), total - 1)
    return WarmupCosine(lr, warmup_steps, total, min_lr)


#: name -> (builder(lr, total_steps, **options), accepted options)
SCHEDULES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "constant": (lambda lr, total: Constant(lr), ()),
    "step": (_step, ("step_size", "gamma")),
    "cosine": (lambda lr, total, min_lr=0.0: Cosine(lr, total, min_lr), ("min_lr",)),
    "restarts": (_restarts, ("t0", "t_mult", "min_lr")),
    "warmup-cosine": (_warmup_cosine, ("warmup_steps", "min_lr")),
}


def make_schedule(name: str, lr: float, total_steps: int, **kw: Any) -> Schedule:
    """Build a schedule by name for a run of ``total_steps`` optimiser steps.

    Defaults when not given: ``step_size = total/3``, ``t0 = total/4``,
    ``warmup_steps = total/20`` (at least 1). Keywords left as None take the default too.
    """
    key = name.lower()
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    total_steps = _check_int("total_steps", total_steps, 1)
    build, allowed = SCHEDULES[key]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {key!r} takes no {unknown}; it accepts "
                         f"{list(allowed) or 'no options'}")
    return build(lr, total_steps, **{k: v for k, v in kw.items() if v is not None})
