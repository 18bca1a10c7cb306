"""The committed study agrees with itself: results/summary.json and the README's table are
what `python -m study summary --readme` gives from the committed results/*.pkl. A result
re-measured without regenerating the summary (or a hand-edited table) fails here."""

from __future__ import annotations

import json
import math

import pytest

from study import paths, report


@pytest.fixture(scope="module")
def rebuilt():
    return report.jsonable(report.build_summary("standard", draft=True))


@pytest.fixture(scope="module")
def committed():
    return json.loads((paths.project_root() / "results" / report.SUMMARY).read_text())


def same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def test_summary_json_holds_the_committed_results_headlines(rebuilt, committed):
    now = {h["key"]: h for h in rebuilt["headlines"]}
    then = {h["key"]: h for h in committed["headlines"]}
    assert list(now) == list(then), "headline keys changed: run python -m study summary"
    stale = [k for k in now for field in ("value", "lo", "hi", "trials", "anomaly", "source")
             if not same(now[k].get(field), then[k].get(field))]
    assert not stale, f"results/summary.json is stale for {sorted(set(stale))}"


def test_readme_table_is_the_generated_one(committed):
    text = paths.readme().read_text()
    start, end = text.find(report.README_START), text.find(report.README_END)
    assert 0 <= start < end, "README lost its headline markers"
    table = text[text.index("\n", start) + 1:end].strip()
    assert table == report.readme_table(committed).strip(), \
        "README table differs from results/summary.json: run python -m study summary --readme"


def test_committed_notebooks_show_their_figures():
    """Saved with outputs, and the figures among them as images (a kernel run under
    MPLBACKEND=agg would have saved only '<Figure size ...>')."""
    import nbformat
    for path in sorted(paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert outputs, f"{path.name} committed without outputs"
        assert not [o for o in outputs if o.get("output_type") == "error"], path.name
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert images, f"{path.name}: no figure saved as an image"
