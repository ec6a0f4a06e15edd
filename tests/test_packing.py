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


# --- contributions: update, weight, evaluated weight and report in one slot vector --------
# (imports for this part are kept here so that the part above stays as it was)

import random  # noqa: E402

from fedcore.packing import (  # noqa: E402
    CONTRIBUTION_TAIL_SLOTS,
    decode_contribution_sum,
    encode_contribution,
)


def _contribution_slots(spec: PackingSpec, n_values: int, **slots: Any) -> list[int]:
    """Pack a hand-made slot vector: model values, W, E, then report slots."""
    model = slots.get("model", [0] * n_values)
    report = slots.get("report", [])
    vector = [*model, slots["weight"], slots["evaluated"], *report]
    return pack_slots(np.array(vector, dtype=np.uint64), spec)


@settings(max_examples=80, deadline=None)
@given(spec=specs(max_key_bits=700), data=st.data())
def test_contributions_sum_to_the_weighted_mean(spec: PackingSpec, data: st.DataObject) -> None:
    """Σ of encoded contributions decodes to the weighted mean, W, E and the report means."""
    n_values = data.draw(st.integers(0, 2 * spec.slots_per_ciphertext))
    bounds = data.draw(st.lists(st.floats(0.01, 100.0), max_size=3))
    clients = data.draw(st.integers(1, min(5, spec.max_total_weight)))
    weights = [
        data.draw(st.integers(1, max(1, min(1000, spec.max_total_weight // clients))))
        for _ in range(clients)
    ]
    reports = [
        data.draw(
            st.none()
            | st.lists(
                st.floats(-10.0, 200.0, allow_nan=False),
                min_size=len(bounds),
                max_size=len(bounds),
            )
        )
        for _ in range(clients)
    ]
    seed = data.draw(st.integers(0, 2**32))
    updates = [
        np.random.default_rng(seed + i).normal(0, spec.clip, n_values).astype(np.float32)
        for i in range(clients)
    ]
    total = [0] * spec.ciphertexts_for(n_values + CONTRIBUTION_TAIL_SLOTS + len(bounds))
    for i, (update, weight, report) in enumerate(zip(updates, weights, reports, strict=True)):
        encoded = encode_contribution(
            update,
            spec,
            weight=weight,
            report=report,
            report_bounds=bounds,
            rng=np.random.default_rng(seed + 1000 + i),
        )
        assert len(encoded) == len(total)
        total = [a + b for a, b in zip(total, encoded, strict=True)]
    result = decode_contribution_sum(total, spec, n_values=n_values, report_bounds=bounds)

    total_weight = sum(weights)
    evaluated = sum(w for w, r in zip(weights, reports, strict=True) if r is not None)
    assert result.total_weight == total_weight
    assert result.evaluated_weight == evaluated
    clipped = [np.clip(u.astype(np.float64), -spec.clip, spec.clip) for u in updates]
    exact = sum(w * c for w, c in zip(weights, clipped, strict=True)) / total_weight
    assert result.mean_update.dtype == np.float32 and result.mean_update.shape == (n_values,)
    assert np.all(np.abs(result.mean_update - exact) <= spec.step * (1 + 1e-9) + 1e-6 * spec.clip)
    if evaluated == 0:
        assert result.report_means is None
    else:
        assert result.report_means is not None and len(result.report_means) == len(bounds)
        for k, bound in enumerate(bounds):
            mean = (
                sum(
                    w * min(max(r[k], 0.0), bound)
                    for w, r in zip(weights, reports, strict=True)
                    if r is not None
                )
                / evaluated
            )
            assert abs(result.report_means[k] - mean) <= bound / spec.levels * (1 + 1e-9)


class HalfRng:
    """A fixed ``random(shape)`` source that always draws 0.5 (rounds x.5 either way)."""

    def random(self, shape: Any) -> np.ndarray:
        return np.full(shape, 0.5)


def test_one_contribution_lays_out_its_slots() -> None:
    """Slots are [w·q.., w, e, e·r..]: checked on values that quantize exactly."""
    spec = PackingSpec(key_bits=512, value_bits=4, headroom_bits=4, clip=1.0)  # 15 levels
    update = np.array([-1.0, 1.0, -1.0 + 2.0 * 7 / 15], dtype=np.float64)  # q = 0, 15, 7
    encoded = encode_contribution(
        update, spec, weight=3, report=[0.5, 20.0], report_bounds=[1.0, 10.0], rng=HalfRng()
    )
    slots = unpack_slots(encoded, spec, 3 + CONTRIBUTION_TAIL_SLOTS + 2).tolist()
    assert slots[:3] == [0, 45, 21]  # w·q
    assert slots[3:5] == [3, 3]  # W, E
    assert slots[5] in (3 * 7, 3 * 8)  # 0.5 of [0, 1] is 7.5 levels, rounded either way
    assert slots[6] == 3 * 15  # 20 is clipped to the bound 10: 15 levels
    no_report = encode_contribution(
        update, spec, weight=3, report=None, report_bounds=[1.0, 10.0], rng=HalfRng()
    )
    assert unpack_slots(no_report, spec, 7).tolist()[3:] == [3, 0, 0, 0]


def test_encode_contribution_refuses_bad_inputs() -> None:
    spec = PackingSpec(key_bits=512, headroom_bits=2)
    rng = np.random.default_rng(0)
    update = np.zeros(3, np.float32)
    with pytest.raises(PackingError, match="weight"):
        encode_contribution(update, spec, weight=0, report=None, report_bounds=(), rng=rng)
    with pytest.raises(PackingError, match="weight"):
        encode_contribution(update, spec, weight=5, report=None, report_bounds=(), rng=rng)
    with pytest.raises(PackingError, match="report has 1 values, expected 2"):
        encode_contribution(update, spec, weight=1, report=[0.5], report_bounds=(1, 1), rng=rng)
    with pytest.raises(PackingError, match="finite"):
        encode_contribution(
            update, spec, weight=1, report=[math.nan], report_bounds=(1.0,), rng=rng
        )
    with pytest.raises(PackingError, match="1-D"):
        encode_contribution(
            np.zeros((2, 2)), spec, weight=1, report=None, report_bounds=(), rng=rng
        )
    with pytest.raises(PackingError, match="float"):
        encode_contribution(
            np.zeros(2, np.int32), spec, weight=1, report=None, report_bounds=(), rng=rng
        )


_SPEC = PackingSpec(key_bits=512, value_bits=16, headroom_bits=10, clip=0.5)  # 19 slots of 26


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        ({"weight": 0, "evaluated": 0}, "total weight 0"),
        ({"weight": 1025, "evaluated": 0}, "total weight 1025"),  # above 2^headroom_bits
        ({"weight": 2, "evaluated": 3}, "evaluated weight 3 exceeds the total weight 2"),
        (
            {"weight": 2, "evaluated": 0, "model": [0, 2 * 65535 + 1, 0]},
            "index 1 exceeds",
        ),
        (
            {"weight": 2, "evaluated": 1, "report": [65535, 65536]},
            "report slot exceeds",
        ),
    ],
    ids=["no-weight", "over-headroom", "evaluated-over-total", "model-slot", "report-slot"],
)
def test_decode_contribution_refuses_impossible_sums(slots: dict[str, Any], message: str) -> None:
    plaintexts = _contribution_slots(_SPEC, 3, **slots)
    with pytest.raises(PackingError, match=message):
        decode_contribution_sum(plaintexts, _SPEC, n_values=3, report_bounds=(1.0, 1.0))


def test_decode_contribution_accepts_the_extremes() -> None:
    """Control for the refusals: W = 2^h, E = W, full model and report slots decode."""
    plaintexts = _contribution_slots(
        _SPEC,
        3,
        weight=1024,
        evaluated=1024,
        model=[0, 1024 * 65535, 512 * 65535],
        report=[1024 * 65535, 0],
    )
    result = decode_contribution_sum(plaintexts, _SPEC, n_values=3, report_bounds=(1.0, 4.0))
    assert result.total_weight == 1024 and result.evaluated_weight == 1024
    assert np.allclose(result.mean_update, [-0.5, 0.5, 0.0], atol=_SPEC.step)
    assert result.report_means == (1.0, 0.0)


def test_decode_contribution_refuses_a_weight_below_the_quorum() -> None:
    plaintexts = _contribution_slots(_SPEC, 3, weight=2, evaluated=0)
    with pytest.raises(PackingError, match=r"outside 3\.\.1024"):
        decode_contribution_sum(plaintexts, _SPEC, n_values=3, report_bounds=(), min_total_weight=3)


def test_decode_contribution_refuses_bits_outside_the_slots() -> None:
    plaintexts = _contribution_slots(_SPEC, 3, weight=1, evaluated=0)
    with pytest.raises(PackingError, match="outside"):
        decode_contribution_sum(
            [plaintexts[0] | 1 << (19 * 26)], _SPEC, n_values=3, report_bounds=()
        )
    with pytest.raises(PackingError, match="padding"):
        decode_contribution_sum(
            [plaintexts[0] | 1 << (10 * 26)], _SPEC, n_values=3, report_bounds=()
        )


@pytest.mark.parametrize("n_values", [10, 74, 100])
def test_decode_of_random_plaintexts_mod_n_is_refused(n_values: int) -> None:
    """What a wrong unmasking yields (uniform values mod a 2048-bit n) never decodes.

    With 2048-bit keys and 26-bit slots, a plaintext holds 78 slots (2028 bits): a
    uniform value below n >= 2^2047 has no bit above the slots with probability at
    most 2^-19, and then W must land in 1..1024 (2^-16) and every model slot below
    W·(2^16 - 1). n_values=74 fills one plaintext exactly (no padding to catch it), so
    one trial passes with probability below 2^-35 and the 2,000 trials below 2^-24.
    """
    spec = PackingSpec(key_bits=2048, value_bits=16, headroom_bits=10, clip=0.5)
    bounds = (1.0, 10.0)
    count = spec.ciphertexts_for(n_values + CONTRIBUTION_TAIL_SLOTS + len(bounds))
    generator = random.Random(n_values)
    n = generator.getrandbits(2048) | (1 << 2047) | 1
    for _ in range(2000):
        plaintexts = [generator.randrange(n) for _ in range(count)]
        with pytest.raises(PackingError):
            decode_contribution_sum(plaintexts, spec, n_values=n_values, report_bounds=bounds)
