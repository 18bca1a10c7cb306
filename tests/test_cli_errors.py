"""Every CLI refuses bad input at parse time, before any data loads or process starts: one
line naming the flag, exit status 2, no traceback. Output paths are checked before
training, naming the path the user typed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnn import cli
from cnn import train as train_cli
from cnn.parallel import costmodel, hogwild, kfold
from cnn.parallel import mpi as mpi_cli

#: The CLIs that train, with their entry point (mpi: its parser, see mpi_refuses).
TRAINING = {"train": train_cli.main, "hogwild": hogwild.main, "kfold": kfold.main}

#: Bad values of the shared training flags, and what the one-line error must say.
SHARED = [
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--batch-size", "-5"], "argument --batch-size: must be an integer >= 1, got -5"),
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["--epochs", "-1"], "argument --epochs: must be an integer >= 1, got -1"),
    (["--max-steps", "0"], "argument --max-steps: must be an integer >= 1, got 0"),
    (["--max-steps", "-1"], "argument --max-steps: must be an integer >= 1, got -1"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
    (["--momentum", "1.5"], "argument --momentum: must be a number in [0, 1), got 1.5"),
    (["--momentum", "1"], "argument --momentum: must be a number in [0, 1), got 1"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: must be a finite number >= 0"),
    (["--subset", "0"], "argument --subset: must be an integer >= 1, got 0"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["--batch-size", "ten"], "argument --batch-size: must be an integer >= 1, got 'ten'"),
    (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    (["--dataset", "imagenet"], "argument --dataset: unknown dataset 'imagenet'"),
    (["--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
]

SPECIFIC = [
    ("hogwild", ["--workers", "0"], "argument --workers: must be an integer >= 1, got 0"),
    ("hogwild", ["--epoch-timeout", "0"], "argument --epoch-timeout: must be a finite number > 0"),
    ("hogwild", ["--epoch-timeout", "nan"], "argument --epoch-timeout: must be a finite number"),
    ("hogwild", ["--save-weights", "w.npz"], "unrecognized arguments: --save-weights"),
    ("hogwild", ["--resume"], "unrecognized arguments: --resume"),
    ("kfold", ["--folds", "1"], "argument --folds: must be an integer >= 2, got 1"),
    ("kfold", ["--engines", "0"], "argument --engines: must be an integer >= 1, got 0"),
    ("kfold", ["--timeout", "0"], "argument --timeout: must be a finite number > 0"),
    ("kfold", ["--cpu-interval", "-1"], "argument --cpu-interval: must be a finite number > 0"),
    ("train", ["--resume"], "--resume needs --checkpoint-dir"),
]


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch):
    """Parse-time means: no dataset is loaded and no ipyparallel cluster is started."""
    import ipyparallel

    def boom(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("cnn.data.load", boom)
    monkeypatch.setattr(ipyparallel, "Cluster", boom)


def refused(main, argv: list[str], capsys) -> str:
    """Run a CLI's main in-process; it must exit 2 with one line on stderr. The line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].endswith("(see --help)")
    return lines[0]


@pytest.mark.parametrize("name", sorted(TRAINING))
@pytest.mark.parametrize("argv,message", SHARED)
def test_shared_training_flags_are_checked_when_parsed(name, argv, message, capsys):
    assert message in refused(TRAINING[name], argv, capsys)


@pytest.mark.parametrize("argv,message", SHARED)
def test_mpi_refuses_the_same_flags(argv, message):
    """Under MPI every rank parses; the error becomes one line from rank 0 (test_mpi runs
    it under mpiexec)."""
    with pytest.raises(Exception, match=re.escape(message)):
        mpi_cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("name,argv,message", SPECIFIC)
def test_strategy_flags_are_checked_when_parsed(name, argv, message, capsys):
    assert message in refused(TRAINING[name], argv, capsys)


@pytest.mark.parametrize("argv,message", [
    (["--sync-every", "0"], "argument --sync-every: must be an integer >= 1, got 0"),
    (["--bucket-kb", "0"], "argument --bucket-kb: must be an integer >= 1, got 0"),
    (["--inject-failure", "1:0:raise"], "argument --inject-failure: RANK:STEP:raise|kill|nan"),
    (["--checkpoint-dir", "d"], "unrecognized arguments: --checkpoint-dir"),
])
def test_mpi_flags_are_checked_when_parsed(argv, message):
    with pytest.raises(Exception, match=re.escape(message)):
        mpi_cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["--sizes", "4,0"], "argument --sizes: want sizes >= 1 byte"),
    (["--sizes", "4,k"], "argument --sizes: want comma-separated integers"),
])
def test_costmodel_flags_are_checked_when_parsed(argv, message, capsys):
    assert message in refused(costmodel.build_parser().parse_args, argv, capsys)


# --- output paths ------------------------------------------------------------------------

def _cannot_write_in(directory: Path) -> bool:
    """The reference: does creating a file there really fail (root writes anywhere)?"""
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return True
    (directory / "probe").unlink()
    return False


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_unwritable_metrics_paths_are_refused_before_training(name, tmp_path, capsys):
    main = TRAINING[name]
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "dir").mkdir()
    cases = [
        ("/proc/m.pkl", "--save-metrics /proc/m.pkl: cannot create files in /proc"),
        (f"{tmp_path}/file/m.pkl", f"--save-metrics {tmp_path}/file/m.pkl: {tmp_path}/file "
                                   f"is not a directory"),
        (f"{tmp_path}/file/sub/m.pkl", f"{tmp_path}/file is not a directory"),
        (f"{tmp_path}/dir", f"--save-metrics {tmp_path}/dir is a directory"),
    ]
    for path, message in cases:
        assert message in refused(main, ["--save-metrics", path], capsys)


def test_a_read_only_directory_is_refused_if_it_really_is(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        argv = ["--save-metrics", str(ro / "m.pkl")]
        if _cannot_write_in(ro):
            msg = refused(train_cli.main, argv, capsys)
            assert f"--save-metrics {ro / 'm.pkl'}: cannot create files in {ro}" in msg
        else:  # root: the directory is writable after all; refusing it would be wrong
            assert cli.check_outputs(train_cli.build_parser().parse_args(argv)) is None
    finally:
        ro.chmod(0o755)


def test_save_weights_never_overwrites_what_it_should_not(tmp_path, capsys):
    main = train_cli.main
    notes = tmp_path / "notes.txt"
    notes.write_text("a week of notes")
    m = tmp_path / "m.pkl"
    msg = refused(main, ["--save-weights", str(notes)], capsys)
    assert f"--save-weights {notes} exists and is not a weights .npz" in msg
    assert notes.read_text() == "a week of notes"
    msg = refused(main, ["--save-metrics", str(m), "--save-weights", str(m)], capsys)
    assert f"--save-weights {m} is the --save-metrics file too" in msg
    msg = refused(main, ["--save-weights", str(tmp_path)], capsys)
    assert f"--save-weights {tmp_path} is a directory" in msg
    other = tmp_path / "other.npz"  # an .npz, but not weights
    np.savez(other, x=np.ones(2))
    assert "is not a weights .npz" in refused(main, ["--save-weights", str(other)], capsys)
    # weights written by us may be replaced
    w = tmp_path / "w.npz"
    np.savez(w, **{"0.weight": np.ones((2, 2)), "0.bias": np.ones(2)})
    assert cli.is_weights_file(w) and not cli.is_weights_file(notes)
    args = train_cli.build_parser().parse_args(["--save-weights", str(w)])
    assert cli.check_outputs(args) is None


def test_checkpoint_dir_must_be_a_writable_directory(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    msg = refused(train_cli.main, ["--checkpoint-dir", str(f)], capsys)
    assert f"--checkpoint-dir {f} is a file, not a directory" in msg
    msg = refused(train_cli.main, ["--checkpoint-dir", "/proc/ckpt"], capsys)
    assert "--checkpoint-dir /proc/ckpt: cannot create files in /proc" in msg


# --- real processes ------------------------------------------------------------------------

@pytest.mark.parametrize("module,argv,message", [
    ("cnn.train", ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    ("cnn.parallel.hogwild", ["--lr", "inf"], "argument --lr: must be a finite number > 0"),
    ("cnn.parallel.kfold", ["--batch-size", "0"], "argument --batch-size: must be an integer"),
    ("cnn.parallel.costmodel", ["--repeats", "0"], "argument --repeats: must be an integer"),
    # a CnnError raised after parsing: its message, status 2, no traceback
    ("cnn.train", ["--subset", "100000", "--epochs", "1"], "error: subset=100000: digits train"),
])
def test_clis_exit_2_with_one_line_and_no_traceback(module, argv, message):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if module == "cnn.parallel.kfold":  # before: started a cluster, failed after ~10 s
        assert time.monotonic() - t0 < 8
