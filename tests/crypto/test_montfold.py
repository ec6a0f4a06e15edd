"""The native fold engine (fedcore.crypto._montfold) against gmpy2 and phe, same key."""

from __future__ import annotations

import os
import random
import threading
from typing import Any

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import PrivateKey, PublicKey, serialize_ciphertexts
from fedcore.crypto import folding as slices

# .ci/run sets this: there the extension must have been built, not silently skipped.
if os.environ.get("FEDCORE_REQUIRE_NATIVE"):
    assert slices._montfold is not None, "fedcore.crypto._montfold was not built"
pytestmark = pytest.mark.skipif(slices._montfold is None, reason="native fold not built")


def _folder(public: PublicKey, count: int) -> Any:  # the C type has no stub
    n_bytes = int(public.n).to_bytes(public.ciphertext_bytes // 2, "big")
    return slices._montfold.SliceFolder(n_bytes, count)


def _random_ciphertexts(public: PublicKey, rng: random.Random, count: int) -> list[int]:
    n, nsquare = int(public.n), int(public.nsquare)
    return [
        (1 + rng.randrange(n) * n) * int(gmpy2.powmod(rng.randrange(1, n), n, nsquare)) % nsquare
        for _ in range(count)
    ]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(0, 9), updates=st.integers(0, 5))
def test_fold_equals_gmpy2_product(
    public_key: PublicKey, seed: int, count: int, updates: int
) -> None:
    rng = random.Random(seed)
    folder = _folder(public_key, count)
    expected = [gmpy2.mpz(1)] * count
    for _ in range(updates):
        cts = _random_ciphertexts(public_key, rng, count)
        data = serialize_ciphertexts(cts, public_key)
        assert folder.validate(data) == -1
        folder.fold(data)
        expected = [a * c % public_key.nsquare for a, c in zip(expected, cts, strict=True)]
    assert folder.folds == updates
    assert folder.result() == serialize_ciphertexts(expected, public_key)


def test_sum_decrypts_with_phe(private_key: PrivateKey) -> None:
    public = private_key.public_key
    rng = random.Random(7)
    rows = [[rng.randrange(2**60) for _ in range(12)] for _ in range(4)]
    folder = _folder(public, 12)
    for values in rows:
        folder.fold(serialize_ciphertexts(public.encrypt_vector(values), public))
    summed = folder.result()
    width = public.ciphertext_bytes
    phe_key = private_key.to_phe()
    got = [
        phe_key.raw_decrypt(int.from_bytes(summed[i * width : (i + 1) * width], "big"))
        for i in range(12)
    ]
    assert got == [sum(column) for column in zip(*rows, strict=True)]
    folder.reset()
    assert folder.folds == 0
    assert folder.result() == serialize_ciphertexts([1] * 12, public)


@pytest.mark.parametrize(
    "bad",
    ["zero", "nsquare", "above", "multiple_of_n", "multiple_of_p", "multiple_of_q"],
)
def test_validate_names_the_first_bad_ciphertext(private_key: PrivateKey, bad: str) -> None:
    public = private_key.public_key
    n, nsquare = int(public.n), int(public.nsquare)
    value = {
        "zero": 0,
        "nsquare": nsquare,
        "above": 2 ** (8 * public.ciphertext_bytes) - 1,
        "multiple_of_n": 5 * n,
        "multiple_of_p": int(private_key.p) * 12345,
        "multiple_of_q": int(private_key.q) * 3,
    }[bad]
    cts = _random_ciphertexts(public, random.Random(bad), 10)
    cts[6] = value
    cts[8] = value
    folder = _folder(public, 10)
    data = serialize_ciphertexts(cts, public)
    assert folder.validate(data) == 6
    # SliceSum turns the index into the error the aggregator reports, offset by its start
    index, reason = slices.SliceSum(n, 100, 110, native=True).stage(0, data)  # type: ignore[misc]
    assert index == 106
    assert ("shares a factor" in reason) == bad.startswith("multiple_of")


def test_fold_refuses_out_of_range_before_touching_the_sum(private_key: PrivateKey) -> None:
    public = private_key.public_key
    folder = _folder(public, 3)
    good = public.encrypt_vector([1, 2, 3])
    folder.fold(serialize_ciphertexts(good, public))
    before = folder.result()
    bad = list(public.encrypt_vector([4, 5, 6]))
    bad[2] = int(public.nsquare) + 1
    with pytest.raises(ValueError, match="index 2"):
        folder.fold(serialize_ciphertexts(bad, public))
    assert folder.result() == before
    assert folder.folds == 1


def test_bad_arguments(public_key: PublicKey) -> None:
    width = public_key.ciphertext_bytes
    folder = _folder(public_key, 2)
    with pytest.raises(ValueError, match="bytes"):
        folder.validate(b"\x01" * width)
    with pytest.raises(ValueError, match="bytes"):
        folder.fold(b"\x01" * (3 * width))
    with pytest.raises(TypeError):
        folder.fold("not bytes")
    with pytest.raises(ValueError, match="odd"):
        slices._montfold.SliceFolder((int(public_key.n) + 1).to_bytes(width // 2, "big"), 2)
    with pytest.raises(ValueError, match="count"):
        _folder(public_key, -1)


def test_folders_run_in_parallel_threads(public_key: PublicKey) -> None:
    """The GIL is released in the loops: two threads folding two slices get exact sums."""
    rng = random.Random(3)
    updates = [_random_ciphertexts(public_key, rng, 40) for _ in range(6)]
    halves = [(0, 20), (20, 40)]
    folders = [_folder(public_key, stop - start) for start, stop in halves]

    def work(k: int) -> None:
        start, stop = halves[k]
        for cts in updates:
            data = memoryview(serialize_ciphertexts(cts, public_key))
            width = public_key.ciphertext_bytes
            folders[k].fold(data[start * width : stop * width])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [gmpy2.mpz(1)] * 40
    for cts in updates:
        expected = [a * c % public_key.nsquare for a, c in zip(expected, cts, strict=True)]
    assert folders[0].result() + folders[1].result() == serialize_ciphertexts(expected, public_key)


def test_slice_sum_engines_agree(private_key: PrivateKey) -> None:
    public = private_key.public_key
    rng = random.Random(11)
    updates = [serialize_ciphertexts(_random_ciphertexts(public, rng, 7), public) for _ in range(3)]
    sums = []
    for native in (True, False):
        part = slices.SliceSum(int(public.n), 3, 10, native=native)
        assert part.native is native
        for update_id, data in enumerate(updates):
            assert part.stage(update_id, data) is None
        part.abort(1)
        part.commit(0)
        part.commit(2)
        sums.append(part.serialized())
    assert sums[0] == sums[1]


def test_environment_forces_gmpy2(monkeypatch: pytest.MonkeyPatch, public_key: PublicKey) -> None:
    monkeypatch.setenv(slices.BACKEND_ENV, "gmp")
    assert not slices.native_available()
    assert not slices.SliceSum(int(public_key.n), 0, 2).native
    monkeypatch.delenv(slices.BACKEND_ENV)
    assert slices.native_available()
    assert slices.SliceSum(int(public_key.n), 0, 2).native


def test_first_out_of_range(public_key: PublicKey) -> None:
    width = public_key.ciphertext_bytes
    bound = int(public_key.nsquare).to_bytes(width, "big")
    good = serialize_ciphertexts([1, int(public_key.nsquare) - 1, 12345], public_key)
    scan = slices._montfold.first_out_of_range
    assert scan(good, bound) == -1
    assert scan(b"", bound) == -1
    for bad, index in [(0, 1), (int(public_key.nsquare), 2), (2 ** (8 * width) - 1, 0)]:
        data = bytearray(good)
        data[index * width : (index + 1) * width] = bad.to_bytes(width, "big")
        assert scan(bytes(data), bound) == index
    with pytest.raises(ValueError, match="multiple"):
        scan(good[:-1], bound)
    with pytest.raises(ValueError, match="multiple"):
        scan(good, b"")


def test_product_folds_like_its_members(public_key: PublicKey) -> None:
    rng = random.Random(5)
    updates = [
        serialize_ciphertexts(_random_ciphertexts(public_key, rng, 6), public_key) for _ in range(4)
    ]
    one_by_one, batched = _folder(public_key, 6), _folder(public_key, 6)
    for data in updates:
        one_by_one.fold(data)
    assert batched.product(updates[:1]) == updates[0]  # one update: itself
    product = batched.product(updates[1:])
    assert batched.validate(product) == -1
    batched.fold(updates[0])
    batched.fold(product, updates=3)
    assert batched.folds == one_by_one.folds == 4
    assert batched.result() == one_by_one.result()
    with pytest.raises(ValueError, match="update 1: ciphertext at index 2"):
        bad = bytearray(updates[1])
        width = public_key.ciphertext_bytes
        bad[2 * width : 3 * width] = bytes(width)
        batched.product([updates[0], bytes(bad)])
    with pytest.raises(ValueError, match="at least one"):
        batched.product([])
    with pytest.raises(ValueError, match="updates"):
        batched.fold(updates[0], updates=0)


def _batch_sums(private_key: PrivateKey, rows: int) -> tuple[list[bytes], list[list[int]]]:
    public = private_key.public_key
    rng = random.Random(rows)
    values = [[rng.randrange(2**30) for _ in range(5)] for _ in range(rows)]
    return [serialize_ciphertexts(public.encrypt_vector(v), public) for v in values], values


def _decrypted(private_key: PrivateKey, summed: bytes) -> list[int]:
    width = private_key.public_key.ciphertext_bytes
    phe_key = private_key.to_phe()
    return [
        phe_key.raw_decrypt(int.from_bytes(summed[i : i + width], "big"))
        for i in range(0, len(summed), width)
    ]


def test_stage_batch_commits_abort_and_partial_sums(private_key: PrivateKey) -> None:
    """A batch folds its product once; an abort or a read of the sum mid-batch is exact."""
    updates, values = _batch_sums(private_key, 4)
    n = int(private_key.public_key.n)
    part = slices.SliceSum(n, 0, 5, native=True)
    assert part.stage_batch(list(enumerate(updates))) == [None] * 4
    part.commit(0)
    part.commit(1)
    # a read now holds exactly updates 0 and 1, whatever becomes of 2 and 3
    assert _decrypted(private_key, part.serialized()) == [
        a + b for a, b in zip(*values[:2], strict=True)
    ]
    part.abort(2)
    part.commit(3)
    expected = [a + b + d for a, b, _, d in zip(*values, strict=True)]
    assert _decrypted(private_key, part.serialized()) == expected

    whole = slices.SliceSum(n, 0, 5, native=True)
    assert whole.stage_batch(list(enumerate(updates))) == [None] * 4
    for update_id in (3, 1, 0, 2):
        whole.commit(update_id)
    assert _decrypted(private_key, whole.serialized()) == [
        sum(c) for c in zip(*values, strict=True)
    ]

    aborted = slices.SliceSum(n, 0, 5, native=True)
    aborted.stage_batch(list(enumerate(updates)))
    aborted.commit(0)
    aborted.abort(1)  # breaks the batch: 0 folds alone now, 2 and 3 when they commit
    aborted.commit(2)
    aborted.abort(3)
    assert _decrypted(private_key, aborted.serialized()) == [
        a + c for a, _, c, _ in zip(*values, strict=True)
    ]


@pytest.mark.parametrize("bad", ["multiple_of_p", "zero", "short"])
def test_stage_batch_finds_the_bad_update(private_key: PrivateKey, bad: str) -> None:
    updates, values = _batch_sums(private_key, 4)
    public = private_key.public_key
    width = public.ciphertext_bytes
    broken = bytearray(updates[2])
    if bad == "short":
        broken = broken[:-width]
    else:
        value = int(private_key.p) * 7 if bad == "multiple_of_p" else 0
        broken[3 * width : 4 * width] = value.to_bytes(width, "big")
    updates[2] = bytes(broken)
    part = slices.SliceSum(int(public.n), 10, 15, native=True)
    answers = part.stage_batch(list(enumerate(updates)))
    assert answers[:2] == [None, None] and answers[3] is None
    index, reason = answers[2]  # type: ignore[misc]
    assert index == (None if bad == "short" else 13)
    assert ("shares a factor" in reason) == (bad == "multiple_of_p")
    for update_id in (0, 1, 3):
        part.commit(update_id)
    expected = [a + b + d for a, b, _, d in zip(*values, strict=True)]
    assert _decrypted(private_key, part.serialized()) == expected
