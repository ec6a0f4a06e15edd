"""Session: the legal conversations pass, every illegal step raises and leaves ERROR for
good, and late upload frames after RoundEnd are dropped and counted."""

from __future__ import annotations

import pytest

from protocol import (
    PROTOCOL_VERSION,
    TRANSITIONS,
    Ack,
    Bye,
    DecryptRequest,
    DecryptResult,
    Direction,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    IllegalTransition,
    LocalProtocolError,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    Session,
    State,
    UnmaskRequest,
    UnmaskResult,
    UnsupportedVersion,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
    encode_frame,
)
from protocol.framing import NEED_DATA
from protocol.session import MAX_COMMITTEE_REQUESTS

HELLO = Hello(version=PROTOCOL_VERSION, committee=b"credential")
WELCOME = Welcome(
    version=PROTOCOL_VERSION,
    client_id="client-0",
    federation=b"federation",
    session_config={"k": 1},
)
DIGEST = bytes(32)


def start(round_id: int = 7, chunks_received: int = 0) -> RoundStart:
    return RoundStart(
        round_id=round_id,
        weights=b"w",
        clip=1.0,
        value_bits=16,
        deadline_s=30.0,
        chunks_received=chunks_received,
    )


def request(round_id: int = 7) -> UploadRequest:
    return UploadRequest(round_id=round_id)


def grant(start_seq: int = 0, round_id: int = 7) -> UploadGrant:
    return UploadGrant(round_id=round_id, start_seq=start_seq)


def chunk(seq: int, round_id: int = 7) -> UpdateChunk:
    return UpdateChunk(round_id=round_id, seq=seq, payload=b"c%d" % seq)


def done(count: int, round_id: int = 7) -> UpdateDone:
    return UpdateDone(round_id=round_id, chunk_count=count, item_count=count, digest=DIGEST)


class Pair:
    """A client and an aggregator session wired back to back."""

    def __init__(self) -> None:
        self.client = Session(Role.CLIENT)
        self.aggregator = Session(Role.AGGREGATOR)

    def deliver(self, msg: Message) -> Message | None:
        """Send msg from whichever side may send it; return what the other side sees."""
        sender, receiver = (
            (self.client, self.aggregator)
            if (Role.CLIENT, self.client.state, type(msg), Direction.SENT) in TRANSITIONS
            or isinstance(msg, UploadRequest | UpdateChunk | UpdateDone)
            else (self.aggregator, self.client)
        )
        receiver.receive_data(sender.send(msg))
        event = receiver.next_event()
        if event is NEED_DATA:
            return None
        assert event == msg
        assert self.client.state is self.aggregator.state, "the two views must mirror"
        return event

    def ready(self) -> Pair:
        self.deliver(HELLO)
        self.deliver(WELCOME)
        assert self.client.state is State.READY
        return self


def decrypt_request(round_id: int, shard_id: int) -> DecryptRequest:
    return DecryptRequest(
        round_id=round_id,
        shard_id=shard_id,
        start=0,
        item_count=5,
        payload=b"x",
        contributors=b"tokens",
    )


def unmask_request(round_id: int, shard_id: int) -> UnmaskRequest:
    return UnmaskRequest(
        round_id=round_id,
        shard_id=shard_id,
        start=0,
        item_count=5,
        contributors=b"tokens",
        payload=b"masked sums",
    )


def test_a_full_round_and_a_decryption_walk_the_documented_states() -> None:
    pair = Pair()
    assert pair.client.state is State.HANDSHAKE
    pair.deliver(HELLO)
    assert pair.aggregator.state is State.AWAIT_WELCOME
    pair.deliver(WELCOME)
    for msg, state in [
        (start(), State.ROUND),
        (Heartbeat(sent_at=1.0), State.ROUND),
        (request(), State.AWAIT_GRANT),
        (Heartbeat(sent_at=2.0), State.AWAIT_GRANT),
        (grant(), State.UPLOADING),
        (chunk(0), State.UPLOADING),
        (chunk(1), State.UPLOADING),
        (chunk(2), State.UPLOADING),
        (done(3), State.AWAIT_ACK),
        (Ack(round_id=7, accepted=True), State.READY),
        (RoundEnd(round_id=7, status="completed"), State.READY),
        (decrypt_request(7, 2), State.DECRYPTING),
        (
            DecryptResult(
                round_id=7, shard_id=2, item_count=5, payload=b"y", seconds=0.1, randomness=b""
            ),
            State.READY,
        ),
        (unmask_request(7, 3), State.DECRYPTING),
        (
            UnmaskResult(round_id=7, shard_id=3, item_count=5, payload=b"m", seconds=0.1),
            State.READY,
        ),
        (Bye(reason="bye"), State.CLOSED),
    ]:
        pair.deliver(msg)
        assert pair.aggregator.state is state, msg


def test_committee_requests_are_pipelined_and_answered_in_any_order() -> None:
    """Up to three requests in flight; the session is READY again with the last answer."""
    assert MAX_COMMITTEE_REQUESTS == 3
    pair = Pair().ready()
    for msg in (decrypt_request(7, 0), decrypt_request(7, 1), unmask_request(7, 0)):
        pair.deliver(msg)
        assert pair.client.state is pair.aggregator.state is State.DECRYPTING
    answers = [
        UnmaskResult(round_id=7, shard_id=0, item_count=5, payload=b"m", seconds=0.1),
        DecryptResult(
            round_id=7, shard_id=1, item_count=5, payload=b"y", seconds=0.1, randomness=b""
        ),
        DecryptResult(
            round_id=7, shard_id=0, item_count=5, payload=b"y", seconds=0.1, randomness=b""
        ),
    ]
    for index, answer in enumerate(answers):
        pair.deliver(answer)
        expected = State.READY if index == len(answers) - 1 else State.DECRYPTING
        assert pair.client.state is pair.aggregator.state is expected, answer
    assert pair.aggregator.committee_pending == []


def test_an_answer_to_no_outstanding_request_is_refused() -> None:
    pair = Pair().ready()
    pair.deliver(decrypt_request(7, 0))
    pair.deliver(decrypt_request(7, 1))
    wrong = DecryptResult(
        round_id=7, shard_id=2, item_count=5, payload=b"y", seconds=0.1, randomness=b""
    )
    pair.aggregator.receive_data(encode_frame(wrong))
    with pytest.raises(RemoteProtocolError, match=r"shard\) \(7, 0\), DecryptResult"):
        pair.aggregator.next_event()


def test_resumed_upload_starts_at_the_granted_seq() -> None:
    pair = Pair().ready()
    pair.deliver(start(chunks_received=2))
    pair.deliver(request())
    pair.deliver(grant(2))
    pair.deliver(chunk(2))
    pair.deliver(done(3))
    assert pair.aggregator.state is State.AWAIT_ACK


def test_resume_with_every_chunk_already_held_goes_straight_to_done() -> None:
    pair = Pair().ready()
    pair.deliver(start(chunks_received=4))
    pair.deliver(request())
    pair.deliver(grant(4))
    pair.deliver(done(4))
    assert pair.aggregator.state is State.AWAIT_ACK


def test_heartbeats_are_legal_in_every_live_state_both_ways() -> None:
    for state in State:
        if state in (State.CLOSED, State.ERROR):
            continue
        for role in Role:
            for direction in Direction:
                assert TRANSITIONS[(role, state, Heartbeat, direction)] is state


def _remote(role: Role, state_setup: list[Message], bad: Message) -> Session:
    """Drive a session of ``role`` through ``state_setup`` then feed it ``bad`` from the peer."""
    pair = Pair()
    for msg in state_setup:
        pair.deliver(msg)
    session = pair.aggregator if role is Role.AGGREGATOR else pair.client
    session.receive_data(encode_frame(bad))
    return session


ILLEGAL_FROM_CLIENT = [
    ([], chunk(0)),  # nothing before Hello
    ([], WELCOME),  # the client cannot welcome
    ([HELLO], HELLO),  # Hello twice
    ([HELLO, WELCOME], chunk(0)),  # upload without RoundStart
    ([HELLO, WELCOME], done(0)),
    ([HELLO, WELCOME], request()),  # upload request without RoundStart
    ([HELLO, WELCOME], Ack(round_id=7, accepted=True)),  # wrong direction
    ([HELLO, WELCOME, start()], chunk(0)),  # streaming without asking for a slot
    ([HELLO, WELCOME, start()], done(0)),
    ([HELLO, WELCOME, start(), request()], chunk(0)),  # streaming before the grant
    ([HELLO, WELCOME, start(), request()], request()),  # asking twice
    ([HELLO, WELCOME, start()], request(round_id=8)),  # asking for another round
    ([HELLO, WELCOME, start(), request(), grant()], chunk(1)),  # sequence gap at the start
    ([HELLO, WELCOME, start(), request(), grant()], chunk(0, round_id=8)),  # other round
    ([HELLO, WELCOME, start(), request(), grant(), chunk(0)], chunk(2)),  # sequence gap
    ([HELLO, WELCOME, start(), request(), grant(), chunk(0)], chunk(0)),  # repeated seq
    ([HELLO, WELCOME, start(), request(), grant(), chunk(0)], done(2)),  # count mismatch
    ([HELLO, WELCOME, start(), request(), grant(), chunk(0)], done(1, round_id=6)),
    ([HELLO, WELCOME, start(), request(), grant(), chunk(0), done(1)], chunk(1)),  # after done
    # the grant's start_seq, not RoundStart.chunks_received, says where a resume starts
    ([HELLO, WELCOME, start(chunks_received=2), request(), grant(0)], chunk(2)),
    (
        [HELLO, WELCOME, decrypt_request(1, 1)],
        DecryptResult(
            round_id=1, shard_id=2, item_count=1, payload=b"", seconds=0.0, randomness=b""
        ),
    ),
    (  # an unmask answer to a decryption request
        [HELLO, WELCOME, decrypt_request(1, 1)],
        UnmaskResult(round_id=1, shard_id=1, item_count=1, payload=b"", seconds=0.0),
    ),
    (  # a decryption answer to an unmask request
        [HELLO, WELCOME, unmask_request(1, 1)],
        DecryptResult(
            round_id=1, shard_id=1, item_count=1, payload=b"", seconds=0.0, randomness=b""
        ),
    ),
    (
        [HELLO, WELCOME],
        DecryptResult(
            round_id=1, shard_id=1, item_count=1, payload=b"", seconds=0.0, randomness=b""
        ),
    ),
]


@pytest.mark.parametrize(("setup", "bad"), ILLEGAL_FROM_CLIENT)
def test_illegal_message_from_client_is_a_remote_error_and_error_is_permanent(
    setup: list[Message], bad: Message
) -> None:
    session = _remote(Role.AGGREGATOR, setup, bad)
    with pytest.raises(RemoteProtocolError):
        session.next_event()
    assert session.state is State.ERROR
    # permanent: nothing else is accepted either way, not even a heartbeat
    with pytest.raises(ProtocolError):
        session.next_event()
    with pytest.raises(LocalProtocolError):
        session.send(Heartbeat(sent_at=1.0))
    # but we may still tell the peer why, once
    assert session.send(Error(code=ErrorCode.BAD_SEQUENCE, reason="x"))
    with pytest.raises(LocalProtocolError):
        session.send(Error(code=ErrorCode.BAD_SEQUENCE, reason="x"))


def test_violation_codes_name_the_rule() -> None:
    streaming = [HELLO, WELCOME, start(), request(), grant()]
    session = _remote(Role.AGGREGATOR, [*streaming, chunk(0)], done(5))
    with pytest.raises(IllegalTransition) as info:
        session.next_event()
    assert info.value.code is ErrorCode.WRONG_CHUNK_COUNT
    session = _remote(Role.AGGREGATOR, streaming, chunk(3))
    with pytest.raises(IllegalTransition) as info:
        session.next_event()
    assert info.value.code is ErrorCode.BAD_SEQUENCE


ILLEGAL_FROM_AGGREGATOR = [
    ([], WELCOME),  # Welcome before Hello
    ([HELLO, WELCOME], WELCOME),
    ([HELLO, WELCOME, start()], start(8)),  # RoundStart during a round
    ([HELLO, WELCOME], Ack(round_id=7, accepted=True)),  # Ack with nothing to ack
    (
        [HELLO, WELCOME, start(), request(), grant(), chunk(0), done(1)],
        Ack(round_id=6, accepted=True),
    ),
    ([HELLO, WELCOME, start()], grant()),  # a grant nobody asked for
    ([HELLO, WELCOME, start(), request()], grant(round_id=8)),  # for another round
    ([HELLO, WELCOME, start(), request(), grant()], grant()),  # granted twice
    ([HELLO, WELCOME, start()], RoundEnd(round_id=6, status="failed")),  # not the current round
    ([HELLO, WELCOME, start()], decrypt_request(1, 0)),
    ([HELLO, WELCOME, start()], unmask_request(1, 0)),  # committee work only between rounds
    # at most MAX_COMMITTEE_REQUESTS (3) outstanding, and each (kind, round, shard) once
    (
        [HELLO, WELCOME, decrypt_request(1, 0), decrypt_request(1, 1), unmask_request(1, 0)],
        decrypt_request(1, 2),
    ),
    ([HELLO, WELCOME, decrypt_request(1, 0)], decrypt_request(1, 0)),
    ([HELLO, WELCOME, decrypt_request(1, 0), unmask_request(1, 1)], start()),  # mid-decryption
]


@pytest.mark.parametrize(("setup", "bad"), ILLEGAL_FROM_AGGREGATOR)
def test_illegal_message_from_aggregator_is_a_remote_error_for_the_client(
    setup: list[Message], bad: Message
) -> None:
    session = _remote(Role.CLIENT, setup, bad)
    with pytest.raises(RemoteProtocolError):
        session.next_event()
    assert session.state is State.ERROR


def test_sending_illegally_is_a_local_error_and_permanent() -> None:
    client = Session(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(chunk(0))
    assert client.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        client.send(HELLO)


def test_wrong_hello_version_is_unsupported() -> None:
    aggregator = Session(Role.AGGREGATOR)
    aggregator.receive_data(encode_frame(Hello(version=PROTOCOL_VERSION + 1)))
    with pytest.raises(UnsupportedVersion):
        aggregator.next_event()
    assert aggregator.state is State.ERROR


def test_late_frames_after_round_end_are_dropped_and_counted() -> None:
    pair = Pair().ready()
    pair.deliver(start())
    pair.deliver(request())
    pair.deliver(grant())
    # the client has already put chunk 0 and 1 on the wire when the deadline hits
    in_flight = pair.client.send(chunk(0)) + pair.client.send(chunk(1))
    end = RoundEnd(round_id=7, status="closed", reason="deadline")
    pair.client.receive_data(pair.aggregator.send(end))
    assert pair.client.next_event() == end
    pair.aggregator.receive_data(in_flight)
    assert pair.aggregator.next_event() is NEED_DATA
    assert pair.aggregator.late_frames == 2
    # the client's own late sends produce no bytes and no error
    assert pair.client.send(chunk(3)) == b""
    assert pair.client.send(done(4)) == b""
    assert pair.client.late_frames == 2
    # the connection goes on normally with the next round
    pair.deliver(start(8))
    pair.deliver(request(8))
    pair.deliver(grant(round_id=8))
    pair.deliver(chunk(0, round_id=8))
    assert pair.aggregator.state is State.UPLOADING


def test_a_request_in_flight_when_the_round_ends_is_late_not_a_violation() -> None:
    pair = Pair().ready()
    pair.deliver(start())
    in_flight = pair.client.send(request())
    end = RoundEnd(round_id=7, status="completed")
    pair.client.receive_data(pair.aggregator.send(end))
    assert pair.client.next_event() == end
    pair.aggregator.receive_data(in_flight)
    assert pair.aggregator.next_event() is NEED_DATA
    assert pair.aggregator.late_frames == 1
    assert pair.client.state is State.READY and pair.aggregator.state is State.READY


def test_round_end_while_waiting_for_the_grant() -> None:
    pair = Pair().ready()
    pair.deliver(start())
    pair.deliver(request())
    pair.deliver(RoundEnd(round_id=7, status="closed", reason="deadline"))
    assert pair.client.state is State.READY
    assert pair.client.send(chunk(0)) == b""  # late, not an error


def test_late_frames_for_a_round_never_ended_are_still_violations() -> None:
    pair = Pair().ready()
    pair.deliver(start())
    pair.deliver(RoundEnd(round_id=7, status="failed"))
    pair.aggregator.receive_data(encode_frame(chunk(0, round_id=99)))
    with pytest.raises(RemoteProtocolError):
        pair.aggregator.next_event()


def test_round_end_broadcast_in_ready_is_allowed() -> None:
    pair = Pair().ready()
    pair.deliver(RoundEnd(round_id=3, status="completed"))
    assert pair.client.state is State.READY


def test_error_either_way_is_permanent() -> None:
    pair = Pair().ready()
    pair.deliver(Error(code=ErrorCode.STALE_ROUND, reason="old round"))
    assert pair.client.state is State.ERROR and pair.aggregator.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        pair.aggregator.send(start())


def test_nothing_after_bye() -> None:
    pair = Pair().ready()
    pair.deliver(Bye())
    with pytest.raises(LocalProtocolError):
        pair.client.send(Heartbeat(sent_at=1.0))
    # a frame from the side that said Bye is a violation...
    pair.aggregator.receive_data(encode_frame(Heartbeat(sent_at=1.0)))
    with pytest.raises(RemoteProtocolError):
        pair.aggregator.next_event()


def test_frames_in_flight_to_the_side_that_said_bye_are_ignored() -> None:
    pair = Pair().ready()
    pair.client.send(Bye())
    pair.client.receive_data(encode_frame(Heartbeat(sent_at=2.0)))
    assert pair.client.next_event() is NEED_DATA
    assert pair.client.state is State.CLOSED


def test_session_uses_role_frame_limits() -> None:
    aggregator = Session(Role.AGGREGATOR, max_frame_size=100)
    aggregator.receive_data(encode_frame(Hello(version=PROTOCOL_VERSION)))
    assert aggregator.next_event() == Hello(version=PROTOCOL_VERSION)
    aggregator.receive_data(encode_frame(Bye(reason="x" * 200)))
    with pytest.raises(RemoteProtocolError) as info:
        aggregator.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert aggregator.state is State.ERROR
