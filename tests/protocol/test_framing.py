"""Framing: decoding is split-independent, limits are checked before buffering, and
whatever bytes arrive the decoder raises nothing but ProtocolError."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    Heartbeat,
    Hello,
    InvalidMessage,
    LocalProtocolError,
    MalformedFrame,
    Message,
    ProtocolError,
    Role,
    Session,
    UnknownMessageType,
    UnsupportedVersion,
    UpdateChunk,
    encode_frame,
)
from protocol.framing import Sentinel

try:  # tests/ may or may not be a package; work either way
    from .protocol_strategies import messages
except ImportError:
    from protocol_strategies import messages  # type: ignore[no-redef]

SAMPLE: list[Message] = [
    Hello(version=PROTOCOL_VERSION, committee=b"credential"),
    UpdateChunk(round_id=3, seq=0, payload=bytes(range(256)) * 40),
    Heartbeat(sent_at=12.5),
    Ack(round_id=3, accepted=True),
    Bye(reason="done"),
]


def drain(decoder: FrameDecoder) -> list[Message]:
    out: list[Message] = []
    while True:
        event = decoder.next_event()
        if isinstance(event, Sentinel):
            return out
        out.append(event)


def frame(
    type_id: int, body: bytes, *, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION
) -> bytes:
    return struct.pack(">2sBBI", magic, version, type_id, len(body)) + body


@given(st.lists(messages, min_size=1, max_size=5))
def test_frames_round_trip_all_at_once(msgs: list[Message]) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(m) for m in msgs))
    assert drain(decoder) == msgs
    decoder.receive_data(b"")
    assert decoder.next_event() is CLOSED


@given(st.lists(messages, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_frames_round_trip_with_random_splits(msgs: list[Message], rng: random.Random) -> None:
    data = b"".join(encode_frame(m) for m in msgs)
    decoder = FrameDecoder()
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, max(1, len(data) // 3))
        piece = data[pos : pos + step]
        # bytes are kept without copying, bytearrays are copied: exercise both
        decoder.receive_data(bytearray(piece) if rng.random() < 0.5 else piece)
        pos += step
        out.extend(drain(decoder))
    assert out == msgs


def test_frames_round_trip_byte_by_byte() -> None:
    data = b"".join(encode_frame(m) for m in SAMPLE)
    decoder = FrameDecoder()
    out: list[Message] = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        out.extend(drain(decoder))
    assert out == SAMPLE
    assert decoder.buffered == 0


def test_bytes_needed_tracks_header_then_body() -> None:
    data = encode_frame(SAMPLE[1])
    decoder = FrameDecoder()
    assert decoder.bytes_needed == HEADER_SIZE
    decoder.receive_data(data[:3])
    assert decoder.next_event() is NEED_DATA and decoder.bytes_needed == HEADER_SIZE - 3
    decoder.receive_data(data[3:HEADER_SIZE])
    assert decoder.next_event() is NEED_DATA
    assert decoder.bytes_needed == len(data) - HEADER_SIZE
    decoder.receive_data(data[HEADER_SIZE:])
    assert decoder.bytes_needed == 0
    assert decoder.next_event() == SAMPLE[1]


def test_trailing_garbage_after_valid_frames_is_a_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(m) for m in SAMPLE) + b"GARBAGE!")
    assert [decoder.next_event() for _ in SAMPLE] == SAMPLE
    with pytest.raises(MalformedFrame):
        decoder.next_event()


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">2sBBI", MAGIC, PROTOCOL_VERSION, UpdateChunk.type_id, 2**31))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == 0  # refused at the header, without the body; input dropped


def test_frame_at_the_limit_is_accepted_and_one_byte_more_is_not() -> None:
    msg = UpdateChunk(round_id=1, seq=0, payload=bytes(1000))
    data = encode_frame(msg)
    body = len(data) - HEADER_SIZE
    ok = FrameDecoder(max_frame_size=body)
    ok.receive_data(data)
    assert ok.next_event() == msg
    small = FrameDecoder(max_frame_size=body - 1)
    small.receive_data(data)
    with pytest.raises(FrameTooLarge):
        small.next_event()


def test_buffer_limit_is_enforced_on_receive() -> None:
    decoder = FrameDecoder(max_frame_size=1024, max_buffer_size=2048)
    decoder.receive_data(bytes(2000))  # not parsed yet
    with pytest.raises(FrameTooLarge):
        decoder.receive_data(bytes(100))


@pytest.mark.parametrize(
    ("data", "exc"),
    [
        (b"X", MalformedFrame),  # wrong magic is caught at the first byte
        (frame(Ack.type_id, b"", magic=b"FX"), MalformedFrame),
        (
            frame(
                Ack.type_id,
                msgpack.packb({"round_id": 1, "accepted": True}),
                version=PROTOCOL_VERSION + 1,
            ),
            UnsupportedVersion,
        ),
        (frame(99, msgpack.packb({})), UnknownMessageType),
        (frame(Ack.type_id, b""), MalformedFrame),
        (frame(Ack.type_id, b"\xc1"), MalformedFrame),  # 0xc1 is never valid msgpack
        (
            frame(Ack.type_id, msgpack.packb({"round_id": 1, "accepted": True}) + b"\x00"),
            MalformedFrame,
        ),
        (frame(Ack.type_id, msgpack.packb([1, True])), InvalidMessage),
        (frame(Ack.type_id, msgpack.packb({"round_id": 1})), InvalidMessage),
        (
            frame(Ack.type_id, msgpack.packb({"round_id": 1, "accepted": True, "x": 0})),
            InvalidMessage,
        ),
        (frame(Ack.type_id, msgpack.packb({1: 1})), MalformedFrame),  # strict_map_key
        (
            frame(Ack.type_id, msgpack.packb({"round_id": 1, "accepted": True, "reason": b"r"})),
            InvalidMessage,
        ),
        (
            frame(Ack.type_id, msgpack.packb({"round_id": 2**64 - 1, "accepted": True})),
            InvalidMessage,
        ),
        (frame(Heartbeat.type_id, msgpack.packb({"sent_at": float("nan")})), InvalidMessage),
        (
            frame(Heartbeat.type_id, msgpack.packb({"sent_at": msgpack.ExtType(1, b"x")})),
            MalformedFrame,
        ),
        (frame(Bye.type_id, b"\x91" * 5000 + b"\xc0"), MalformedFrame),  # deep nesting
    ],
)
def test_bad_frames_raise_the_specific_error(data: bytes, exc: type[ProtocolError]) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    with pytest.raises(exc):
        decoder.next_event()
    with pytest.raises(exc):  # the decoder stays failed
        decoder.next_event()


def test_eof_at_a_frame_boundary_is_closed_and_inside_a_frame_is_malformed() -> None:
    data = encode_frame(SAMPLE[0])
    clean = FrameDecoder()
    clean.receive_data(data)
    clean.receive_data(b"")
    assert clean.next_event() == SAMPLE[0]
    assert clean.next_event() is CLOSED
    for cut in (3, HEADER_SIZE, len(data) - 1):
        partial = FrameDecoder()
        partial.receive_data(data[:cut])
        assert partial.next_event() is NEED_DATA
        partial.receive_data(b"")
        with pytest.raises(MalformedFrame, match="EOF"):
            partial.next_event()


def test_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


def test_encode_frame_refuses_a_body_over_the_given_limit() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(UpdateChunk(round_id=0, seq=0, payload=bytes(2000)), max_frame_size=1000)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_decoder_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=0)
    with pytest.raises(ValueError, match="max_buffer_size"):
        FrameDecoder(max_frame_size=1000, max_buffer_size=10)
    assert FrameDecoder().max_frame_size == DEFAULT_MAX_FRAME_SIZE


# ---------------------------------------------------------------------------- fuzzing

FUZZ_FRAMES = 100_000


def _mutations(rng: random.Random, seeds: list[bytes]) -> bytes:
    kind = rng.randrange(7)
    base = bytearray(rng.choice(seeds))
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 1:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        return bytes(base)
    if kind == 2:  # truncate
        return bytes(base[: rng.randrange(len(base))])
    if kind == 3:  # huge or wrong length
        struct.pack_into(">I", base, 4, rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)]))
        return bytes(base)
    if kind == 4:  # valid header, random body
        body = rng.randbytes(rng.randrange(0, 48))
        return (
            struct.pack(">2sBBI", MAGIC, PROTOCOL_VERSION, rng.randrange(1, 14), len(body)) + body
        )
    if kind == 5:  # insert or delete inside the body
        i = rng.randrange(HEADER_SIZE, len(base) + 1)
        if rng.random() < 0.5:
            base[i:i] = rng.randbytes(rng.randint(1, 4))
        else:
            del base[i : i + rng.randint(1, 4)]
        return bytes(base)
    return bytes(base) + rng.randbytes(rng.randint(1, 8))  # trailing bytes


@pytest.mark.slow
def test_fuzzed_frames_only_ever_raise_protocol_errors() -> None:
    rng = random.Random(20261125)
    seeds = [
        encode_frame(m)
        for m in [
            *SAMPLE,
            UpdateChunk(round_id=1, seq=2, payload=b"abc"),
            Ack(round_id=1, accepted=False, reason="no"),
        ]
    ]
    outcomes = {"message": 0, "need_data": 0, "error": 0}
    for _ in range(FUZZ_FRAMES):
        data = _mutations(rng, seeds)
        decoder = FrameDecoder(max_frame_size=4096)
        try:
            decoder.receive_data(data)
            if rng.random() < 0.3:
                decoder.receive_data(b"")
            while True:
                event = decoder.next_event()
                if event is NEED_DATA or event is CLOSED:
                    outcomes["need_data"] += 1
                    break
                outcomes["message"] += 1
        except ProtocolError:
            outcomes["error"] += 1
    # every path was exercised, and nothing but ProtocolError escaped
    assert all(outcomes.values()), outcomes


def _decoded(frame: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> object:
    decoder = FrameDecoder(max_frame_size=max_frame_size)
    decoder.receive_data(frame)
    return decoder.next_event()


def test_one_encode_buffer_per_thread_shared_by_sessions_but_not_a_huge_one() -> None:
    from protocol import framing
    from protocol.framing import MAX_RETAINED_ENCODE_BUFFER

    for msg in [*SAMPLE, *SAMPLE]:
        assert _decoded(encode_frame(msg)) == msg
    shared = framing._packers.packer
    assert shared is not None
    for _ in range(2):  # two connections' sessions
        hello = SAMPLE[0]  # a client's first message, legal in a fresh session
        assert _decoded(Session(Role.CLIENT).send(hello)) == hello
    assert framing._packers.packer is shared  # one buffer for every connection
    big = UpdateChunk(round_id=1, seq=0, payload=bytes(MAX_RETAINED_ENCODE_BUFFER + 1))
    assert _decoded(encode_frame(big), 2 * MAX_RETAINED_ENCODE_BUFFER) == big
    assert framing._packers.packer is None  # a frame that large does not pin its buffer
    with pytest.raises(LocalProtocolError):
        encode_frame(big, max_frame_size=100)
    assert _decoded(encode_frame(SAMPLE[0])) == SAMPLE[0]


def test_frame_encoding_from_many_threads_at_once() -> None:
    import concurrent.futures

    messages = [
        UpdateChunk(round_id=1, seq=i % 100, payload=bytes([i % 256]) * (1000 + i))
        for i in range(400)
    ]
    expected = [encode_frame(m) for m in messages]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(encode_frame, messages)) == expected
