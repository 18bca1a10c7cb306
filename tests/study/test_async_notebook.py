"""Notebook 05 redraws from saved results (``measure = False``) without measuring; its
measuring path at quick scale is run by tests/test_notebooks.py."""

from __future__ import annotations

import nbformat
import pytest
from test_hogwild_study import frame as hogwild_frame
from test_hogwild_study import pinning_frame, seeded
from test_kfold_study import seeded as kfold_seeded

from study import paths, schema

papermill = pytest.importorskip("papermill")

NOTEBOOK = paths.notebooks_dir() / "05_async_hogwild_kfold.ipynb"


def execute(tmp_path, monkeypatch, **params) -> nbformat.NotebookNode:
    monkeypatch.setenv("CNN_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CNN_IMAGES_DIR", str(tmp_path / "images"))
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
    """What the code cells showed: plain text, markdown and HTML tables."""
    return "\n".join(str(o.get("data", {}).get(kind, "")) for c in nb.cells
                     if c.cell_type == "code" for o in c.get("outputs", [])
                     for kind in ("text/plain", "text/markdown", "text/html"))


def test_notebook_is_thin():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert "measure = True" in code[0].source and 'scale = "standard"' in code[0].source
    assert not any("def " in c.source or "class " in c.source for c in code)
    assert not any(c.get("outputs") for c in code), "committed without outputs"


def test_notebook_redraws_saved_results(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_RESULTS_DIR", str(tmp_path / "results"))
    schema.save(hogwild_frame(seeded(32) + seeded(64)), "hogwild_runs")
    schema.save(pinning_frame(33.3, 31.0, 31.2), "hogwild_pinning")
    schema.save(kfold_seeded(), "kfold_runs")
    schema.save(kfold_seeded(3000, 1), "kfold_work")
    nb = execute(tmp_path, monkeypatch, scale="standard", measure=False)
    made = {p.stem for p in (tmp_path / "images").glob("*.png")}
    assert made == {"hogwild_speedup", "hogwild_accuracy", "hogwild_pinning", "kfold_speedup",
                    "kfold_cpu", "kfold_timeline", "peers_throughput", "peers_ratio"}
    text = outputs(nb)
    assert "migration of the lone worker explains" in text
    assert "1.79x" in text and "1.90x" in text  # HOGWILD and k-fold headlines


def test_notebook_without_results_says_not_measured(tmp_path, monkeypatch):
    nb = execute(tmp_path, monkeypatch, scale="standard", measure=False)
    text = outputs(nb)
    assert "not measured" in text
