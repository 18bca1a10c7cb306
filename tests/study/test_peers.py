"""The peers family: the peers compute what the project computes (real processes at tiny
sizes), plans and commands, the ratios, accuracy differences, fold check and headlines on
frames with known answers, the figures' series, and the skip without torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest

from cnn.metrics import make_row
from study import config, peer_runners, schema
from study.checks import compare
from study.experiments import peers as pe
from study.figures import peers as figs
from study.measure import find_mpiexec, pinned_env

matplotlib.use("agg")

STD = config.preset("peers", "standard")
SESSION = "20260101T000000-abcdef"
MACHINE = dict(host="testhost", cpu="Test CPU (2 cores, 2 threads)", physical_cores=2, gpu=None,
               versions={"numpy": "x"}, commit="abc1234", timestamp="2026-01-01T00:00:00")
FIVE = (0, 1, 2, 3, 4)
#: torch is the optional `compare` extra; CI installs it, so these run there
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason=f"torch not installed: {peer_runners.TORCH_HINT}")


# --- frames with known answers ---------------------------------------------------------

def frame(points: list[dict], session: str = SESSION, scale: str = "standard") -> pd.DataFrame:
    """Run rows per (strategy, workers) with per-trial throughput and accuracy; k-fold
    points get fold rows (``accs`` per trial) too."""
    recs = []
    for pt in points:
        part = pe.part_of(pt["strategy"])
        common = dict(experiment=pe.EXPERIMENT[part], strategy=pt["strategy"],
                      backend="torch" if "torch" in pt["strategy"] else "numba",
                      processes=pt["workers"], threads=1, workers=pt["workers"], device="cpu",
                      model="seed_cnn", dataset="fashion-mnist", batch_size=64,
                      config=pe.config_label(STD, part), **MACHINE)
        for t, (thr, acc) in enumerate(zip(pt["thr"], pt["acc"], strict=True)):
            recs.append(make_row(**common, kind="run", trial=t, samples=1000.0,
                                 samples_per_s=thr, wall_s=1000.0 / thr,
                                 process_wall_s=1000.0 / thr + 5.0, startup_s=5.0,
                                 test_acc=acc))
            for k, a in enumerate(pt.get("accs", [[]] * 5)[t]):
                recs.append(make_row(**common, kind="fold", trial=t, fold=float(k), test_acc=a))
    return schema.rows(recs, scale=scale, session=session)


def pair(part: str, mine: float, peer: float, acc_mine=(0.90,) * 5, acc_peer=(0.90,) * 5,
         **kw) -> list[dict]:
    """Project and peer at 1 and 2 workers: 2 workers at ``mine``/``peer`` samples/s
    (median; trials spread +-2%), 1 worker at 60% of that."""
    a, b = pe.PAIRS[part]
    out = []
    for w, f in ((1, 0.6), (2, 1.0)):
        for s, v, acc in ((a, mine, acc_mine), (b, peer, acc_peer)):
            out.append(dict(strategy=s, workers=w, thr=[f * v * (1 + 0.01 * (i - 2))
                                                        for i in FIVE], acc=list(acc),
                            **kw.get(s, {})))
    return out


# --- plans and commands ---------------------------------------------------------------------

def test_plan_pairs_project_and_peer_at_every_worker_count_that_fits():
    pl = pe.plan(STD, "ddp", cores=2)
    assert [(c["strategy"], c["workers"]) for c in pl.configs] == [
        ("allreduce", 1), ("torch-ddp", 1), ("allreduce", 2), ("torch-ddp", 2)]
    full = config.preset("peers", "full")
    assert [c["workers"] for c in pe.plan(full, "kfold", cores=4).configs] == [1, 1, 2, 2, 4, 4]
    assert STD["trials"] >= 5 and STD["batch_size"] == 64


def test_commands_give_project_and_peer_the_same_training_flags():
    def flags(cmd, part="ddp"):
        shared = pe.train_args(STD, part)
        i = cmd.index("--backend")
        return cmd[i:i + len(shared)]

    ar = pe.command(STD, dict(part="ddp", strategy="allreduce", workers=2))
    ddp = pe.command(STD, dict(part="ddp", strategy="torch-ddp", workers=2))
    assert ar[0] == find_mpiexec() and ar[1:3] == ["-n", "2"]
    assert ar[ar.index("-m") + 1] == "cnn.parallel.mpi" and "allreduce" in ar
    assert ddp[ddp.index("-m") + 1:ddp.index("-m") + 3] == ["study.peer_runners", "ddp"]
    assert ddp[ddp.index("--workers") + 1] == "2"
    assert flags(ar) == flags(ddp) == pe.train_args(STD, "ddp")
    args = pe.train_args(STD, "ddp")
    for flag, value in (("--batch-size", "64"), ("--threads", "1"), ("--lr", "0.05"),
                        ("--momentum", "0.9"), ("--epochs", "3"), ("--subset", "12000")):
        assert args[args.index(flag) + 1] == value
    hw = pe.command(STD, dict(part="hogwild", strategy="hogwild", workers=2))
    thw = pe.command(STD, dict(part="hogwild", strategy="torch-hogwild", workers=2))
    i = thw.index("study.peer_runners")
    assert "cnn.parallel.hogwild" in hw and thw[i + 1:i + 4] == ["hogwild", "--workers", "2"]
    kf = pe.command(STD, dict(part="kfold", strategy="kfold", workers=2))
    jl = pe.command(STD, dict(part="kfold", strategy="joblib-kfold", workers=2))
    assert kf[kf.index("--engines") + 1] == "2" and jl[jl.index("--jobs") + 1] == "2"
    kargs = pe.train_args(STD, "kfold")
    assert kargs[kargs.index("--epochs") + 1] == "2" and kargs[kargs.index("--folds") + 1] == "4"
    assert pe.env()["OMP_NUM_THREADS"] == "1" and pe.env()["NUMBA_NUM_THREADS"] == "1"


def test_fit_run_row_takes_the_first_step_apart():
    raw = pd.DataFrame([dict(wall_s=6.0, compile_s=0.5, step_ms_median=10.0, samples=1000.0,
                             epochs=1.0),
                        dict(wall_s=11.0, compile_s=0.5, step_ms_median=10.0, samples=2000.0,
                             epochs=2.0)])
    row = pe.fit_run_row(raw, workers=2, batch=64).iloc[0]
    assert row["first_step_s"] == pytest.approx(0.51)
    assert row["wall_s"] == pytest.approx(10.49)
    assert row["samples_per_s"] == pytest.approx((2000 - 128) / 10.49)


def test_tidy_keeps_schema_columns_and_puts_everything_else_in_startup():
    raw = pd.DataFrame([make_row(experiment="x", strategy="torch-hogwild", processes=2,
                                 threads=1, samples=1000.0, wall_s=4.0, test_acc=0.8,
                                 process_wall_s=10.0, not_a_column=1, **MACHINE)])
    df = pe.tidy(raw, dict(part="hogwild", strategy="torch-hogwild", workers=2), "c", 64)
    row = df.iloc[0]
    assert row["startup_s"] == pytest.approx(6.0) and row["kind"] == "run"
    assert row["peer"] == "hogwild" and row["experiment"] == "peers_hogwild"
    assert "not_a_column" not in df


# --- analysis -------------------------------------------------------------------------------

def test_ratio_is_project_over_peer_of_the_medians_with_a_ci():
    df = frame(pair("ddp", 300.0, 200.0))
    rat = pe.ratios(df)
    two = rat[(rat["workers"] == 2) & (rat["measure"] == "training")].iloc[0]
    assert two["ratio"] == pytest.approx(1.5)
    assert two["ratio_lo"] < 1.5 < two["ratio_hi"] and two["ratio_hi"] - two["ratio_lo"] < 0.1
    e2e = rat[(rat["workers"] == 2) & (rat["measure"] == "end to end")].iloc[0]
    # 1000 samples in 1000/thr + 5 s: (1000/200 + 5) / (1000/300 + 5)
    assert e2e["ratio"] == pytest.approx(10.0 / (1000 / 300 + 5.0), rel=1e-3)


def test_speedup_is_against_the_best_one_worker_run_of_either_side():
    tp = pe.throughput(frame(pair("hogwild", 300.0, 200.0)), "hogwild")
    two = tp[(tp["strategy"] == "torch-hogwild") & (tp["workers"] == 2)].iloc[0]
    assert two["baseline"] == "hogwild" and two["speedup"] == pytest.approx(200 / 180)


def test_accuracy_difference_is_paired_by_trial_in_points():
    df = frame(pair("hogwild", 300.0, 200.0, acc_mine=(0.90, 0.91, 0.89, 0.90, 0.90),
                    acc_peer=(0.89, 0.90, 0.88, 0.89, 0.89)))
    acc = pe.accuracy(df)
    two = acc[(acc["part"] == "hogwild") & (acc["workers"] == 2)].iloc[0]
    assert two["diff_points"] == pytest.approx(1.0) and two["n"] == 5
    assert two["project_acc"] == pytest.approx(0.90) and two["peer_acc"] == pytest.approx(0.89)


def test_fold_check_wants_the_engines_accuracies_bit_for_bit():
    same = [[0.8, 0.7]] * 5
    off = [[0.8, 0.7]] * 4 + [[0.8, 0.7000001]]
    df = pe.flag(frame(pair("kfold", 100.0, 100.0, kfold={"accs": same},
                            **{"joblib-kfold": {"accs": off}})))
    jl = df[(df["strategy"] == "joblib-kfold") & (df["kind"] == "run")]
    assert jl["fold_acc_match"].tolist() == [True] * 4 + [False] + [True] * 4 + [False]
    bad = jl[jl["fold_acc_match"] == False]  # noqa: E712
    assert bad["anomaly"].str.contains("per-fold accuracies differ").all()
    assert (bad["fold_acc_rel_err"] > 0).all() and (bad["fold_acc_rel_err"] < 1e-6).all()
    assert jl[jl["fold_acc_match"] == True]["fold_acc_rel_err"].eq(0).all()  # noqa: E712


def test_summary_table_reads_one_line_per_part_and_worker_count():
    df = frame(pair("ddp", 300.0, 200.0) + pair("kfold", 100.0, 110.0))
    table = pe.summary_table(df)
    assert list(zip(table["part"], table["workers"], strict=True)) == [
        ("ddp", 1), ("ddp", 2), ("kfold", 1), ("kfold", 2)]
    assert table.iloc[1]["ratio"].startswith("1.50 [")
    assert table.iloc[3]["ratio"].startswith("0.91")


def test_headlines_are_the_two_worker_ratios_with_their_targets():
    df = frame(pair("ddp", 300.0, 200.0) + pair("hogwild", 240.0, 200.0,
                                                acc_mine=(0.90,) * 5, acc_peer=(0.893,) * 5)
               + pair("kfold", 100.0, 110.0))
    hs = {h.key: h for h in pe.headlines({"peers": df})}
    assert list(hs) == ["peers_allreduce_vs_torch_ddp", "peers_hogwild_vs_torch_hogwild",
                        "peers_hogwild_acc_diff", "peers_kfold_vs_joblib",
                        "peers_kfold_vs_joblib_e2e"]
    ddp = hs["peers_allreduce_vs_torch_ddp"]
    assert ddp.value == pytest.approx(1.5) and ddp.lo < 1.5 < ddp.hi and ddp.unit == "x"
    assert "met" in ddp.note and ddp.config == pe.config_label(STD, "ddp")
    assert ddp.trials == 5 and ddp.scale == "standard" and ddp.source.endswith("peers.pkl")
    assert "missed" in hs["peers_hogwild_vs_torch_hogwild"].note
    assert hs["peers_hogwild_acc_diff"].value == pytest.approx(0.7)
    assert "missed" in hs["peers_hogwild_acc_diff"].note
    kf = hs["peers_kfold_vs_joblib"]
    assert kf.value == pytest.approx(100 / 110) and "no slower" in kf.note and "missed" in kf.note


def test_a_part_re_run_alone_keeps_the_other_parts_of_their_own_session():
    old = frame(pair("ddp", 300.0, 200.0) + pair("kfold", 100.0, 110.0),
                session="20260101T000000-aaaaaa")
    new = frame(pair("kfold", 120.0, 100.0), session="20260102T000000-bbbbbb")
    hs = {h.key: h for h in pe.headlines({"peers": pd.concat([new, old], ignore_index=True)})}
    assert hs["peers_allreduce_vs_torch_ddp"].value == pytest.approx(1.5)
    assert hs["peers_allreduce_vs_torch_ddp"].session == "20260101T000000-aaaaaa"
    assert hs["peers_kfold_vs_joblib"].value == pytest.approx(1.2)
    assert hs["peers_kfold_vs_joblib"].session == "20260102T000000-bbbbbb"


def test_without_torch_the_torch_parts_skip_and_say_why(monkeypatch):
    why = "torch is not installed: " + peer_runners.TORCH_HINT
    monkeypatch.setattr(pe, "torch_missing", lambda: why)
    lines: list[str] = []
    assert pe.run("quick", parts=["ddp", "hogwild"], log=lines.append) == {}
    assert lines == [f"peers_ddp: skipped, {why}", f"peers_hogwild: skipped, {why}"]
    hs = {h.key: h for h in pe.headlines({})}
    for key in ("peers_allreduce_vs_torch_ddp", "peers_hogwild_vs_torch_hogwild",
                "peers_hogwild_acc_diff"):
        assert not hs[key].measured and hs[key].note == why and hs[key].text() == "not measured"
    assert "notebooks 04 and 05" in hs["peers_kfold_vs_joblib"].note
    fig = figs.throughput({}, save=False)
    assert why in [t.get_text() for t in fig.axes[0].texts]


@needs_torch
def test_torch_missing_is_empty_where_torch_is_installed():
    assert pe.torch_missing() == ""


# --- figures --------------------------------------------------------------------------------

def test_figures_draw_project_and_peer_with_cis():
    df = frame(pair("ddp", 300.0, 200.0) + pair("hogwild", 240.0, 200.0)
               + pair("kfold", 100.0, 110.0))
    fig = figs.throughput({"peers": df}, save=False)
    assert [len(ax.containers) for ax in fig.axes] == [2, 2, 2]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "allreduce", "torch-ddp"]
    fig = figs.ratio({"peers": df}, save=False)
    assert [len(ax.containers) for ax in fig.axes] == [3, 3]
    assert len(fig.axes[0].get_legend().get_texts()) == 5  # 3 parts, parity, target


def test_figures_without_results_say_so():
    fig = figs.ratio({}, save=False)
    assert all(ax.texts for ax in fig.axes)


# --- the peers compute what the project computes (real processes, tiny sizes) --------------

TINY = ["--dataset", "digits", "--subset", "301", "--batch-size", "16", "--epochs", "2",
        "--max-steps", "20", "--seed", "0", "--lr", "0.05", "--momentum", "0.9",
        "--schedule", "cosine", "--no-progress"]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env=pe.env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def weights(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def same_weights(got: dict, want: dict, tol: float = 1e-4) -> list[str]:
    assert got.keys() == want.keys()
    checks = [compare(got[k], want[k], k, tol) for k in want]
    assert all(c.ok for c in checks), [c.line() for c in checks]
    return [c.line() for c in checks]


@pytest.mark.mpi
@needs_torch
def test_allreduce_and_torch_ddp_give_the_same_weights_after_20_steps(tmp_path):
    """2 ranks, 16 per rank, 301 samples: epoch 1 ends with a short global batch of 13
    (slices of 7 and 6), so DDP's mean over ranks is checked against allreduce's weighting."""
    run([find_mpiexec(), "-n", "2", sys.executable, "-m", "cnn.parallel.mpi", "--strategy",
         "allreduce", "--backend", "numba", "--threads", "1", *TINY,
         "--save-weights", str(tmp_path / "ar.npz"), "--save-metrics", str(tmp_path / "ar.pkl")])
    run([sys.executable, "-m", "study.peer_runners", "ddp", "--workers", "2", *TINY,
         "--save-weights", str(tmp_path / "ddp.npz"), "--save-metrics",
         str(tmp_path / "ddp.pkl")])
    initial = peer_runners.initial_network(
        peer_runners.ddp_parser().parse_args(TINY), (1, 8, 8), 10).state_dict()
    got, want = weights(tmp_path / "ddp.npz"), weights(tmp_path / "ar.npz")
    same_weights(got, want)
    moved = compare(want["0.weight"], initial["0.weight"], tol=1e-4)
    assert not moved.ok, "20 steps must have changed the weights"
    ar, ddp = pd.read_pickle(tmp_path / "ar.pkl"), pd.read_pickle(tmp_path / "ddp.pkl")
    assert ddp["step"].tolist() == ar["step"].tolist() == [10, 20]
    assert ddp["samples"].tolist() == ar["samples"].tolist() == [301, 602]
    assert ddp["test_acc"].tolist() == pytest.approx(ar["test_acc"].tolist(), abs=0.01)
    assert set(ddp["strategy"]) == {"torch-ddp"} and (ddp["torch_threads"] == 1).all()
    assert ddp["torch_version"].iloc[0] == __import__("torch").__version__


@needs_torch
def test_torch_hogwild_with_one_worker_is_sequential_sgd(tmp_path):
    run([sys.executable, "-m", "cnn.train", "--backend", "numba", "--threads", "1", *TINY,
         "--save-weights", str(tmp_path / "seq.npz")])
    run([sys.executable, "-m", "study.peer_runners", "hogwild", "--workers", "1", *TINY,
         "--save-weights", str(tmp_path / "thw.npz")])
    same_weights(weights(tmp_path / "thw.npz"), weights(tmp_path / "seq.npz"))


@needs_torch
def test_torch_hogwild_workers_share_the_epoch_and_the_weights(tmp_path):
    out = tmp_path / "m.pkl"
    run([sys.executable, "-m", "study.peer_runners", "hogwild", "--workers", "2", "--dataset",
         "digits", "--subset", "301", "--batch-size", "16", "--epochs", "2", "--no-progress",
         "--save-metrics", str(out)])
    row = pd.read_pickle(out).iloc[0]
    assert row["strategy"] == "torch-hogwild" and row["processes"] == 2
    assert row["samples"] == 602 and row["updates"] == 2 * 19  # ceil(301 / 16) per epoch
    assert row["torch_threads"] == 1 and row["test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert row["wall_s"] > 0 and row["compile_s"] > 0 and row["pool_startup_s"] > 0


@needs_torch
def test_a_failing_torch_hogwild_worker_is_named_and_nothing_hangs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "study.peer_runners", "hogwild", "--workers",
                          "2", "--dataset", "digits", "--subset", "200", "--epochs", "1",
                          "--lr", "1e12", "--no-progress"], capture_output=True, text=True,
                         timeout=300, env=pinned_env(1))
    assert out.returncode == 2
    assert "error: worker" in out.stderr and "DivergenceError" in out.stderr


def test_joblib_kfold_gives_the_engines_per_fold_accuracies_bit_for_bit(tmp_path):
    args = ["--dataset", "digits", "--subset", "400", "--folds", "3", "--epochs", "1",
            "--backend", "numba", "--threads", "1", "--seed", "0", "--no-progress",
            "--cpu-interval", "0.25"]
    run([sys.executable, "-m", "cnn.parallel.kfold", *args, "--engines", "2", "--timeout",
         "300", "--save-metrics", str(tmp_path / "kf.pkl")])
    run([sys.executable, "-m", "study.peer_runners", "joblib-kfold", *args, "--jobs", "2",
         "--save-metrics", str(tmp_path / "jl.pkl")])
    kf, jl = pd.read_pickle(tmp_path / "kf.pkl"), pd.read_pickle(tmp_path / "jl.pkl")

    def accs(df):
        return df[df["kind"] == "fold"].sort_values("fold")["test_acc"].to_numpy()

    assert len(accs(jl)) == 3 and np.array_equal(accs(jl), accs(kf))
    jrun = jl[jl["kind"] == "run"].iloc[0]
    assert jrun["strategy"] == "joblib-kfold" and jrun["samples"] == kf[kf["kind"] == "run"][
        "samples"].iloc[0]
    assert jrun["warm_workers"] == 2 and jl[jl["kind"] == "fold"]["pid"].nunique() == 2


def test_peer_runner_cli_help_and_bad_runner():
    assert peer_runners.main(["--help"]) == 0
    assert peer_runners.main(["nope"]) == 2
    out = subprocess.run([sys.executable, "-m", "study.peer_runners", "ddp", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--workers" in out.stdout and "--batch-size" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "study.peer_runners", "joblib-kfold", "--jobs",
                          "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--jobs" in bad.stderr.splitlines()[-1]


def test_family_cli_rejects_an_unknown_part(capsys):
    with pytest.raises(SystemExit):
        pe.main(["--scale", "quick", "--parts", "ddp,nope"])
    assert "unknown nope" in capsys.readouterr().err


# --- the family, end to end at quick scale ------------------------------------------------

@pytest.mark.slow
@pytest.mark.mpi
@needs_torch
def test_quick_run_measures_every_pair(tmp_path, monkeypatch):
    from study import paths

    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "results"))
    monkeypatch.setenv(paths.IMAGES_ENV, str(tmp_path / "images"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    frames = pe.run("quick", log=None)
    from study.figures import peers as peers_figures

    peers_figures.draw(frames, "quick")
    df = schema.load_file(tmp_path / "results" / "peers.pkl", strict=True)
    r = df[df["kind"] == "run"]
    assert sorted(zip(r["strategy"], r["workers"], strict=True)) == sorted(
        (s, w) for pair in pe.PAIRS.values() for s in pair for w in (1, 2))
    assert set(df["scale"]) == {"quick"} and df["session"].nunique() == 1
    assert (r["samples_per_s"] > 0).all() and (r["startup_s"] > 0).all()
    torch_rows = r[r["backend"] == "torch"]
    assert len(torch_rows) == 4 and (torch_rows["torch_threads"] == 1).all()
    assert torch_rows["torch_version"].notna().all()
    assert r[r["strategy"] == "joblib-kfold"]["fold_acc_match"].astype(bool).all()
    same = r.groupby("experiment")["samples"].nunique()
    assert (same == 1).all(), "project and peer must train on the same samples"
    assert {p.stem for p in (tmp_path / "images").glob("*.png")} == {"peers_throughput",
                                                                     "peers_ratio"}


def test_a_target_inside_the_interval_is_not_settled():
    assert pe.target_note("hogwild", 1.32, 1.28, 1.39).endswith(
        "not settled (the median is above it, the 95% CI includes it)")
    assert pe.target_note("hogwild", 1.40, 1.35, 1.45) == "target >= 1.3x the peer: met"
    assert pe.target_note("ddp", 1.20, 1.17, 1.23) == "target >= 1.3x the peer: missed"
