"""Datasets for the demo and the benchmarks, and how to split them among clients.

Two datasets, both offline: scikit-learn's 8x8 digits (ships with sklearn) and
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzip IDX files).
Nothing here downloads anything. Partitions are index arrays into the training set,
IID or label-skewed (Dirichlet), reproducible from a seed. This module knows nothing
of torch, Paillier or the wire protocol.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import FedcoreError

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_FASHION_MNIST_DIR",
    "PARTITION_SCHEMES",
    "Dataset",
    "DatasetFormatError",
    "DatasetUnavailableError",
    "client_shard",
    "default_dataset_name",
    "dirichlet_partition",
    "fashion_mnist_available",
    "iid_partition",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "parse_partition",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASET_NAMES = ("digits", "fashion-mnist")
PARTITION_SCHEMES = ("iid", "dirichlet")

# Dirichlet draws are retried until every client gets min_size samples; with sane
# arguments a handful of tries suffice, so hitting this bound means the request is
# (nearly) impossible, e.g. tiny alpha with many clients and few samples.
MAX_DIRICHLET_RETRIES = 1000

_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_MNIST_TRAIN = 60_000
_FASHION_MNIST_TEST = 10_000
_FASHION_MNIST_SIDE = 28
_APT_HINT = "install it with: apt-get install dataset-fashion-mnist"
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE = 0x08


class DatasetUnavailableError(FedcoreError, FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to install them."""


class DatasetFormatError(FedcoreError, ValueError):
    """A dataset file exists but is corrupt or not in the expected format."""


@dataclass(frozen=True)
class Dataset:
    """A classification dataset: float32 features in [0, 1] and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.ndim != 2 or x.dtype != np.float32:
                raise ValueError(f"x_{split} must be a 2-D float32 array; got {x.dtype} {x.shape}")
            if y.ndim != 1 or y.dtype != np.int64 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"y_{split} must be a 1-D int64 array with one label per row of x_{split}; "
                    f"got {y.dtype} {y.shape} for x_{split} {x.shape}"
                )
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(
                f"x_train has {self.x_train.shape[1]} features but x_test has "
                f"{self.x_test.shape[1]}"
            )
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {self.num_classes}")

    @property
    def num_features(self) -> int:
        """Number of input features per sample (the model's ``in_features``)."""
        return int(self.x_train.shape[1])


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load scikit-learn's 8x8 digits (1,797 samples, 64 features), stratified split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(
        name="digits",
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
        num_classes=10,
    )


def _fashion_dir(path: Path | str | None) -> Path:
    return DEFAULT_FASHION_MNIST_DIR if path is None else Path(path)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_available(path: Path | str | None = None) -> bool:
    """True when all four Fashion-MNIST IDX files exist in ``path`` (default: the apt dir)."""
    directory = _fashion_dir(path)
    return all(_idx_file(directory, stem) is not None for stem in _FASHION_MNIST_FILES.values())


def _read_idx(file: Path, *, expected_dims: int) -> np.ndarray:
    """Parse one IDX file (gzip or raw) of unsigned bytes into an array of its shape."""
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as stream:
                raw = stream.read()
        else:
            raw = file.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise DatasetFormatError(f"{file}: cannot read IDX data ({exc}); {_APT_HINT}") from exc
    if len(raw) < 4:
        raise DatasetFormatError(f"{file}: {len(raw)} bytes is too short for an IDX header")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code != _IDX_UBYTE or ndim != expected_dims:
        raise DatasetFormatError(
            f"{file}: bad IDX magic {raw[:4].hex()}; expected 000008{expected_dims:02x} "
            f"(unsigned bytes, {expected_dims} dims)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetFormatError(f"{file}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_len:
        raise DatasetFormatError(
            f"{file}: IDX header says shape {shape} ({expected_len} bytes) but the file "
            f"holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _load_split(
    directory: Path, images_key: str, labels_key: str, count: int
) -> tuple[np.ndarray, np.ndarray]:
    images_file = _idx_file(directory, _FASHION_MNIST_FILES[images_key])
    labels_file = _idx_file(directory, _FASHION_MNIST_FILES[labels_key])
    assert images_file is not None and labels_file is not None  # checked by the caller
    images = _read_idx(images_file, expected_dims=3)
    labels = _read_idx(labels_file, expected_dims=1)
    side = _FASHION_MNIST_SIDE
    if images.shape != (count, side, side):
        raise DatasetFormatError(
            f"{images_file}: images have shape {images.shape}; expected ({count}, {side}, {side})"
        )
    if labels.shape != (count,):
        raise DatasetFormatError(f"{labels_file}: {labels.shape[0]} labels; expected {count}")
    if labels.size and int(labels.max()) >= 10:
        raise DatasetFormatError(f"{labels_file}: label {int(labels.max())} is outside 0..9")
    x = images.reshape(count, side * side).astype(np.float32)
    x /= np.float32(255.0)
    return x, labels.astype(np.int64)


def load_fashion_mnist(path: Path | str | None = None) -> Dataset:
    """Load Fashion-MNIST (60,000 train / 10,000 test, 784 features in [0, 1]).

    ``path`` is a directory holding the four IDX files (``*.gz`` or uncompressed);
    by default the one the Debian package ``dataset-fashion-mnist`` installs.
    Raises `DatasetUnavailableError` when files are missing, `DatasetFormatError`
    when one is corrupt.
    """
    directory = _fashion_dir(path)
    missing = [stem for stem in _FASHION_MNIST_FILES.values() if _idx_file(directory, stem) is None]
    if missing:
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}); {_APT_HINT}"
        )
    x_train, y_train = _load_split(directory, "train_images", "train_labels", _FASHION_MNIST_TRAIN)
    x_test, y_test = _load_split(directory, "test_images", "test_labels", _FASHION_MNIST_TEST)
    return Dataset(
        name="fashion-mnist",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
    )


def default_dataset_name() -> str:
    """``"fashion-mnist"`` when its files are installed, else ``"digits"``."""
    return "fashion-mnist" if fashion_mnist_available() else "digits"


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
}


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a dataset by name (``"digits"`` or ``"fashion-mnist"``), passing ``kwargs`` on."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return loader(**kwargs)


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1; got {num_clients}")
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients must be <= the number of samples ({num_samples}); got {num_clients}"
        )


def iid_partition(num_samples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(num_samples)`` and deal it to clients; sizes differ by at most one.

    Returns one sorted int64 index array per client; together they are disjoint and
    cover every sample.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    _check_num_clients(num_clients, num_samples)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Split sample indices with label skew: each class is shared out by Dirichlet(alpha).

    Small ``alpha`` (0.1) gives each client few classes; large ``alpha`` (100) tends to
    IID. Draws are repeated until every client has at least ``min_size`` samples, at
    most `MAX_DIRICHLET_RETRIES` times. Returns sorted, disjoint int64 index arrays
    covering every sample.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array; got shape {y.shape}")
    _check_num_clients(num_clients, y.size)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0; got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0; got {min_size}")
    if min_size * num_clients > y.size:
        raise ValueError(
            f"min_size * num_clients must be <= the number of samples ({y.size}); got "
            f"{min_size} * {num_clients}"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    fair_share = y.size / num_clients
    for _attempt in range(MAX_DIRICHLET_RETRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            # Clients already above a fair share get no more of this class; without
            # this, small alpha hands one client most of the data.
            proportions = np.where(sizes < fair_share, proportions, 0.0)
            total = proportions.sum()
            if total <= 0:
                proportions = np.full(num_clients, 1.0 / num_clients)
            else:
                proportions = proportions / total
            cuts = (np.cumsum(proportions)[:-1] * shuffled.size).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                parts[client].append(piece)
                sizes[client] += piece.size
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ValueError(
        f"dirichlet_partition could not give each of {num_clients} clients >= {min_size} "
        f"samples in {MAX_DIRICHLET_RETRIES} draws (alpha={alpha}, {y.size} samples); "
        "raise alpha or lower min_size or num_clients"
    )


def client_shard(
    dataset: Dataset,
    index: int,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The training ``(x, y)`` of client ``index`` of ``num_clients`` under ``scheme``.

    Every client computing its own shard with the same ``seed`` gets a disjoint piece.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1; got {num_clients}")
    if not 0 <= index < num_clients:
        raise ValueError(f"index must be in [0, {num_clients - 1}]; got {index}")
    if scheme == "iid":
        parts = iid_partition(dataset.y_train.size, num_clients, seed=seed)
    elif scheme == "dirichlet":
        parts = dirichlet_partition(dataset.y_train, num_clients, alpha=alpha, seed=seed)
    else:
        raise ValueError(f"scheme must be one of {', '.join(PARTITION_SCHEMES)}; got {scheme!r}")
    rows = parts[index]
    return dataset.x_train[rows], dataset.y_train[rows]


def parse_partition(text: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (client I of N, 0 <= I < N) as used by ``--partition``."""
    head, sep, tail = text.strip().partition("/")
    try:
        if not sep:
            raise ValueError
        index, count = int(head), int(tail)
    except ValueError:
        raise ValueError(
            f"partition must look like I/N (e.g. 0/4) with integers 0 <= I < N; got {text!r}"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"partition must look like I/N (e.g. 0/4) with integers 0 <= I < N; got {text!r}"
        )
    return index, count
