"""Every notebook runs top to bottom at scale="quick" with a real kernel, in order, into
scratch results and images folders; each writes the results files and figures it promises,
the rows validate strictly against the schema, and notebook 06 reads the others' rows.

The committed notebooks, results/ and images/ are never touched: "open it and rerun the
cells" is tested, not assumed.
"""

from __future__ import annotations

import pytest

from study import notebooks, paths, schema

pytestmark = pytest.mark.slow

#: notebook -> (results files it writes at quick scale, figures it saves)
PROMISES: dict[str, tuple[set[str], set[str]]] = {
    "01_sequential_baseline": ({"twin_check", "baseline_digits"},
                               {"baseline_twin", "baseline_curves", "baseline_confusion",
                                "baseline_samples_digits"}),
    "02_numba_cpu": ({"kernels", "kernel_ladder"},
                     {"kernels_throughput", "kernels_time", "kernels_ladder"}),
    "03_numba_cuda": ({"gpu_simulator_check"}, {"gpu_simulator_check"}),
    "04_mpi_data_parallel": ({"mpi_scaling_runs", "mpi_hybrid_runs", "mpi_accuracy_runs",
                              "mpi_costmodel_runs"},
                             {"mpi_speedup", "mpi_comm_split", "mpi_amortisation", "mpi_hybrid",
                              "mpi_accuracy", "mpi_costmodel_check",
                              "mpi_costmodel_extrapolation"}),
    "05_async_hogwild_kfold": ({"hogwild_runs", "kfold_runs", "peers", "stragglers_runs",
                                "stragglers_momentum"},
                               {"hogwild_speedup", "hogwild_accuracy", "kfold_speedup",
                                "peers_throughput", "peers_ratio",
                                "stragglers_time_to_accuracy", "stragglers_scenarios"}),
    "06_speedup_summary": (set(), {"summary_speedup", "summary_efficiency"}),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv(paths.RESULTS_ENV, str(root / "results"))
    mp.setenv(paths.IMAGES_ENV, str(root / "images"))
    mp.setenv("MPLBACKEND", "agg")
    yield root
    mp.undo()


@pytest.mark.parametrize("name", list(PROMISES))
def test_notebook_runs_at_quick_scale(name, scratch):
    committed = {p.name: p.stat().st_mtime_ns for p in paths.notebooks_dir().glob("*.ipynb")}
    src = paths.notebooks_dir() / f"{name}.ipynb"
    run = notebooks.run_notebook(src, scale="quick", out=scratch / "nb" / f"{name}.ipynb")
    assert run.status == "ok", notebooks.failure_message(run)
    assert {p.name: p.stat().st_mtime_ns for p in paths.notebooks_dir().glob("*.ipynb")} \
        == committed, "a quick run must not rewrite the committed notebooks"
    files, figures = PROMISES[name]
    for stem in files:
        df = schema.load_file(scratch / "results" / f"{stem}.pkl", strict=True)
        assert len(df) and set(df["scale"]) == {"quick"}, stem
        assert df["session"].str.len().min() > 0 and (df["trial"] >= 0).all()
    made = {p.stem for p in (scratch / "images").glob("*.png")}
    assert figures <= made, sorted(figures - made)
