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
- flags: a sitting's flags carry over; the pooled interval is checked again for width; two
  sittings whose intervals do not overlap are flagged as disagreeing;
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


def sitting_count(frames: Frames) -> int:
    """The most sittings any (file, experiment, host) of ``frames`` holds."""
    most = 1
    for df in frames.values():
        if df is None or not len(df) or "session" not in df:
            continue
        keys = [c for c in ("experiment", "host") if c in df]
        counts = df.groupby(keys)["session"].nunique() if keys else [df["session"].nunique()]
        most = max(most, int(max(counts)))
    return most


def nth_sitting(df: pd.DataFrame | None, k: int) -> pd.DataFrame | None:
    """Each experiment's (and host's) ``k``-th newest sitting (0 = newest); an experiment
    with fewer sittings gives its oldest. Session ids start with their UTC time."""
    if df is None or not len(df) or "session" not in df:
        return df
    keys = [c for c in ("experiment", "host") if c in df]
    parts = []
    for _, g in (df.groupby(keys, sort=False) if keys else [(None, df)]):
        sessions = sorted(set(g["session"].astype(str)), reverse=True)
        parts.append(g[g["session"].astype(str) == sessions[min(k, len(sessions) - 1)]])
    return pd.concat(parts).sort_index()


def identity(h: analysis.Headline) -> tuple[object, ...]:
    """What makes two headlines of one key the same sitting's (the session when known)."""
    if h.session:
        return ("session", h.session)
    return ("value", h.value, h.lo, h.hi)


def pooled_headlines(build: Callable[[dict[str, pd.DataFrame]], list[analysis.Headline]],
                     frames: Frames) -> list[analysis.Headline]:
    """``build`` (a family's ``headlines``) once per sitting, each key pooled (`pool`)."""
    rounds = sitting_count(frames)
    order: list[str] = []
    found: dict[str, list[analysis.Headline]] = {}
    for k in range(rounds):
        for h in build({n: nth_sitting(df, k) for n, df in frames.items()}):
            if h.key not in found:
                order.append(h.key)
                found[h.key] = [h]
            elif identity(h) not in {identity(x) for x in found[h.key]}:
                found[h.key].append(h)
    return [pool(found[key]) for key in order]


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
    flags: list[str] = []
    for h in same:
        for part in filter(None, (h.anomaly or "").split("; ")):
            if "wider than" not in part and part not in flags:
                flags.append(part)
    if analysis.ci_too_wide(value, lo, hi):
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

    ``inside`` is True/False where both are measured (a headline without an interval must
    be equal: it is deterministic), None where either is not measured.
    """
    by_key = {h.key: h for h in rerun}
    rows = []
    for c in committed:
        r = by_key.get(c.key)
        row = {"key": c.key, "label": c.label, "committed": c.text(),
               "committed_sittings": len(c.extra.get("sittings", [])) or int(c.measured),
               "rerun": r.text() if r is not None else "absent", "inside": None, "how": ""}
        if r is not None and c.measured and r.measured:
            if math.isfinite(c.lo) and math.isfinite(c.hi):
                row["inside"] = bool(c.lo <= r.value <= c.hi)
                row["how"] = "re-run median inside the committed 95% interval"
            else:
                row["inside"] = bool(math.isclose(r.value, c.value, rel_tol=1e-9,
                                                  abs_tol=1e-15))
                row["how"] = "equal (deterministic, no interval)"
        rows.append(row)
    return pd.DataFrame(rows)
