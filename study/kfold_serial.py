"""Serial k-fold in a fresh process: ``python -m study.kfold_serial [cnn.parallel.kfold flags]``.

The k-fold CLI (``python -m cnn.parallel.kfold``) always runs at least one engine run
(``--serial`` only adds a serial run before it), so it cannot time the serial baseline
alone in its own process as the engine runs are timed. This launcher takes the same
flags and runs only the serial folds through the library's public `run_kfold`; the study
times it with `study.measure.run_cli` like every other run (start-up measured apart).
Remove it once the CLI has a serial-only mode.
"""

from __future__ import annotations

from collections.abc import Sequence

from cnn.metrics import save_metrics
from cnn.parallel import kfold


def main(argv: Sequence[str] | None = None) -> int:
    parser = kfold.build_parser()
    parser.prog = "python -m study.kfold_serial"
    parser.description = "Serial k-fold only (the folds one after another in this process)."
    args = parser.parse_args(list(argv) if argv is not None else None)
    df = kfold.run_kfold(args, serial=True, progress=False,
                         log=None if args.no_progress else print,
                         cpu_interval=args.cpu_interval)
    if args.save_metrics:
        save_metrics(df, args.save_metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
