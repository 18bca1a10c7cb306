"""report/report.typ builds from results/summary.json; every headline number is in the PDF."""

from __future__ import annotations

import re

import pytest

from cnn import study
from cnn import summary as S

pypdf = pytest.importorskip("pypdf", reason="pypdf extracts the PDF text (the dev extra)")
pytest.importorskip("typst", reason="the typst package compiles the report (the dev extra)")


def pdf_text(path) -> tuple[str, int]:
    reader = pypdf.PdfReader(str(path))
    text = "\n".join(page.extract_text() or "" for page in reader.pages)
    return text, len(reader.pages)


def squash(text: str) -> str:
    """Whitespace-free, so a number broken over a line still matches."""
    return re.sub(r"\s+", "", text)


def check_report(summary: dict, out) -> str:
    study.build_report(out=out, summary=summary)
    text, pages = pdf_text(out)
    assert pages >= 8, f"report has {pages} pages"
    flat = squash(text)
    for key, h in summary["headlines"].items():
        if h["status"] == "measured":
            assert squash(h["text"]) in flat, f"{key}: {h['text']!r} missing from the PDF"
        else:
            assert squash(h["label"]) in flat, key
    if any(h["status"] != "measured" for h in summary["headlines"].values()):
        assert "not measured in this build" in text
    return text


def test_report_builds_from_current_results(tmp_path):
    root = S.project_root()
    summary = S.build_summary(root / "results", root / "images", twin=False)
    text = check_report(summary, tmp_path / "report.pdf")
    for section in ("Hardware and software", "The network and the data", "Correctness",
                    "Results", "Communication analysis and cost model", "Threats to validity",
                    "How to reproduce"):
        assert section in text, section
    assert summary["network"]["params_text"] in text
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_prints_every_measured_headline(tmp_path):
    """With every part measured (a small synthetic results folder), all nine numbers appear."""
    from test_study import fake_results

    fake_results(tmp_path / "results")
    summary = S.build_summary(tmp_path / "results", tmp_path / "images", twin=False)
    assert summary["counts"]["measured"] == len(S.HEADLINES)
    check_report(summary, tmp_path / "report.pdf")


def test_report_says_not_measured(tmp_path):
    (tmp_path / "results").mkdir()
    summary = S.build_summary(tmp_path / "results", tmp_path / "images", twin=False)
    text = check_report(summary, tmp_path / "report.pdf")
    reason = summary["headlines"]["gpu_throughput"]["reason"]
    assert squash(reason)[:60] in squash(text)
