"""One module per experiment family; each has the same shape (docs/DESIGN.md, "Experiments").

    RESULTS: tuple[str, ...]       the results files it writes (results/<name>.pkl)
    run(scale="standard", *, parts=None, log=print) -> dict[str, DataFrame]
        measure (interleaved trials, study/measure.py), flag anomalies
        (study/analysis.py), validate and save (study/schema.py); returns the frames
    load(scale="standard") -> dict[str, DataFrame]
        the saved frames, to redraw without measuring
    headlines(frames) -> list[analysis.Headline]
        the family's numbers for the README and the report
    main(argv) -> int
        ``python -m study.experiments.<family> --help``

The family's figures live in ``study/figures/<family>.py``. Sizes come only from
``study/config.py``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

import pandas as pd

from study import schema
from study.config import DEFAULT_SCALE

#: family -> module, in the order of the notebooks.
FAMILIES: dict[str, str] = {
    "baseline": "study.experiments.baseline",
    "kernels": "study.experiments.kernels",
    "ladder": "study.experiments.ladder",
    "gpu": "study.experiments.gpu",
    "mpi": "study.experiments.mpi",
    "hogwild": "study.experiments.hogwild",
    "kfold": "study.experiments.kfold",
    "peers": "study.experiments.peers",
    "stragglers": "study.experiments.stragglers",
}


def chosen_parts(family: str, parts: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """``parts`` (default: all of ``known``), refusing a part the family does not have."""
    chosen = list(parts or known)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"unknown {family} part(s) {unknown}; parts are {', '.join(known)}")
    return chosen


def load_saved(names: Sequence[str], scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    """The family's saved frames that exist (a missing file is simply not measured yet)."""
    out = {}
    for name in names:
        try:
            out[name] = schema.load(name, scale)
        except FileNotFoundError:
            continue
    return out


def save_part(raw: pd.DataFrame, name: str, scale: str, session: str,
              flag: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
    """A part's raw trials as schema rows, flagged (``flag``), validated and saved as
    ``name``: one place, so every family saves a part as soon as it is measured."""
    df = schema.rows(raw, scale=scale, session=session)
    df = flag(df) if flag is not None else df
    schema.save(df, name, scale)
    return df


def cli(family: str, doc: str, run: Callable[..., dict[str, pd.DataFrame]],
        parts: Sequence[str] = (), argv: Sequence[str] | None = None) -> int:
    """The standard CLI of a family: ``--scale``, ``--parts``, ``--quiet``."""
    p = argparse.ArgumentParser(prog=f"python -m study.experiments.{family}",
                                description=doc.strip().splitlines()[0],
                                epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=schema.SCALES, default=DEFAULT_SCALE,
                   help="sizes from study/config.py; quick writes to build/quick "
                        f"(default {DEFAULT_SCALE})")
    if parts:
        p.add_argument("--parts", default=None,
                       help=f"comma-separated subset of: {', '.join(parts)} (default: all)")
    p.add_argument("--quiet", action="store_true", help="no per-trial log lines")
    p.add_argument("--replace", action="store_true",
                   help="drop this host's earlier sittings of the parts run instead of "
                        "pooling with them (after a change that moves the numbers)")
    args = p.parse_args(argv)
    if args.replace:
        os.environ[schema.REPLACE_ENV] = "1"
    chosen = None
    if parts and args.parts:
        chosen = [x.strip() for x in args.parts.split(",") if x.strip()]
        unknown = sorted(set(chosen) - set(parts))
        if unknown:
            p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(parts)}")
    kw = {"parts": chosen} if parts else {}
    frames = run(args.scale, log=None if args.quiet else print, **kw)
    for name, df in frames.items():
        print(f"{name}: {len(df)} rows -> {schema.path_of(name, args.scale)}")
    return 0
