"""Headlines pooled over sittings: a number is not one sitting's luck on a shared machine.

On this 2-core VM the same run drifts 20-30% between minutes, and more between hours. A 95%
interval from the five interleaved trials of one sitting covers that sitting's noise, not
the next one's: a re-run of the MPI family two hours after the committed one put 2 of its 10
medians outside their committed intervals. So `results/` keeps up to five sittings
(`schema.SITTINGS_KEPT`) of each experiment per host, and every headline is computed once per
sitting by its family's own `headlines(frames)`, then pooled:

- value: the median of the sittings' values;
- interval: a 95% *prediction* interval for the next sitting's value (`rerun_interval`),
  which is what a reader who re-runs the study meets. A sitting's value is the common value
  plus that sitting's drift plus its own trial noise. The spread of the k sitting values
  (standard deviation s) estimates drift and noise together, with k-1 degrees of freedom;
  the sittings' own 95% intervals give the trial noise alone (w, their root-mean-square
  standard error). The half-width is max(t(k-1) s, z w) * sqrt(1 + 1/k): the standard t
  prediction interval, never narrower than the sittings' trial noise (drift cannot make
  the next sitting quieter than its own trials). Ratios, rates, times and efficiencies are
  positive and multiplicative, so this is done on their logarithm; differences in points
  and a model's error, which may sit at zero, are done as they are. Declared before the
  fifth pass of re-runs, not fitted to it (the error's scale was corrected after: on the
  logarithm, three errors of 3-23% gave [0%, 2300%]). The envelope of the sittings'
  intervals is kept beside it (``extra["envelope"]``);
- flags: a sitting's flags carry over; the pooled interval is checked again for width
  (except for differences in points, which may sit at zero); two sittings whose intervals
  do not overlap are flagged as disagreeing;
- only sittings with the newest sitting's host, configuration and unit are pooled;
- a model's output (unit "modelled ...") is not a measurement: its interval is the range of
  the sittings' outputs, and no re-run is checked against it.

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
#: Units that may sit at zero (differences, a model's error): their prediction interval is
#: taken on the value itself; every other positive unit varies by factors (its logarithm).
LINEAR_UNITS = ("points", "error")
#: Coverage of the re-run (prediction) interval.
PREDICTION = 0.95


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


def on_log_scale(heads: Sequence[analysis.Headline]) -> bool:
    """Positive multiplicative numbers (ratios, rates, times, efficiencies) vary by factors."""
    bounds = [b for h in heads for b in (h.value, *interval(h))]
    return heads[0].unit not in LINEAR_UNITS and all(b > 0 for b in bounds)


def rerun_interval(heads: Sequence[analysis.Headline]) -> tuple[float, float, str]:
    """95% prediction interval for the next sitting's value from k >= 2 sittings (module
    docstring), and which term set its width: the sittings' spread or their trial noise."""
    from scipy import stats

    log = on_log_scale(heads)
    f = np.log if log else np.asarray
    k = len(heads)
    y = f(np.array([h.value for h in heads], dtype=float))
    spread = float(np.std(y, ddof=1))
    z = float(stats.norm.ppf(0.5 + PREDICTION / 2))
    t = float(stats.t.ppf(0.5 + PREDICTION / 2, k - 1))
    ses = [(float(f(h.hi)) - float(f(h.lo))) / (2 * z) for h in heads
           if math.isfinite(h.lo) and math.isfinite(h.hi)]
    noise = math.sqrt(float(np.mean(np.square(ses)))) if ses else 0.0
    half = max(t * spread, z * noise) * math.sqrt(1 + 1 / k)
    centre = float(np.mean(y))
    lo, hi = centre - half, centre + half
    if log:
        lo, hi = math.exp(lo), math.exp(hi)
    term = (f"t({k - 1}) x the spread of {k} sitting values" if t * spread >= z * noise
            else "the sittings' own trial noise (wider than their spread)")
    scale = "log scale" if log else "linear scale"
    return lo, hi, f"95% prediction interval for a re-run, {scale}; width set by {term}"


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
    envelope = (min(b[0] for b in bounds), max(b[1] for b in bounds))
    how = ""
    if not with_ci and len(set(values)) == 1:  # deterministic: every sitting gave it
        lo = hi = math.nan
    elif newest.unit.startswith("modelled"):  # outputs of a model, not a sample
        lo, hi = envelope
        how = "range of the sittings' model outputs"
    else:
        lo, hi, how = rerun_interval(same)
    # a difference (points) may sit at zero: no width rule, its sittings' own flags stand
    width_rule = newest.unit not in NO_WIDTH_RULE
    flags: list[str] = []
    for h in same:
        for part in filter(None, (h.anomaly or "").split("; ")):
            if (not width_rule or "wider than" not in part) and part not in flags:
                flags.append(part)
    if width_rule and analysis.ci_too_wide(value, lo, hi):
        flags.append(f"the re-run interval over {len(same)} sittings [{lo:.4g}, {hi:.4g}] is "
                     f"wider than {analysis.WIDE_CI:.0%} of the median {value:.4g}")
    if len(with_ci) > 1 and max(h.lo for h in with_ci) > min(h.hi for h in with_ci):
        flags.append("sittings disagree: their 95% intervals do not overlap (" + "; ".join(
            f"{h.text()} at {h.session[:15]}" for h in with_ci) + ")")
    sittings = [{"session": h.session, "value": h.value, "lo": h.lo, "hi": h.hi,
                 "trials": h.trials, "text": h.text()} for h in same]
    note = f"{len(same)} sittings pooled"
    extra = {**newest.extra, "sittings": sittings, "envelope": list(envelope)}
    if how:
        extra["interval"] = how
    return dataclasses.replace(
        newest, value=value, lo=lo, hi=hi, trials=sum(h.trials for h in same),
        session="+".join(h.session for h in same), anomaly="; ".join(flags),
        note="; ".join(x for x in (newest.note, note) if x), extra=extra)


# --- a re-run against the committed headlines -------------------------------------------

def deterministic(h: analysis.Headline) -> bool:
    """For a headline without an interval: one run, or pooled sittings that all gave the same
    number (`pool` gives every other pooled headline an interval)."""
    return h.trials < 2 or "sittings" in h.extra


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
                pooled = "sittings" in c.extra
                row["how"] = ("re-run value inside the committed 95% "
                              + ("re-run interval" if pooled else "interval"))
            elif c.trials >= 2 and not deterministic(c):
                row["how"] = "not checked: too few trials for an interval"
            else:
                row["inside"] = bool(math.isclose(r.value, c.value, rel_tol=1e-9,
                                                  abs_tol=1e-15))
                row["how"] = "equal (deterministic, no interval)"
        rows.append(row)
    return pd.DataFrame(rows)
