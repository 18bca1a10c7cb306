"""cnn.checkpoint: arrays and JSON metadata that load without ever unpickling, written so
that a kill mid-write leaves the previous checkpoint."""

import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cnn import checkpoint
from cnn.errors import CheckpointError


class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_round_trip_keeps_arrays_and_metadata(tmp_path):
    arrays = {"param/0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "step_times": np.array([0.5, 0.25]), "flags": np.array([True, False])}
    meta = {"global_step": np.int64(7), "loss": np.float32(0.5), "nan": math.nan,
            "row": {"test_acc": 0.9, "gpu": None, "shape": (1, 8, 8), "ok": np.bool_(True)}}
    checkpoint.save(tmp_path / "c.npz", arrays, meta)
    got, m = checkpoint.load(tmp_path / "c.npz")
    assert got.keys() == arrays.keys()
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    assert m["global_step"] == 7 and m["loss"] == 0.5 and math.isnan(m["nan"])
    assert m["row"] == {"test_acc": 0.9, "gpu": None, "shape": [1, 8, 8], "ok": True}
    assert m["format"] == checkpoint.FORMAT and m["format_version"] == checkpoint.FORMAT_VERSION
    assert m["versions"]["numpy"] == np.__version__


def test_object_arrays_are_refused_on_save(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        checkpoint.save(tmp_path / "c.npz", {"x": np.array([{}], dtype=object)}, {})
    assert not list(tmp_path.iterdir())


def test_a_crafted_pickle_never_runs(tmp_path):
    """Before: --resume unpickled checkpoint.pkl, so a planted file ran any code."""
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=f"{path} holds pickled data, which is never"):
        checkpoint.load(path)
    # the same payload as an object array inside a real .npz
    np.savez(path, x=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(CheckpointError, match=f"{path} holds an object array"):
        checkpoint.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"hello, world", "not an .npz archive"),
    (b"PK\x03\x04\x14\x00\x00\x00", "truncated or corrupt"),
])
def test_garbage_is_an_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "c.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)


def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"w": np.ones(1000)}, {"step": 1})
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=f"{path} is truncated or corrupt"):
        checkpoint.load(path)


def test_foreign_npz_and_newer_format_are_refused(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, w=np.ones(3))
    with pytest.raises(CheckpointError, match="without cnn checkpoint metadata"):
        checkpoint.load(path)
    checkpoint.save(path, {}, {"format_version": checkpoint.FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match="upgrade cnn"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'nope.npz'}"):
        checkpoint.load(tmp_path / "nope.npz")


def test_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    """A process SIGKILLed halfway through writing the new checkpoint."""
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, {"w": np.full(10, 1.0)}, {"global_step": 1})
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from cnn import checkpoint

        def savez(fh, **arrays):  # half the archive, then the kill
            fh.write(b"PK\\x03\\x04" + bytes(1 << 16))
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        np.savez = savez
        checkpoint.save({str(path)!r}, {{"w": np.full(10, 2.0)}}, {{"global_step": 2}})
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    arrays, meta = checkpoint.load(path)
    assert meta["global_step"] == 1 and (arrays["w"] == 1.0).all()
    # what the killed writer left is only its own temporary file, never the checkpoint
    assert [p.name for p in tmp_path.iterdir() if p != path][0].endswith(".tmp")
