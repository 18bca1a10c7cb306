"""cnn.data: loaders, pinned files, parsers on generated files, downloads, index helpers."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from cnn import data
from cnn.errors import DataError, ShapeError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist",
)
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEAD_MIRROR = "http://127.0.0.1:1/"  # nothing listens on port 1: downloads fail fast


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real network, no stray data dirs: ./data is the test's own empty folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(data.MIRROR_ENV, DEAD_MIRROR)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --------------------------------------------------------------------------- file makers


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX payload exactly as the official files: big-endian magic and dims, uint8 data."""
    magic = (0x00000800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0))
    return path


def make_idx_split(folder: Path, split: str = "train", n: int = 12, seed: int = 0):
    """Write one split of a small MNIST-format dataset; return its images and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    image_name, label_name = IDX_NAMES[split]
    write_gz(folder / image_name, idx_bytes(images))
    write_gz(folder / label_name, idx_bytes(labels))
    return images, labels


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pin_folder(monkeypatch, name: str, folder: Path) -> None:
    """Replace the pinned hashes of ``name`` by those of the files the test generated."""
    monkeypatch.setitem(data.SHA256, name, {p.name: (sha(p),) for p in folder.iterdir()})


def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"generated",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def make_cifar_tar(path: Path, batches: dict[str, object]) -> Path:
    """A tar.gz laid out like cifar-10-python.tar.gz, members given as name -> object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in batches.items():
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def official_cifar_batches(n: int = 2) -> dict[str, dict]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: cifar_batch(n + (name == "test_batch"), seed) for seed, name in enumerate(names)}


def check_xy(x: np.ndarray, y: np.ndarray, shape: tuple, num_classes: int) -> None:
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
    assert y.dtype == np.int64 and y.shape == (len(x),)
    assert x.shape[1:] == tuple(shape)
    assert y.min() >= 0 and y.max() < num_classes
    assert np.isfinite(x).all()


# --------------------------------------------------------------------------- built-in data


def test_dataset_names_and_info():
    assert set(data.DATASETS) == {"digits", "iris", "fashion-mnist", "mnist", "cifar10",
                                  "synthetic"}
    for name in data.DATASETS:
        info = data.dataset_info(name)
        assert info["name"] == name and info["num_classes"] == len(info["classes"])
    assert data.dataset_info("FASHION_MNIST")["classes"][-1] == "Ankle boot"
    assert data.dataset_info("cifar10")["input_shape"] == (3, 32, 32)
    assert data.dataset_info("synthetic")["timing_only"] is True
    with pytest.raises(ShapeError, match="unknown dataset"):
        data.load("imagenet")
    with pytest.raises(ShapeError, match="split"):
        data.load("digits", "validation")


@pytest.mark.parametrize("name", ["digits", "iris"])
def test_sklearn_datasets(name):
    info = data.dataset_info(name)
    x, y = data.load(name, "train")
    xt, yt = data.load(name, "test")
    check_xy(x, y, info["input_shape"], info["num_classes"])
    check_xy(xt, yt, info["input_shape"], info["num_classes"])
    assert (len(x), len(xt)) == (info["n_train"], info["n_test"])
    axes = 0 if name == "iris" else None  # iris per feature, digits one pixel constant
    np.testing.assert_allclose(x.mean(axis=axes), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=axes), 1, atol=1e-4)
    # stratified 80/20: every class in both splits, in proportion
    counts, test_counts = np.bincount(y), np.bincount(yt)
    assert (np.abs(counts - 4 * test_counts) <= 5).all() and test_counts.min() > 0
    x2, y2 = data.load(name, "train", subset=10)
    np.testing.assert_array_equal(x2, x[:10])  # a subset is a prefix: stable across runs
    np.testing.assert_array_equal(y2, y[:10])


def test_digits_raw_range_and_fresh_copies():
    raw, _ = data.load("digits", standardize=False)
    assert raw.min() == 0 and raw.max() == 1 and raw.shape[1:] == (1, 8, 8)
    x, _ = data.load("digits")
    x[:] = 123  # callers may scribble on their copy: the cache must not change
    again, _ = data.load("digits")
    assert np.abs(again).max() < 100


def test_synthetic():
    x, y = data.load("synthetic")
    check_xy(x, y, (3, 32, 32), 10)
    assert len(x) == data.dataset_info("synthetic")["n_train"]
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    xt, _ = data.load("synthetic", "test")
    assert not np.array_equal(xt, x[: len(xt)])
    xs, ys = data.load("synthetic", shape=(1, 5, 7), num_classes=3, n=50, seed=4, subset=20)
    check_xy(xs, ys, (1, 5, 7), 3)
    xd, yd = data.synthetic(50, (1, 5, 7), num_classes=3, seed=[4, 0])
    np.testing.assert_array_equal(xs, xd[:20])  # prefix-stable
    np.testing.assert_array_equal(ys, yd[:20])
    raw, _ = data.synthetic(8, (2, 3, 3), standardize=False)
    assert raw.min() >= 0 and raw.max() < 1
    with pytest.raises(TypeError):
        data.load("digits", shape=(1, 8, 8))
    with pytest.raises(ShapeError):
        data.synthetic(4, (3, 0, 2))
    with pytest.raises(ShapeError, match="subset"):
        data.load("synthetic", subset=10**6)


@needs_fashion
def test_fashion_mnist_subsets():
    x, y = data.load("fashion-mnist", subset=2000)
    check_xy(x, y, (1, 28, 28), 10)
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05
    xt, yt = data.load("fashion-mnist", "test", subset=500)
    check_xy(xt, yt, (1, 28, 28), 10)
    raw, _ = data.load("fashion-mnist", "test", subset=500, standardize=False)
    assert raw.min() == 0 and raw.max() == 1
    np.testing.assert_allclose((raw - 0.2860) / 0.3530, xt, atol=1e-5)


@needs_fashion
def test_fashion_mnist_full_train_split():
    x, y = data.load("fashion-mnist", "train")
    assert x.shape == (60000, 1, 28, 28) and x.flags.c_contiguous
    assert np.bincount(y).tolist() == [6000] * 10
    assert abs(float(x.mean(dtype=np.float64))) < 1e-3
    assert abs(float(x.std(dtype=np.float64)) - 1) < 1e-3
    images = data.read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    assert images.shape == (60000, 28, 28) and not images.flags.writeable  # cache is safe


# --------------------------------------------------------------------------- IDX files


def test_idx_round_trip(tmp_path):
    images, labels = make_idx_split(tmp_path, n=7)
    got = data.read_idx(tmp_path / IDX_NAMES["train"][0])
    np.testing.assert_array_equal(got, images)
    assert got.dtype == np.uint8 and not got.flags.writeable
    gi, gl = data.read_idx_pair(*(tmp_path / n for n in IDX_NAMES["train"]))
    np.testing.assert_array_equal(gi, images)
    np.testing.assert_array_equal(gl, labels)
    assert gl.dtype == np.int64
    path = tmp_path / IDX_NAMES["train"][1]
    assert data.read_idx(path, expected_sha256=sha(path)).shape == (7,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00\x08\x01\x00\x00\x00\x02ab", "not a valid gzip"),  # plain, not gzip
        (gzip.compress(idx_bytes(np.zeros(300, np.uint8)))[:-12], "not a valid gzip"),  # cut
        (gzip.compress(idx_bytes(np.zeros(3, np.uint8), magic=0x00000802)), "magic"),
        (gzip.compress(idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-4]), "truncated"),
        (gzip.compress(idx_bytes(np.zeros(3, np.uint8)) + b"xx"), "trailing"),
    ],
    ids=["not-gzip", "corrupt-gzip", "wrong-magic", "truncated", "trailing-bytes"],
)
def test_broken_idx_files(tmp_path, content, message):
    path = tmp_path / "broken-idx1-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_idx_pair_mismatches(tmp_path):
    make_idx_split(tmp_path, n=5)
    images, labels = (tmp_path / n for n in IDX_NAMES["train"])
    write_gz(labels, idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="count mismatch") as err:
        data.read_idx_pair(images, labels)
    assert str(images) in str(err.value) and str(labels) in str(err.value)
    write_gz(labels, idx_bytes(np.array([0, 1, 2, 10, 3], np.uint8)))
    with pytest.raises(DataError, match="out of range") as err:
        data.read_idx_pair(images, labels)
    assert str(labels) in str(err.value)
    with pytest.raises(DataError, match="expected IDX images"):
        data.read_idx_pair(labels, labels)


def test_load_idx_dataset_and_lookup_order(tmp_path, monkeypatch):
    """data_dir, then $CNN_DATA_DIR, then ./data; files directly or in <dir>/<name>/."""
    given, env, local = tmp_path / "given", tmp_path / "env", tmp_path / "data"
    expected = {}
    for seed, folder in enumerate([given / "mnist", env, local / "mnist"]):
        expected[folder] = make_idx_split(folder, n=10 + seed, seed=seed)
    monkeypatch.setitem(data.SHA256, "mnist", {
        name: tuple(sha(f / name) for f in expected) for name in IDX_NAMES["train"]
    })
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env))
    for data_dir, folder in [(given, given / "mnist"), (None, env)]:
        x, y = data.load("mnist", data_dir=data_dir, standardize=False)
        np.testing.assert_array_equal(x[:, 0], expected[folder][0] / np.float32(255))
        np.testing.assert_array_equal(y, expected[folder][1])
    monkeypatch.delenv(data.DATA_DIR_ENV)
    x, y = data.load("mnist", download=False)
    assert len(y) == 12  # ./data/mnist
    check_xy(x, y, (1, 28, 28), 10)
    mean, std = data.STATS["mnist"]
    np.testing.assert_allclose(x[:, 0], (expected[local / "mnist"][0] / 255 - mean[0]) / std[0],
                               rtol=1e-5, atol=1e-5)


def test_load_rejects_broken_dataset_on_disk(tmp_path, monkeypatch):
    folder = tmp_path / "store" / "mnist"
    make_idx_split(folder, n=6)
    write_gz(folder / IDX_NAMES["train"][1], idx_bytes(np.zeros(5, np.uint8)))
    pin_folder(monkeypatch, "mnist", folder)
    with pytest.raises(DataError, match="count mismatch") as err:
        data.load("mnist", data_dir=tmp_path / "store")
    assert "train-labels-idx1-ubyte.gz" in str(err.value)


def test_sha256_mismatch_names_file_and_hashes(tmp_path, monkeypatch):
    folder = tmp_path / "store" / "fashion-mnist"
    make_idx_split(folder, n=4)
    image_file = folder / IDX_NAMES["train"][0]
    with pytest.raises(DataError, match="SHA-256 mismatch") as err:
        data.load("fashion-mnist", data_dir=tmp_path / "store")  # real pins
    message = str(err.value)
    assert str(image_file) in message and sha(image_file) in message
    assert data.SHA256["fashion-mnist"][image_file.name][0] in message
    # the verification cache notices a rewritten file
    good = sha(image_file)
    assert data.verify_sha256(image_file, good) == good
    write_gz(image_file, idx_bytes(np.ones((4, 28, 28), np.uint8)))
    with pytest.raises(DataError, match=str(image_file)):
        data.verify_sha256(image_file, [good])


@pytest.mark.parametrize("download", [False, True])
def test_missing_dataset_says_how_to_get_it(monkeypatch, download):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", ())
    with pytest.raises(DataError) as err:
        data.load("fashion-mnist", download=download)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and data.DATA_DIR_ENV in message
    for name in (*IDX_NAMES["train"], *IDX_NAMES["test"]):
        assert name in message
    if download:
        assert DEAD_MIRROR in message
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", download=False)


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar_round_trip_and_load(tmp_path, monkeypatch):
    batches = official_cifar_batches()
    archive = make_cifar_tar(tmp_path / "store" / "cifar10" / data.CIFAR10_ARCHIVE, batches)
    x, y = data.read_cifar10(archive, "train", verify=False)
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    np.testing.assert_array_equal(x, raw.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(y, sum((batches[f"data_batch_{i}"][b"labels"]
                                         for i in range(1, 6)), []))
    assert y.dtype == np.int64 and not x.flags.writeable
    with pytest.raises(DataError, match="SHA-256 mismatch"):  # strict by default
        data.read_cifar10(archive, "test")
    pin_folder(monkeypatch, "cifar10", archive.parent)
    xt, yt = data.load("cifar10", "test", data_dir=tmp_path / "store")
    check_xy(xt, yt, (3, 32, 32), 10)
    assert yt.tolist() == batches["test_batch"][b"labels"]
    mean = np.array(data.STATS["cifar10"][0], np.float32)[:, None, None]
    std = np.array(data.STATS["cifar10"][1], np.float32)[:, None, None]
    expected = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32) / np.float32(255)
    np.testing.assert_allclose(xt, (expected - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("damage", ["missing-member", "bad-shape", "bad-labels", "not-gzip"])
def test_broken_cifar_archives(tmp_path, damage):
    batches = official_cifar_batches()
    if damage == "missing-member":
        del batches["data_batch_3"]
    elif damage == "bad-shape":
        batches["data_batch_2"][b"data"] = batches["data_batch_2"][b"data"][:, :100]
    elif damage == "bad-labels":
        batches["data_batch_1"][b"labels"] = [0]
    archive = make_cifar_tar(tmp_path / data.CIFAR10_ARCHIVE, batches)
    if damage == "not-gzip":
        archive.write_bytes(b"this is not a tarball")
    with pytest.raises(DataError) as err:
        data.read_cifar10(archive, "train", verify=False)
    assert str(archive) in str(err.value)


# --------------------------------------------------------------------------- downloads


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A loopback HTTP server over a folder; CNN_DATA_MIRROR points at it."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    monkeypatch.setenv(data.MIRROR_ENV, url)
    yield root, url
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_lands_verified_files(tmp_path, monkeypatch, mirror):
    root, _ = mirror
    images, labels = make_idx_split(root, n=9)
    pin_folder(monkeypatch, "mnist", root)
    x, y = data.load("mnist", data_dir=tmp_path / "dl", standardize=False)
    np.testing.assert_array_equal(x[:, 0] * 255, images)
    np.testing.assert_array_equal(y, labels)
    landed = sorted(p.name for p in (tmp_path / "dl" / "mnist").iterdir())
    assert landed == sorted(IDX_NAMES["train"])  # no temp files left behind
    for name in landed:
        assert (tmp_path / "dl" / "mnist" / name).read_bytes() == (root / name).read_bytes()
    # without data_dir the download goes to ./data/<name>/
    data.load("mnist", subset=3)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == landed


def test_download_with_wrong_hash_leaves_nothing(tmp_path, monkeypatch, mirror):
    root, url = mirror
    make_idx_split(root, n=3)
    bad = "0" * 64
    monkeypatch.setitem(data.SHA256, "mnist", {n: (bad,) for n in IDX_NAMES["train"]})
    with pytest.raises(DataError, match="SHA-256 mismatch") as err:
        data.load("mnist", data_dir=tmp_path / "dl")
    message = str(err.value)
    image_file = root / IDX_NAMES["train"][0]
    assert image_file.name in message and bad in message and sha(image_file) in message
    assert list((tmp_path / "dl" / "mnist").iterdir()) == []
    # the explicit arguments of download_file beat the environment and the pins
    path = data.download_file("mnist", image_file.name, tmp_path / "dl2", mirror=url,
                              expected_sha256=sha(image_file))
    assert path == tmp_path / "dl2" / "mnist" / image_file.name and path.is_file()


def test_download_http_error_says_how_to_get_it(tmp_path, mirror):
    with pytest.raises(DataError, match="could not download") as err:
        data.load("mnist", data_dir=tmp_path / "dl")  # the mirror folder is empty: 404
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert data.DATA_DIR_ENV in str(err.value)
    assert list((tmp_path / "dl" / "mnist").iterdir()) == []


# --------------------------------------------------------------------------- index helpers


def test_epoch_permutation_is_deterministic():
    a = data.epoch_permutation(100, seed=3, epoch=0)
    assert a.dtype == np.int64 and sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(a, data.epoch_permutation(100, seed=3, epoch=0))
    assert not np.array_equal(a, data.epoch_permutation(100, seed=3, epoch=1))
    assert not np.array_equal(a, data.epoch_permutation(100, seed=4, epoch=0))
    with pytest.raises(ShapeError):
        data.epoch_permutation(10, seed=-1, epoch=0)


@pytest.mark.parametrize(("n", "batch_size"), [(100, 10), (103, 10), (5, 8), (0, 4)])
def test_iterate_batches_cover_each_index_once(n, batch_size):
    batches = list(data.iterate_batches(n, batch_size, seed=1, epoch=2))
    flat = np.concatenate(batches) if batches else np.array([], np.int64)
    np.testing.assert_array_equal(flat, data.epoch_permutation(n, 1, 2))
    assert all(len(b) == batch_size for b in batches[:-1])
    kept = list(data.iterate_batches(n, batch_size, seed=1, epoch=2, drop_last=True))
    assert len(kept) == n // batch_size and all(len(b) == batch_size for b in kept)
    ordered = list(data.iterate_batches(n, batch_size, 1, 2, shuffle=False))
    assert [int(i) for b in ordered for i in b] == list(range(n))
    with pytest.raises(ShapeError):
        next(data.iterate_batches(n, 0, 1, 2))


def test_train_val_split():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, val = data.train_val_split(labels, 0.2, seed=5)
    assert len(val) == 20 and np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert np.bincount(labels[val]).tolist() == [10, 6, 4]
    again = data.train_val_split(labels, 0.2, seed=5)
    np.testing.assert_array_equal(again[1], val)
    tr, va = data.train_val_split(37, 0.25, seed=0)
    assert len(va) == 9 and len(tr) == 28 and np.union1d(tr, va).tolist() == list(range(37))
    for fraction in (0.0, 1.0, 0.001):
        with pytest.raises(ShapeError):
            data.train_val_split(37, fraction)


@pytest.mark.parametrize("stratified", [True, False])
def test_kfold_indices_partition(stratified):
    labels = np.repeat(np.arange(4), [13, 7, 22, 9])
    folds = data.kfold_indices(labels, 5, seed=2, stratified=stratified)
    assert len(folds) == 5
    vals = [v for _, v in folds]
    np.testing.assert_array_equal(np.sort(np.concatenate(vals)), np.arange(len(labels)))
    for train, val in folds:
        np.testing.assert_array_equal(train, np.setdiff1d(np.arange(len(labels)), val))
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1
    if stratified:
        per_class = np.array([np.bincount(labels[v], minlength=4) for v in vals])
        assert (per_class.max(axis=0) - per_class.min(axis=0) <= 1).all()
    plain = data.kfold_indices(len(labels), 5, seed=2)
    assert sum(len(v) for _, v in plain) == len(labels)
    with pytest.raises(ShapeError):
        data.kfold_indices(3, 4)
