"""The study's one command line.

    python -m study all --scale standard        # make study: notebooks, summary, README, report
    python -m study run mpi hogwild --scale quick
    python -m study notebooks --only 01,06 --scale quick
    python -m study summary [--readme] [--draft]
    python -m study report [--draft]
    python -m study export mpi_scaling_runs out.csv
    python -m study schema                       # the results columns, typed
    python -m study reproduce /tmp/rerun --pool  # a re-run inside the committed CIs? keep it

``quick`` writes under build/quick and never touches the committed results, images,
notebooks, README or report.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

from study import paths, schema
from study.config import DEFAULT_SCALE
from study.experiments import FAMILIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0],
                                epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def scaled(name: str, help: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, description=help)
        q.add_argument("--scale", choices=schema.SCALES, default=DEFAULT_SCALE,
                       help=f"preset sizes (study/config.py); default {DEFAULT_SCALE}")
        return q

    a = scaled("all", "notebooks 01-06, then summary.json, the README table and report.pdf")
    a.add_argument("--only", default=None, metavar="01,06", help="notebooks to run")
    a.add_argument("--draft", action="store_true", help="allow a dirty tree (watermarked)")
    a.add_argument("--timeout", type=float, default=None, help="per-cell timeout, seconds")
    r = scaled("run", "run experiment families without the notebooks")
    r.add_argument("families", nargs="+", choices=list(FAMILIES), metavar="FAMILY",
                   help=f"one or more of: {', '.join(FAMILIES)}")
    n = scaled("notebooks", "execute the notebooks headless (papermill)")
    n.add_argument("--only", default=None, metavar="01,06", help="notebooks to run")
    n.add_argument("--timeout", type=float, default=None, help="per-cell timeout, seconds")
    n.add_argument("--no-measure", action="store_true",
                   help="redraw from the saved results instead of measuring")
    s = scaled("summary", "results/summary.json from the saved results")
    s.add_argument("--readme", action="store_true", help="also rewrite the README's table")
    s.add_argument("--draft", action="store_true", help="allow a dirty tree")
    rep = scaled("report", "summary.json and report.pdf")
    rep.add_argument("--draft", action="store_true", help="allow a dirty tree (watermarked)")
    rep.add_argument("--out", default=None, help="PDF path (default report.pdf)")
    e = scaled("export", "write a results file as CSV or Parquet for sharing")
    e.add_argument("name", help="results file stem, e.g. mpi_scaling_runs")
    e.add_argument("dest", help="output path ending in .csv or .parquet")
    sub.add_parser("schema", help="print the results schema")
    rp = scaled("reproduce", "is each headline of a re-run (its own results folder) inside "
                "the committed interval? Recorded in results/reproduction.json")
    rp.add_argument("folder", help="the re-run's results folder (CNN_RESULTS_DIR of the re-run)")
    rp.add_argument("--pool", action="store_true",
                    help="then add the re-run to results/ as one more sitting")
    return p


def _notebooks(scale: str, only: str | None, timeout: float | None, measure: bool) -> bool:
    from study import notebooks

    try:
        notebooks.run_notebooks(scale=scale, only=only.split(",") if only else None,
                                timeout=timeout, parameters={"measure": measure},
                                log=lambda line: print(line, flush=True))
    except notebooks.StudyError as exc:
        print(f"study FAILED: {exc}", file=sys.stderr, flush=True)
        return False
    return True


def _report(scale: str, draft: bool, readme: bool, out: str | None = None) -> int:
    from study import report

    try:
        s = report.build_summary(scale, draft=draft)
    except report.DirtyTree as exc:
        print(f"report refused: {exc}", file=sys.stderr)
        return 2
    report.write_summary(s)
    report.print_headlines(s)
    if readme and scale in paths.COMMITTED_SCALES:
        report.update_readme(s)
    pdf = out or (paths.report_pdf() if scale in paths.COMMITTED_SCALES
                  else paths.scratch_dir(scale) / "report.pdf")
    print(f"report: {report.build_report(s, pdf)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "schema":
        print(schema.describe().to_string(index=False))
        return 0
    if args.command == "export":
        print(schema.export(args.name, args.dest, args.scale))
        return 0
    if args.command == "reproduce":
        from study import reproduce

        try:
            return reproduce.main(args.folder, args.scale, pool=args.pool)
        except (FileNotFoundError, ValueError, schema.SchemaError) as exc:
            print(f"reproduce refused: {exc}", file=sys.stderr)
            return 2
    if args.command == "run":
        for family in args.families:
            importlib.import_module(FAMILIES[family]).run(args.scale)
        return 0
    if args.command == "notebooks":
        return 0 if _notebooks(args.scale, args.only, args.timeout, not args.no_measure) else 1
    if args.command == "summary":
        from study import report

        try:
            print(report.main_summary(args.scale, args.readme and args.scale in
                                      paths.COMMITTED_SCALES, args.draft))
        except report.DirtyTree as exc:
            print(f"summary refused: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "report":
        return _report(args.scale, args.draft, readme=False, out=args.out)
    # all: measure a new sitting, check it against the committed numbers, then report
    from study import report, reproduce

    before = report.family_frames(args.scale)
    if not _notebooks(args.scale, args.only, args.timeout, True):
        return 1
    fresh = reproduce.new_rows(before, report.family_frames(args.scale))
    if fresh and any(len(fr) for fr in before.values()):
        rec = reproduce.check_record(before, fresh, args.scale)
        print(reproduce.table_text(rec))
        print(f"record: {reproduce.append_record(rec, args.scale)}")
    rc = _report(args.scale, args.draft, readme=True)
    print(f"study done in {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
