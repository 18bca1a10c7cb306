"""cnn.summary (headlines from the pickles, "not measured" when absent) and the cnn.study runner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from cnn import summary as S
from cnn.results import make_row, save_results, to_frame

HOST = "testhost"
MACHINE = dict(cpu="Test CPU (4 cores, 4 threads)", gpu=None, versions={"python": "3.12"},
               commit="abc1234", timestamp="2026-01-01T00:00:00+00:00")


def row(**kw):
    base = dict(host=HOST, device="cpu", **MACHINE)
    base.update(kw)
    return make_row(**base)


def fake_results(folder: Path, parts=("baseline", "bench_cpu", "mpi", "hogwild", "kfold",
                                      "bench_gpu", "costmodel")) -> dict[str, pd.DataFrame]:
    """A small results folder in the shapes the other notebooks write."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    if "baseline" in parts:
        rows = [row(experiment="baseline_fashion_mnist", strategy="sequential", backend="numpy",
                    processes=1, threads=1, model="seed_cnn", dataset="fashion-mnist",
                    batch_size=64, epochs=e, epoch=e, samples=60000 * e, wall_s=100.0 * e,
                    samples_per_s=sps, test_acc=acc, final_loss=1.0 / e, train_loss=1.0 / e,
                    test_loss=1.1 / e, complete_epoch=True)
                for e, sps, acc in ((1, 590.0, 0.81), (2, 600.0, 0.86), (3, 610.0, 0.8912))]
        out["baseline_fashion_mnist.pkl"] = to_frame(rows)
    if "bench_cpu" in parts:
        rows = []
        for b in (32, 128):
            common = dict(experiment="bench_cpu", model="seed_cnn", dataset="synthetic",
                          batch_size=b, processes=1, input_shape="3x32x32", filters="32,64")
            rows.append(row(strategy="sequential", backend="numpy", threads=1,
                            samples_per_s=100.0 * (b / 32), step_ms_median=10.0,
                            step_ms_iqr=1.0, **common))
            rows.append(row(strategy="torch", backend="torch", threads=1,
                            samples_per_s=400.0 * (b / 32), **common))
            for t, f in ((1, 1.5), (2, 2.5)):
                rows.append(row(strategy="numba", backend="numba", threads=t,
                                samples_per_s=100.0 * (b / 32) * f, **common))
        rows.append(row(strategy="gemm-ceiling", backend="numpy", threads=1,
                        samples_per_s=float("nan"), experiment="bench_cpu"))
        out["bench_cpu.pkl"] = to_frame(rows)
    if "mpi" in parts:
        rows = []
        for mode in ("strong", "weak"):
            rows.append(row(experiment="mpi_scaling", strategy="sequential", backend="numpy",
                            processes=1, threads=1, model="seed_cnn", dataset="synthetic",
                            batch_size=64, samples_per_s=500.0, wall_s=10.0, comm_s=0.0,
                            scaling=mode))
            for p in (1, 2, 4):
                eff = {"strong": {1: 1.0, 2: 0.9, 4: 0.75}, "weak": {1: 1.0, 2: 0.95,
                                                                     4: 0.875}}[mode][p]
                rows.append(row(experiment="mpi_scaling", strategy="allreduce",
                                backend="numpy", processes=p, threads=1, model="seed_cnn",
                                dataset="synthetic", batch_size=64,
                                samples_per_s=500.0 * p * eff, wall_s=10.0 / (p * eff),
                                comm_s=0.1 * p, scaling=mode))
        out["mpi_scaling.pkl"] = to_frame(rows)
    if "hogwild" in parts:
        rows = [row(experiment="hogwild", strategy="sequential", backend="numpy", processes=1,
                    threads=1, model="seed_cnn", dataset="digits", samples_per_s=1000.0,
                    wall_s=20.0, test_acc=0.95)]
        rows += [row(experiment="hogwild", strategy="hogwild", backend="numpy", processes=w,
                     threads=1, model="seed_cnn", dataset="digits", samples_per_s=1000.0 * s,
                     wall_s=20.0 / s, test_acc=0.94) for w, s in ((1, 0.95), (2, 1.8))]
        out["hogwild.pkl"] = to_frame(rows)
    if "kfold" in parts:
        common = dict(experiment="kfold", backend="numpy", threads=1, model="seed_cnn",
                      dataset="digits", folds=2)
        rows = []
        for strategy, engines, wall in (("sequential", 1, 60.0), ("kfold", 2, 40.0)):
            rows += [row(kind="fold", fold=k, strategy=strategy, processes=engines,
                         wall_s=wall / 2, test_acc=0.95, **common) for k in range(2)]
            rows.append(row(kind="run", strategy=strategy, processes=engines, wall_s=wall,
                            test_acc=0.96, cpu_times=[0.5, 1.0],
                            cpu_samples=[[90.0, 10.0 * engines], [95.0, 20.0 * engines]],
                            **common))
        out["kfold.pkl"] = to_frame(rows)
    if "costmodel" in parts:
        out["mpi_costmodel.pkl"] = pd.DataFrame(
            [dict(network=n, processes=p, alpha_s=a, weak_efficiency=1 / (1 + p * a * 1e3),
                  strong_efficiency=1 / (1 + p * a * 2e3))
             for n, a in (("10GbE", 30e-6), ("IB-100G", 1.5e-6)) for p in (16, 64, 1024)])
    if "bench_gpu" in parts:
        common = dict(experiment="bench_gpu", model="seed_cnn", dataset="synthetic",
                      processes=1, threads=1, input_shape="3x32x32", filters="32,64")
        rows = [row(strategy="cuda", backend="cuda", host="gpuhost", device="cuda:0",
                    gpu="Test GPU", batch_size=b, samples_per_s=sps, **common)
                for b, sps in ((128, 20000.0), (256, 30000.0))]
        out["bench_gpu.pkl"] = to_frame(rows)
    for name, df in out.items():
        save_results(df, folder / name)
    return out


# --------------------------------------------------------------------------- summary


@pytest.fixture
def full_summary(tmp_path):
    frames = fake_results(tmp_path / "results")
    return S.build_summary(tmp_path / "results", tmp_path / "images", twin=False), frames


def test_summary_headlines_match_the_pickles(full_summary):
    summary, frames = full_summary
    h = summary["headlines"]
    assert all(v["status"] == "measured" for v in h.values()), {
        k: v.get("reason") for k, v in h.items() if v["status"] != "measured"}
    # every measured value is traceable: recompute it from the rows it names
    base = frames["baseline_fashion_mnist.pkl"]
    acc = h["baseline_accuracy"]
    assert acc["source"].endswith("results/baseline_fashion_mnist.pkl")
    assert acc["column"] == "test_acc" and acc["host"] == HOST and acc["device"] == "cpu"
    assert acc["value"] == base.loc[acc["rows"][0], "test_acc"] == 0.8912
    assert acc["text"] == "89.12%"
    thr = h["baseline_throughput"]
    assert thr["value"] == pytest.approx(np.median(base.loc[thr["rows"], "samples_per_s"]))
    assert thr["value"] == 600.0 and thr["text"] == "600"

    bench = frames["bench_cpu.pkl"]
    r = h["numpy_vs_torch_1thread"]
    a, b = r["rows"]
    sps = bench["samples_per_s"]
    assert r["value"] == pytest.approx(sps[a] / sps[b])
    assert (bench.loc[a, "backend"], bench.loc[b, "backend"]) == ("numpy", "torch")
    assert r["batch_size"] == 128 and r["value"] == pytest.approx(0.25)
    n = h["numba_best_speedup"]
    assert n["value"] == pytest.approx(2.5) and n["threads"] == 2 and n["text"] == "2.50x"

    assert h["mpi_strong_efficiency"]["value"] == pytest.approx(0.75)
    assert h["mpi_strong_efficiency"]["processes"] == 4
    assert h["mpi_strong_efficiency"]["text"] == "75.0%"
    assert h["mpi_weak_efficiency"]["value"] == pytest.approx(0.875)
    assert h["mpi_strong_efficiency"]["karp_flatt_serial_fraction"] == pytest.approx(
        (1 / 3 - 1 / 4) / (3 / 4))
    assert h["hogwild_speedup"]["value"] == pytest.approx(1.8)
    assert h["hogwild_speedup"]["workers"] == 2
    assert h["kfold_speedup"]["value"] == pytest.approx(1.5)
    assert h["kfold_speedup"]["column"] == "wall_s"
    assert frames["kfold.pkl"].loc[h["kfold_speedup"]["rows"], "kind"].eq("run").all()
    cm = summary["costmodel"]
    assert cm["status"] == "measured" and cm["processes"] == [16, 64, 1024]
    assert {(e["network"], e["column"]) for e in cm["extrapolated"]} == {
        (n, c) for n in ("10GbE", "IB-100G") for c in ("weak_efficiency", "strong_efficiency")}
    g = h["gpu_throughput"]
    assert g["value"] == 30000.0 and g["host"] == "gpuhost" and g["device"] == "cuda:0"
    assert g["gpu"] == "Test GPU" and g["text"] == "30,000"
    # every measured headline names file, host, device, column and rows
    for v in h.values():
        assert {"source", "host", "device", "column", "rows", "selection", "text"} <= set(v)
    assert summary["counts"] == {"measured": 9, "not_measured": 0}
    assert {x["host"] for x in summary["hosts"]} == {HOST, "gpuhost"}
    assert "results/bench_cpu.pkl" in " ".join(summary["synthetic_files"])
    assert summary["conclusions"] and not any("Not measured" in c
                                              for c in summary["conclusions"])


def test_summary_marks_missing_results_not_measured(tmp_path):
    fake_results(tmp_path / "results", parts=("baseline",))
    (tmp_path / "results" / "hogwild.pkl").write_bytes(b"not a pickle")
    summary = S.build_summary(tmp_path / "results", tmp_path / "images", twin=False)
    h = summary["headlines"]
    assert h["baseline_accuracy"]["status"] == "measured"
    for key in ("numpy_vs_torch_1thread", "numba_best_speedup", "mpi_strong_efficiency",
                "mpi_weak_efficiency", "hogwild_speedup", "kfold_speedup", "gpu_throughput"):
        assert h[key]["status"] == "not measured", key
        assert h[key]["reason"] and "value" not in h[key] and "text" not in h[key]
    assert "bench_cpu.pkl not found" in h["numba_best_speedup"]["reason"]
    assert "could not be read" in h["hogwild_speedup"]["reason"]
    assert summary["costmodel"]["status"] == "not measured"
    assert any("Not measured in this build" in c for c in summary["conclusions"])


def test_summary_reads_unlabelled_and_odd_columns_defensively(tmp_path):
    """MPI rows without a weak/strong label are not guessed; a baseline without epochs works."""
    folder = tmp_path / "results"
    folder.mkdir()
    save_results([row(experiment="mpi_allreduce", strategy="allreduce", processes=p,
                      samples_per_s=100.0 * p) for p in (1, 2)], folder / "mpi_allreduce.pkl")
    save_results([row(strategy="sequential", test_acc=0.5, samples_per_s=10.0)],
                 folder / "baseline_fashion_mnist.pkl")
    summary = S.build_summary(folder, tmp_path / "images", twin=False)
    h = summary["headlines"]
    assert h["mpi_strong_efficiency"]["status"] == "not measured"
    assert "no weak/strong label" in h["mpi_strong_efficiency"]["reason"]
    assert h["baseline_accuracy"]["value"] == 0.5


def test_jit_dominated_rows_are_left_out_of_speedups(tmp_path):
    """A baseline whose wall time is mostly JIT compilation would inflate every speedup."""
    folder = tmp_path / "results"
    folder.mkdir()
    rows = [row(experiment="hogwild", strategy="sequential", processes=1, samples_per_s=10.0,
                wall_s=45.0, compile_s=44.0),
            row(experiment="hogwild", strategy="sequential", processes=1, samples_per_s=400.0,
                wall_s=2.0, compile_s=0.0),
            row(experiment="hogwild", strategy="hogwild", processes=2, samples_per_s=600.0,
                wall_s=1.5, compile_s=0.1)]
    save_results(rows, folder / "hogwild.pkl")
    summary = S.build_summary(folder, tmp_path / "images", twin=False)
    assert summary["headlines"]["hogwild_speedup"]["value"] == pytest.approx(1.5)
    assert summary["excluded_from_speedups"][0]["rows"] == [0]
    frames, _ = S.load_frames(folder)
    assert S.speedup_frame(frames)["speedup"].tolist() == pytest.approx([1.5])


def test_summary_cli_writes_json_atomically(tmp_path):
    fake_results(tmp_path / "results", parts=("baseline", "kfold"))
    out = tmp_path / "results" / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "cnn.summary", "--results-dir",
                           str(tmp_path / "results"), "--images-dir", str(tmp_path / "images"),
                           "--no-twin", "--print"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["headlines"]["kfold_speedup"]["value"] == pytest.approx(1.5)
    assert data["headlines"]["gpu_throughput"]["status"] == "not measured"
    assert "not measured" in proc.stdout
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    # strict JSON (no NaN) so typst and any other reader can parse it
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def test_repo_summary_matches_current_results():
    """results/summary.json, regenerated from the pickles now, agrees with them."""
    root = S.project_root()
    summary = S.build_summary(root / "results", root / "images", twin=False)
    frames, _ = S.load_frames(root / "results")
    for key, v in summary["headlines"].items():
        if v["status"] != "measured":
            continue
        df = frames[v["source"]]
        vals = pd.to_numeric(df.loc[v["rows"], v["column"]], errors="coerce")
        assert vals.notna().all(), key
        if v["unit"] in ("test accuracy", "samples/s") and len(v["rows"]) == 1:
            assert v["value"] == pytest.approx(float(vals.iloc[0])), key
        assert math.isfinite(v["value"]), key


# --------------------------------------------------------------------------- runner


def _notebook(path: Path, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('scale = "standard"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"), params] + [
        nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


def test_runner_reports_failing_notebook_and_cell(tmp_path, capsys):
    from cnn import study

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook(nbdir / "01_ok.ipynb", ["x = 1", "assert scale == 'quick', scale"])
    _notebook(nbdir / "02_broken.ipynb", ["y = 2", "# the failing step\nraise ValueError('boom')",
                                          "z = 3"])
    before = (nbdir / "02_broken.ipynb").read_text()
    lines = []
    with pytest.raises(study.StudyError) as err:
        study.run_notebooks(nbdir, scale="quick", log=lines.append)
    msg = str(err.value)
    assert "02_broken.ipynb" in msg and "cell 3" in msg and "# the failing step" in msg
    assert "ValueError: boom" in msg
    assert lines[0].startswith("01_ok") and lines[0].rstrip().endswith("ok")
    assert lines[1].startswith("02_broken") and "FAILED" in lines[1]
    # later numbers are not run; the failing notebook itself is left as it was
    assert len(lines) == 2
    assert (nbdir / "02_broken.ipynb").read_text() == before
    # the successful one was saved in place, with outputs and the injected scale
    ok = nbformat.read(nbdir / "01_ok.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in ok.cells)
    assert not list(nbdir.glob(".*.ipynb"))  # no temp files left behind


def test_runner_skips_missing_notebooks(tmp_path):
    from cnn import study

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook(nbdir / "06_last.ipynb", ["print(scale)"])
    lines = []
    runs = study.run_notebooks(nbdir, scale="quick", log=lines.append)
    assert [r.status for r in runs[:5]] == ["missing (not built yet)"] * 5
    assert runs[0].name == "01_sequential_baseline" and runs[5].status == "ok"
    assert "missing (not built yet)" in lines[2]
    only = study.run_notebooks(nbdir, scale="quick", only=["06"], log=lambda s: None)
    assert [r.name for r in only] == ["06_last"]


def test_study_cli_help():
    for mod in ("cnn.study", "cnn.summary"):
        proc = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and "usage" in proc.stdout


def test_readme_headline_block_is_regenerated(tmp_path):
    from cnn import summary as S

    summary = {"headlines": {
        "baseline_accuracy": {"status": "measured", "text": "92.14%", "host": "h",
                              "device": "cpu", "source": "results/b.pkl", "label": "Acc"},
        "gpu_throughput": {"status": "not measured", "reason": "no GPU", "label": "GPU"}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\n{S.README_START}\nold table\n{S.README_END}\n\nrest\n")
    assert S.update_readme(summary, readme)
    text = readme.read_text()
    assert "old table" not in text and text.endswith("rest\n")
    assert "| Acc | 92.14% | h (cpu) | `results/b.pkl` |" in text
    assert "| GPU | not measured | | no GPU |" in text
    (tmp_path / "plain.md").write_text("no markers\n")
    assert not S.update_readme(summary, tmp_path / "plain.md")


def test_scaling_headline_is_the_widest_run_that_fits_the_cores(tmp_path):
    """On a host with fewer cores than the widest run, the headline is not the
    oversubscribed point."""
    from cnn import summary as S

    fake_results(tmp_path)
    for f in tmp_path.glob("mpi_*.pkl"):
        df = pd.read_pickle(f)
        df["cpu"] = "Test CPU (2 cores, 2 threads)"
        df.to_pickle(f)
    h = S.build_summary(tmp_path, twin=False)["headlines"]
    assert h["mpi_strong_efficiency"]["processes"] == 2
    assert "oversubscribed" not in h["mpi_strong_efficiency"]
