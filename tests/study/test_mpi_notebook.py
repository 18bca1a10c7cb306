"""Notebook 04 is thin and redraws from saved results (``measure = False``) without
measuring; its measuring path at quick scale is run by tests/test_notebooks.py."""

from __future__ import annotations

from notebook_run import assert_thin, execute, outputs
from test_mpi_study import accuracy_frame, costmodel_frame, scaling_frame

from study import paths, schema
from study.experiments import mpi_analysis as A

NOTEBOOK = paths.notebooks_dir() / "04_mpi_data_parallel.ipynb"
FIGURES = {"mpi_speedup", "mpi_comm_split", "mpi_amortisation", "mpi_hybrid", "mpi_accuracy",
           "mpi_costmodel_check", "mpi_costmodel_extrapolation"}


def test_notebook_is_thin():
    assert_thin(NOTEBOOK)


def test_notebook_redraws_saved_results(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "results"))
    schema.save(scaling_frame(), A.SCALING)
    schema.save(accuracy_frame(), A.ACCURACY)
    schema.save(costmodel_frame(), A.COSTMODEL)
    nb = execute(NOTEBOOK, tmp_path, monkeypatch, scale="standard", measure=False)
    assert {p.stem for p in (tmp_path / "images").glob("*.png")} == FIGURES
    text = outputs(nb)
    assert "not re-run: measure = False" in text  # the engines demo measures nothing
    assert "90.0% [" in text  # allreduce weak efficiency at P = 2
    assert "+0.50 pts" in text  # allreduce accuracy vs sequential
    assert "rank 0 serves" in text  # the server's one-worker point explained


def test_notebook_without_results_says_not_measured(tmp_path, monkeypatch):
    nb = execute(NOTEBOOK, tmp_path, monkeypatch, scale="standard", measure=False)
    assert "not measured" in outputs(nb)
    assert {p.stem for p in (tmp_path / "images").glob("*.png")} == FIGURES
