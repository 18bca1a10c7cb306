"""The Numba CPU kernel ladder (notebook 02): every version of every kernel, from the naive
loop nest to the production kernel and the candidates beyond it, timed one way.

    python -m study.experiments.ladder --scale standard      # about 3 minutes on 2 cores

``benchmarks/ladder.py --time`` does the timing (compile apart, interleaved round-robin
trials, roofs measured in the same run: see benchmarks/kernels/timer.py); this module
runs it in a fresh process, turns its rows into study rows (``config`` = kernel, shape and
threads, so analysis compares versions within one), flags wide intervals and keeps
``results/kernel_ladder.pkl``. ``benchmarks/ladder.py --check`` is the correctness side.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from study import analysis, paths, schema
from study.config import DEFAULT_SCALE
from study.experiments import cli, load_saved
from study.measure import RunFailed, new_session, tail

RESULTS = ("kernel_ladder",)
PARTS = ("time",)
#: Derived by the ladder's own summary; recomputed here from ``time_ms``.
DERIVED = ("time_ms_median", "ci_low_ms", "ci_high_ms")
#: The configuration of the headlines: the seed CNN's layers on CIFAR-shaped input.
HEADLINE_OPS = (("conv_forward", "conv2d_forward", "cifar conv2 b128"),
                ("conv_backward", "conv2d_backward", "cifar conv2 b128 +dx"))


def tidy(raw: pd.DataFrame, scale: str, session: str) -> pd.DataFrame:
    """The ladder's rows as study rows, with each point's anomaly on its rows."""
    df = raw.drop(columns=[c for c in DERIVED if c in raw.columns]).copy()
    df["processes"] = 1
    df["workers"] = df["threads"]
    df["model"] = "seed_cnn"
    df["mode"] = ""
    df["input_shape"] = df.pop("shape")
    df["config"] = (df["family"] + "/" + df["kernel"] + " " + df["input_shape"] + " "
                    + df["threads"].astype(int).astype(str) + "t")
    df["anomaly"] = ""
    df["scale"] = scale
    out = schema.rows(df, scale=scale, session=session)
    pts = points(out)
    return analysis.flag_rows(out, pts, ["config", "version"])


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Per (kernel, shape, threads, version): median time and CI, GFLOP/s at the median,
    % of the roofs, and the speedup over the kernel's first version with its CI."""
    rows = []
    for config, g in df.groupby("config", sort=False):
        base = g[g["version"] == "v1"]["time_ms"]
        for version, v in g.groupby("version", sort=False):
            med, lo, hi = analysis.median_ci(v["time_ms"])
            sp = analysis.ratio_ci(base, v["time_ms"]) if len(base) else (np.nan,) * 3
            flops = float(v["flops"].iloc[0])
            gflops = flops / (med / 1e3) / 1e9 if flops else np.nan
            p = {"config": config, "family": v["family"].iloc[0], "kernel": v["kernel"].iloc[0],
                 "input_shape": v["input_shape"].iloc[0], "threads": int(v["threads"].iloc[0]),
                 "version": version, "status": v["status"].iloc[0],
                 "what_changed": v["what_changed"].iloc[0], "median": med, "lo": lo, "hi": hi,
                 "n": int(len(v)), "gflops": gflops,
                 "pct_gemm_roof": 100 * gflops / float(v["gemm_roof_gflops"].max()),
                 "pct_copy_roof": float(np.nanmedian(v["pct_copy_roof"])),
                 "speedup": sp[0], "speedup_lo": sp[1], "speedup_hi": sp[2],
                 "compile_s": float(v["compile_s"].median())}
            p["anomaly"] = analysis.point_anomaly(p)
            rows.append(p)
    return pd.DataFrame(rows)


def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    """Time every rung in a fresh process, then keep the rows."""
    script = paths.project_root() / "benchmarks" / "ladder.py"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ladder.pkl"
        cmd = [sys.executable, str(script), "--time", "--out", str(out)]
        if scale == "quick":
            cmd.append("--quick")
        if log:
            log("running " + " ".join(cmd[1:3]) + (" --quick" if scale == "quick" else ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200,
                              cwd=paths.project_root())
        if proc.returncode != 0:
            raise RunFailed(f"benchmarks/ladder.py --time failed ({proc.returncode}):\n"
                            f"{tail(proc.stdout + proc.stderr)}")
        raw = pd.read_pickle(out)
    df = tidy(raw, scale, new_session())
    schema.save(df, RESULTS[0], scale)
    return {RESULTS[0]: df}


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    return load_saved(RESULTS, scale)


def table(df: pd.DataFrame | None, family: str, kernel: str, shape: str,
          threads: int | None = None) -> pd.DataFrame:
    """One kernel's rungs at one shape: time, GFLOP/s, % of the roofs, speedup over v1."""
    if df is None or not len(df):
        return pd.DataFrame()
    pts = points(analysis.latest_session(df))
    pts = pts[(pts["family"] == family) & (pts["kernel"] == kernel)
              & (pts["input_shape"] == shape)]
    if threads is not None:
        pts = pts[pts["threads"] == threads]
    cols = ["threads", "version", "status", "what_changed", "median", "lo", "hi", "gflops",
            "pct_gemm_roof", "pct_copy_roof", "speedup", "anomaly"]
    return pts[cols].rename(columns={"median": "ms", "lo": "ms lo", "hi": "ms hi"})


def headlines(frames: dict[str, pd.DataFrame]) -> list[analysis.Headline]:
    df = frames.get(RESULTS[0])
    out = []
    for family, kernel, shape in HEADLINE_OPS:
        key = f"ladder_{family}"
        label = f"{kernel}, production kernel vs the naive loop nest (v1), {shape}, 2 threads"
        if df is None or not len(df):
            out.append(analysis.not_measured(key, label, "results/kernel_ladder.pkl has not "
                                             "been made yet (python -m study.experiments."
                                             "ladder)"))
            continue
        pts = points(analysis.latest_session(df))
        hit = pts[(pts["kernel"] == kernel) & (pts["input_shape"] == shape)
                  & (pts["status"] == "production")]
        hit = hit[hit["threads"] == hit["threads"].max()] if len(hit) else hit
        if not len(hit):
            out.append(analysis.not_measured(key, label, f"no production rung of {kernel} "
                                             f"at {shape}"))
            continue
        p = hit.iloc[0]
        rows = df[df["config"] == p["config"]]
        label = label.replace("2 threads", f"{p['threads']} thread(s)")
        out.append(analysis.headline_from_point(
            key, label, p, "x", source="results/kernel_ladder.pkl", rows=rows,
            note=f"production {p['version']} at {p['gflops']:.0f} GFLOP/s, "
                 f"{p['pct_gemm_roof']:.0f}% of the measured sgemm roof"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli("ladder", __doc__ or "", run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
