"""Messages: every type round-trips through its wire map; bad fields are refused when built."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given

try:  # tests/ may or may not be a package; work either way
    from .protocol_strategies import messages
except ImportError:
    from protocol_strategies import messages  # type: ignore[no-redef]

from protocol import (
    MAX_CHUNKS_PER_UPDATE,
    MAX_REASON_LEN,
    MESSAGE_TYPES,
    Ack,
    Bye,
    DecryptResult,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    InvalidMessage,
    KeyProof,
    Message,
    RelayStatus,
    RoundEnd,
    RoundStart,
    UnknownMessageType,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
    message_from_wire,
)


@given(messages)
def test_every_message_round_trips_through_its_wire_map(msg: Message) -> None:
    assert message_from_wire(msg.type_id, msg.to_wire()) == msg


def test_type_ids_are_unique_and_cover_every_message() -> None:
    assert sorted(MESSAGE_TYPES) == list(range(1, 21))
    assert len({cls.__name__ for cls in MESSAGE_TYPES.values()}) == 20


def test_messages_are_frozen_keyword_only_and_slotted() -> None:
    msg = Ack(round_id=1, accepted=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.round_id = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Ack(1, True)  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")


def test_defaults_match_the_documented_api() -> None:
    rs = RoundStart(round_id=0, weights=b"", clip=1.0, value_bits=16, deadline_s=10.0)
    assert rs.chunks_received == 0 and rs.config == {}
    done = UpdateDone(round_id=0, chunk_count=0, item_count=0, digest=bytes(32))
    assert done.timings == {} and done.metrics == {}
    assert Bye().reason == "" and Ack(round_id=0, accepted=False).reason == ""


def test_int_given_for_a_float_field_is_stored_as_float() -> None:
    rs = RoundStart(round_id=0, weights=b"", clip=2, value_bits=16, deadline_s=3)
    assert type(rs.clip) is float and type(rs.deadline_s) is float


def test_error_code_is_an_error_code_member() -> None:
    err = Error(code=int(ErrorCode.STALE_ROUND), reason="old")
    assert err.code is ErrorCode.STALE_ROUND


def test_config_is_copied_from_the_callers_dict() -> None:
    config: dict[str, Any] = {"k": 1}
    rs = RoundStart(round_id=0, weights=b"", clip=1.0, value_bits=8, deadline_s=1.0, config=config)
    config["k"] = 2
    assert rs.config == {"k": 1}


GOOD_WELCOME = {"version": 1, "client_id": "c", "federation": b"", "session_config": {}}
GOOD_DONE = {
    "round_id": 1,
    "chunk_count": 2,
    "item_count": 3,
    "digest": bytes(32),
    "token": b"signed",
}
BAD_VALUES = [
    (Hello, {"version": 256}, ValueError, "version"),
    (Hello, {"version": 1, "committee": "credential"}, TypeError, "committee"),
    (Hello, {"version": 1, "committee": bytes(16 * 1024 + 1)}, ValueError, "committee"),
    (Hello, {"version": 1.0}, TypeError, "version"),
    (Hello, {"version": 1, "relay": True}, TypeError, "relay"),
    (Hello, {"version": 1, "relay": "a/b"}, ValueError, "relay name"),
    (Hello, {"version": 1, "relay": "r" * 65}, ValueError, "relay"),
    (Hello, {"version": 1, "relay": "r-0", "committee": b"c"}, ValueError, "relay"),
    (UpdateDone, {**GOOD_DONE, "contributors": b"tokens"}, ValueError, "not both"),
    (RelayStatus, {"clients": -1}, ValueError, "clients"),
    (
        Welcome,
        {"version": 1, "client_id": "", "federation": b"", "session_config": {}},
        ValueError,
        "client_id",
    ),
    (
        Welcome,
        {"version": 1, "client_id": "c", "federation": "k", "session_config": {}},
        TypeError,
        "federation",
    ),
    (
        Welcome,
        {"version": 1, "client_id": "c", "federation": b"", "session_config": {"a": [1]}},
        TypeError,
        "session_config",
    ),
    (
        Welcome,
        {"version": 1, "client_id": "c", "federation": b"", "session_config": {1: 1}},
        TypeError,
        "session_config",
    ),
    (
        Welcome,
        {"version": 1, "client_id": "c", "federation": b"", "session_config": {"x": math.nan}},
        ValueError,
        "session_config",
    ),
    (
        RoundStart,
        {"round_id": 1, "weights": b"", "clip": 0.0, "value_bits": 8, "deadline_s": 1.0},
        ValueError,
        "clip",
    ),
    (
        RoundStart,
        {"round_id": 1, "weights": b"", "clip": math.inf, "value_bits": 8, "deadline_s": 1.0},
        ValueError,
        "clip",
    ),
    (
        RoundStart,
        {"round_id": 1, "weights": b"", "clip": 1.0, "value_bits": 0, "deadline_s": 1.0},
        ValueError,
        "value_bits",
    ),
    (
        RoundStart,
        {"round_id": 1, "weights": b"", "clip": 1.0, "value_bits": 8, "deadline_s": -1.0},
        ValueError,
        "deadline_s",
    ),
    (
        RoundStart,
        {"round_id": -1, "weights": b"", "clip": 1.0, "value_bits": 8, "deadline_s": 1.0},
        ValueError,
        "round_id",
    ),
    (UploadRequest, {"round_id": -1}, ValueError, "round_id"),
    (UploadGrant, {"round_id": 1, "start_seq": MAX_CHUNKS_PER_UPDATE + 1}, ValueError, "start_seq"),
    (UploadGrant, {"round_id": 1, "start_seq": 1.0}, TypeError, "start_seq"),
    (UpdateChunk, {"round_id": 1, "seq": MAX_CHUNKS_PER_UPDATE, "payload": b""}, ValueError, "seq"),
    (UpdateChunk, {"round_id": 1, "seq": 0, "payload": bytearray(1)}, TypeError, "payload"),
    (UpdateDone, {**GOOD_DONE, "digest": bytes(31)}, ValueError, "digest"),
    (UpdateDone, {**GOOD_DONE, "chunk_count": -1}, ValueError, "chunk_count"),
    (UpdateDone, {**GOOD_DONE, "timings": {"t": "1"}}, TypeError, "timings"),
    (UpdateDone, {**GOOD_DONE, "metrics": {"m": math.inf}}, ValueError, "metrics"),
    (
        Ack,
        {"round_id": 1, "accepted": True, "reason": "x" * (MAX_REASON_LEN + 1)},
        ValueError,
        "reason",
    ),
    (RoundEnd, {"round_id": 1, "status": ""}, ValueError, "status"),
    (
        DecryptResult,
        {
            "round_id": 1,
            "shard_id": 0,
            "item_count": 1,
            "payload": b"",
            "seconds": math.nan,
            "randomness": b"",
        },
        ValueError,
        "seconds",
    ),
    (Welcome, {**GOOD_WELCOME, "key_challenge": bytes(65)}, ValueError, "key_challenge"),
    (KeyProof, {"root": "not bytes"}, TypeError, "root"),
    (UploadGrant, {"round_id": 1, "resume_token": bytes(65)}, ValueError, "resume_token"),
    (UploadRequest, {"round_id": 1, "resume_token": 7}, TypeError, "resume_token"),
    (Heartbeat, {"sent_at": math.nan}, ValueError, "sent_at"),
    (Error, {"code": 12345, "reason": ""}, ValueError, "code"),
    (Error, {"code": ErrorCode.INTERNAL, "reason": None}, TypeError, "reason"),
    (Bye, {"reason": b"bytes"}, TypeError, "reason"),
]


@pytest.mark.parametrize(("cls", "kwargs", "exc", "field"), BAD_VALUES)
def test_invalid_field_is_refused_naming_the_field(
    cls: type, kwargs: dict[str, Any], exc: type[Exception], field: str
) -> None:
    with pytest.raises(exc, match=field):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("type_id", "wire", "match"),
    [
        (Hello.type_id, {"committee": b""}, "missing field 'version'"),
        (Hello.type_id, {"version": 1, "sample_count": 1}, "unexpected field 'sample_count'"),
        (Hello.type_id, [1, 2, 3], "must be a map"),
        (Ack.type_id, {"round_id": "1", "accepted": True}, "round_id"),
        (Bye.type_id, {"reason": 7}, "reason"),
    ],
)
def test_bad_wire_maps_raise_invalid_message(type_id: int, wire: object, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        message_from_wire(type_id, wire)


def test_unknown_type_id_raises_unknown_message_type() -> None:
    with pytest.raises(UnknownMessageType):
        message_from_wire(200, {})
