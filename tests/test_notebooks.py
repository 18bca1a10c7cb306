"""Every notebook runs top to bottom at scale="quick" with a real kernel, without errors.

They run from a temporary copy, with figures going to a temporary images folder
(``$CNN_IMAGES_DIR``) and results to a temporary copy of results/
(``$CNN_RESULTS_DIR``), so the committed notebooks, images/ and results/ stay
untouched: "open it and rerun the cells" is tested, not assumed.
"""

from __future__ import annotations

import shutil

import nbformat
import pytest

from cnn.summary import project_root

papermill = pytest.importorskip("papermill")

ROOT = project_root()


def run(name: str, tmp_path, monkeypatch, results=None, **params) -> nbformat.NotebookNode:
    src = ROOT / "notebooks" / name
    if not src.is_file():
        pytest.skip(f"{src} not built yet")
    work = tmp_path / "notebooks"
    work.mkdir(exist_ok=True)
    shutil.copy(src, work / name)
    monkeypatch.setenv("CNN_IMAGES_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    if results is not None:
        monkeypatch.setenv("CNN_RESULTS_DIR", str(results))
    out = work / f"out_{name}"
    papermill.execute_notebook(str(work / name), str(out), parameters={"scale": "quick", **params},
                               cwd=str(work), progress_bar=False, kernel_name="python3")
    nb = nbformat.read(out, as_version=4)
    errors = [(i, c.source.splitlines()[0] if c.source else "")
              for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert not errors, errors
    return nb


def test_01_sequential_baseline_quick(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the twin checks need torch (the compare extra)")
    run("01_sequential_baseline.ipynb", tmp_path, monkeypatch)
    made = {p.name for p in (tmp_path / "images").iterdir()}
    for fig in ("baseline_twin", "baseline_curves", "baseline_confusion",
                "baseline_samples_digits"):
        assert {f"{fig}.png", f"{fig}.pdf"} <= made, fig


def test_06_speedup_summary_quick_current_results(tmp_path, monkeypatch):
    nb = run("06_speedup_summary.ipynb", tmp_path, monkeypatch)
    text = "\n".join(str(o.get("data", {}).get("text/markdown", "")) + str(o.get("text", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert text.strip()


def test_06_speedup_summary_quick_every_part(tmp_path, monkeypatch):
    """With results for every part, every section draws its figure."""
    from test_study import fake_results

    fake_results(tmp_path / "results")
    run("06_speedup_summary.ipynb", tmp_path, monkeypatch, results=tmp_path / "results")
    made = {p.stem for p in (tmp_path / "images").glob("*.pdf")}
    assert {"summary_speedup", "summary_throughput", "summary_accuracy", "summary_comm",
            "summary_costmodel", "summary_amdahl", "summary_gpu", "summary_cpu"} <= made


def results_copy(tmp_path):
    """A scratch copy of the committed results: what the notebooks read, where they write."""
    dst = tmp_path / "results"
    shutil.copytree(ROOT / "results", dst)
    return dst


@pytest.mark.parametrize("name, params", [
    ("02_numba_cpu.ipynb", {}),
    ("03_numba_cuda.ipynb", {}),
    ("04_mpi_data_parallel.ipynb", {"hybrid": False}),
    ("05_async_hogwild_kfold.ipynb", {}),
])
def test_measuring_notebooks_quick(name, params, tmp_path, monkeypatch):
    before = {p.name: p.stat().st_mtime for p in (ROOT / "results").glob("*.pkl")}
    run(name, tmp_path, monkeypatch, results=results_copy(tmp_path), **params)
    assert list((tmp_path / "images").glob("*.png")), "a notebook that measures draws figures"
    after = {p.name: p.stat().st_mtime for p in (ROOT / "results").glob("*.pkl")}
    assert after == before, "quick runs must not touch the committed results"
