"""Run a notebook the way a reader does (papermill, results and images redirected to a
scratch folder) and read back what its cells showed: shared by the notebook tests."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from study import paths


def execute(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            **params: object) -> nbformat.NotebookNode:
    """Execute ``notebook`` with ``params``; fail naming the first line of any cell that
    raised."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "results"))
    monkeypatch.setenv(paths.IMAGES_ENV, str(tmp_path / "images"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(notebook), str(out), parameters=params, cwd=str(tmp_path),
                               progress_bar=False, kernel_name="python3")
    nb = nbformat.read(out, as_version=4)
    errors = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert not errors, errors
    return nb


def outputs(nb: nbformat.NotebookNode) -> str:
    """What the code cells showed: streams, plain text, markdown and HTML tables."""
    return "\n".join(str(o.get("data", {}).get(kind, "")) + str(o.get("text", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     for kind in ("text/plain", "text/markdown", "text/html"))


def assert_thin(notebook: Path) -> None:
    """A parameters cell first (``scale``, ``measure``), no definitions in any cell, and
    the committed outputs free of errors."""
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert "measure = True" in code[0].source and 'scale = "standard"' in code[0].source
    assert not any("def " in c.source or "class " in c.source for c in code)
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])), \
        "committed with an error in its outputs"
