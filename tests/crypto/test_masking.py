"""Masks: key agreement, the AES-CTR PRG, mask sums, the CSPRNG (fedcore.crypto.masking)."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import PublicKey, masking
from fedcore.crypto.masking import (
    MASK_KEY_BYTES,
    STATISTICAL_BITS,
    MaskSum,
    SecureUniform,
    add_masks,
    derive_mask_key,
    mask_block_bytes,
    mask_values,
    public_key_bytes,
    remove_masks,
    set_digest,
)

FEDERATION = bytes(range(32))
MODEL = bytes(range(32, 64))

mask_keys = st.binary(min_size=MASK_KEY_BYTES, max_size=MASK_KEY_BYTES)
# Moduli of many widths: the block width (bits + 128 rounded up to 16 bytes) changes with them.
moduli = st.integers(min_value=3, max_value=(1 << 1100) - 1)


def _pair_keys(
    client: X25519PrivateKey,
    unmasker: X25519PrivateKey,
    *,
    federation: bytes = FEDERATION,
    model_digest: bytes = MODEL,
) -> tuple[bytes, bytes]:
    """The mask key as the client computes it and as the unmasker computes it."""
    client_public, unmasker_public = public_key_bytes(client), public_key_bytes(unmasker)
    info = {
        "client_public": client_public,
        "unmasker_public": unmasker_public,
        "federation": federation,
        "model_digest": model_digest,
    }
    return (
        derive_mask_key(client, unmasker_public, **info),
        derive_mask_key(unmasker, client_public, **info),
    )


# --- key agreement ----------------------------------------------------------------------


def test_client_and_unmasker_derive_the_same_mask_key() -> None:
    client, unmasker = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    on_client, on_unmasker = _pair_keys(client, unmasker)
    assert on_client == on_unmasker
    assert len(on_client) == MASK_KEY_BYTES


def test_mask_key_is_bound_to_federation_model_and_both_parties() -> None:
    client, unmasker = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    base, _ = _pair_keys(client, unmasker)
    other_federation, _ = _pair_keys(client, unmasker, federation=bytes(32))
    other_model, _ = _pair_keys(client, unmasker, model_digest=bytes(32))
    other_unmasker, _ = _pair_keys(client, X25519PrivateKey.generate())
    other_client, _ = _pair_keys(X25519PrivateKey.generate(), unmasker)
    keys = [base, other_federation, other_model, other_unmasker, other_client]
    assert len(set(keys)) == len(keys)


def test_mask_key_info_names_the_roles() -> None:
    """Swapping the client and unmasker public keys in ``info`` gives another key."""
    client, unmasker = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    a, b = public_key_bytes(client), public_key_bytes(unmasker)
    straight = derive_mask_key(
        client, b, client_public=a, unmasker_public=b, federation=FEDERATION, model_digest=MODEL
    )
    swapped = derive_mask_key(
        client, b, client_public=b, unmasker_public=a, federation=FEDERATION, model_digest=MODEL
    )
    assert straight != swapped


@pytest.mark.parametrize(
    "parameter", ["peer_public", "client_public", "unmasker_public", "federation", "model_digest"]
)
@pytest.mark.parametrize("size", [0, 31, 33])
def test_derive_mask_key_refuses_wrong_sizes(parameter: str, size: int) -> None:
    own, peer = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    arguments = {
        "peer_public": public_key_bytes(peer),
        "client_public": public_key_bytes(own),
        "unmasker_public": public_key_bytes(peer),
        "federation": FEDERATION,
        "model_digest": MODEL,
    }
    arguments[parameter] = bytes(size)
    with pytest.raises(ValueError, match=parameter):
        derive_mask_key(own, **arguments)


def test_public_key_bytes_of_private_and_public_half_agree() -> None:
    key = X25519PrivateKey.generate()
    raw = public_key_bytes(key)
    assert raw == public_key_bytes(key.public_key())
    assert len(raw) == 32


# --- the PRG ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "width"),
    [(1, 32), (128, 32), (129, 48), (512, 80), (1024, 144), (2048, 272), (2049, 288)],
)
def test_mask_block_bytes_known_widths(bits: int, width: int) -> None:
    assert mask_block_bytes(bits) == width


@given(bits=st.integers(1, 20000))
def test_mask_block_bytes_has_statistical_margin(bits: int) -> None:
    width = mask_block_bytes(bits)
    assert width % 16 == 0
    assert 8 * width >= bits + STATISTICAL_BITS  # at least 128 bits beyond the modulus
    assert 8 * (width - 16) < bits + STATISTICAL_BITS  # and no whole AES block more


@pytest.mark.parametrize("bits", [0, -8])
def test_mask_block_bytes_refuses_non_positive(bits: int) -> None:
    with pytest.raises(ValueError, match="modulus_bits"):
        mask_block_bytes(bits)


def test_prg_matches_aes_ecb_of_big_endian_counter_blocks(public_key: PublicKey) -> None:
    """Reference check of the PRG against the CTR definition, block by block.

    NIST SP 800-38A, section 6.5: CTR output block ``O_j = CIPH_K(T_j)`` for counter
    blocks ``T_j`` incremented as 128-bit big-endian integers (appendix B.1, the
    standard incrementing function). Mask ``j`` is the ``W``-byte big-endian string
    ``O_{jW/16} ‖ ... ‖ O_{(j+1)W/16 - 1}`` reduced mod n. Computed here from AES-ECB
    (the bare block cipher) to check offsets, byte order and reduction independently.
    """
    n = int(public_key.n)
    width = mask_block_bytes(n.bit_length())
    key = bytes(range(100, 132))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def reference(j: int) -> int:
        first = j * width // 16
        block = b"".join(ecb.update((first + i).to_bytes(16, "big")) for i in range(width // 16))
        return int.from_bytes(block, "big") % n

    start, count = 37, 5
    assert mask_values(key, n, start, count) == [reference(j) for j in range(start, start + 5)]
    assert mask_values(key, n, 0, 1) == [reference(0)]


def test_prg_counter_runs_across_the_low_64_bits() -> None:
    """The counter is one 128-bit integer (no 64-bit nonce half that wraps on its own)."""
    key = bytes(32)
    n = (1 << 127) - 1  # 127 bits: width 32 bytes, two AES blocks per mask
    width = mask_block_bytes(n.bit_length())
    blocks_per_mask = width // 16
    position = ((1 << 64) - 1) // blocks_per_mask  # its blocks straddle 2^64 - 1 / 2^64
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    first = position * blocks_per_mask
    block = b"".join(ecb.update((first + i).to_bytes(16, "big")) for i in range(blocks_per_mask))
    assert mask_values(key, n, position, 1) == [int.from_bytes(block, "big") % n]


@settings(max_examples=60, deadline=None)
@given(
    key=mask_keys,
    n=moduli,
    start=st.integers(0, 300),
    count=st.integers(0, 40),
    extra_before=st.integers(0, 20),
    extra_after=st.integers(0, 20),
)
def test_any_range_of_masks_is_a_slice_of_a_longer_range(
    key: bytes, n: int, start: int, count: int, extra_before: int, extra_after: int
) -> None:
    """Counter addressing: masks ``[start, start+count)`` need none of the positions before."""
    outer_start = max(0, start - extra_before)
    outer = mask_values(key, n, outer_start, (start - outer_start) + count + extra_after)
    offset = start - outer_start
    assert mask_values(key, n, start, count) == outer[offset : offset + count]


@settings(max_examples=40, deadline=None)
@given(key=mask_keys, n=moduli, start=st.integers(0, 1000), count=st.integers(0, 30))
def test_masks_lie_in_zero_to_n(key: bytes, n: int, start: int, count: int) -> None:
    masks = mask_values(key, n, start, count)
    assert len(masks) == count
    assert all(type(m) is int and 0 <= m < n for m in masks)


def test_different_keys_give_unrelated_masks(public_key: PublicKey) -> None:
    a = mask_values(bytes(32), public_key.n, 0, 8)
    b = mask_values(bytes(31) + b"\x01", public_key.n, 0, 8)
    assert not set(a) & set(b)


@pytest.mark.parametrize(("start", "count"), [(-1, 1), (0, -1)])
def test_mask_values_refuses_negative_ranges(start: int, count: int) -> None:
    with pytest.raises(ValueError, match="start and count"):
        mask_values(bytes(32), 1 << 100, start, count)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_mask_values_refuses_wrong_key_size(size: int) -> None:
    with pytest.raises(ValueError, match="mask key"):
        mask_values(bytes(size), 1 << 100, 0, 1)


def test_masks_are_uniform_mod_n(public_key: PublicKey) -> None:
    """Where masks fall in [0, n) is uniform: catches a PRG block too short for n.

    16384 masks under one key (the PRG is 2^-128-close to uniform mod n, so treat them
    as independent uniform draws). Their position ``M·256 // n`` (the top byte relative
    to n) must take all 256 values: a given value is missed with probability
    ``(1 - 1/256)^16384 < e^-64``, so some value is missed with probability below
    ``256·e^-64 ≈ 4e-26``. In 16 equal bins the counts (mean 1024) must stay within
    ±256: by Chernoff bounds a bin leaves that with probability below
    ``exp(-0.25²·1024/2.25) + exp(-0.25²·1024/2) < 5e-13``, all 16 bins below 1e-11.
    A block that covered only the low 512 - 8 bits of n, or a bias towards small
    values, fails at once.
    """
    n = int(public_key.n)
    masks = mask_values(secrets.token_bytes(32), n, 0, 16384)
    top = {m * 256 // n for m in masks}
    assert top == set(range(256))
    bins = np.bincount([m * 16 // n for m in masks], minlength=16)
    assert bins.size == 16
    assert np.all(np.abs(bins - 1024) <= 256), bins.tolist()


# --- sums of masks ----------------------------------------------------------------------


def _reference_sum(keys: list[bytes], n: int, start: int, count: int) -> list[int]:
    """``Σ_keys mask_values(key) mod n`` with Python integers, one mask at a time."""
    expected = [0] * count
    for key in keys:
        masks = mask_values(key, n, start, count)
        expected = [(a + b) % n for a, b in zip(expected, masks, strict=True)]
    return expected


@settings(max_examples=50, deadline=None)
@given(
    keys=st.lists(mask_keys, min_size=0, max_size=6),
    n=moduli,
    start=st.integers(0, 200),
    count=st.integers(0, 12),
)
def test_mask_sum_equals_python_reference(
    keys: list[bytes], n: int, start: int, count: int
) -> None:
    total = MaskSum(n, start, count)
    total.add_all(keys)
    result = total.result()
    assert result == _reference_sum(keys, n, start, count)
    assert total.keys == len(keys)
    assert all(type(v) is int and 0 <= v < n for v in result)


def test_mask_sum_of_many_keys_carries_between_limbs(public_key: PublicKey) -> None:
    """300 keys: every 32-bit limb accumulator exceeds 2^32, so the carries must be right."""
    n = int(public_key.n)
    keys = [secrets.token_bytes(32) for _ in range(300)]
    total = MaskSum(n, 5, 3)
    total.add_all(keys)
    assert total.result() == _reference_sum(keys, n, 5, 3)


def test_mask_sum_over_several_passes(
    monkeypatch: pytest.MonkeyPatch, public_key: PublicKey
) -> None:
    """A range longer than one keystream pass is summed pass by pass at the right offsets."""
    n = int(public_key.n)
    width = mask_block_bytes(n.bit_length())
    monkeypatch.setattr(masking, "_SUM_BLOCK_BYTES", 3 * width)  # three masks per pass
    keys = [secrets.token_bytes(32) for _ in range(3)]
    total = MaskSum(n, 11, 10)
    total.add_all(keys)
    assert total.result() == _reference_sum(keys, n, 11, 10)


def test_mask_sum_refuses_negative_ranges() -> None:
    with pytest.raises(ValueError, match="start and count"):
        MaskSum(1 << 100, -1, 1)
    with pytest.raises(ValueError, match="start and count"):
        MaskSum(1 << 100, 0, -1)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=moduli, count=st.integers(0, 10), key=mask_keys)
def test_remove_masks_undoes_add_masks(data: st.DataObject, n: int, count: int, key: bytes) -> None:
    plaintexts = data.draw(st.lists(st.integers(0, n - 1), min_size=count, max_size=count))
    masks = mask_values(key, n, 0, count)
    masked = add_masks(plaintexts, masks, n)
    assert all(0 <= v < n for v in masked)
    assert remove_masks(masked, masks, n) == plaintexts


def test_unmasking_a_sum_needs_exactly_the_summed_masks(public_key: PublicKey) -> None:
    """Σ(m_i + M_i) minus ΣM_i is Σm_i; minus the masks of a subset it is not."""
    n = int(public_key.n)
    keys = [secrets.token_bytes(32) for _ in range(3)]
    updates = [[secrets.randbelow(1 << 40) for _ in range(4)] for _ in keys]
    masked_sum = [0] * 4
    for key, update in zip(keys, updates, strict=True):
        masked = add_masks(update, mask_values(key, n, 0, 4), n)
        masked_sum = [(a + b) % n for a, b in zip(masked_sum, masked, strict=True)]
    everyone = MaskSum(n, 0, 4)
    everyone.add_all(keys)
    plain_sum = [sum(column) for column in zip(*updates, strict=True)]
    assert remove_masks(masked_sum, everyone.result(), n) == plain_sum
    subset = MaskSum(n, 0, 4)
    subset.add_all(keys[:2])
    assert all(v >= 1 << 50 for v in remove_masks(masked_sum, subset.result(), n))


def test_add_and_remove_masks_refuse_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 plaintexts but 1 masks"):
        add_masks([1, 2], [3], 101)
    with pytest.raises(ValueError, match="1 values but 2 mask sums"):
        remove_masks([1], [2, 3], 101)


# --- contributor sets -------------------------------------------------------------------


def test_set_digest_ignores_order_and_separates_items() -> None:
    names = [b"client-1", b"client-2", b"client-3"]
    assert set_digest(names) == set_digest(reversed(names))
    assert set_digest([b"ab", b"c"]) != set_digest([b"a", b"bc"])  # length-prefixed
    assert set_digest(names) != set_digest(names[:2])
    assert set_digest([b"a", b"a"]) != set_digest([b"a"])
    assert len(set_digest([])) == 32


# --- SecureUniform ----------------------------------------------------------------------


def test_secure_uniform_values_in_unit_interval_on_the_2_53_grid() -> None:
    values = SecureUniform().random((200, 50))
    assert values.shape == (200, 50)
    assert values.dtype == np.float64
    assert np.all(values >= 0.0) and np.all(values < 1.0)
    scaled = values * 2.0**53
    assert np.array_equal(scaled, np.floor(scaled))  # 53-bit values, as numpy's random()


def test_secure_uniform_mean_is_one_half() -> None:
    """100,000 draws: by Hoeffding, |mean - 1/2| > 0.015 has probability < 2·e^-45."""
    values = SecureUniform().random(100_000)
    assert abs(float(values.mean()) - 0.5) <= 0.015


def test_two_secure_uniforms_differ_and_a_key_reproduces() -> None:
    assert not np.array_equal(SecureUniform().random(8), SecureUniform().random(8))
    key = bytes(range(32))
    assert np.array_equal(SecureUniform(key).random(16), SecureUniform(key).random(16))
    assert not np.array_equal(SecureUniform(key).random(16), SecureUniform(bytes(32)).random(16))


def test_secure_uniform_stream_continues_across_calls() -> None:
    """Consecutive calls draw new keystream: no value is reused for two roundings."""
    key = bytes(range(32))
    rng = SecureUniform(key)
    first, second = rng.random(5), rng.random((2, 3))
    whole = SecureUniform(key).random(11)
    assert np.array_equal(np.concatenate([first, second.ravel()]), whole)
    assert not np.array_equal(first, second.ravel()[:5])
