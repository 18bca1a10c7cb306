"""The one checker: every version of every op against the NumPy reference
(``cnn.backends.numpy_seq`` in float64) on every check case, at 1 thread and at the most
threads; versions that claim it must also give the same bits at every thread count.

The full check (not ``quick``) also runs the shapes the timer measures, so every timed
configuration is a checked one.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .common import NB, Op, Version, rel_error, same_bits


@dataclass
class Result:
    """One version of one op over all its check cases."""

    family: str
    op: str
    version: str
    status: str
    cases: int = 0
    passed: int = 0
    worst: float = 0.0
    worst_case: str = ""
    bits: str = "-"  # "same", "DIFFER" or "-" (not claimed, or one thread count only)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.passed == self.cases and self.bits != "DIFFER" and not self.error


def thread_counts() -> tuple[int, ...]:
    """1 and the most threads Numba has here (one entry on a 1-core machine)."""
    return tuple(sorted({1, NB.max_threads()}))


def _run(version: Version, inputs: dict, threads: int) -> tuple:
    NB.configure(threads)
    return version.prepare(inputs)()


def check_op(op: Op, quick: bool, threads: Sequence[int], only: Sequence[str] = ()
             ) -> list[Result]:
    cases = op.checks(quick) + ([] if quick else op.timings(False))
    data = []
    for i, case in enumerate(cases):
        inputs = op.make(case, np.random.default_rng(1000 + i))
        data.append((case, inputs, op.reference(inputs)))
    results = []
    for version in op.versions:
        if only and version.name not in only:
            continue
        res = Result(op.family, op.name, version.name, version.status, cases=len(cases))
        det = version.deterministic and len(threads) > 1
        res.bits = "same" if det else "-"
        for case, inputs, want in data:
            try:
                got = {t: _run(version, inputs, t) for t in threads}
            except Exception as exc:  # a crash is a failure, reported with its case
                res.error = f"{case.label}: {type(exc).__name__}: {exc}"
                res.worst, res.worst_case = float("inf"), case.label
                traceback.print_exc()
                break
            err = max(rel_error(g, w) for out in got.values()
                      for g, w in zip(out, want, strict=True))
            if err <= op.rtol:
                res.passed += 1
            if err > res.worst or not res.worst_case:
                res.worst, res.worst_case = err, case.label
            if det and not all(same_bits(got[threads[0]], got[t]) for t in threads[1:]):
                res.bits = "DIFFER"
        results.append(res)
    return results


def check(ops: Sequence[Op], quick: bool = False, threads: Sequence[int] | None = None,
          only: Sequence[str] = (), echo: Callable[[str], None] = print) -> list[Result]:
    """Check every op's versions; print one table line per version as it finishes."""
    threads = tuple(threads or thread_counts())
    echo(f"checking against the NumPy reference at {', '.join(map(str, threads))} thread(s)"
         f"{' (quick sizes)' if quick else ''}")
    echo(header())
    out = []
    for op in ops:
        for res in check_op(op, quick, threads, only):
            echo(line(res, op.rtol))
            out.append(res)
    return out


def header() -> str:
    return (f"{'family':<14}{'op':<32}{'ver':<5}{'status':<11}{'cases':>7}  "
            f"{'worst rel err':>13}  {'tol':>7}  {'bits 1t=Nt':<10} result")


def line(res: Result, rtol: float) -> str:
    verdict = "ok" if res.ok else "FAIL"
    if res.passed < res.cases and not res.error:
        verdict += f" (worst: {res.worst_case})"
    if res.error:
        verdict += f" ({res.error})"
    return (f"{res.family:<14}{res.op:<32}{res.version:<5}{res.status:<11}"
            f"{res.passed:>3}/{res.cases:<3}  {res.worst:>13.2e}  {rtol:>7.0e}  "
            f"{res.bits:<10} {verdict}")
