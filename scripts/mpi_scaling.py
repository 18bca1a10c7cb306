#!/usr/bin/env python
"""The MPI scaling and accuracy measurements of notebook 04, as one command each.

    # weak + strong scaling of every strategy (numba, 1 thread per rank), the issue's targets
    .venv/bin/python scripts/mpi_scaling.py --scale standard --backend numba --only scaling
    # hybrid ranks x threads (numba), P * T = physical cores
    .venv/bin/python scripts/mpi_scaling.py --scale standard --backend numba --only hybrid
    # accuracy of every strategy vs sequential on Fashion-MNIST at equal epochs
    .venv/bin/python scripts/mpi_scaling.py --scale standard --backend numpy --only accuracy
    # the communication measurements behind the cost model
    .venv/bin/mpiexec -n 2 .venv/bin/python -m cnn.parallel.costmodel \\
        --save results/mpi_costmodel_raw.pkl

Runs go through ``mpiexec`` (``--via mpiexec``, the default here) or ipyparallel MPI
engines (``--via ipyparallel``, what the notebook does); the numbers are the same runs.
Each experiment is written to ``results/mpi_<experiment>.pkl`` (rows measured on other
hosts are kept) and summarised on stdout, with the targets checked for scaling.
Run it on a quiet machine: other load on the cores shows up in every number.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cnn.parallel import cluster as C  # noqa: E402
from cnn.results import save_results  # noqa: E402

EXPERIMENTS = ("scaling", "hybrid", "accuracy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--scale", default="quick", choices=list(C.SCALES))
    p.add_argument("--backend", default="numpy", help="numpy | numba")
    p.add_argument("--only", default=",".join(EXPERIMENTS),
                   help=f"comma-separated subset of {', '.join(EXPERIMENTS)}")
    p.add_argument("--via", default="mpiexec", choices=["mpiexec", "ipyparallel"])
    p.add_argument("--ranks", default=None, help="rank counts, e.g. 1,2,3 (default: "
                   "1..physical cores + 1)")
    p.add_argument("--mpi-args", default="", help="extra mpiexec arguments, e.g. "
                   "'-bind-to core'")
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    only = [x for x in args.only.split(",") if x]
    unknown = set(only) - set(EXPERIMENTS)
    if unknown:
        p.error(f"unknown experiments {sorted(unknown)}")
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    results = Path(args.results)
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 20)
    ok = True
    with C.Runner(via=args.via, mpi_args=args.mpi_args.split()) as runner:
        if "scaling" in only:
            df = C.run_plan(C.scaling_plan(args.scale, args.backend, ranks=ranks), runner)
            save_results(df, results / "mpi_scaling.pkl", merge_on=["mode", "strategy",
                                                                       "processes", "threads"])
            s = C.summarize_scaling(df)
            print(s[["mode", "strategy", "processes", "batch_size", "step_s", "throughput",
                     "speedup", "efficiency", "comm_share", "epoch_s"]].round(3)
                  .to_string(index=False))
            targets = C.check_targets(s)
            print(targets.to_string(index=False))
            ok &= bool(targets["ok"].all())
        if "hybrid" in only:
            df = C.run_plan(C.hybrid_plan(args.scale, args.backend), runner)
            save_results(df, results / "mpi_hybrid.pkl", merge_on=["mode", "strategy",
                                                                      "processes", "threads"])
            s = C.summarize_scaling(df)
            print(s[["strategy", "processes", "threads", "step_s", "throughput", "speedup",
                     "efficiency", "comm_share"]].round(3).to_string(index=False))
        if "accuracy" in only:
            df = C.run_plan(C.accuracy_plan(args.scale, args.backend), runner)
            save_results(df, results / "mpi_accuracy.pkl", merge_on=["strategy", "epoch"])
            last = df[df["epoch"] == df["epoch"].max()]
            seq = float(last.loc[last["strategy"] == "sequential", "test_acc"].iloc[0])
            view = last[["strategy", "processes", "batch_size", "epoch", "test_acc",
                         "wall_s"]].copy()
            view["vs_sequential_points"] = (view["test_acc"] - seq) * 100
            print(view.round(4).to_string(index=False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
