"""Safe-prime search for the threshold key ceremony (fedcore.crypto.safeprime)."""

from __future__ import annotations

import secrets

import gmpy2
import pytest

from fedcore.crypto import safeprime
from fedcore.crypto.safeprime import random_safe_prime


class _DrawBudget:
    """Stands in for :mod:`secrets` in safeprime: fails after ``limit`` draws, not never."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def randbits(self, k: int) -> int:
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("random_safe_prime drew too many candidate windows")
        return secrets.randbits(k)


def _assert_safe_prime(p: gmpy2.mpz, bits: int) -> None:
    assert p.bit_length() == bits
    assert p >> (bits - 2) == 0b11  # top two bits: a product of two has exactly 2·bits
    assert gmpy2.is_prime(p, 50)
    assert gmpy2.is_prime((p - 1) // 2, 50)


@pytest.mark.parametrize("bits", [64, 65, 128, 256])
def test_random_safe_prime_has_exact_size_and_is_safe(bits: int) -> None:
    p = random_safe_prime(bits)
    _assert_safe_prime(p, bits)


def test_random_safe_prime_is_not_repeated() -> None:
    assert len({int(random_safe_prime(128)) for _ in range(4)}) == 4


def test_random_safe_prime_reports_progress() -> None:
    calls: list[int] = []
    p = random_safe_prime(128, calls.append)
    _assert_safe_prime(p, 128)
    assert calls, "progress was never called"
    assert all(isinstance(tried, int) and tried > 0 for tried in calls)
    assert calls == sorted(calls)  # candidates tried so far only grows


@pytest.mark.parametrize("bits", [-1, 0, 2, 8, 16, 19, 63])
def test_random_safe_prime_refuses_tiny_sizes(bits: int) -> None:
    # below 64 bits the search window would not fit (16..19 bits once looped forever)
    with pytest.raises(ValueError, match="bits must be >= 64"):
        random_safe_prime(bits)


def test_smallest_accepted_size_terminates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safeprime, "secrets", _DrawBudget(2000))
    _assert_safe_prime(random_safe_prime(64), 64)
