"""Speedup, efficiency, confidence intervals, anomaly flags: pure functions of frames,
defined once. Every number the notebooks, the README and the report print comes from here.

The rules (docs/DESIGN.md, "Numbers a reader can trust"):

- a point is the median of its trials with a 95% bootstrap confidence interval (a
  headline then pools the sittings kept in results/: study/sittings.py);
- a speedup is against the best one-worker run of the same configuration (``config``)
  measured in the same session, never against a run from another sitting or host;
- anomalies are flagged, not printed as findings: efficiency above 1.05 on
  compute-bound work, a CI wider than 20% of its median, a quick-scale row where a
  standard number is expected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

SUPERLINEAR = 1.05  # efficiency above this on compute-bound work: the baseline is wrong
WIDE_CI = 0.20  # a CI wider than this fraction of its median is not a finding
CONFIDENCE = 0.95
N_RESAMPLES = 2000


# --- intervals ---------------------------------------------------------------------------

def _clean(values: Any) -> np.ndarray:
    a = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=np.float64)
    return a[np.isfinite(a)]


def median_ci(values: Any, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the 95% percentile-bootstrap interval of the median.

    With fewer than 3 values there is no interval (NaN bounds): one run proves nothing.
    """
    a = _clean(values)
    if a.size == 0:
        return (math.nan, math.nan, math.nan)
    med = float(np.median(a))
    if a.size < 3 or np.all(a == a[0]):
        return (med, math.nan, math.nan) if a.size < 3 else (med, med, med)
    from scipy.stats import bootstrap

    res = bootstrap((a,), np.median, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                    method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return med, float(lo), float(hi)


def ratio_ci(num: Any, den: Any, seed: int = 0) -> tuple[float, float, float]:
    """(median(num) / median(den), low, high): both samples resampled independently."""
    a, b = _clean(num), _clean(den)
    if a.size == 0 or b.size == 0:
        return (math.nan, math.nan, math.nan)
    ratio = float(np.median(a) / np.median(b))
    if a.size < 3 or b.size < 3:
        return ratio, math.nan, math.nan
    from scipy.stats import bootstrap

    def stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(x, axis=axis) / np.median(y, axis=axis)

    res = bootstrap((a, b), stat, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                    method="percentile", vectorized=True, paired=False,
                    random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return ratio, float(lo), float(hi)


def ci_too_wide(median: float, lo: float, hi: float) -> bool:
    return bool(np.isfinite(lo) and np.isfinite(hi) and median
                and (hi - lo) > WIDE_CI * abs(median))


# --- points: median + CI per configuration --------------------------------------------

def points(df: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """One row per ``by`` group: ``value`` median, CI (``lo``, ``hi``), trials ``n``."""
    out = []
    for key, g in df.groupby(list(by), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        med, lo, hi = median_ci(g[value])
        out.append({**dict(zip(by, key, strict=True)), "median": med, "lo": lo, "hi": hi,
                    "n": int(_clean(g[value]).size)})
    return pd.DataFrame(out)


def point_text(med: float, lo: float = math.nan, hi: float = math.nan,
               fmt: str = "{:.3g}") -> str:
    """``"median [lo, hi]"`` for tables ('' when not measured, no brackets without a CI)."""
    if not np.isfinite(med):
        return ""
    s = fmt.format(med)
    return s + (f" [{fmt.format(lo)}, {fmt.format(hi)}]" if np.isfinite(lo) and
                np.isfinite(hi) else "")


def latest_session(df: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of the most recent session (`measure.new_session` ids start with the time);
    an empty frame for None (a results file not measured yet)."""
    if df is None:
        return pd.DataFrame()
    if not len(df) or "session" not in df:
        return df
    return df[df["session"].astype(str) == max(df["session"].astype(str))]


# --- speedup against the best one-worker run ------------------------------------------

def speedups(df: pd.DataFrame, value: str = "samples_per_s", *, higher_is_better: bool = True,
             group: Sequence[str] = ("host", "session", "config"),
             series: Sequence[str] = ("strategy",),
             baseline_query: str | None = None) -> pd.DataFrame:
    """Speedup and efficiency of every (series, workers) point of each ``group``.

    The baseline of a group is its best one-worker series (highest median throughput or
    lowest median time among rows with ``workers == 1``), measured in the same session
    and configuration; ``baseline_query`` (a ``DataFrame.query`` expression, e.g.
    ``"processes == 1"``) narrows the rows a baseline may come from. Returns one row per
    point: ``group`` and ``series`` columns, ``workers``, the value's median/CI,
    ``speedup`` (+ ``speedup_lo``/``_hi``), ``efficiency`` (+ CI), ``baseline`` (its series
    label) and ``anomaly``.
    """
    group, series = list(group), list(series)
    rows = []
    for gkey, g in df.groupby(group, sort=False, dropna=False):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        one = g[pd.to_numeric(g["workers"]) == 1]
        if baseline_query:
            one = one.query(baseline_query)
        base_label, base_vals = None, None
        for skey, s in one.groupby(series, sort=False, dropna=False):
            vals = _clean(s[value])
            if not vals.size:
                continue
            better = (base_vals is None or (np.median(vals) > np.median(base_vals)
                                            if higher_is_better
                                            else np.median(vals) < np.median(base_vals)))
            if better:
                base_label, base_vals = skey, vals
        for key, s in g.groupby([*series, "workers"], sort=False, dropna=False):
            skey, w = key[:-1], key[-1]
            vals = _clean(s[value])
            med, lo, hi = median_ci(vals)
            if base_vals is None:
                sp = (math.nan,) * 3
            elif higher_is_better:
                sp = ratio_ci(vals, base_vals)
            else:
                sp = ratio_ci(base_vals, vals)
            w = float(w)
            eff = tuple(v / w for v in sp)
            row = {**dict(zip(group, gkey, strict=True)), **dict(zip(series, skey, strict=True)),
                   "workers": w, "median": med, "lo": lo, "hi": hi, "n": int(vals.size),
                   "speedup": sp[0], "speedup_lo": sp[1], "speedup_hi": sp[2],
                   "efficiency": eff[0], "efficiency_lo": eff[1], "efficiency_hi": eff[2],
                   "baseline": (base_label if not isinstance(base_label, tuple)
                                else "/".join(map(str, base_label)))}
            row["anomaly"] = point_anomaly(row)
            rows.append(row)
    return pd.DataFrame(rows)


def point_anomaly(p: dict[str, Any]) -> str:
    """Why a point must not be read as a finding ('' if it can)."""
    why = []
    if p.get("workers", 1) > 1 and np.isfinite(p.get("efficiency", math.nan)) and \
            p["efficiency"] > SUPERLINEAR:
        why.append(f"efficiency {p['efficiency']:.2f} > {SUPERLINEAR} against the best "
                   "one-worker run: superlinear on compute-bound work, so the baseline ran "
                   "slow or the workers got more than their share of the machine")
    if ci_too_wide(p.get("median", math.nan), p.get("lo", math.nan), p.get("hi", math.nan)):
        why.append(f"95% CI [{p['lo']:.4g}, {p['hi']:.4g}] wider than "
                   f"{WIDE_CI:.0%} of the median {p['median']:.4g}")
    if p.get("n", 0) and p["n"] < 3:
        why.append(f"only {p['n']} trial(s): no confidence interval")
    return "; ".join(why)


def key_text(value: Any) -> str:
    """A join key's text: 2, 2.0 and np.int64(2) all read "2" (points hold float workers,
    validated rows int ones)."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | float | np.integer | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def flag_rows(df: pd.DataFrame, pts: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Copy each point's ``anomaly`` onto the rows it summarises (joined on ``keys``)."""
    out = df.copy()
    if not len(pts) or "anomaly" not in pts:
        return out
    notes = {tuple(key_text(v) for v in k): a for k, a in zip(
        pts[list(keys)].itertuples(index=False, name=None), pts["anomaly"], strict=True) if a}
    mine = [notes.get(tuple(key_text(v) for v in k), "") for k in out[list(keys)].itertuples(
        index=False, name=None)]
    old = out["anomaly"] if "anomaly" in out else pd.Series("", index=out.index)
    out["anomaly"] = ["; ".join(x for x in (str(o or ""), m) if x) for o, m in zip(
        old, mine, strict=True)]
    return out


# --- headlines ---------------------------------------------------------------------------

@dataclass
class Headline:
    """One number the README and the report lead with, with where it comes from."""

    key: str
    label: str
    value: float
    lo: float = math.nan
    hi: float = math.nan
    unit: str = ""
    config: str = ""
    source: str = ""
    scale: str = ""
    session: str = ""
    trials: int = 0
    host: str = ""
    cpu: str = ""
    anomaly: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return bool(np.isfinite(self.value))

    def text(self) -> str:
        """The value with its CI, as printed in the README and the report."""
        if not self.measured:
            return "not measured"
        f = FORMATS.get(self.unit, "{:.3g}")
        b = BOUND_FORMATS.get(self.unit, f)
        s = f.format(self.value)
        if np.isfinite(self.lo) and np.isfinite(self.hi):
            s += f" [{b.format(self.lo)}, {b.format(self.hi)}]"
        return s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["text"] = self.text()
        for k in ("value", "lo", "hi"):
            if not np.isfinite(d[k]):
                d[k] = None
        return d


BOUND_FORMATS = {"x": "{:.2f}", "points": "{:+.2f}", "s": "{:.1f}", "ms": "{:.1f}",
                 "modelled %": "{:.1%}"}
#: "error": a relative error; "modelled %": a model's efficiency (not a measurement, and
#: kept apart from the measured "%" ones).
FORMATS = {"x": "{:.2f}x", "%": "{:.1%}", "acc": "{:.2%}", "points": "{:+.2f} pts",
           "samples/s": "{:,.0f}", "s": "{:.1f} s", "ms": "{:.1f} ms", "error": "{:.1%}",
           "modelled %": "{:.1%} (model)"}


def not_measured(key: str, label: str, why: str) -> Headline:
    return Headline(key, label, math.nan, note=why)


def headline_from_point(key: str, label: str, p: pd.Series | dict[str, Any], unit: str,
                        value: str = "speedup", source: str = "",
                        rows: pd.DataFrame | None = None, note: str = "") -> Headline:
    """A headline from a `speedups`/`points` row; provenance from the rows it summarises."""
    p = dict(p)
    lo_col, hi_col = (f"{value}_lo", f"{value}_hi") if value != "median" else ("lo", "hi")
    h = Headline(key, label, float(p.get(value, math.nan)), float(p.get(lo_col, math.nan)),
                 float(p.get(hi_col, math.nan)), unit, config=str(p.get("config", "")),
                 source=source, session=str(p.get("session", "")), trials=int(p.get("n", 0)),
                 host=str(p.get("host", "")), anomaly=str(p.get("anomaly", "") or ""),
                 note=note)
    if rows is not None and len(rows):
        if not h.session and "session" in rows:
            h.session = "+".join(sorted(set(rows["session"].astype(str))))
        h.scale = ",".join(sorted(set(rows["scale"].astype(str))))
        h.cpu = str(rows["cpu"].iloc[0])
        if h.scale != "standard" and "full" not in h.scale:
            h.anomaly = "; ".join(x for x in (h.anomaly, f"{h.scale}-scale rows in a "
                                              "standard headline") if x)
    return h
