"""The results schema: typed, validated on save and load, scales never replace each other,
files outside the project's results folders are refused."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from cnn.metrics import make_row
from study import paths, schema


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    monkeypatch.delenv(paths.RESULTS_ENV, raising=False)
    (tmp_path / "results").mkdir()
    return tmp_path


def rows(scale="standard", session="s1", n=2, **kw):
    raw = [make_row(experiment="exp", strategy="sequential", backend="numpy", processes=1,
                    threads=1, device="cpu", model="seed_cnn", dataset="digits",
                    batch_size=64, wall_s=1.0 + i, samples_per_s=100.0 + i, **kw)
           for i in range(n)]
    return schema.rows(raw, scale=scale, session=session)


def test_rows_are_typed_and_complete(scratch):
    df = rows()
    assert df["processes"].dtype == np.int64 and df["workers"].tolist() == [1, 1]
    assert set(schema.REQUIRED) <= set(df.columns)
    assert df["physical_cores"].iloc[0] >= 1 and df["anomaly"].tolist() == ["", ""]


def test_missing_required_column_names_the_file_and_column(scratch):
    path = scratch / "results" / "bad.pkl"
    rows().drop(columns=["host"]).to_pickle(path)
    with pytest.raises(schema.SchemaError, match=r"results/bad\.pkl.*'host'"):
        schema.load("bad")


def test_a_text_in_a_number_column_is_refused(scratch):
    df = rows()
    df["wall_s"] = df["wall_s"].astype(object)
    df.loc[0, "wall_s"] = "fast"
    with pytest.raises(schema.SchemaError, match="'wall_s' must be a number, found 'fast'"):
        schema.validate(df)


def test_garbage_file_is_an_error_not_a_skip(scratch):
    (scratch / "results" / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(schema.SchemaError, match="junk.pkl: not a readable results pickle"):
        schema.load_all()


def test_a_file_outside_the_results_folders_is_never_unpickled(scratch, tmp_path_factory):
    evil = tmp_path_factory.mktemp("elsewhere") / "x.pkl"
    marker = evil.parent / "ran"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(schema.SchemaError, match="read only from the project's results"):
        schema.load_file(evil)
    assert not marker.exists()


def test_quick_rows_never_replace_standard_rows(scratch):
    schema.save(rows("standard", "std"), "exp")
    schema.save(rows("quick", "q"), "exp")  # goes to build/quick, not results/
    kept = schema.load("exp", "standard")
    assert set(kept["session"]) == {"std"} and len(kept) == 2
    assert (scratch / "build" / "quick" / "results" / "exp.pkl").is_file()


def test_a_rerun_is_kept_as_a_sitting_beside_the_earlier_ones(scratch):
    first = rows(session="a")
    other = first.copy()
    other["host"] = "elsewhere"
    schema.save(pd.concat([first, other], ignore_index=True), "exp")
    schema.save(rows(session="b"), "exp")
    df = schema.load("exp")
    here = first["host"][0]
    assert sorted(zip(df["host"], df["session"], strict=True)) == sorted(
        [("elsewhere", "a")] * 2 + [(here, "a")] * 2 + [(here, "b")] * 2)


def test_the_same_sitting_saved_again_replaces_itself_and_only_five_are_kept(scratch):
    for session in ("s1", "s2", "s3", "s3", "s4", "s5", "s6"):
        schema.save(rows(session=session), "exp")
    df = schema.load("exp")
    assert sorted(set(df["session"])) == ["s2", "s3", "s4", "s5", "s6"]
    assert (df["session"].value_counts() == 2).all()


def test_replace_drops_the_earlier_sittings(scratch, monkeypatch):
    schema.save(rows(session="a"), "exp")
    monkeypatch.setenv(schema.REPLACE_ENV, "1")
    schema.save(rows(session="b"), "exp")
    assert set(schema.load("exp")["session"]) == {"b"}


def test_strict_validation_names_an_undeclared_column(scratch):
    df = rows()
    df["made_up"] = 1
    schema.validate(df)
    with pytest.raises(schema.SchemaError, match="'made_up' is not in study/schema.py"):
        schema.validate(df, strict=True)


def test_export_csv_round_trips_the_numbers(scratch):
    schema.save(rows(), "exp")
    out = schema.export("exp", scratch / "exp.csv")
    back = pd.read_csv(out)
    assert back["wall_s"].tolist() == [1.0, 2.0]
    assert back["samples_per_s"].tolist() == [100.0, 101.0]


def test_committed_results_match_the_schema_strictly():
    """Every committed results file validates, and declares every column it has."""
    folder = paths.project_root() / "results"
    files = sorted(folder.glob("*.pkl"))
    for p in files:
        try:
            schema.load_file(p, strict=True)
        except schema.SchemaError as exc:
            pytest.fail(str(exc))
