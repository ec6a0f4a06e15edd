"""`DecryptPool`: a committee member's decryption workers, started once and reused."""

from __future__ import annotations

import secrets

import pytest

from fedcore.crypto import DecryptPool, PrivateKey
from fedcore.crypto.modexp import constant_time_backend

SHARDS = 3  # a member decrypts several shards a round, and rounds follow


def _shards(private_key: PrivateKey) -> list[tuple[list[int], list[int]]]:
    """Shards of ciphertexts (enough for both workers to get a range) and their plaintexts."""
    pk = private_key.public_key
    out = []
    for _ in range(SHARDS):
        plaintexts = [secrets.randbelow(int(pk.n)) for _ in range(80)]
        out.append((pk.encrypt_vector(plaintexts), plaintexts))
    return out


@pytest.mark.parametrize("constant_time", [True, False], ids=["constant-time", "gmp"])
def test_one_pool_opens_every_shard_like_a_single_worker(
    private_key: PrivateKey, constant_time: bool
) -> None:
    shards = _shards(private_key)
    with DecryptPool(2) as pool:
        for ciphertexts, plaintexts in shards:
            opened = private_key.open_vector(ciphertexts, constant_time=constant_time, pool=pool)
            alone = private_key.open_vector(ciphertexts, constant_time=constant_time)
            assert opened == alone and opened[0] == plaintexts
        threads = constant_time and constant_time_backend() == "openssl"
        # OpenSSL's exponentiation releases the GIL: threads, no process at all; GMP's
        # does not: worker processes, started for the first shard and kept for the rest
        assert pool.processes_started == (0 if threads else 1)


def test_a_pool_refuses_zero_workers() -> None:
    with pytest.raises(ValueError, match="workers"):
        DecryptPool(0)
