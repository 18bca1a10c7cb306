"""Headlines pooled over sittings: a number is not one sitting's luck on a shared machine.

On this 2-core VM the same run drifts 20-30% between minutes, and more between hours. A 95%
interval from the five interleaved trials of one sitting covers that sitting's noise, not
the next one's: a re-run of the MPI family two hours after the committed one put 2 of its 10
medians outside their committed intervals. So `results/` keeps up to three sittings
(`schema.SITTINGS_KEPT`) of each experiment per host, and every headline is computed once per
sitting by its family's own `headlines(frames)`, then pooled:

- value: the median of the sittings' values;
- interval: from the lowest sitting's lower bound to the highest sitting's upper bound (the
  envelope of their 95% intervals). It covers the noise within a sitting and the drift
  between them; it is conservative and grows with sittings, hence the cap of three;
- flags: a sitting's flags carry over; the pooled interval is checked again for width
  (except for differences in points, which may sit at zero); two sittings whose intervals
  do not overlap are flagged as disagreeing;
- only sittings with the newest sitting's host, configuration and unit are pooled.

Figures draw the newest sitting; the headlines (README, report, summary.json) pool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from study import analysis

Frames = Mapping[str, pd.DataFrame]
#: Units whose value is a difference that may be zero: a width relative to it means nothing.
NO_WIDTH_RULE = ("points",)


def sessions(frames: Frames) -> list[str]:
    """Every sitting (session) of ``frames``, newest first (session ids start with the time)."""
    found = {str(x) for df in frames.values() if df is not None and len(df)
             and "session" in df for x in df["session"]}
    return sorted(found, reverse=True)


def sitting_frames(df: pd.DataFrame | None, session: str) -> pd.DataFrame | None:
    """The rows of ``session`` for each experiment (and host) that has it, the newest
    sitting's rows for the others."""
    if df is None or not len(df) or "session" not in df:
        return df
    keys = [c for c in ("experiment", "host") if c in df]
    parts = []
    for _, g in (df.groupby(keys, sort=False) if keys else [(None, df)]):
        have = set(g["session"].astype(str))
        pick = session if session in have else max(have)
        parts.append(g[g["session"].astype(str) == pick])
    return pd.concat(parts).sort_index()


def identity(h: analysis.Headline) -> tuple[object, ...]:
    """What makes two headlines of one key the same sitting's (the session when known)."""
    if not h.measured:
        return ("not measured",)
    if h.session:
        return ("session", h.session)
    return ("value", h.value, h.lo, h.hi)


def pooled_headlines(build: Callable[[dict[str, pd.DataFrame]], list[analysis.Headline]],
                     frames: Frames) -> list[analysis.Headline]:
    """``build`` (a family's ``headlines``) once per sitting, each key pooled (`pool`).

    The build for sitting S sees S's rows wherever an experiment has them; a headline it
    gives counts for S only if it comes from S (its ``session`` names S, or it has none):
    a number that pairs two files is never made of two sittings' rows.
    """
    order: list[str] = []
    first: dict[str, analysis.Headline] = {}
    found: dict[str, list[analysis.Headline]] = {}
    for session in sessions(frames) or [""]:
        built = build({n: sitting_frames(df, session) if session else df
                       for n, df in frames.items()})
        for h in built:
            if h.key not in first:
                order.append(h.key)
                first[h.key] = h
            if session and h.session and session not in h.session:
                continue
            mine = found.setdefault(h.key, [])
            if identity(h) not in {identity(x) for x in mine}:
                mine.append(h)
    return [pool(found.get(key) or [first[key]]) for key in order]


def interval(h: analysis.Headline) -> tuple[float, float]:
    """A headline's interval, or its value twice when it has none."""
    if math.isfinite(h.lo) and math.isfinite(h.hi):
        return h.lo, h.hi
    return h.value, h.value


def pool(heads: Sequence[analysis.Headline]) -> analysis.Headline:
    """One headline from the same key's sittings, newest first (module docstring)."""
    newest = heads[0]
    same = [h for h in heads if h.measured and (h.host, h.config, h.unit)
            == (newest.host, newest.config, newest.unit)]
    if not newest.measured or len(same) < 2:
        return newest
    values = [h.value for h in same]
    value = float(np.median(values))
    bounds = [interval(h) for h in same]
    with_ci = [h for h in same if math.isfinite(h.lo) and math.isfinite(h.hi)]
    if with_ci or len(set(values)) > 1:
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
    else:  # deterministic: every sitting gave the same number
        lo = hi = math.nan
    # a difference (points) may sit at zero: no width rule, its sittings' own flags stand
    width_rule = newest.unit not in NO_WIDTH_RULE
    flags: list[str] = []
    for h in same:
        for part in filter(None, (h.anomaly or "").split("; ")):
            if (not width_rule or "wider than" not in part) and part not in flags:
                flags.append(part)
    if width_rule and analysis.ci_too_wide(value, lo, hi):
        flags.append(f"the interval over {len(same)} sittings [{lo:.4g}, {hi:.4g}] is wider "
                     f"than {analysis.WIDE_CI:.0%} of the median {value:.4g}")
    if len(with_ci) > 1 and max(h.lo for h in with_ci) > min(h.hi for h in with_ci):
        flags.append("sittings disagree: their 95% intervals do not overlap (" + "; ".join(
            f"{h.text()} at {h.session[:15]}" for h in with_ci) + ")")
    sittings = [{"session": h.session, "value": h.value, "lo": h.lo, "hi": h.hi,
                 "trials": h.trials, "text": h.text()} for h in same]
    note = f"{len(same)} sittings pooled"
    return dataclasses.replace(
        newest, value=value, lo=lo, hi=hi, trials=sum(h.trials for h in same),
        session="+".join(h.session for h in same), anomaly="; ".join(flags),
        note="; ".join(x for x in (newest.note, note) if x),
        extra={**newest.extra, "sittings": sittings})


# --- a re-run against the committed headlines -------------------------------------------

def check(committed: Sequence[analysis.Headline],
          rerun: Sequence[analysis.Headline]) -> pd.DataFrame:
    """Is each re-run headline inside the committed interval? One row per committed key.

    ``inside`` is True/False where both are measured (a headline of one run without an
    interval must be equal: it is deterministic); None where either is not measured, the
    number is a model's, or it has too few trials for an interval (``how`` says which).
    """
    by_key = {h.key: h for h in rerun}
    rows = []
    for c in committed:
        r = by_key.get(c.key)
        row = {"key": c.key, "label": c.label, "committed": c.text(),
               "committed_sittings": len(c.extra.get("sittings", [])) or int(c.measured),
               "rerun": r.text() if r is not None else "absent", "inside": None, "how": ""}
        if r is not None and c.measured and r.measured:
            if c.unit.startswith("modelled"):  # pooled, its "interval" is a range of outputs
                row["how"] = "not checked: a model's output, not a measurement"
            elif math.isfinite(c.lo) and math.isfinite(c.hi):
                row["inside"] = bool(c.lo <= r.value <= c.hi)
                row["how"] = "re-run median inside the committed 95% interval"
            elif c.trials >= 2:
                row["how"] = "not checked: too few trials for an interval"
            else:
                row["inside"] = bool(math.isclose(r.value, c.value, rel_tol=1e-9,
                                                  abs_tol=1e-15))
                row["how"] = "equal (deterministic, no interval)"
        rows.append(row)
    return pd.DataFrame(rows)
