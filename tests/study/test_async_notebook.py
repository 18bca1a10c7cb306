"""Notebook 05 redraws from saved results (``measure = False``) without measuring; its
measuring path at quick scale is run by tests/test_notebooks.py."""

from __future__ import annotations

from notebook_run import assert_thin, execute, outputs
from test_hogwild_study import frame as hogwild_frame
from test_hogwild_study import pinning_frame, seeded
from test_kfold_study import seeded as kfold_seeded

from study import paths, schema

NOTEBOOK = paths.notebooks_dir() / "05_async_hogwild_kfold.ipynb"


def test_notebook_is_thin():
    assert_thin(NOTEBOOK)


def test_notebook_redraws_saved_results(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_RESULTS_DIR", str(tmp_path / "results"))
    schema.save(hogwild_frame(seeded(32) + seeded(64)), "hogwild_runs")
    schema.save(pinning_frame(33.3, 31.0, 31.2), "hogwild_pinning")
    schema.save(kfold_seeded(), "kfold_runs")
    schema.save(kfold_seeded(3000, 1), "kfold_work")
    nb = execute(NOTEBOOK, tmp_path, monkeypatch, scale="standard", measure=False)
    made = {p.stem for p in (tmp_path / "images").glob("*.png")}
    assert made == {"hogwild_speedup", "hogwild_accuracy", "hogwild_pinning", "kfold_speedup",
                    "kfold_cpu", "kfold_timeline", "peers_throughput", "peers_ratio",
                    "stragglers_time_to_accuracy", "stragglers_scenarios", "stragglers_staleness",
                    "stragglers_momentum"}
    text = outputs(nb)
    assert "migration of the lone worker explains" in text
    assert "1.79x" in text and "1.90x" in text  # HOGWILD and k-fold headlines


def test_notebook_without_results_says_not_measured(tmp_path, monkeypatch):
    nb = execute(NOTEBOOK, tmp_path, monkeypatch, scale="standard", measure=False)
    text = outputs(nb)
    assert "not measured" in text
