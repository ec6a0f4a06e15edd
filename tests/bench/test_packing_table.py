"""Tests for bench.packing_table: fedcore's own packing figures at 10 and 1,000 clients."""

from __future__ import annotations

from typing import Any

import pytest

from bench.packing_table import SEED_MLP_PARAMETERS, packing_lines, packing_table
from fedcore.crypto import generate_keypair


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    return packing_table(2048, SEED_MLP_PARAMETERS)


def test_packing_table_at_2048_bits_matches_fedcores_packing(table: dict[str, Any]) -> None:
    got = {
        (row["value_bits"], row["clients_per_round"]): (
            row["headroom_bits"],
            row["slot_bits"],
            row["values_per_ciphertext"],
            row["ciphertexts_per_update"],
        )
        for row in table["rows"]
    }
    # values per ciphertext = (2048 - 1) // slot bits; the update is 535,818 values plus
    # weight, evaluated weight and 2 report metrics
    assert got == {
        (16, 10): (10, 26, 78, 6870),
        (16, 1000): (16, 32, 63, 8506),
        (8, 10): (10, 18, 113, 4742),
        (8, 1000): (16, 24, 85, 6304),
    }
    for row in table["rows"]:
        assert row["ciphertext_bytes"] == 512
        assert row["bytes_per_value"] == pytest.approx(
            512 * row["ciphertexts_per_update"] / SEED_MLP_PARAMETERS
        )


def test_packing_lines_print_one_line_per_row(table: dict[str, Any]) -> None:
    lines = packing_lines(table)
    assert lines[0] == "packing, 2048-bit key, 535,818 parameters:"
    assert len(lines) == 2 + 4
    assert lines[2].split() == ["16", "10", "10", "26", "78", "6870", "6.56"]


def test_packing_table_refuses_a_key_of_another_size() -> None:
    public_key, _ = generate_keypair(512)
    with pytest.raises(ValueError, match="512 bits"):
        packing_table(2048, public_key=public_key)
    with pytest.raises(ValueError, match="parameters"):
        packing_table(512, 0, public_key=public_key)
