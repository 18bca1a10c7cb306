"""Datasets, batching, splits and k-fold indices for the study.

``load(name, split)`` returns ``(x, y)`` ready for the network: ``x`` float32,
C-contiguous, NCHW (``(N, 4)`` for iris), scaled to [0, 1] then standardised with
fixed per-dataset constants taken from the train split, so every strategy and
every notebook sees the same numbers; ``y`` int64 class indices.

Files on disk are checked against pinned SHA-256 hashes before they are parsed,
so a result always names the exact data it was measured on, and a corrupt,
truncated or foreign file is an error naming that file, never a silent change.
Index helpers (permutations, batches, splits, folds) are pure NumPy and depend
only on their arguments, so MPI ranks and ipyparallel engines agree on them.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Collection, Iterator, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, ShapeError
from .io import atomic_write

PathLike = str | os.PathLike[str]

DATASETS: tuple[str, ...] = ("digits", "iris", "fashion-mnist", "mnist", "cifar10", "synthetic")
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
#: Base URL per downloadable dataset; a file's URL is ``base + file name``.
MIRRORS: dict[str, str] = {
    "fashion-mnist": FASHION_MNIST_MIRROR,
    "mnist": MNIST_MIRROR,
    "cifar10": CIFAR10_URL[: -len(CIFAR10_ARCHIVE)],
}
#: Environment variables: a base URL replacing every mirror, and a data folder.
MIRROR_ENV = "CNN_DATA_MIRROR"
DATA_DIR_ENV = "CNN_DATA_DIR"
#: Read-only folders searched last (the Debian package ``dataset-fashion-mnist``).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Files each split needs, per dataset kept in files.
FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "fashion-mnist": _IDX_FILES,
    "mnist": _IDX_FILES,
    "cifar10": {"train": (CIFAR10_ARCHIVE,), "test": (CIFAR10_ARCHIVE,)},
}

#: Known-good SHA-256 per file; a file is accepted when it matches any of them.
SHA256: dict[str, dict[str, tuple[str, ...]]] = {
    "fashion-mnist": {  # official release, then the Debian repack (same images, recompressed)
        "train-images-idx3-ubyte.gz": (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        ),
        "train-labels-idx1-ubyte.gz": (
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        ),
        "t10k-images-idx3-ubyte.gz": (
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "train-labels-idx1-ubyte.gz": (
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        "t10k-images-idx3-ubyte.gz": (
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    },
    "cifar10": {
        CIFAR10_ARCHIVE: ("6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",),
    },
}

#: Standardisation constants (mean, std per channel) of the train split, on [0, 1] pixels.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_DIGITS = tuple(str(i) for i in range(10))
_INFO: dict[str, dict[str, Any]] = {
    "digits": dict(input_shape=(1, 8, 8), classes=_DIGITS, n_train=1438, n_test=359,
                   source="scikit-learn load_digits, stratified 80/20 split (seed 0)"),
    "iris": dict(input_shape=(4,), classes=("setosa", "versicolor", "virginica"),
                 n_train=120, n_test=30,
                 source="scikit-learn load_iris, stratified 80/20 split (seed 0)"),
    "fashion-mnist": dict(
        input_shape=(1, 28, 28), n_train=60000, n_test=10000, source=FASHION_MNIST_MIRROR,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")),
    "mnist": dict(input_shape=(1, 28, 28), classes=_DIGITS, n_train=60000, n_test=10000,
                  source=MNIST_MIRROR),
    "cifar10": dict(
        input_shape=(3, 32, 32), n_train=50000, n_test=10000, source=CIFAR10_URL,
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")),
    "synthetic": dict(input_shape=(3, 32, 32), classes=_DIGITS, n_train=1024, n_test=256,
                      source="uniform random pixels and labels: for timing only, not learnable",
                      timing_only=True),
}
_SKLEARN_SPLIT_SEED = 0
_SKLEARN_TEST_FRACTION = 0.2
_CIFAR10_MEMBERS = {
    "train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
    "test": ("cifar-10-batches-py/test_batch",),
}
_IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}  # uint8 labels (N,), uint8 images (N, H, W)


# --------------------------------------------------------------------------- public loading


def load(
    name: str,
    split: str = "train",
    data_dir: PathLike | None = None,
    subset: int | None = None,
    standardize: bool = True,
    download: bool = True,
    **synthetic_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)`` of one split, ready for the network.

    ``x`` is a fresh float32 C-contiguous array, pixels scaled to [0, 1] and, with
    ``standardize``, shifted and scaled by the dataset's fixed train-split constants
    (iris: raw features, standardised per feature). ``y`` is int64.
    ``subset=n`` keeps the first ``n`` samples of the (deterministic) split: a prefix,
    so a smaller run always sees a subset of a larger one.
    IDX and CIFAR files are searched in ``data_dir``, ``$CNN_DATA_DIR``, ``./data``
    (and, for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist``), each directly or
    in a ``<name>/`` subfolder, verified against the pinned SHA-256, and downloaded
    (``download=True``) when missing. ``synthetic_kwargs`` (``n``, ``shape``,
    ``num_classes``, ``seed``) go to :func:`synthetic` and are refused elsewhere.
    """
    key = canonical_name(name)
    split = _check_split(split)
    if synthetic_kwargs and key != "synthetic":
        raise TypeError(f"load({key!r}) takes no extra arguments {sorted(synthetic_kwargs)}")
    if key == "synthetic":
        return _load_synthetic(split, subset, standardize, **synthetic_kwargs)
    if key in ("digits", "iris"):
        raw, y, mean, std, scale = _sklearn_data(key)[split]
    elif key == "cifar10":
        (archive,) = dataset_files(key, split, data_dir, download)
        raw, y = read_cifar10(archive, split)
        (mean, std), scale = STATS[key], 255.0
    else:
        images, labels = dataset_files(key, split, data_dir, download)
        raw, y = read_idx_pair(images, labels, num_classes=len(_INFO[key]["classes"]))
        raw = raw[:, None]
        (mean, std), scale = STATS[key], 255.0
    n = _subset_size(subset, len(y), f"{key} {split}")
    x = _to_float(raw[:n], scale, mean if standardize else None, std)
    return x, np.array(y[:n], dtype=np.int64)


def synthetic(
    n: int,
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int | Sequence[int] = 0,
    *,
    standardize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Random images and labels, FOR TIMING ONLY: there is nothing to learn in them.

    Pixels are uniform on [0, 1) (standardised to mean 0, std 1 with ``standardize``),
    labels uniform over ``num_classes``. Images and labels use separate streams, so
    ``synthetic(m)`` is a prefix of ``synthetic(n)`` for ``m < n``.
    """
    shape = tuple(int(s) for s in shape)
    if n < 0 or num_classes < 1 or not shape or min(shape) < 1:
        raise ShapeError(
            f"synthetic(n={n}, shape={shape}, num_classes={num_classes}): need n >= 0, "
            "a non-empty shape of positive sizes and num_classes >= 1"
        )
    image_seq, label_seq = np.random.SeedSequence(seed).spawn(2)
    x = np.random.default_rng(image_seq).random((n, *shape), dtype=np.float32)
    y = np.random.default_rng(label_seq).integers(0, num_classes, size=n, dtype=np.int64)
    if standardize:
        x -= np.float32(0.5)
        x /= np.float32(math.sqrt(1 / 12))  # std of U(0, 1)
    return x, y


def dataset_info(name: str) -> dict[str, Any]:
    """Shape, classes and sizes of a dataset, without loading it (a fresh dict)."""
    key = canonical_name(name)
    info = dict(_INFO[key], name=key)
    info["classes"] = list(info["classes"])
    info["num_classes"] = len(info["classes"])
    info.setdefault("timing_only", False)
    if key in FILES:
        info["files"] = sorted({f for files in FILES[key].values() for f in files})
    return info


def _load_synthetic(
    split: str,
    subset: int | None,
    standardize: bool,
    n: int | None = None,
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``load("synthetic")``: train and test come from different streams of one seed."""
    total = _INFO["synthetic"][f"n_{split}"] if n is None else n
    count = _subset_size(subset, total, f"synthetic {split}")
    return synthetic(count, shape, num_classes, [seed, SPLITS.index(split)],
                     standardize=standardize)


@cache
def _sklearn_data(name: str) -> dict[str, tuple[Any, ...]]:
    """Raw split and train-split constants of a scikit-learn dataset, computed once."""
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        raw, scale, axis = bunch.images[:, None], 16.0, None  # pixel values 0..16
    else:
        bunch = datasets.load_iris()
        raw, scale, axis = bunch.data, 1.0, 0  # features in cm, standardised per feature
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = train_val_split(labels, _SKLEARN_TEST_FRACTION, seed=_SKLEARN_SPLIT_SEED)
    train_x = raw[train] / scale
    mean = tuple(np.atleast_1d(train_x.mean(axis=axis)).tolist())
    std = tuple(np.atleast_1d(train_x.std(axis=axis)).tolist())
    out = {}
    for split, idx in zip(SPLITS, (train, test), strict=True):
        x, y = raw[idx], labels[idx]
        x.flags.writeable = y.flags.writeable = False
        out[split] = (x, y, mean, std, scale)
    return out


def _to_float(
    raw: np.ndarray, scale: float, mean: Sequence[float] | None, std: Sequence[float]
) -> np.ndarray:
    """Fresh float32 copy of ``raw / scale``, standardised per channel unless ``mean`` is None."""
    x = np.array(raw, dtype=np.float32, order="C")  # always a copy: cached data stays intact
    x /= np.float32(scale)
    if mean is not None:
        channel = (1, -1) + (1,) * (x.ndim - 2)
        x -= np.asarray(mean, dtype=np.float32).reshape(channel)
        x /= np.asarray(std, dtype=np.float32).reshape(channel)
    return x


# --------------------------------------------------------------------------- finding files


def dataset_files(
    name: str, split: str, data_dir: PathLike | None = None, download: bool = True
) -> list[Path]:
    """Paths of the verified files one split needs, downloading missing ones if allowed."""
    key = canonical_name(name)
    paths = []
    for filename in FILES[key][_check_split(split)]:
        path = find_file(key, filename, data_dir)
        if path is None:
            if not download:
                raise DataError(f"{key}: {filename} not found (download=False).\n"
                                + _how_to_get(key, data_dir))
            path = download_file(key, filename, data_dir)
        verify_sha256(path, SHA256[key][filename])
        paths.append(path)
    return paths


def find_file(name: str, filename: str, data_dir: PathLike | None = None) -> Path | None:
    """First ``<dir>/<name>/<filename>`` or ``<dir>/<filename>`` over the search dirs."""
    for folder in _search_dirs(name, data_dir, system=True):
        for candidate in (folder / name / filename, folder / filename):
            if candidate.is_file():
                return candidate
    return None


def _search_dirs(name: str, data_dir: PathLike | None, system: bool) -> list[Path]:
    """Search order: ``data_dir``, ``$CNN_DATA_DIR``, ``./data``, then read-only system dirs."""
    dirs = [Path(data_dir)] if data_dir is not None else []
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]))
    dirs.append(Path.cwd() / "data")
    if system:
        dirs.extend(SYSTEM_DIRS.get(name, ()))
    return dirs


def _how_to_get(name: str, data_dir: PathLike | None) -> str:
    """The part of a missing-dataset error that says where we looked and what to do."""
    files = sorted({f for fs in FILES[name].values() for f in fs})
    dirs = ", ".join(str(d) for d in _search_dirs(name, data_dir, system=True))
    lines = [f"Looked for {', '.join(files)} in {dirs} (directly or in a '{name}/' subfolder)."]
    if name == "fashion-mnist":
        lines.append("Get it with: apt-get install dataset-fashion-mnist "
                     "(installs /usr/share/datasets/fashion-mnist), or")
    lines.append(f"download {', '.join(MIRRORS[name] + f for f in files)} and put the files "
                 f"in a data dir (data_dir=..., ./data) or set {DATA_DIR_ENV} to their folder.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- hashes, download

_HASHES: dict[tuple[str, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    """Cache key that changes when a file is replaced or rewritten."""
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def file_sha256(path: PathLike) -> str:
    """SHA-256 hex digest, remembered per (path, size, mtime) so reloads skip re-hashing."""
    path = Path(path)
    key = _stat_key(path)
    if key not in _HASHES:
        try:
            with open(path, "rb") as fh:
                _HASHES[key] = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}") from exc
    return _HASHES[key]


def verify_sha256(path: PathLike, expected: str | Collection[str]) -> str:
    """Raise DataError naming the file unless its SHA-256 is one of ``expected``."""
    actual = file_sha256(path)
    good = (expected,) if isinstance(expected, str) else tuple(expected)
    if actual not in good:
        raise DataError(
            f"{path}: SHA-256 mismatch: expected {' or '.join(good)}, got {actual}"
            f"{_identify(actual)}. The file is corrupt, truncated or not the pinned release: "
            "replace it (delete it to re-download)."
        )
    return actual


def _identify(digest: str) -> str:
    """Name the pinned file a mismatching hash belongs to, e.g. MNIST in a Fashion folder."""
    for name, files in SHA256.items():
        for filename, digests in files.items():
            if digest in digests:
                return f" (that is {name}'s {filename}; keep each dataset in <dir>/{name}/)"
    return ""


def download_file(
    name: str,
    filename: str,
    data_dir: PathLike | None = None,
    *,
    mirror: str | None = None,
    expected_sha256: str | Collection[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download one dataset file into ``<first writable dir>/<name>/`` and verify it.

    The base URL is ``mirror``, else ``$CNN_DATA_MIRROR``, else :data:`MIRRORS`.
    The body is streamed into a temporary file and renamed into place only when its
    SHA-256 is one of ``expected_sha256`` (default: the pins in :data:`SHA256`), so a
    failed or mismatching download leaves nothing behind.
    """
    from tqdm.auto import tqdm

    key = canonical_name(name)
    expected = SHA256[key][filename] if expected_sha256 is None else expected_sha256
    good = (expected,) if isinstance(expected, str) else tuple(expected)
    base = mirror or os.environ.get(MIRROR_ENV) or MIRRORS[key]
    url = base.rstrip("/") + "/" + filename
    dest = _download_dir(key, data_dir) / filename
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with atomic_write(dest) as fh, tqdm(
                total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=filename
            ) as bar:
                digest = hashlib.sha256()
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
                    bar.update(len(chunk))
                actual = digest.hexdigest()
                if actual not in good:  # raising here makes atomic_write drop the temp file
                    raise DataError(
                        f"{filename} downloaded from {url}: SHA-256 mismatch: expected "
                        f"{' or '.join(good)}, got {actual}; the file was discarded."
                    )
    except DataError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts
        raise DataError(f"{key}: could not download {url}: {exc}\n"
                        + _how_to_get(key, data_dir)) from exc
    _HASHES[_stat_key(dest)] = actual
    return dest


def _download_dir(name: str, data_dir: PathLike | None) -> Path:
    """First writable ``<dir>/<name>`` of data_dir, ``$CNN_DATA_DIR``, ``./data``."""
    for folder in _search_dirs(name, data_dir, system=False):
        target = folder / name
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(target, os.W_OK | os.X_OK):
            return target
    raise DataError(f"{name}: no writable data directory to download into.\n"
                    + _how_to_get(name, data_dir))


# --------------------------------------------------------------------------- parsers


def read_idx(path: PathLike, expected_sha256: str | Collection[str] | None = None) -> np.ndarray:
    """Decode a gzipped IDX file into a read-only uint8 array (cached per file version).

    Labels (magic 0x00000801) give ``(N,)``, images (0x00000803) ``(N, H, W)``.
    The hash is checked only when ``expected_sha256`` is given (``load`` always does).
    """
    path = Path(path)
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    return _decode_idx(*_stat_key(path))


@lru_cache(maxsize=16)
def _decode_idx(path: str, size: int, mtime_ns: int) -> np.ndarray:
    """``read_idx`` body; size and mtime are only in the cache key."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc}); replace it") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic not in _IDX_MAGIC:
        found = "a file shorter than 4 bytes" if magic is None else f"0x{magic:08x}"
        raise DataError(f"{path}: wrong IDX magic number {found}; expected 0x00000801 "
                        "(uint8 labels) or 0x00000803 (uint8 images)")
    header = 4 + 4 * _IDX_MAGIC[magic]
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4))
    needed, found = math.prod(dims), len(raw) - header
    if found < needed:
        raise DataError(f"{path}: truncated: dimensions {dims} need {needed} data bytes, "
                        f"found {found}")
    if found > needed:
        raise DataError(f"{path}: {found - needed} trailing bytes after the {dims} data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)  # read-only


def read_idx_pair(
    images_path: PathLike, labels_path: PathLike, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` uint8 (read-only) and int64 labels, checked against each other."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected IDX images (magic 0x00000803), "
                        f"found a {images.ndim}-D array")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected IDX labels (magic 0x00000801), "
                        f"found a {labels.ndim}-D array")
    if len(images) != len(labels):
        raise DataError(f"count mismatch: {images_path} has {len(images)} images but "
                        f"{labels_path} has {len(labels)} labels")
    _check_labels(labels, num_classes, str(labels_path))
    return images, labels.astype(np.int64)


def read_cifar10(
    path: PathLike, split: str = "train", *, verify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and int64 labels straight from the python tarball.

    The batches are pickles, and unpickling can run code, so the archive's SHA-256 is
    checked against :data:`SHA256` first. ``verify=False`` is only for archives you
    made yourself (tests). Results are cached per file version and read-only.
    """
    path = Path(path)
    split = _check_split(split)
    if verify:
        verify_sha256(path, SHA256["cifar10"][CIFAR10_ARCHIVE])
    return _decode_cifar10(*_stat_key(path), split)


@lru_cache(maxsize=4)
def _decode_cifar10(path: str, size: int, mtime_ns: int, split: str) -> tuple[np.ndarray, ...]:
    """``read_cifar10`` body: one pass over the tarball, no extraction to disk."""
    wanted = _CIFAR10_MEMBERS[split]
    batches: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    batches[member.name] = pickle.load(tar.extractfile(member), encoding="bytes")
    except Exception as exc:  # a damaged archive or pickle can fail in many ways
        raise DataError(f"{path}: not a readable CIFAR-10 python archive "
                        f"({type(exc).__name__}: {exc}); replace it") from exc
    missing = [m for m in wanted if m not in batches]
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}")
    xs, ys = [], []
    for member in wanted:
        batch = batches[member]
        data = batch.get(b"data") if isinstance(batch, dict) else None
        labels = batch.get(b"labels") if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            got = getattr(data, "shape", type(data).__name__)
            raise DataError(f"{path}: {member}: b'data' should be a uint8 (N, 3072) array, "
                            f"got {got}")
        labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
        if labels.shape != (len(data),):
            raise DataError(f"{path}: {member}: count mismatch, {len(data)} images but "
                            f"{labels.size} labels")
        _check_labels(labels, 10, f"{path}: {member}")
        xs.append(data)
        ys.append(labels)
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    y = np.concatenate(ys)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Labels must index the classes, else the loss would read out of bounds."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels out of range: found {labels.min()}..{labels.max()}, "
                        f"expected 0..{num_classes - 1}")


# --------------------------------------------------------------------------- batches, splits


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """Sample order of one epoch; a function of ``(n, seed, epoch)`` only.

    Global batch ``k`` of epoch ``e`` is ``perm[k*B:(k+1)*B]`` whatever the number of
    processes, so data-parallel ranks can split it and match a single process.
    """
    for value, what in ((n, "n"), (seed, "seed"), (epoch, "epoch")):
        if value < 0:
            raise ShapeError(f"epoch_permutation: {what}={value} must be >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(n).astype(np.int64, copy=False)


def iterate_batches(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    shuffle: bool = True,
) -> Iterator[np.ndarray]:
    """Yield index arrays of consecutive global batches of :func:`epoch_permutation`.

    The last batch is short unless ``drop_last``; ``shuffle=False`` keeps ``0..n-1``
    (evaluation).
    """
    if batch_size < 1:
        raise ShapeError(f"batch_size={batch_size} must be >= 1")
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n, dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def train_val_split(
    n_or_labels: int | np.ndarray | Sequence[Any],
    val_fraction: float,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_idx, val_idx)``, disjoint and covering, ``round(f*n)`` in val.

    With labels and ``stratify`` each class gives its proportional share (largest
    remainder), so small validation sets still see every class.
    """
    n, labels = _n_and_labels(n_or_labels)
    n_val = round(val_fraction * n) if 0 < val_fraction < 1 else 0
    if not 0 < n_val < n:
        raise ShapeError(f"val_fraction={val_fraction} of {n} samples leaves the train or "
                         "validation set empty; need 0 < fraction < 1 and enough samples")
    rng = np.random.default_rng(seed)
    if labels is None or not stratify:
        val = rng.permutation(n)[:n_val]
    else:
        groups = _shuffled_groups(labels, rng)
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        quota, remainder = divmod(sizes * n_val, n)
        quota[np.argsort(-remainder, kind="stable")[: n_val - quota.sum()]] += 1
        val = np.concatenate([g[:q] for g, q in zip(groups, quota, strict=True)])
    in_val = np.zeros(n, dtype=bool)
    in_val[val] = True
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def kfold_indices(
    labels_or_n: int | np.ndarray | Sequence[Any],
    k: int,
    seed: int = 0,
    stratified: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` sorted ``(train_idx, val_idx)`` pairs: val folds disjoint and covering,
    each train the complement; fold sizes (and, stratified, per-class counts) differ by
    at most one."""
    n, labels = _n_and_labels(labels_or_n)
    if not 2 <= k <= n:
        raise ShapeError(f"k={k} folds need 2 <= k <= n={n}")
    rng = np.random.default_rng(seed)
    if labels is None or not stratified:
        order = rng.permutation(n)
    else:  # classes one after another, dealt round-robin: every fold gets its share
        order = np.concatenate(_shuffled_groups(labels, rng))
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % k
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]


def _shuffled_groups(labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each class (in sorted class order), shuffled."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _n_and_labels(n_or_labels: int | np.ndarray | Sequence[Any]) -> tuple[int, np.ndarray | None]:
    """Accept either a sample count or a 1-D label array."""
    if isinstance(n_or_labels, (int, np.integer)):
        if n_or_labels < 0:
            raise ShapeError(f"n={n_or_labels} must be >= 0")
        return int(n_or_labels), None
    labels = np.asarray(n_or_labels)
    if labels.ndim != 1:
        raise ShapeError(f"labels must be 1-D, got shape {labels.shape}")
    return len(labels), labels


# --------------------------------------------------------------------------- small helpers


def canonical_name(name: str) -> str:
    """Dataset key: case and ``_``/``-`` do not matter (``Fashion_MNIST``, ``CIFAR-10``)."""
    key = name.strip().lower().replace("_", "-")
    key = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist"}.get(key, key)
    if key not in DATASETS:
        raise ShapeError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ShapeError(f"unknown split {split!r}; choose 'train' or 'test'")
    return split


def _subset_size(subset: int | None, available: int, what: str) -> int:
    """Length of the prefix ``subset`` asks for, refusing more than there is."""
    if subset is None:
        return available
    if not 1 <= subset <= available:
        raise ShapeError(f"subset={subset}: {what} has {available} samples; need 1..{available}")
    return int(subset)
