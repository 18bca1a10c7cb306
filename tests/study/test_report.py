"""What a reader meets: summary.json, the README table, report.pdf; and the promises that
printing never writes the README, a dirty tree is refused, and a quick study leaves the
committed study alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnn.metrics import make_row
from study import paths, report, schema

ROOT = Path(__file__).resolve().parents[2]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A scratch checkout: a git repo with a README holding the table markers."""
    root = tmp_path / "proj"
    (root / "results").mkdir(parents=True)
    (root / "README.md").write_text(
        f"# x\n\n{report.README_START}\nPLACEHOLDER\n{report.README_END}\n")
    os.chmod(root / "README.md", 0o644)
    git(root, "init", "-q")
    git(root, "-c", "user.email=a@b", "-c", "user.name=t", "add", "-A")
    git(root, "-c", "user.email=a@b", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setenv(paths.ROOT_ENV, str(root))
    monkeypatch.delenv(paths.RESULTS_ENV, raising=False)
    monkeypatch.delenv(paths.IMAGES_ENV, raising=False)
    monkeypatch.setattr(report, "commit_state",
                        lambda: (git(root, "rev-parse", "--short", "HEAD").strip(),
                                 bool(git(root, "status", "--porcelain",
                                          "--untracked-files=no").strip())))
    return root


def baseline_rows(acc: float = 0.9):
    raw = [make_row(experiment="baseline_fashion_mnist", strategy="sequential",
                    backend="numpy", processes=1, threads=1, device="cpu", model="seed_cnn",
                    dataset="fashion-mnist", batch_size=64, epoch=e, test_acc=acc,
                    samples_per_s=1000.0 + e, config="seed_cnn fashion-mnist b64")
           for e in range(1, 6)]
    return schema.rows(raw, scale="standard", session="s")


def test_summary_reports_the_saved_numbers(repo):
    schema.save(baseline_rows(0.9123), "baseline_fashion_mnist")
    s = report.build_summary("standard")
    h = next(h for h in s["headlines"] if h["key"] == "baseline_accuracy")
    assert h["value"] == pytest.approx(0.9123) and h["text"] == "91.23%"
    rate = next(h for h in s["headlines"] if h["key"] == "baseline_throughput")
    assert rate["value"] == pytest.approx(1003.0)
    assert any("91.23%" in f for f in s["findings"])


def test_printing_a_summary_never_writes_the_readme(repo):
    schema.save(baseline_rows(), "baseline_fashion_mnist")
    before = (repo / "README.md").read_bytes()
    report.main_summary("standard", readme=False, draft=True)
    assert (repo / "README.md").read_bytes() == before
    report.main_summary("standard", readme=True, draft=True)
    text = (repo / "README.md").read_text()
    assert "90.00%" in text and "PLACEHOLDER" not in text
    assert oct((repo / "README.md").stat().st_mode & 0o777) == oct(0o644)


def test_a_dirty_tree_is_refused_unless_draft(repo):
    (repo / "README.md").write_text("changed\n")
    with pytest.raises(report.DirtyTree, match="--draft"):
        report.build_summary("standard")
    assert report.build_summary("standard", draft=True)["draft"] is True


def test_report_pdf_carries_the_numbers_and_the_draft_mark(repo):
    pypdf = pytest.importorskip("pypdf")
    schema.save(baseline_rows(0.9123), "baseline_fashion_mnist")
    later = baseline_rows(0.9123).assign(session="t", samples_per_s=lambda d: d.samples_per_s + 7)
    schema.save(later, "baseline_fashion_mnist")  # a second sitting: pooled
    shutil.copytree(ROOT / "report", repo / "report")
    s = report.build_summary("standard", draft=True)
    s["reproduction"] = [{"checked": "2026-01-01 00:00 UTC", "families": ["baseline"],
                          "rerun_sessions": ["r"], "committed_sessions": ["c"], "inside": 1,
                          "compared": 1, "rows": [
                              {"label": "Sequential throughput", "committed": "1,003 [1,001, "
                               "1,005]", "rerun": "1,004 [1,002, 1,006]", "inside": True},
                              {"label": "Cost model error", "committed": "5.9%",
                               "rerun": "23.1%", "inside": None}]}]
    pdf = report.build_report(s, repo / "out.pdf")
    text = "\n".join(p.extract_text() for p in pypdf.PdfReader(pdf).pages)
    assert "91.23%" in text and "DRAFT" in text
    assert "1 of 1 inside" in text and "1,004 [1,002, 1,006]" in text and "n/a" in text
    assert "Headlines by sitting" in text and "1,010 [1,008, 1,012]" in text  # newest
    [pooled] = [h for h in s["headlines"] if h["key"] == "baseline_throughput"]
    assert pooled["value"] == pytest.approx(1006.5, abs=1) and pooled["lo"] < 1001
    assert pooled["hi"] > 1012 and pooled["text"] in text  # median, re-run interval


@pytest.mark.slow
def test_quick_study_in_a_fresh_clone_leaves_the_committed_study_alone(tmp_path):
    """make study SCALE=quick in a clone: nothing tracked changes (results, images,
    notebooks, README, report.pdf); its outputs land under build/quick."""
    clone = tmp_path / "clone"
    git(ROOT, "clone", "-q", str(ROOT), str(clone))
    env = {**os.environ, "PYTHONPATH": str(clone), "MPLBACKEND": "agg",
           paths.ROOT_ENV: str(clone)}
    env.pop(paths.RESULTS_ENV, None)
    env.pop(paths.IMAGES_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "study", "all", "--scale", "quick",
                           "--only", "01,06"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert git(clone, "status", "--porcelain") == ""
    assert (clone / "build" / "quick" / "report.pdf").is_file()
    assert (clone / "build" / "quick" / "notebooks" / "01_sequential_baseline.ipynb").is_file()


def test_the_abstract_leads_with_measured_unflagged_key_findings_in_order():
    from study.analysis import Headline, not_measured
    heads = [Headline("hogwild_speedup_b32", "HOGWILD", 1.9, 1.8, 2.0, "x", trials=5),
             Headline("mpi_weak_allreduce", "MPI weak", 0.9, 0.8, 0.95, "%", trials=5),
             Headline("stragglers_slow4x_sooner", "slow", 2.4, 2.2, 3.4, "x", trials=5,
                      anomaly="95% CI too wide"),
             not_measured("cuda_vs_torch", "CUDA", "no GPU"),
             Headline("unlisted", "not a key finding", 3.0, 2.9, 3.1, "x", trials=5)]
    lines = report.key_findings(heads)
    assert [line.split(":")[0] for line in lines] == ["MPI weak", "HOGWILD"]
    assert "[" in lines[0]  # its interval goes with it


def test_a_key_finding_whose_size_varies_but_direction_holds_is_listed_apart():
    from study.analysis import Headline
    wide = "the re-run interval over 4 sittings [1.4, 2.6] is wider than 20% of the median 1.9"
    heads = [Headline("hogwild_speedup_b32", "HOGWILD", 1.9, 1.4, 2.6, "x", trials=5,
                      anomaly=wide),
             Headline("numba1t_vs_torch1t_seed", "Numba/torch", 1.0, 0.5, 2.3, "x",
                      trials=5, anomaly=wide),  # straddles 1x: no direction either
             Headline("peers_kfold_vs_joblib_e2e", "k-fold/joblib", 0.72, 0.56, 0.95, "x",
                      trials=5, anomaly=wide),
             Headline("stragglers_slow4x_sooner", "slow", 2.4, 2.2, 3.4, "x", trials=5,
                      anomaly="efficiency 1.2 > 1.05")]  # a flag of another kind
    assert report.key_findings(heads) == []
    lines = report.directional_findings(heads)
    assert [line.split(":")[0] for line in lines] == ["HOGWILD", "k-fold/joblib"]
    assert "above 1x" in lines[0] and "below 1x" in lines[1]
    assert "[1.40, 2.60]" in lines[0] and "wider than 20% of the median" not in lines[0]
    table = report.readme_table({"key_findings": [], "directional_findings": lines,
                                 "headlines": []})
    assert "Directions that reproduce" in table and "Every headline" in table
