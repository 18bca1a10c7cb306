"""The kernel ladder (benchmarks/ladder.py): every version of every Numba CPU kernel matches
the NumPy reference at tiny sizes, the checker fails on a wrong version, and the timer's
frame has the rows, columns and interleaving the measurement rules ask for.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("numba")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import kernels  # noqa: E402
import ladder  # noqa: E402
from kernels import elementwise  # noqa: E402
from kernels.check import check  # noqa: E402
from kernels.timer import median_ci, run_timer  # noqa: E402


def test_every_version_matches_the_reference_at_tiny_sizes():
    """What CI runs: the whole ladder, exit status 0, one ok line per version."""
    out = subprocess.run([sys.executable, "benchmarks/ladder.py", "--check", "--quick"],
                         cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.rstrip().endswith(" ok")]
    total = sum(len(op.versions) for op in kernels.ops())
    assert len(lines) == total, out.stdout[-4000:]
    assert f"{total} of {total} versions match the reference" in out.stdout
    for family in kernels.FAMILIES:
        assert any(ln.startswith(family) for ln in lines), family


def test_ladder_shape():
    """v1..vN per op, one production rung (the backend's own function) and a docstring
    saying what changed on every rung; candidates come after production."""
    for op in kernels.ops():
        names = [v.name for v in op.versions]
        assert names == [f"v{i}" for i in range(1, len(names) + 1)], op.name
        statuses = [v.status for v in op.versions]
        assert statuses.count("production") == 1, op.name
        prod = statuses.index("production")
        assert set(statuses[prod + 1:]) <= {"candidate"}, op.name
        assert all(len(v.what) > 20 for v in op.versions), op.name
        assert "numba_cpu" in v_source(op.versions[prod]) or "NB." in v_source(
            op.versions[prod]), op.name


def v_source(version) -> str:
    import inspect

    return inspect.getsource(version.prepare)


def _broken_relu(a: dict):
    """A wrong rung (no clamp at zero), to show the checker catches it."""
    return lambda: (a["x"].copy(),)


def _unstable_relu(a: dict):
    """A rung that claims bit-identity across thread counts but depends on them."""
    import numba

    return lambda: (np.maximum(a["x"], 0) + np.float32(numba.get_num_threads() - 1),)


def _with(op, *extra):
    """``op`` with the given rungs added as candidates after its own."""
    n = len(op.versions)
    added = [dataclasses.replace(op.versions[0], name=f"v{n + i + 1}", prepare=fn,
                                 status="candidate") for i, fn in enumerate(extra)]
    return dataclasses.replace(op, versions=(*op.versions, *added))


def test_checker_fails_on_a_wrong_version(monkeypatch, capsys):
    op = _with(elementwise.RELU_FORWARD, _broken_relu)
    results = check([op], quick=True, echo=lambda s: None)
    assert [r.ok for r in results] == [True] * 4 + [False]
    assert results[-1].worst > 0.5
    monkeypatch.setattr(elementwise, "OPS", [op])
    assert ladder.main(["--check", "--quick", "--family", "elementwise"]) == 1
    assert "FAILED: relu_forward v5" in capsys.readouterr().out


def test_checker_fails_when_bits_depend_on_threads():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    op = _with(elementwise.RELU_FORWARD, _unstable_relu)
    op = dataclasses.replace(op, rtol=10.0)  # within tolerance, but not the same bits
    res = check([op], quick=True, threads=(1, 2), echo=lambda s: None)[-1]
    assert res.bits == "DIFFER" and not res.ok


def test_timer_writes_interleaved_rows(tmp_path):
    out = tmp_path / "ladder.pkl"
    ops = kernels.ops(["elementwise", "dense"], ["relu_forward", "dense_forward"])
    threads = sorted({1, min(2, kernels.common.NB.max_threads())})
    frame = run_timer(ops, quick=True, threads=threads, trials=5, out=out, echo=lambda s: None)
    saved = pd.read_pickle(out)
    pd.testing.assert_frame_equal(saved, frame)
    need = ["experiment", "family", "kernel", "version", "what_changed", "status", "shape",
            "threads", "batch_size", "trial", "time_ms", "compile_s", "gflops",
            "pct_gemm_roof", "pct_copy_roof", "host", "cpu", "versions", "commit"]
    assert not set(need) - set(frame.columns)
    assert (frame["experiment"] == "kernel_ladder").all()
    cells = sum(len(op.versions) * len(op.timings(True)) for op in ops) * len(threads)
    assert len(frame) == cells * 5
    per_cell = frame.groupby(["kernel", "shape", "threads", "version"])["trial"]
    assert all(sorted(t) == [0, 1, 2, 3, 4] for _, t in per_cell)
    # round-robin: every trial's samples form one contiguous block of the run order
    for trial, part in frame.groupby("trial"):
        seq = np.sort(part["seq"].to_numpy())
        assert seq[0] == trial * cells and np.array_equal(seq, np.arange(seq[0], seq[0] + cells))
    assert (frame["time_ms"] > 0).all() and (frame["compile_s"] >= 0).all()
    assert ((frame["ci_low_ms"] <= frame["time_ms_median"])
            & (frame["time_ms_median"] <= frame["ci_high_ms"])).all()
    dense = frame[frame["kernel"] == "dense_forward"]
    assert np.isfinite(dense["gflops"]).all() and np.isfinite(dense["pct_gemm_roof"]).all()
    assert np.isfinite(frame["pct_copy_roof"]).all()
    relu = frame[frame["kernel"] == "relu_forward"]
    assert relu["gflops"].isna().all()  # no arithmetic to count: the copy roof applies
    assert set(frame["what_changed"]) == {v.what for op in ops for v in op.versions}


def test_median_ci_brackets_the_median():
    med, lo, hi = median_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert med == 3.0 and 1.0 <= lo <= med <= hi <= 100.0
    med, lo, hi = median_ci([*range(1, 41), 1000.0])  # one outlier does not reach the CI
    assert med == 21.0 and 14 < lo < med < hi < 28
    assert median_ci([2.0] * 5) == (2.0, 2.0, 2.0)


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        ladder.parse(["--time", "--trials", "3"])
    assert "--trials must be >= 5" in capsys.readouterr().err
    assert ladder.main(["--list", "--family", "convolution"]) == 2
    assert "unknown kernel family convolution" in capsys.readouterr().err


def test_time_cli_writes_the_pickle(tmp_path, capsys):
    out = tmp_path / "sub" / "kernel_ladder.pkl"
    assert ladder.main(["--time", "--quick", "--family", "elementwise", "--op", "sgd_update",
                        "--threads", "1", "--out", str(out)]) == 0
    frame = pd.read_pickle(out)
    assert sorted(frame["version"].unique()) == ["v1", "v2", "v3"]
    assert (frame["threads"] == 1).all() and frame["trial"].max() == 4
    assert "elementwise / sgd_update / tiny 4096 / 1 thread(s)" in capsys.readouterr().out
