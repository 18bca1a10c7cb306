"""The Numba CPU kernel ladder: every version of every kernel, checked and timed one way.

    python benchmarks/ladder.py --check [--quick]          # exits 1 on any mismatch
    python benchmarks/ladder.py --time [--quick] [--out results/kernel_ladder.pkl]
                                [--trials 5] [--threads 1,2] [--family conv_forward,...]
                                [--op conv2d_forward,...] [--versions v1,v8]
    python benchmarks/ladder.py --list

The versions live in ``benchmarks/kernels/`` (one file per family); ``--check`` compares
each with the NumPy reference on many shapes, ``--time`` runs interleaved trials and
writes one row per (version, shape, threads, trial). ``--quick`` uses tiny sizes (CI).
Timing needs a quiet machine: run ``--time`` at real sizes only in a measurement window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):  # the cnn package (from a checkout) and kernels/
    if path not in sys.path:
        sys.path.insert(0, path)

from kernels import FAMILIES, ops  # noqa: E402
from kernels.check import check  # noqa: E402

DEFAULT_OUT = ROOT / "results" / "kernel_ladder.pkl"


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _threads(value: str) -> list[int]:
    try:
        out = [int(v) for v in _list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes integers like 1,2; got {value!r}"
                                         ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--threads needs counts >= 1, got {value!r}")
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare every version with NumPy")
    mode.add_argument("--time", action="store_true", help="time every version (quiet machine)")
    mode.add_argument("--list", action="store_true", help="list the rungs and what changed")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--family", type=_list, default=None,
                    help=f"families to run (default all: {','.join(FAMILIES)})")
    ap.add_argument("--op", type=_list, default=None, help="ops to run (default all)")
    ap.add_argument("--versions", type=_list, default=(), help="versions to run, e.g. v1,v8")
    ap.add_argument("--threads", type=_threads, default=None,
                    help="thread counts (default: 1 and all Numba threads)")
    ap.add_argument("--trials", type=int, default=5, help="interleaved trials (>= 5)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of calls per timing sample (default 0.05, quick 0.002)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where --time writes rows")
    args = ap.parse_args(argv)
    if args.trials < 5:
        ap.error(f"--trials must be >= 5 (medians and CIs need them), got {args.trials}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        chosen = ops(args.family, args.op)
    except ValueError as exc:
        print(f"ladder: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for op in chosen:
            print(f"{op.family} / {op.name}")
            for v in op.versions:
                print(f"  {v.name:<4} {v.status:<10} {v.what}")
        return 0
    from cnn.backends import numba_cpu

    numba_cpu.check_available()
    if args.check:
        results = check(chosen, quick=args.quick, threads=args.threads, only=args.versions)
        bad = [r for r in results if not r.ok]
        print(f"{len(results) - len(bad)} of {len(results)} versions match the reference"
              + (f"; FAILED: {', '.join(f'{r.op} {r.version}' for r in bad)}" if bad else ""))
        return 1 if bad else 0
    from kernels.timer import run_timer

    frame = run_timer(chosen, quick=args.quick, threads=args.threads, trials=args.trials,
                      only=args.versions, min_time=args.min_time, out=args.out)
    return 0 if len(frame) else 1


if __name__ == "__main__":
    sys.exit(main())
