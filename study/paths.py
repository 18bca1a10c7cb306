"""Where the study's files live: the project root, results/, images/, and the scratch
folders of quick runs. Defined once; every other module asks here.

A quick run is a smoke test, not a measurement: by default it writes under
``build/quick/`` so it can never replace the committed standard-scale study
(docs/DESIGN.md, "Results"). ``$CNN_RESULTS_DIR`` / ``$CNN_IMAGES_DIR`` redirect either.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "CNN_STUDY_ROOT"
RESULTS_ENV = "CNN_RESULTS_DIR"
IMAGES_ENV = "CNN_IMAGES_DIR"

#: Scales whose rows are the study's numbers and live in the committed folders.
COMMITTED_SCALES = ("standard", "full")


def project_root() -> Path:
    """The checkout: ``$CNN_STUDY_ROOT``, else the folder above this package."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def scratch_dir(scale: str) -> Path:
    """Where a run that is not a committed measurement writes (``build/<scale>``)."""
    return project_root() / "build" / scale


def results_dir(scale: str = "standard") -> Path:
    """``$CNN_RESULTS_DIR``, else ``results/`` for committed scales, else the scratch folder."""
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env)
    if scale in COMMITTED_SCALES:
        return project_root() / "results"
    return scratch_dir(scale) / "results"


def images_dir(scale: str = "standard") -> Path:
    """``$CNN_IMAGES_DIR``, else ``images/`` for committed scales, else the scratch folder."""
    env = os.environ.get(IMAGES_ENV)
    if env:
        return Path(env)
    if scale in COMMITTED_SCALES:
        return project_root() / "images"
    return scratch_dir(scale) / "images"


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def report_source() -> Path:
    return project_root() / "report" / "report.typ"


def report_pdf() -> Path:
    return project_root() / "report.pdf"


def readme() -> Path:
    return project_root() / "README.md"


def shown(path: str | os.PathLike) -> str:
    """``path`` relative to the project root when it lies inside it (for tables and logs)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(project_root()).as_posix()
    except ValueError:
        return str(p)
