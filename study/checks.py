"""One way to say "these numbers agree": the tests, the torch-twin table, the CUDA simulator
check and the equivalence runs all call `compare`, so a tolerance means the same thing
everywhere.

The error is scale-relative: max |got - want| / max |want|. An elementwise relative error
blows up on entries near zero (gradients are full of them); a norm ratio hides one wrong
entry among millions. The max ratio does neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Default tolerances by dtype: float32 kernels reorder sums; float64 must agree to round-off.
TOLERANCE: dict[str, float] = {"float32": 1e-4, "float64": 1e-10}


@dataclass(frozen=True)
class Check:
    name: str
    rel_err: float
    max_abs_err: float
    scale: float
    tol: float
    shape_ok: bool = True

    @property
    def ok(self) -> bool:
        return self.shape_ok and bool(self.rel_err <= self.tol)

    def line(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        if not self.shape_ok:
            return f"{self.name}: shapes differ ({verdict})"
        return f"{self.name}: rel err {self.rel_err:.2e} (tol {self.tol:.0e}) {verdict}"


def compare(got: Any, want: Any, name: str = "", tol: float | None = None) -> Check:
    """Compare ``got`` with the reference ``want``; ``tol`` defaults by ``want``'s dtype."""
    g = np.asarray(got)
    w = np.asarray(want)
    if tol is None:
        tol = TOLERANCE.get(str(w.dtype), TOLERANCE["float32"])
    if g.shape != w.shape:
        return Check(name, float("inf"), float("inf"), float("nan"), tol, shape_ok=False)
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    if w64.size == 0:
        return Check(name, 0.0, 0.0, 0.0, tol)
    err = np.abs(g64 - w64)
    if not np.all(np.isfinite(g64)) or not np.all(np.isfinite(w64)):
        same = np.array_equal(np.isnan(g64), np.isnan(w64)) and np.array_equal(
            g64[~np.isfinite(w64)], w64[~np.isfinite(w64)])
        finite = np.isfinite(w64) & np.isfinite(g64)
        if not same:
            return Check(name, float("inf"), float("inf"), float("nan"), tol)
        err = np.where(finite, err, 0.0)
        w64 = np.where(finite, w64, 0.0)
    scale = float(np.max(np.abs(w64)))
    max_abs = float(np.max(err))
    rel = max_abs / max(scale, 1e-30) if max_abs else 0.0
    return Check(name, rel, max_abs, scale, tol)


def assert_close(got: Any, want: Any, name: str = "", tol: float | None = None) -> Check:
    """`compare`, raising AssertionError with the check's line when it fails."""
    check = compare(got, want, name, tol)
    if not check.ok:
        raise AssertionError(check.line())
    return check
