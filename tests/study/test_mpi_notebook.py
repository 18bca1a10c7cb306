"""Notebook 04 is thin and redraws from saved results (``measure = False``) without
measuring; its measuring path at quick scale is run by tests/test_notebooks.py."""

from __future__ import annotations

import nbformat
import pytest
from test_mpi_study import accuracy_frame, costmodel_frame, scaling_frame

from study import paths, schema
from study.experiments import mpi_analysis as A

papermill = pytest.importorskip("papermill")

NOTEBOOK = paths.notebooks_dir() / "04_mpi_data_parallel.ipynb"
FIGURES = {"mpi_speedup", "mpi_comm_split", "mpi_amortisation", "mpi_hybrid", "mpi_accuracy",
           "mpi_costmodel_check", "mpi_costmodel_extrapolation"}


def execute(tmp_path, monkeypatch, **params) -> nbformat.NotebookNode:
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "results"))
    monkeypatch.setenv(paths.IMAGES_ENV, str(tmp_path / "images"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=params, cwd=str(tmp_path),
                               progress_bar=False, kernel_name="python3")
    nb = nbformat.read(out, as_version=4)
    errors = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert not errors, errors
    return nb


def outputs(nb: nbformat.NotebookNode) -> str:
    return "\n".join(str(o.get("data", {}).get(kind, "")) + str(o.get("text", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     for kind in ("text/plain", "text/html"))


def test_notebook_is_thin():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert "measure = True" in code[0].source and 'scale = "standard"' in code[0].source
    assert not any("def " in c.source or "class " in c.source for c in code)
    assert not any(c.get("outputs") for c in code), "committed without outputs"
    assert max(len(c.source.splitlines()) for c in code) <= 10  # imports + a table


def test_notebook_redraws_saved_results(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "results"))
    schema.save(scaling_frame(), A.SCALING)
    schema.save(accuracy_frame(), A.ACCURACY)
    schema.save(costmodel_frame(), A.COSTMODEL)
    nb = execute(tmp_path, monkeypatch, scale="standard", measure=False)
    assert {p.stem for p in (tmp_path / "images").glob("*.png")} == FIGURES
    text = outputs(nb)
    assert "not re-run: measure = False" in text  # the engines demo measures nothing
    assert "90.0% [" in text  # allreduce weak efficiency at P = 2
    assert "+0.50 pts" in text  # allreduce accuracy vs sequential
    assert "rank 0 serves" in text  # the server's one-worker point explained


def test_notebook_without_results_says_not_measured(tmp_path, monkeypatch):
    nb = execute(tmp_path, monkeypatch, scale="standard", measure=False)
    assert "not measured" in outputs(nb)
    assert {p.stem for p in (tmp_path / "images").glob("*.png")} == FIGURES
