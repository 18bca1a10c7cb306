#!/usr/bin/env python
"""The MPI measurements of notebook 04 from the shell (`study.experiments.mpi`).

    .venv/bin/python scripts/mpi_scaling.py --scale quick       # smoke run -> build/quick
    .venv/bin/python scripts/mpi_scaling.py --scale standard --parts scaling
    .venv/bin/python scripts/mpi_scaling.py --scale standard --parts hybrid,accuracy,costmodel
    .venv/bin/python scripts/mpi_scaling.py --scale standard --parts scaling --oversubscribe
    .venv/bin/python scripts/mpi_scaling.py --scale full --parts scaling --ranks 1,2,4,8,16

Every run is a fresh ``mpiexec -n P python -m cnn.parallel.mpi`` (or ``python -m
cnn.train``) job, trials interleaved with the sequential baseline of the same
configuration; start-up and the first step are measured apart. Rows go to
``results/mpi_<part>_runs.pkl`` (quick: ``build/quick/results``; rows of other hosts are
kept), then the headlines, the scaling table and the start-up amortisation table are
printed; ``--figures`` also draws the figures. Sizes: ``study/config.py`` ("mpi").
Run it on a quiet machine: other load on the cores shows up in every number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from study import schema  # noqa: E402
from study.config import DEFAULT_SCALE, preset  # noqa: E402
from study.experiments import mpi  # noqa: E402
from study.experiments import mpi_analysis as A  # noqa: E402


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = sorted({int(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks takes numbers like 1,2,4, got {text!r}"
                                         ) from None
    if not ranks or ranks[0] < 1:
        raise argparse.ArgumentTypeError(f"--ranks must be positive, got {text!r}")
    return ranks


def main(argv: list[str] | None = None) -> int:
    head, _, rest = (__doc__ or "").partition("\n\n")
    p = argparse.ArgumentParser(prog="scripts/mpi_scaling.py", description=head,
                                epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=schema.SCALES, default=DEFAULT_SCALE,
                   help=f"sizes from study/config.py (default {DEFAULT_SCALE})")
    p.add_argument("--parts", default=",".join(mpi.PARTS),
                   help=f"comma-separated subset of {', '.join(mpi.PARTS)} (default: all)")
    p.add_argument("--ranks", type=parse_ranks, default=None,
                   help="scaling: process counts, e.g. 1,2,3 (default: 1 .. physical cores)")
    p.add_argument("--oversubscribe", action=argparse.BooleanOptionalAction, default=None,
                   help="scaling: also measure P = physical cores + 1 (flagged); default: "
                        "only at --scale full")
    p.add_argument("--backend", choices=["numpy", "numba"], default=None,
                   help="backend of the scaling, accuracy and cost-model runs (default: the "
                        "preset's; hybrid always uses numba)")
    p.add_argument("--figures", action="store_true", help="draw the figures too")
    p.add_argument("--quiet", action="store_true", help="no per-trial log lines")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(mpi.PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(mpi.PARTS)}")
    mpi.run(args.scale, parts=parts, log=None if args.quiet else print, ranks=args.ranks,
            oversubscribe=args.oversubscribe, backend=args.backend)
    frames = mpi.load(args.scale)
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.max_colwidth", 70):
        print(A.headline_table(frames)[["headline", "value", "anomaly"]].to_string(index=False))
        if A.SCALING in frames:
            print(A.scaling_table(frames[A.SCALING]).to_string(index=False))
            steps = preset("mpi", args.scale)["amortise_steps"]
            print(A.amortisation_table(frames[A.SCALING], steps).to_string(index=False))
    if args.figures:
        from study.figures import mpi as figs

        figs.scaling(frames, args.scale)
        figs.comm_split(frames, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
