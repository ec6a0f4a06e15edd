"""Tests for fedcore.data: offline loaders, IDX validation, client partitions."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fedcore.data import (
    DEFAULT_FASHION_MNIST_DIR,
    Dataset,
    DatasetFormatError,
    DatasetUnavailableError,
    client_shard,
    default_dataset_name,
    dirichlet_partition,
    fashion_mnist_available,
    iid_partition,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    parse_partition,
)
from fedcore.errors import FedcoreError

needs_fashion = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST not in {DEFAULT_FASHION_MNIST_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_digits_shapes_dtypes_and_range(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.num_features == 64 and digits.num_classes == 10
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.x_test.shape[0] == pytest.approx(0.2 * 1797, abs=1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.x_train.min() >= 0.0 and digits.x_train.max() == 1.0
    # Stratified: every class in both splits, in similar proportions.
    train_share = np.bincount(digits.y_train) / digits.y_train.size
    test_share = np.bincount(digits.y_test) / digits.y_test.size
    assert np.abs(train_share - test_share).max() < 0.01


def test_digits_split_depends_on_seed() -> None:
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_digits_rejects_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)


@needs_fashion
def test_fashion_mnist_shapes_and_range() -> None:
    data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (60000, 784) and data.y_train.shape == (60000,)
    assert data.x_test.shape == (10000, 784) and data.y_test.shape == (10000,)
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert np.array_equal(np.bincount(data.y_train), np.full(10, 6000))
    assert default_dataset_name() == "fashion-mnist"


def _idx_bytes(magic_dims: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, 8, magic_dims]) + b"".join(struct.pack(">I", d) for d in shape) + payload


def _write_fake_fashion(directory: Path, *, train: int = 60000, test: int = 10000) -> None:
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(3, (count, 28, 28), images.tobytes()), compresslevel=1)
        )
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(1, (count,), labels.tobytes()))
        )


def test_missing_directory_names_the_apt_package(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert not fashion_mnist_available(missing)
    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(missing)
    with pytest.raises(FileNotFoundError):
        load_fashion_mnist(missing)
    with pytest.raises(FedcoreError):
        load_fashion_mnist(missing)


def test_corrupt_gzip_is_a_format_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, train=10, test=10)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage" * 10)
    with pytest.raises(DatasetFormatError, match="train-images"):
        load_fashion_mnist(tmp_path)


def test_truncated_gzip_is_a_format_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, train=10, test=10)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    with pytest.raises(DatasetFormatError, match="train-labels"):
        load_fashion_mnist(tmp_path)


def test_bad_magic_is_a_format_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, train=10, test=10)
    # A labels file where an images file belongs: 1 dim instead of 3.
    shutil.copy(tmp_path / "train-labels-idx1-ubyte.gz", tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(DatasetFormatError, match="magic"):
        load_fashion_mnist(tmp_path)


def test_header_payload_mismatch_is_a_format_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, train=10, test=10)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(1, (10,), bytes(9)))
    )
    with pytest.raises(DatasetFormatError, match="holds 17 bytes"):
        load_fashion_mnist(tmp_path)


def test_wrong_sample_count_is_a_format_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, train=10, test=10)  # well-formed, but not 60k/10k
    with pytest.raises(DatasetFormatError, match="expected"):
        load_fashion_mnist(tmp_path)


def test_load_dataset_rejects_unknown_names_listing_choices() -> None:
    with pytest.raises(ValueError, match="digits, fashion-mnist"):
        load_dataset("cifar10")


def test_load_dataset_passes_keywords(digits: Dataset) -> None:
    again = load_dataset("digits", test_fraction=0.2, seed=0)
    assert np.array_equal(again.x_train, digits.x_train)


def _assert_partition(parts: list[np.ndarray], num_samples: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == num_samples, "partitions overlap or miss samples"
    assert np.array_equal(np.sort(joined), np.arange(num_samples))


@pytest.mark.parametrize(("num_samples", "num_clients"), [(1, 1), (10, 3), (1437, 7), (100, 100)])
def test_iid_partition_is_disjoint_complete_and_balanced(
    num_samples: int, num_clients: int
) -> None:
    parts = iid_partition(num_samples, num_clients, seed=3)
    assert len(parts) == num_clients
    _assert_partition(parts, num_samples)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 for p in parts)


def test_iid_partition_is_reproducible_from_seed() -> None:
    a, b, c = (iid_partition(500, 4, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(("num_samples", "num_clients"), [(10, 0), (3, 4), (0, 1)])
def test_iid_partition_rejects_bad_arguments(num_samples: int, num_clients: int) -> None:
    with pytest.raises(ValueError, match="num_"):
        iid_partition(num_samples, num_clients, seed=0)


def _label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    overall = np.bincount(labels, minlength=10) / labels.size
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=10) / p.size - overall).sum() for p in parts
    ]
    return float(np.mean(distances))


def test_dirichlet_partition_is_complete_and_non_iid(digits: Dataset) -> None:
    labels = digits.y_train
    skewed = dirichlet_partition(labels, 10, alpha=0.1, seed=0, min_size=10)
    _assert_partition(skewed, labels.size)
    assert min(p.size for p in skewed) >= 10
    iid = iid_partition(labels.size, 10, seed=0)
    assert _label_skew(skewed, labels) > 0.4
    assert _label_skew(iid, labels) < 0.1
    # Large alpha approaches IID.
    mild = dirichlet_partition(labels, 10, alpha=1000.0, seed=0)
    assert _label_skew(mild, labels) < 0.15


def test_dirichlet_partition_is_reproducible(digits: Dataset) -> None:
    a = dirichlet_partition(digits.y_train, 5, alpha=0.5, seed=4)
    b = dirichlet_partition(digits.y_train, 5, alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_partition_gives_up_with_a_clear_error() -> None:
    # Two classes, three clients, near-zero alpha: each class lands on one client.
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet_partition(labels, 3, alpha=0.001, seed=0, min_size=6)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"min_size": -1}, "min_size"),
        ({"min_size": 500}, "min_size"),
    ],
)
def test_dirichlet_partition_rejects_bad_arguments(kwargs: dict, parameter: str) -> None:
    args = {"alpha": 0.5, "seed": 0, "min_size": 1} | kwargs
    with pytest.raises(ValueError, match=parameter):
        dirichlet_partition(np.arange(100) % 10, 4, **args)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_client_shards_tile_the_training_set(digits: Dataset, scheme: str) -> None:
    shards = [client_shard(digits, i, 4, scheme=scheme, seed=1) for i in range(4)]
    assert sum(x.shape[0] for x, _ in shards) == digits.x_train.shape[0]
    for x, y in shards:
        assert x.shape[1] == 64 and x.shape[0] == y.shape[0]
    rows = np.concatenate([x for x, _ in shards])
    assert np.unique(rows, axis=0).shape[0] == np.unique(digits.x_train, axis=0).shape[0]


def test_client_shard_rejects_bad_index_and_scheme(digits: Dataset) -> None:
    with pytest.raises(ValueError, match="index"):
        client_shard(digits, 4, 4)
    with pytest.raises(ValueError, match="scheme"):
        client_shard(digits, 0, 4, scheme="pathological")


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2/10 ", (2, 10))]
)
def test_parse_partition(text: str, expected: tuple[int, int]) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize("text", ["", "4/4", "1", "a/b", "-1/3", "1/0", "1/2/3", "1:2"])
def test_parse_partition_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="I/N"):
        parse_partition(text)
