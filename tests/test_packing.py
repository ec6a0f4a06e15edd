"""Quantization, slot packing and the weighted-mean decode (fedcore.packing)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import (
    PrivateKey,
    PublicKey,
    deserialize_ciphertexts,
    fold_update,
    serialize_ciphertexts,
)
from fedcore.errors import PackingError
from fedcore.packing import (
    PackingSpec,
    decode_sum,
    dequantize_mean,
    encode_update,
    pack_slots,
    quantize,
    unpack_slots,
)

VECTORS = Path(__file__).resolve().parent / "vectors"
_PAILLIER = json.loads((VECTORS / "paillier_512.json").read_text())
_PACKING = json.loads((VECTORS / "packing_slots.json").read_text())


@pytest.fixture(scope="module")
def private_key() -> PrivateKey:
    key = _PAILLIER["key"]
    return PrivateKey(PublicKey(int(key["n"])), int(key["p"]), int(key["q"]))


@st.composite
def specs(draw: st.DrawFn, max_key_bits: int = 1024) -> PackingSpec:
    value_bits = draw(st.integers(2, 32))
    headroom_bits = draw(st.integers(0, 32))
    key_bits = draw(st.integers(value_bits + headroom_bits + 1, max_key_bits))
    clip = draw(st.floats(1e-3, 1e3))
    return PackingSpec(
        key_bits=key_bits, value_bits=value_bits, headroom_bits=headroom_bits, clip=clip
    )


# --- PackingSpec -------------------------------------------------------------------


def test_default_spec_matches_design() -> None:
    spec = PackingSpec(key_bits=2048)
    assert spec.slot_bits == 26
    assert spec.slots_per_ciphertext == 78
    assert spec.max_total_weight == 1024
    assert spec.ciphertexts_for(535_818) == 6870
    assert spec.ciphertexts_for(0) == 0
    assert spec.ciphertexts_for(78) == 1
    assert spec.ciphertexts_for(79) == 2


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"value_bits": 1}, "value_bits"),
        ({"value_bits": 33}, "value_bits"),
        ({"value_bits": True}, "value_bits"),
        ({"headroom_bits": -1}, "headroom_bits"),
        ({"headroom_bits": 33}, "headroom_bits"),
        ({"headroom_bits": 2.0}, "headroom_bits"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"clip": math.nan}, "clip"),
        ({"clip": math.inf}, "clip"),
        ({"clip": "1"}, "clip"),
        ({"key_bits": 26}, "key_bits"),  # a 26-bit slot needs a 27-bit key
        ({"key_bits": 20000}, "key_bits"),
    ],
)
def test_spec_refuses_impossible_values(kwargs: dict[str, Any], parameter: str) -> None:
    arguments: dict[str, Any] = {"key_bits": 2048, **kwargs}
    with pytest.raises(PackingError, match=parameter):
        PackingSpec(**arguments)


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        PackingSpec(key_bits=2048, value_bits=0)


@pytest.mark.parametrize(
    ("max_total_weight", "headroom"), [(1, 0), (2, 1), (3, 2), (1000, 10), (1024, 10), (1025, 11)]
)
def test_for_federation_headroom(max_total_weight: int, headroom: int) -> None:
    spec = PackingSpec.for_federation(
        key_bits=2048, value_bits=16, max_total_weight=max_total_weight, clip=0.5
    )
    assert spec.headroom_bits == headroom
    assert spec.max_total_weight >= max_total_weight


def test_for_federation_refuses_zero_weight() -> None:
    with pytest.raises(PackingError, match="max_total_weight"):
        PackingSpec.for_federation(key_bits=2048, value_bits=16, max_total_weight=0, clip=1.0)


@given(spec=specs())
def test_spec_dict_round_trip(spec: PackingSpec) -> None:
    as_dict = spec.to_dict()
    assert all(type(v) in (int, float) for v in as_dict.values())
    assert PackingSpec.from_dict(json.loads(json.dumps(as_dict))) == spec


@pytest.mark.parametrize(
    "data",
    [
        {"key_bits": 2048, "value_bits": 16, "headroom_bits": 10},
        {"key_bits": 2048, "value_bits": 16, "headroom_bits": 10, "clip": 1.0, "extra": 1},
        {"key_bits": "2048", "value_bits": 16, "headroom_bits": 10, "clip": 1.0},
    ],
)
def test_spec_from_dict_refuses_bad_fields(data: dict[str, Any]) -> None:
    with pytest.raises(PackingError):
        PackingSpec.from_dict(data)


# --- pack / unpack (pure integers) ---------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(spec=specs(), data=st.data())
def test_pack_unpack_round_trip(spec: PackingSpec, data: st.DataObject) -> None:
    s, k = spec.slot_bits, spec.slots_per_ciphertext
    values = data.draw(st.lists(st.integers(0, (1 << s) - 1), max_size=3 * k + 5))
    plaintexts = pack_slots(np.array(values, dtype=np.uint64), spec)
    assert len(plaintexts) == spec.ciphertexts_for(len(values))
    expected = [
        sum(v << (j * s) for j, v in enumerate(values[i : i + k])) for i in range(0, len(values), k)
    ]
    assert plaintexts == expected
    assert all(0 <= p < 1 << (spec.key_bits - 1) for p in plaintexts)
    assert unpack_slots(plaintexts, spec, len(values)).tolist() == values


@settings(max_examples=100, deadline=None)
@given(spec=specs(), data=st.data())
def test_sum_of_packed_plaintexts_is_packed_sum(spec: PackingSpec, data: st.DataObject) -> None:
    """Adding packed integers adds slot by slot while the headroom holds (no carries)."""
    s, k = spec.slot_bits, spec.slots_per_ciphertext
    n_values = data.draw(st.integers(1, 2 * k + 3))
    clients = data.draw(st.integers(1, min(spec.max_total_weight, 8)))
    rows = [
        data.draw(st.lists(st.integers(0, spec.levels), min_size=n_values, max_size=n_values))
        for _ in range(clients)
    ]
    total = [0] * spec.ciphertexts_for(n_values)
    for row in rows:
        for i, p in enumerate(pack_slots(np.array(row, dtype=np.uint64), spec)):
            total[i] += p
    assert all(p < 1 << (k * s) for p in total)
    assert unpack_slots(total, spec, n_values).tolist() == [
        sum(col) for col in zip(*rows, strict=True)
    ]


@pytest.mark.parametrize("vector", _PACKING["vectors"], ids=lambda v: str(v["spec"]))
def test_packing_known_answers(vector: dict[str, Any]) -> None:
    spec = PackingSpec.from_dict(vector["spec"])
    plaintexts = [int(p) for p in vector["plaintexts"]]
    assert pack_slots(np.array(vector["values"], dtype=np.uint64), spec) == plaintexts
    assert unpack_slots(plaintexts, spec, len(vector["values"])).tolist() == vector["values"]


def test_pack_refuses_value_wider_than_slot() -> None:
    spec = PackingSpec(key_bits=512)
    with pytest.raises(PackingError, match="index 2"):
        pack_slots(np.array([0, 1, 1 << 26], dtype=np.uint64), spec)


def test_unpack_refuses_inconsistent_input() -> None:
    spec = PackingSpec(key_bits=512)  # 19 slots of 26 bits
    good = pack_slots(np.arange(20, dtype=np.uint64), spec)
    with pytest.raises(PackingError, match="plaintexts"):
        unpack_slots(good, spec, 40)
    with pytest.raises(PackingError, match="outside"):
        unpack_slots([good[0], good[1] | (1 << (19 * 26))], spec, 20)
    with pytest.raises(PackingError, match="outside"):
        unpack_slots([-1, 0], spec, 20)
    with pytest.raises(PackingError, match="padding"):
        unpack_slots([good[0], good[1] | (5 << 26)], spec, 20)


def test_full_model_pack_round_trip() -> None:
    spec = PackingSpec(key_bits=2048)
    values = np.random.default_rng(3).integers(0, 1 << 26, size=535_818, dtype=np.uint64)
    plaintexts = pack_slots(values, spec)
    assert len(plaintexts) == 6870
    assert np.array_equal(unpack_slots(plaintexts, spec, values.size), values)


# --- quantization ---------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    spec=specs(),
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50),
    seed=st.integers(0, 2**32),
)
def test_quantization_error_at_most_one_step(
    spec: PackingSpec, values: list[float], seed: int
) -> None:
    v = np.array(values)
    q = quantize(v, spec, np.random.default_rng(seed))
    assert q.dtype == np.uint64
    assert int(q.max()) <= spec.levels
    restored = dequantize_mean(q, spec, 1)
    clipped = np.clip(v, -spec.clip, spec.clip)
    assert np.all(np.abs(restored - clipped) <= spec.step * (1 + 1e-9) + 1e-12 * spec.clip)


def test_quantize_is_reproducible_with_a_seed() -> None:
    spec = PackingSpec(key_bits=512, value_bits=8)
    v = np.linspace(-2, 2, 1000)
    a = quantize(v, spec, np.random.default_rng(7))
    b = quantize(v, spec, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert a[0] == 0 and a[-1] == spec.levels  # clipped ends map to the extremes


def test_stochastic_rounding_is_unbiased() -> None:
    spec = PackingSpec(key_bits=512, value_bits=4, clip=1.0)
    draws = 200_000
    for x in (0.3, 7.77, 14.5):  # position in quantization steps
        value = x * spec.step - spec.clip
        q = quantize(np.full(draws, value), spec, np.random.default_rng(11))
        assert set(np.unique(q).tolist()) <= {math.floor(x), math.ceil(x)}
        sigma = math.sqrt((x % 1) * (1 - x % 1) / draws)
        assert abs(q.mean() - x) <= 5 * sigma + 1e-12


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_quantize_refuses_non_finite(bad: float) -> None:
    spec = PackingSpec(key_bits=512)
    with pytest.raises(PackingError, match="index 1"):
        quantize(np.array([0.0, bad]), spec, np.random.default_rng(0))


# --- encode_update / decode_sum ---------------------------------------------------------


def _expected_mean(
    updates: list[np.ndarray], weights: list[int], seeds: list[int], spec: PackingSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Exact weighted mean of the quantized values, and its float32 dequantization."""
    summed = np.zeros(updates[0].size if updates else 0, dtype=object)
    for update, weight, seed in zip(updates, weights, seeds, strict=True):
        summed = (
            summed
            + np.asarray(quantize(update, spec, np.random.default_rng(seed)), object) * weight
        )
    total = sum(weights)
    exact = np.array([float(x) for x in summed]) * (spec.step / total) - spec.clip
    return exact, dequantize_mean(np.asarray(summed, dtype=np.uint64), spec, total).astype(
        np.float32
    )


@settings(max_examples=60, deadline=None)
@given(spec=specs(max_key_bits=700), data=st.data())
def test_decode_of_summed_plaintexts_is_weighted_mean(
    spec: PackingSpec, data: st.DataObject
) -> None:
    n_values = data.draw(st.integers(0, 3 * spec.slots_per_ciphertext))
    clients = data.draw(st.integers(1, min(6, spec.max_total_weight)))
    max_weight = max(1, spec.max_total_weight // clients)
    weights = [data.draw(st.integers(1, min(max_weight, 1000))) for _ in range(clients)]
    seeds = [data.draw(st.integers(0, 2**32)) for _ in range(clients)]
    updates = [
        np.random.default_rng(seed + 1).normal(0, spec.clip, n_values).astype(np.float32)
        for seed in seeds
    ]
    total = [0] * spec.ciphertexts_for(n_values)
    for update, weight, seed in zip(updates, weights, seeds, strict=True):
        encoded = encode_update(update, spec, weight=weight, rng=np.random.default_rng(seed))
        total = [a + b for a, b in zip(total, encoded, strict=True)]
    mean = decode_sum(total, spec, n_values=n_values, total_weight=sum(weights))
    exact, expected = _expected_mean(updates, weights, seeds, spec)
    assert mean.dtype == np.float32 and mean.shape == (n_values,)
    assert np.array_equal(mean, expected)
    assert np.allclose(mean, exact, rtol=1e-6, atol=1e-6 * spec.clip)


@pytest.mark.parametrize(("clients", "weights"), [(1, [1]), (3, [5, 1, 300]), (4, [256] * 4)])
def test_encrypted_fedavg_round_trip(
    private_key: PrivateKey, clients: int, weights: list[int]
) -> None:
    pk = private_key.public_key
    spec = PackingSpec(key_bits=pk.bits, value_bits=16, headroom_bits=10, clip=0.05)
    n_values = 100  # 6 ciphertexts of 19 slots
    seeds = list(range(clients))
    updates = [
        np.random.default_rng(100 + s).normal(0, 0.02, n_values).astype(np.float32) for s in seeds
    ]
    running: list[Any] | None = None
    for update, weight, seed in zip(updates, weights, seeds, strict=True):
        encoded = encode_update(update, spec, weight=weight, rng=np.random.default_rng(seed))
        wire = serialize_ciphertexts(pk.encrypt_vector(encoded), pk)
        received = deserialize_ciphertexts(wire, pk)
        if running is None:
            running = received
        else:
            fold_update(running, received, pk)
    assert running is not None
    mean = decode_sum(
        private_key.decrypt_vector(running), spec, n_values=n_values, total_weight=sum(weights)
    )
    exact, expected = _expected_mean(updates, weights, seeds, spec)
    assert np.array_equal(mean, expected)
    assert np.allclose(mean, exact, atol=1e-7)
    weighted = sum(w * np.clip(u, -0.05, 0.05) for u, w in zip(updates, weights, strict=True))
    assert np.allclose(mean, weighted / sum(weights), atol=spec.step)


def test_total_weight_over_headroom_raises() -> None:
    spec = PackingSpec(key_bits=512, headroom_bits=2)
    # The largest legal sum: every value at +clip, total weight exactly 2^h.
    plaintexts = encode_update(np.ones(5, np.float32), spec, weight=4, rng=np.random.default_rng(0))
    assert np.array_equal(
        decode_sum(plaintexts, spec, n_values=5, total_weight=4), np.ones(5, np.float32)
    )
    with pytest.raises(PackingError, match="would overflow slot headroom"):
        decode_sum(plaintexts, spec, n_values=5, total_weight=5)


def test_weight_over_headroom_refused_at_encode() -> None:
    spec = PackingSpec(key_bits=512, headroom_bits=2)
    with pytest.raises(PackingError, match="weight"):
        encode_update(np.zeros(5, np.float32), spec, weight=5, rng=np.random.default_rng(0))
    with pytest.raises(PackingError, match="weight"):
        encode_update(np.zeros(5, np.float32), spec, weight=0, rng=np.random.default_rng(0))


def test_slot_sum_above_declared_weight_raises() -> None:
    spec = PackingSpec(key_bits=512)
    plaintexts = encode_update(np.ones(5, np.float32), spec, weight=3, rng=np.random.default_rng(0))
    with pytest.raises(PackingError, match="exceeds"):
        decode_sum(plaintexts, spec, n_values=5, total_weight=2)


def test_encode_refuses_bad_updates() -> None:
    spec = PackingSpec(key_bits=512)
    rng = np.random.default_rng(0)
    with pytest.raises(PackingError, match="1-D"):
        encode_update(np.zeros((2, 2), np.float32), spec, rng=rng)
    with pytest.raises(PackingError, match="float"):
        encode_update(np.zeros(4, np.int64), spec, rng=rng)
    with pytest.raises(PackingError, match="finite"):
        encode_update(np.array([0.0, np.nan], np.float32), spec, rng=rng)


def test_full_model_encode_decode() -> None:
    spec = PackingSpec(key_bits=2048, clip=0.05)
    update = (np.random.default_rng(5).standard_normal(535_818) * 0.01).astype(np.float32)
    plaintexts = encode_update(update, spec, weight=7, rng=np.random.default_rng(6))
    assert len(plaintexts) == 6870
    mean = decode_sum(plaintexts, spec, n_values=update.size, total_weight=7)
    assert np.max(np.abs(mean - np.clip(update, -0.05, 0.05))) <= spec.step * 1.0001
