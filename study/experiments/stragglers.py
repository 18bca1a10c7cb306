"""When does asynchrony pay? Uneven workers, the remedies, and time to accuracy.

Parts (``python -m study.experiments.stragglers --scale quick --parts momentum``):

``scenarios`` -> results/stragglers_runs.pkl
    Every strategy under every scenario of the preset: no straggler, one worker 2x slower,
    one worker 4x slower (``--straggler RANK:FACTOR``: it sleeps (FACTOR-1) x its compute
    every step, so its core is free meanwhile), random delays on every worker
    (``--straggler-dist exp:MEAN_MS``). Strategies: allreduce, the synchronous parameter
    server, the same with one backup worker, the asynchronous parameter server plain and
    staleness-aware (lr / max(1, s); the variant lr / (1 + s) where the preset says),
    model averaging, HOGWILD with each momentum option; the asynchronous ones hand out work
    dynamically (``--assign dynamic``), so a slow worker takes fewer batches. Two workers
    everywhere (the parameter servers add a server rank). Each run keeps a copy of the
    weights every ``eval_samples`` samples (``--eval-every``), evaluated after training,
    outside the timed region: accuracy against training seconds, and the time to the
    target accuracy (the first crossing, interpolated between evaluations). One worker
    (a 1-worker HOGWILD run, which is sequential SGD bit for bit) is the reference for
    HOGWILD's accuracy; its accuracy is deterministic, so it runs ``seq_trials`` times.
``momentum`` -> results/stragglers_momentum.pkl
    HOGWILD's momentum options and one worker at the preset's other batch sizes (the
    scenarios' batch is measured there, with no straggler): accuracy at equal epochs.

Rows: one per epoch (``kind == "epoch"``), one per evaluated copy (``kind == "eval"``:
``wall_s``, ``test_acc``) and one per run (``kind == "run"``: ``time_to_target_s``, the
final accuracy, the staleness histogram, gradients dropped). ``mode`` is the scenario.
``wall_s`` is training seconds without the first step's JIT excess (``compile_s``, reported
apart; HOGWILD's workers warm up untimed anyway); start-up is ``startup_s``.
Rules: docs/DESIGN.md, "Numbers a reader can trust". The analysis of the rows:
`study.experiments.stragglers_analysis`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from study import analysis, paths, schema
from study.config import DEFAULT_SCALE, preset
from study.experiments import chosen_parts, cli, load_saved, save_part
from study.experiments import stragglers_analysis as sa
from study.measure import (
    Plan,
    RunDiverged,
    mpiexec_module,
    new_session,
    python_module,
    run_cli,
    run_interleaved,
)

RESULTS: tuple[str, ...] = ("stragglers_runs", "stragglers_momentum")
PARTS: tuple[str, ...] = ("scenarios", "momentum")
EXPERIMENT = {"scenarios": "stragglers", "momentum": "stragglers_momentum"}
#: The seed study's training settings, equal for every run compared here.
TRAINING: dict[str, Any] = dict(model="seed_cnn", lr=0.05, momentum=0.9, schedule="cosine",
                                seed=0)
SCENARIOS: dict[str, str] = {"none": "no straggler", "slow2x": "one worker 2x slower",
                             "slow4x": "one worker 4x slower", "random": "random delays"}
#: What an evaluated copy's row repeats from its run (who, where, which configuration).
IDENTITY = ("config", "momentum_mode", "straggler", "target_acc", "gpu", "lr")


@dataclass(frozen=True)
class Strategy:
    """How the study runs one strategy: which CLI, how many processes and trainers, its
    flags, which worker a straggler scenario slows (the last one), its momentum option."""

    name: str
    runner: str  # "mpi" | "hogwild"
    processes: int
    trainers: int
    flags: tuple[str, ...]
    slow: int
    momentum_mode: str = ""


def _ps(*flags: str) -> tuple[str, ...]:
    return ("--strategy", *flags)


def _hog(mode: str) -> Strategy:
    return Strategy("hogwild", "hogwild", 2, 2, ("--workers", "2", "--assign", "dynamic",
                                                 "--hogwild-momentum", mode), 1, mode)


#: The strategies, by the key plans and presets use (also the figures' series names).
STRATEGIES: dict[str, Strategy] = {
    "allreduce": Strategy("allreduce", "mpi", 2, 2, _ps("allreduce"), 1),
    "param-server": Strategy("param-server", "mpi", 3, 2, _ps("param-server"), 2),
    "param-server-backup": Strategy("param-server-backup", "mpi", 3, 2, _ps(
        "param-server", "--backup-workers", "1"), 2),
    "async-param-server": Strategy("async-param-server", "mpi", 3, 2, _ps(
        "async-param-server", "--assign", "dynamic"), 2),
    "async-param-server-stale": Strategy("async-param-server-stale", "mpi", 3, 2, _ps(
        "async-param-server", "--assign", "dynamic", "--staleness-aware"), 2),
    "async-param-server-stale1": Strategy("async-param-server-stale1", "mpi", 3, 2, _ps(
        "async-param-server", "--assign", "dynamic", "--staleness-aware",
        "--staleness-rule", "plus1"), 2),
    "model-average": Strategy("model-average", "mpi", 2, 2, _ps("model-average"), 1),
    "hogwild (local)": _hog("local"),
    "hogwild (shared)": _hog("shared"),
    "hogwild (scaled)": _hog("scaled"),
    "sequential": Strategy("sequential", "hogwild", 1, 1, ("--workers", "1"), 0),
}
HOGWILD_OPTIONS = ("hogwild (local)", "hogwild (shared)", "hogwild (scaled)")


# --- plans (pure) ------------------------------------------------------------------------

def config_label(p: Mapping[str, Any], batch: int) -> str:
    """The configuration every run of a batch size shares (all but strategy and scenario)."""
    return (f"{p['dataset']}/{p['subset'] or 'all'}, batch {int(batch)} per worker, "
            f"{p['epochs']} epochs, {p['backend']} 1 thread/process")


def label(cfg: Mapping[str, Any]) -> str:
    return f"{cfg['key']} b{cfg['batch_size']} [{cfg['scenario']}]"


def scenario_plan(p: Mapping[str, Any]) -> tuple[Plan, Plan]:
    """(the interleaved scenarios x strategies, the one-worker reference runs)."""
    b = int(p["batch_size"])
    configs = []
    for scenario in p["scenarios"]:
        keys = p["strategies"] if scenario == "none" else p["straggler_strategies"]
        configs += [dict(key=k, scenario=scenario, batch_size=b, evals=True) for k in keys]
    seq = [dict(key="sequential", scenario="none", batch_size=b, evals=True)]
    return Plan(configs, [label(c) for c in configs]), Plan(seq, [label(c) for c in seq])


def momentum_plan(p: Mapping[str, Any]) -> tuple[Plan, Plan]:
    """(HOGWILD's momentum options at the other batch sizes, one worker at each)."""
    configs = [dict(key=k, scenario="none", batch_size=int(b), evals=False)
               for b in p["momentum_batches"] for k in HOGWILD_OPTIONS]
    seq = [dict(key="sequential", scenario="none", batch_size=int(b), evals=False)
           for b in p["momentum_batches"]]
    return Plan(configs, [label(c) for c in configs]), Plan(seq, [label(c) for c in seq])


def eval_every(p: Mapping[str, Any], s: Strategy, batch: int) -> int:
    """Global steps between weight copies: ``eval_samples`` worth of the strategy's global
    batch (trainers x batch for the MPI strategies, one batch per HOGWILD step)."""
    global_batch = batch * (s.trainers if s.runner == "mpi" else 1)
    return max(1, round(float(p["eval_samples"]) / global_batch))


def scenario_flags(p: Mapping[str, Any], scenario: str, s: Strategy) -> list[str]:
    if scenario == "none":
        return []
    if scenario in ("slow2x", "slow4x"):
        return ["--straggler", f"{s.slow}:{scenario[4]}"]
    if scenario == "random":
        return ["--straggler-dist", f"exp:{p['delay_ms']:g}"]
    raise ValueError(f"unknown scenario {scenario!r}; scenarios are {', '.join(SCENARIOS)}")


def command(p: Mapping[str, Any], cfg: Mapping[str, Any], experiment: str) -> list[str]:
    """The library CLI call of one configuration (one thread per process)."""
    s, b = STRATEGIES[cfg["key"]], int(cfg["batch_size"])
    args = ["--backend", str(p["backend"]), "--threads", "1", "--model", TRAINING["model"],
            "--dataset", str(p["dataset"]), "--epochs", str(p["epochs"]),
            "--batch-size", str(b), "--lr", str(TRAINING["lr"]),
            "--momentum", str(TRAINING["momentum"]), "--schedule", TRAINING["schedule"],
            "--seed", str(TRAINING["seed"]), "--experiment", experiment, *s.flags]
    if s.name == "model-average":
        args += ["--sync-every", str(p["sync_every"])]
    if p.get("subset"):
        args += ["--subset", str(p["subset"])]
    if p.get("test_subset"):
        args += ["--test-subset", str(p["test_subset"])]
    if cfg.get("evals", True):
        args += ["--eval-every", str(eval_every(p, s, b))]
    args += scenario_flags(p, cfg["scenario"], s)
    if s.runner == "mpi":
        return mpiexec_module(s.processes, "cnn.parallel.mpi", *args)
    return python_module("cnn.parallel.hogwild", *args)


def estimate(p: Mapping[str, Any]) -> dict[str, float]:
    """Estimated seconds of each part and in total at preset ``p`` (see
    `study.experiments.stragglers_analysis.estimate_seconds` for the cost model)."""
    n = (p["subset"] or 60000) * int(p["epochs"])
    runs_of: dict[str, list[tuple]] = {}
    for part, make in (("scenarios", scenario_plan), ("momentum", momentum_plan)):
        items = []
        for plan, trials in zip(make(p), (p["trials"], p["seq_trials"]), strict=True):
            for c in plan.configs:
                s, b = STRATEGIES[c["key"]], int(c["batch_size"])
                copies = n // (eval_every(p, s, b) * b * (s.trainers if s.runner == "mpi"
                                                          else 1)) if c["evals"] else 0
                items.append((c["key"], c["scenario"], b, s.processes, s.trainers,
                              copies + int(p["epochs"]), s.runner, int(trials)))
        runs_of[part] = items
    return sa.estimate_seconds(p, runs_of)


# --- one run ------------------------------------------------------------------------------

def tidy(raw: pd.DataFrame, cfg: Mapping[str, Any], p: Mapping[str, Any],
         experiment: str) -> pd.DataFrame:
    """A CLI's per-epoch rows as study rows: the epoch rows, one row per evaluated copy
    and the run's row (time to the target, the run's staleness histogram and drops)."""
    s = STRATEGIES[cfg["key"]]
    ep = raw.sort_values("epoch").reset_index(drop=True).copy()
    # the MPI strategies time their first step, JIT and first calls included; HOGWILD's
    # workers warm up untimed: take the first step's excess (compile_s) out of the clock
    jit = float(pd.to_numeric(ep["compile_s"]).fillna(0.0).iloc[0]) if s.runner == "mpi" \
        else 0.0
    ep["wall_s"] = pd.to_numeric(ep["wall_s"]) - jit
    if "evals" in ep:
        ep["evals"] = [[{**pt, "wall_s": max(pt["wall_s"] - jit, 0.0)} for pt in c]
                       if isinstance(c, list) else c for c in ep["evals"]]
    ident = dict(experiment=experiment, strategy=s.name, momentum_mode=s.momentum_mode,
                 mode=cfg["scenario"], workers=s.trainers, batch_size=int(cfg["batch_size"]),
                 config=config_label(p, cfg["batch_size"]), target_acc=float(p["target_acc"]))
    for k, v in ident.items():
        ep[k] = v
    keep = [c for c in ep.columns if c in schema.COLUMNS]
    ident = [c for c in (*schema.REQUIRED, *IDENTITY) if c in ep.columns]
    evals, curve = [], []
    for _, row in ep.iterrows():
        for pt in (row["evals"] if "evals" in ep and isinstance(row["evals"], list) else []):
            curve.append(pt)
            evals.append({**{c: row[c] for c in ident}, "kind": "eval", "epoch": row["epoch"],
                          **{k: pt[k] for k in ("step", "samples", "wall_s", "test_acc",
                                                "test_loss")}})
    run = run_row(ep[keep], curve, float(p["target_acc"]))
    epochs = ep[keep].assign(kind="epoch")
    out = pd.concat([epochs, pd.DataFrame(evals), pd.DataFrame([run])], ignore_index=True,
                    sort=False)
    if "process_wall_s" in raw:
        out["startup_s"] = max(0.0, float(raw["process_wall_s"].iloc[0]) - run["wall_s"])
    return out


def run_row(epochs: pd.DataFrame, curve: Sequence[Mapping[str, Any]],
            target: float) -> dict[str, Any]:
    """The run's row: its last epoch's numbers, the time to ``target``, the staleness
    histogram and the gradients dropped over the whole run."""
    last = epochs.iloc[-1].to_dict()
    hist = sa.add_histograms(epochs["staleness_hist"]) if "staleness_hist" in epochs else []
    pts = sorted(curve, key=lambda q: q["step"])
    last.update(kind="run", epoch=math.nan, staleness_hist=hist,
                time_to_target_s=sa.time_to_target([q["wall_s"] for q in pts],
                                                   [q["test_acc"] for q in pts], target),
                compile_s=float(pd.to_numeric(epochs["compile_s"]).fillna(0.0).max()))
    if len(hist):
        levels = np.arange(len(hist))
        last["staleness_mean"] = float(np.dot(levels, hist) / max(sum(hist), 1))
        last["staleness_max"] = float(levels[np.asarray(hist) > 0].max()) if sum(hist) else 0.0
    if "dropped" in epochs:
        last["dropped"] = float(pd.to_numeric(epochs["dropped"]).fillna(0.0).sum())
    return last


def measure_one(p: Mapping[str, Any], cfg: Mapping[str, Any], experiment: str) -> pd.DataFrame:
    """One configuration in fresh processes; a run that diverges is a run that never
    reaches the target (one row, the reason in ``anomaly``), not a crash of the family."""
    try:
        raw = run_cli(command(p, cfg, experiment), timeout=float(p["timeout_s"]),
                      what=label(cfg))
    except RunDiverged as exc:
        return diverged_row(p, cfg, experiment, exc.why)
    return tidy(raw, cfg, p, experiment)


def diverged_row(p: Mapping[str, Any], cfg: Mapping[str, Any], experiment: str, why: str
                 ) -> pd.DataFrame:
    from cnn.metrics import make_row

    s = STRATEGIES[cfg["key"]]
    return pd.DataFrame([make_row(
        experiment=experiment, strategy=s.name, backend=p["backend"], processes=s.processes,
        threads=1, workers=s.trainers, device="cpu", model=TRAINING["model"],
        dataset=p["dataset"], batch_size=int(cfg["batch_size"]), mode=cfg["scenario"],
        momentum_mode=s.momentum_mode, config=config_label(p, cfg["batch_size"]),
        target_acc=float(p["target_acc"]), kind="run", anomaly=why, test_acc=math.nan,
        time_to_target_s=math.nan, lr=float(TRAINING["lr"]))])


# --- the family contract ------------------------------------------------------------------

def run(scale: str = DEFAULT_SCALE, *, parts: Sequence[str] | None = None,
        log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    """Measure the chosen parts (interleaved trials), flag anomalies, validate and save."""
    p = preset("stragglers", scale)
    chosen = chosen_parts("stragglers", parts, PARTS)
    session = new_session()
    out: dict[str, pd.DataFrame] = {}
    for part in chosen:
        plan, seq = (scenario_plan if part == "scenarios" else momentum_plan)(p)
        experiment = EXPERIMENT[part]
        if log:
            log(f"{experiment}: {len(plan.configs)} configurations x {p['trials']} trial(s), "
                f"interleaved, then {len(seq.configs)} one-worker reference(s) x "
                f"{p['seq_trials']} (deterministic accuracy)")
        one = partial(measure_one, p, experiment=experiment)
        quiet = scale != "quick"
        raw = pd.concat([run_interleaved(plan, one, int(p["trials"]), quiet=quiet, log=log),
                         run_interleaved(seq, one, int(p["seq_trials"]), quiet=quiet,
                                         log=log)], ignore_index=True, sort=False)
        name = RESULTS[PARTS.index(part)]
        out[name] = save_part(raw, name, scale, session, sa.flag)
    return out


def load(scale: str = DEFAULT_SCALE) -> dict[str, pd.DataFrame]:
    return load_saved(RESULTS, scale)


def headlines(frames: Mapping[str, pd.DataFrame]) -> list[analysis.Headline]:
    """The issue's three targets as headlines, each with its verdict in the note."""
    df = frames.get(RESULTS[0])
    scale = str(df["scale"].iloc[0]) if df is not None and len(df) else "standard"
    source = paths.shown(schema.path_of(RESULTS[0], scale))
    why = f"{source} not found: run notebook 05 (study.experiments.stragglers)"
    out = []
    for t in sa.targets(frames):
        if not np.isfinite(t["value"]):
            out.append(analysis.not_measured(t["key"], t["label"], t.get("why") or why))
            continue
        h = analysis.headline_from_point(t["key"], t["label"], t["point"], t["unit"],
                                         value=t["value_col"], source=source, rows=t["rows"],
                                         note=t["verdict"])
        out.append(h)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli("stragglers", __doc__, run, PARTS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
