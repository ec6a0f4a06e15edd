"""Federation parameters, session settings, round plans, reports, reject reasons (contracts)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.contracts import (
    DEFAULT_REPORT_METRICS,
    MAX_COMMITTEE,
    ClientReport,
    FederationMismatch,
    FederationParams,
    RejectReason,
    RoundPlan,
    SessionInfo,
)
from fedcore.crypto import PrivateKey, PublicKey, deal, generate_keypair
from fedcore.errors import ConfigError
from fedcore.packing import PackingSpec
from protocol.errors import ErrorCode

VECTORS = Path(__file__).resolve().parent / "vectors"
_KEY = json.loads((VECTORS / "paillier_512.json").read_text())["key"]
KEY_512 = PrivateKey(PublicKey(int(_KEY["n"])), int(_KEY["p"]), int(_KEY["q"])).public_key
OTHER_512, _ = generate_keypair(512)
THRESHOLD_512, _SHARES = deal(512, 2, 3)


def _shared(**changes: Any) -> FederationParams:
    values: dict[str, Any] = {"mode": "shared", "public_key": KEY_512}
    values.update(changes)
    return FederationParams(**values)


# --- documents --------------------------------------------------------------------------

metric_names = st.text(min_size=1, max_size=64)
positive_floats = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)


@st.composite
def federations(draw: st.DrawFn) -> FederationParams:
    """Any valid federation (a 512-bit key fits every slot size the fields allow)."""
    shared = draw(st.booleans())
    headroom = draw(st.integers(1, 32))  # the packing's MAX_HEADROOM_BITS
    max_weight = draw(st.integers(1, min(1 << 20, 1 << (headroom - 1))))
    max_contributors = (1 << headroom) // max_weight
    names = draw(st.lists(metric_names, max_size=16, unique=True))
    return FederationParams(
        mode="shared" if shared else "plaintext",
        public_key=draw(st.sampled_from([KEY_512, OTHER_512])) if shared else None,
        value_bits=draw(st.integers(2, 32)),
        headroom_bits=headroom,
        clip=draw(positive_floats),
        min_clients=draw(st.integers(2, min(max_contributors, 1 << 30))),
        max_weight=max_weight,
        samples_per_weight=draw(st.integers(1, 1 << 40)),
        report_metrics=tuple((name, draw(positive_floats)) for name in names),
        unmaskers=draw(st.integers(1, MAX_COMMITTEE)),
    )


@settings(max_examples=150, deadline=None)
@given(params=federations())
def test_federation_document_round_trip(params: FederationParams) -> None:
    data = params.to_bytes()
    again = FederationParams.from_bytes(data)
    assert again == params
    assert again.to_bytes() == data
    assert again.digest() == params.digest()
    assert FederationParams.from_document(json.loads(json.dumps(params.to_document()))) == params


@settings(max_examples=30, deadline=None)
@given(params=federations())
def test_federation_file_round_trip(params: FederationParams, tmp_path_factory: Any) -> None:
    path = tmp_path_factory.mktemp("fed") / "federation.json"
    params.save(path)
    assert FederationParams.load(path) == params


def test_canonical_bytes_are_stable() -> None:
    """The bytes (hence the digest every client pins) of a federation never change."""
    params = FederationParams(mode="plaintext", public_key=None)
    assert params.to_bytes() == (
        b'{"clip":0.5,"headroom_bits":10,"max_weight":64,"min_clients":3,"mode":"plaintext",'
        b'"public_key":null,"report_metrics":[["accuracy",1.0],["loss",10.0]],'
        b'"samples_per_weight":100,"type":"fedcore-federation","unmaskers":1,"value_bits":16,'
        b'"version":1}'
    )
    assert len(params.digest()) == 32
    assert params.digest() == FederationParams(mode="plaintext", public_key=None).digest()


def test_document_carries_the_key_identity() -> None:
    document = _shared().to_document()
    assert document["public_key"] == {"n": str(KEY_512.n), "sha256": KEY_512.sha256()}


# One changed value per field: each must change the digest and be named by mismatches.
_CHANGES: dict[str, Any] = {
    "mode": {"mode": "plaintext", "public_key": None},
    "public_key": {"public_key": OTHER_512},
    "value_bits": {"value_bits": 12},
    "headroom_bits": {"headroom_bits": 11},
    "clip": {"clip": 0.25},
    "min_clients": {"min_clients": 4},
    "max_weight": {"max_weight": 32},
    "samples_per_weight": {"samples_per_weight": 50},
    "report_metrics": {"report_metrics": (("accuracy", 1.0),)},
    "unmaskers": {"unmaskers": 2},
    "threshold_key": {"mode": "threshold", "public_key": None, "threshold_key": THRESHOLD_512},
}


def test_change_table_covers_every_field() -> None:
    assert set(_CHANGES) == {f.name for f in dataclasses.fields(FederationParams)}


@pytest.mark.parametrize("field", sorted(_CHANGES))
def test_digest_is_sensitive_to_every_field(field: str) -> None:
    base = _shared()
    changed = dataclasses.replace(base, **_CHANGES[field])
    assert changed.digest() != base.digest()


def test_digest_is_sensitive_to_a_report_bound_and_metric_order() -> None:
    base = _shared()
    bound = _shared(report_metrics=(("accuracy", 1.0), ("loss", 11.0)))
    order = _shared(report_metrics=(("loss", 10.0), ("accuracy", 1.0)))
    assert len({base.digest(), bound.digest(), order.digest()}) == 3


@pytest.mark.parametrize("field", sorted(_CHANGES))
def test_mismatches_names_exactly_the_differing_field(field: str) -> None:
    pinned = _shared()
    offered = dataclasses.replace(pinned, **_CHANGES[field])
    problems = pinned.mismatches(offered)
    differing = {
        "mode": {"mode", "public_key"},
        "threshold_key": {"mode", "public_key", "threshold_key"},
    }.get(field, {field})
    assert {line.split(":")[0] for line in problems} == differing
    assert pinned.mismatches(pinned) == []


def _threshold(**changes: Any) -> FederationParams:
    values: dict[str, Any] = {"mode": "threshold", "public_key": None}
    values.update({"threshold_key": THRESHOLD_512, **changes})
    return FederationParams(**values)


def test_a_threshold_federation_pins_its_whole_threshold_key() -> None:
    params = _threshold()
    assert params.public_key == THRESHOLD_512.public_key and params.encrypted
    document = params.to_document()
    assert document["threshold_key"]["sha256"] == THRESHOLD_512.sha256()
    assert document["threshold_key"]["verification_keys"] == [
        str(v) for v in THRESHOLD_512.verification_keys
    ]
    again = FederationParams.from_bytes(params.to_bytes())
    assert again == params and again.digest() == params.digest()
    # a verification key swapped for another member's: refused, not silently trusted
    forged = json.loads(params.to_bytes())
    keys = forged["threshold_key"]["verification_keys"]
    keys[0], keys[1] = keys[1], keys[0]
    with pytest.raises(ValueError, match="sha256"):
        FederationParams.from_document(forged)


def test_threshold_mode_needs_its_key_and_no_other() -> None:
    with pytest.raises(ValueError, match="threshold public key"):
        FederationParams(mode="threshold", public_key=KEY_512)
    with pytest.raises(ValueError, match="not the threshold key's n"):
        _threshold(public_key=KEY_512)
    with pytest.raises(ValueError, match="has no threshold key"):
        _shared(threshold_key=THRESHOLD_512)


def test_a_threshold_federation_mismatch_names_the_key() -> None:
    pinned = _threshold()
    other, _ = deal(512, 2, 3)
    problems = pinned.mismatches(_threshold(threshold_key=other))
    assert [line.split(":")[0] for line in problems] == ["public_key", "threshold_key"]
    assert other.sha256()[:16] in problems[1] and THRESHOLD_512.sha256()[:16] in problems[1]
    assert pinned.mismatches(_shared()) != []


def test_mismatches_lists_every_differing_field() -> None:
    pinned = _shared()
    offered = _shared(public_key=OTHER_512, clip=0.25, min_clients=5)
    problems = pinned.mismatches(offered)
    assert [line.split(":")[0] for line in problems] == ["clip", "min_clients", "public_key"]
    key_line = problems[2]
    assert OTHER_512.sha256()[:16] in key_line and KEY_512.sha256()[:16] in key_line
    assert "the aggregator says 0.25, pinned 0.5" in problems[0]


def test_require_same_raises_federation_mismatch_naming_the_source() -> None:
    pinned = _shared()
    pinned.require_same(_shared(), source="the pinned file")  # equal: nothing raised
    with pytest.raises(FederationMismatch, match=r"the pinned file.*value_bits") as info:
        pinned.require_same(_shared(value_bits=8), source="the pinned file")
    assert isinstance(info.value, ConfigError)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mode": "paillier"}, "mode"),
        ({"public_key": None}, "public key"),
        ({"mode": "plaintext"}, "public key"),  # a plaintext federation with a key
        ({"public_key": int(KEY_512.n)}, "public key"),
        ({"value_bits": 1}, "value_bits"),
        ({"value_bits": 33}, "value_bits"),
        ({"value_bits": True}, "value_bits"),
        ({"value_bits": 16.0}, "value_bits"),
        ({"headroom_bits": 0}, "headroom_bits"),
        ({"headroom_bits": 41}, "headroom_bits"),
        ({"headroom_bits": 33}, "headroom_bits"),  # more than the packing can hold
        ({"clip": 0}, "clip"),
        ({"clip": -0.5}, "clip"),
        ({"clip": math.nan}, "clip"),
        ({"clip": math.inf}, "clip"),
        ({"clip": "0.5"}, "clip"),
        ({"clip": True}, "clip"),
        ({"min_clients": 1}, "min_clients"),
        ({"min_clients": 17}, "min_clients"),  # 2^10 // 64 = 16 clients fit the headroom
        ({"max_weight": 0}, "max_weight"),
        ({"max_weight": (1 << 20) + 1}, "max_weight"),
        ({"samples_per_weight": 0}, "samples_per_weight"),
        ({"samples_per_weight": 1.5}, "samples_per_weight"),
        ({"unmaskers": 0}, "unmaskers"),
        ({"unmaskers": MAX_COMMITTEE + 1}, "unmaskers"),
        ({"report_metrics": (("a", 1.0), ("a", 2.0))}, "report_metrics"),
        ({"report_metrics": (("", 1.0),)}, "report_metrics"),
        ({"report_metrics": (("x" * 65, 1.0),)}, "report_metrics"),
        ({"report_metrics": tuple((f"m{i}", 1.0) for i in range(17))}, "report_metrics"),
        ({"report_metrics": (("a", 0.0),)}, "report_metrics"),
        ({"report_metrics": (("a", -1.0),)}, "report_metrics"),
        ({"report_metrics": (("a", math.nan),)}, "report_metrics"),
        ({"report_metrics": (("a", math.inf),)}, "report_metrics"),
    ],
)
def test_invalid_federation_values_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _shared(**changes)


@pytest.mark.parametrize("bound", ["2", True, "x", None])
def test_report_metric_bound_must_be_a_number(bound: Any) -> None:
    with pytest.raises(ValueError, match="report_metrics"):
        _shared(report_metrics=(("accuracy", bound),))


def test_valid_edges_are_accepted() -> None:
    edge = _shared(value_bits=32, headroom_bits=32, min_clients=2, max_weight=1 << 20, unmaskers=16)
    assert edge.max_contributors == (1 << 32) // (1 << 20)
    wide = FederationParams(mode="plaintext", public_key=None, headroom_bits=32)
    assert wide.max_contributors == (1 << 32) // 64
    assert _shared(headroom_bits=1, max_weight=1, min_clients=2).max_contributors == 2
    assert _shared(report_metrics=()).report_metrics == ()
    assert _shared(clip=1).clip == 1.0 and type(_shared(clip=1).clip) is float


def test_headroom_error_names_both_fields() -> None:
    with pytest.raises(ValueError, match=r"headroom_bits 3 holds 1 clients.*min_clients 3"):
        _shared(headroom_bits=3, max_weight=8)


@pytest.mark.parametrize(
    ("document_changes", "field"),
    [
        ({"type": "something"}, "type"),
        ({"version": 2}, "version"),
        ({"extra": 1}, "extra"),
        ({"mode": None}, "mode"),
        ({"public_key": "123"}, "public_key"),
        ({"public_key": {"n": 123}}, "public_key"),
        ({"public_key": {"n": "12a"}}, "public_key.n"),
        ({"public_key": {"n": "9" * 5001}}, "public_key.n"),
        ({"public_key": {"n": str(KEY_512.n), "sha256": "0" * 64}}, "sha256"),
        ({"public_key": {"n": str(KEY_512.n)}}, "sha256"),
        ({"public_key": {"n": "15", "sha256": ""}}, "n must have"),
        ({"report_metrics": "accuracy"}, "report_metrics"),
        ({"report_metrics": [["accuracy", 1.0, 2.0]]}, "report_metrics"),
        ({"value_bits": "16"}, "value_bits"),
        ({"clip": None}, "clip"),
    ],
)
def test_bad_documents_name_the_field(document_changes: dict[str, Any], field: str) -> None:
    document = _shared().to_document()
    document.update(document_changes)
    with pytest.raises(ValueError, match=field):
        FederationParams.from_document(document)


def test_document_without_a_field_names_it() -> None:
    for name in ("mode", "public_key"):
        document = _shared().to_document()
        del document[name]
        with pytest.raises(ValueError, match=name):
            FederationParams.from_document(document)
    document = _shared().to_document()
    del document["value_bits"]  # optional: the default applies
    assert FederationParams.from_document(document).value_bits == 16


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff", b"x" * (64 * 1024 + 1)])
def test_from_bytes_refuses_non_documents(data: bytes) -> None:
    with pytest.raises(ValueError):
        FederationParams.from_bytes(data)


def test_load_names_the_file_when_missing_or_corrupt(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=r"missing\.json"):
        FederationParams.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(ConfigError, match=r"corrupt\.json.*not JSON"):
        FederationParams.load(corrupt)
    edited = tmp_path / "edited.json"
    _shared().save(edited)
    edited.write_text(edited.read_text().replace('"value_bits": 16', '"value_bits": 99'))
    with pytest.raises(ConfigError, match=r"edited\.json.*value_bits"):
        FederationParams.load(edited)


# --- derived values ---------------------------------------------------------------------


def test_weight_for_bounds() -> None:
    params = _shared(samples_per_weight=100, max_weight=64)
    assert params.weight_for(-5) == 1
    assert params.weight_for(0) == 1
    assert params.weight_for(1) == 1
    assert params.weight_for(100) == 1
    assert params.weight_for(101) == 2
    assert params.weight_for(6400) == 64
    assert params.weight_for(6401) == 64
    assert params.weight_for(10**12) == 64


@settings(max_examples=100, deadline=None)
@given(params=federations(), samples=st.integers(-10, 1 << 50))
def test_weight_for_stays_within_the_pinned_bounds(params: FederationParams, samples: int) -> None:
    weight = params.weight_for(samples)
    assert 1 <= weight <= params.max_weight
    assert weight == max(
        1, min(params.max_weight, math.ceil(max(1, samples) / params.samples_per_weight))
    )
    # max_contributors clients of max_weight never overflow the slot headroom
    assert params.max_contributors * params.max_weight <= 1 << params.headroom_bits
    assert params.max_contributors >= params.min_clients


def test_packing_spec_follows_the_federation() -> None:
    params = _shared(value_bits=12, headroom_bits=9, clip=0.25, max_weight=32)
    assert params.packing_spec() == PackingSpec(
        key_bits=512, value_bits=12, headroom_bits=9, clip=0.25
    )
    assert params.packing_spec().max_total_weight >= params.max_contributors * params.max_weight
    assert params.encrypted
    plaintext = FederationParams(mode="plaintext", public_key=None)
    assert not plaintext.encrypted
    with pytest.raises(ValueError, match="no packing"):
        plaintext.packing_spec()


def test_check_key_refuses_a_1024_bit_key_at_the_default_floor() -> None:
    public, _ = generate_keypair(1024)
    params = _shared(public_key=public)
    with pytest.raises(ConfigError, match=r"1024 bits.*2048"):
        params.check_key()
    params.check_key(min_key_bits=1024)  # a test may lower the floor explicitly
    FederationParams(mode="plaintext", public_key=None).check_key()  # no key, nothing to check


def test_check_key_refuses_an_implausible_modulus() -> None:
    params = _shared(public_key=PublicKey(3**323))
    with pytest.raises(ConfigError, match="perfect power"):
        params.check_key(min_key_bits=512)


# --- SessionInfo ------------------------------------------------------------------------


@given(
    num_values=st.integers(1, 1 << 40),
    chunk_items=st.integers(1, 1 << 20),
    model_layout=st.text(max_size=50),
    rounds=st.integers(1, 1 << 40),
)
def test_session_info_round_trip(
    num_values: int, chunk_items: int, model_layout: str, rounds: int
) -> None:
    info = SessionInfo(
        num_values=num_values, chunk_items=chunk_items, model_layout=model_layout, rounds=rounds
    )
    assert SessionInfo.from_wire(info.to_wire()) == info


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_values": 0}, "num_values"),
        ({"num_values": True}, "num_values"),
        ({"chunk_items": (1 << 20) + 1}, "chunk_items"),
        ({"chunk_items": 1.0}, "chunk_items"),
        ({"rounds": 0}, "rounds"),
        ({"model_layout": b"[]"}, "model_layout"),
    ],
)
def test_session_info_refusals_name_the_field(changes: dict[str, Any], field: str) -> None:
    wire: dict[str, Any] = {"num_values": 10, "chunk_items": 4, "model_layout": "[]", "rounds": 3}
    wire.update(changes)
    with pytest.raises(ValueError, match=field):
        SessionInfo.from_wire(wire)


def test_session_info_names_missing_fields() -> None:
    with pytest.raises(ValueError, match="chunk_items, rounds"):
        SessionInfo.from_wire({"num_values": 10, "model_layout": "[]"})


# --- RoundPlan --------------------------------------------------------------------------


@given(
    epochs=st.integers(1, 1 << 20),
    learning_rate=positive_floats,
    seed=st.integers(-(1 << 62), 1 << 62),
    committee=st.lists(st.binary(max_size=20), max_size=MAX_COMMITTEE),
)
def test_round_plan_round_trip(
    epochs: int, learning_rate: float, seed: int, committee: list[bytes]
) -> None:
    plan = RoundPlan(
        epochs=epochs, learning_rate=learning_rate, seed=seed, committee=tuple(committee)
    )
    assert plan.config() == {"epochs": epochs, "lr": learning_rate, "seed": seed}
    assert RoundPlan.from_round_start(plan.config(), tuple(committee)) == plan


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
        ({"lr": 0.0}, "learning_rate"),
        ({"lr": math.nan}, "learning_rate"),
        ({"lr": "0.1"}, "learning_rate"),
        ({"seed": 1 << 63}, "seed"),
        ({"seed": 0.5}, "seed"),
    ],
)
def test_round_plan_refusals_name_the_field(changes: dict[str, Any], field: str) -> None:
    config: dict[str, Any] = {"epochs": 1, "lr": 0.1, "seed": 0}
    config.update(changes)
    with pytest.raises(ValueError, match=field):
        RoundPlan.from_round_start(config, ())


@pytest.mark.parametrize("missing", ["epochs", "lr", "seed"])
def test_round_plan_names_a_missing_config_key(missing: str) -> None:
    config: dict[str, Any] = {"epochs": 1, "lr": 0.1, "seed": 0}
    del config[missing]
    with pytest.raises(ValueError, match=repr(missing)):
        RoundPlan.from_round_start(config, ())


def test_round_plan_refuses_too_many_unmaskers() -> None:
    with pytest.raises(ValueError, match="committee"):
        RoundPlan.from_round_start(
            {"epochs": 1, "lr": 0.1, "seed": 0}, (b"c",) * (MAX_COMMITTEE + 1)
        )


# --- ClientReport -----------------------------------------------------------------------


_TIMING_NAMES = (
    "evaluate_s",
    "train_s",
    "encode_s",
    "encrypt_s",
    "serialize_s",
    "grant_wait_s",
    "upload_s",
)


@given(
    timings=st.dictionaries(st.sampled_from(_TIMING_NAMES), st.floats(0, 1e6, allow_nan=False)),
    iterations=st.integers(0, 1 << 20),
)
def test_client_report_round_trip(timings: dict[str, float], iterations: int) -> None:
    report = ClientReport(timings=timings, iterations=iterations)
    assert ClientReport.from_wire(*report.to_wire()) == report


def test_client_report_carries_no_data_figures() -> None:
    timings, metrics = ClientReport(timings={"train_s": 1.5}, iterations=3).to_wire()
    assert metrics == {"iterations": 3.0}
    assert timings == {"train_s": 1.5}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"timings": {"samples": 3.0}}, "samples"),
        ({"timings": {"train_s": math.inf}}, "train_s"),
        ({"iterations": -1}, "iterations"),
        ({"iterations": (1 << 20) + 1}, "iterations"),
    ],
)
def test_client_report_refusals_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ClientReport(**changes)


def test_client_report_refuses_a_negative_timing() -> None:
    with pytest.raises(ValueError, match="train_s"):
        ClientReport(timings={"train_s": -1.0})


def test_client_report_from_wire_keeps_only_what_it_knows() -> None:
    report = ClientReport.from_wire(
        {"train_s": 2.0, "upload_s": -1.0, "samples_s": 5.0},
        {"iterations": 1e9, "accuracy": 0.9},
    )
    assert report == ClientReport(timings={"train_s": 2.0}, iterations=1 << 20)
    assert ClientReport.from_wire({}, {"iterations": -4.0}).iterations == 0
    assert ClientReport.from_wire({}, {}).iterations == 0


# --- RejectReason -----------------------------------------------------------------------


def test_reject_reason_labels_and_codes_are_unique() -> None:
    labels = [reason.label for reason in RejectReason]
    codes = [reason.code for reason in RejectReason]
    assert len(set(labels)) == len(labels)
    assert len(set(codes)) == len(codes)
    assert all(isinstance(code, ErrorCode) for code in codes)
    assert all(label.isidentifier() and label == label.lower() for label in labels)


def test_reject_reason_for_code_finds_each_reason() -> None:
    for reason in RejectReason:
        assert RejectReason.for_code(reason.code) is reason
    assert RejectReason.for_code(ErrorCode.TIMEOUT) is RejectReason.PROTOCOL_ERROR


def test_default_report_metrics_are_valid() -> None:
    params = FederationParams(mode="plaintext", public_key=None)
    assert params.report_metrics == DEFAULT_REPORT_METRICS
